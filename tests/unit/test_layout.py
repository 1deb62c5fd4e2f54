"""The house rules: the engine never imports ComfyUI, and the package imports cleanly without it."""

import ast
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "server", "nodes",
                 "execution", "node_helpers", "latent_preview"}


def test_lora_core_never_imports_comfyui():
    offenders = []
    for path in sorted((ROOT / "lora_core").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in COMFY_MODULES]
    assert not offenders, offenders


def test_engine_modules_import_each_other_relatively():
    """``lora_core`` must work both as a top-level package and inside the custom-node package."""
    absolute = []
    for path in sorted((ROOT / "lora_core").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("lora_core"):
                absolute.append(str(path.relative_to(ROOT)))
    assert not absolute, absolute


def test_the_package_imports_without_comfyui():
    spec = importlib.util.spec_from_file_location("lora_kiln_pkg", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.WEB_DIRECTORY == "./web/js" and (ROOT / "web" / "js").is_dir()


def test_no_module_shadows_the_standard_library():
    """A module named like a stdlib one (``nodes/types.py`` once) breaks every script run from its folder.

    Running ``python nodes/x.py`` puts ``nodes/`` first on ``sys.path``; a clean venv then imports the package's
    ``types`` instead of the standard library's and ``import argparse`` fails. Checked for every file and package.
    """
    import sys

    skip = {".git", ".venv", "node_modules", "test-artifacts", "__pycache__"}
    offenders = []
    for path in ROOT.rglob("*"):
        if any(part in skip or part.startswith(".") for part in path.relative_to(ROOT).parts):
            continue
        name = path.stem if path.suffix == ".py" else path.name if (path / "__init__.py").is_file() else None
        if name and name != "__init__" and name in sys.stdlib_module_names:
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"rename these (they shadow the standard library): {offenders}"


# Where ComfyUI may be imported under nodes/: the corridor (its internals) and the tiny-checkpoint builder (ComfyUI's
# own model classes). Node modules use only the public node API (comfy_api) and the corridor. The headless runner
# (ComfyUI's executor, a server stand-in) is kiln.py's room, headless/, not a node's.
COMFY_IMPORTERS = {"nodes/tiny_checkpoint.py"}
NODE_API = {"comfy_api"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_corridor_touches_comfyui_internals():
    offenders = []
    for path in sorted((ROOT / "nodes").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("nodes/corridor/") or rel in COMFY_IMPORTERS:
            continue
        bad = (_imports(path) & COMFY_MODULES) - NODE_API
        offenders += [f"{rel}: {name}" for name in sorted(bad)]
    assert not offenders, f"only nodes/corridor/ (and {sorted(COMFY_IMPORTERS)}) may import ComfyUI: {offenders}"
    for rel in COMFY_IMPORTERS:  # the exceptions must still exist, so the list cannot rot silently
        assert (ROOT / rel).is_file(), rel


def test_test_file_names_are_unique():
    """pytest imports test modules by base name (no __init__.py): two test_x.py in different folders break the
    whole collection, which running one file at a time never shows."""
    import collections

    names = collections.Counter(p.name for p in (ROOT / "tests").rglob("test_*.py"))
    assert not [n for n, c in names.items() if c > 1], names


def test_nodes_never_reach_into_kilns_headless_room():
    """headless/ (kiln.py's runner and workflow conversion) uses the nodes; no node module uses it."""
    offenders = []
    for path in sorted((ROOT / "nodes").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level >= 2 and (node.module or "").startswith("headless"):
                offenders.append(path.relative_to(ROOT).as_posix())
    assert not offenders, offenders


def test_comfyui_version_differences_are_probed_in_one_place():
    """Differences between ComfyUI versions live in nodes/corridor/compat.py, found by probing a capability; nothing
    reads ComfyUI's version string to decide what to do."""
    offenders = []
    package = [ROOT / "kiln.py", *(p for d in ("nodes", "lora_core", "headless") for p in (ROOT / d).rglob("*.py"))]
    for path in sorted(package):
        rel = path.relative_to(ROOT).as_posix()
        text = path.read_text(encoding="utf-8")
        if ("comfyui_version" in text or "disable_dynamic" in text) and rel != "nodes/corridor/compat.py":
            offenders.append(rel)
    assert not offenders, offenders
