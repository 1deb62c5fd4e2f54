import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "unit"))
sys.path.insert(0, str(ROOT / "tests" / "integration"))  # comfy_harness: importable without ComfyUI


def comfyui_under_test() -> str:
    """``ComfyUI 0.33.0 at /path`` (its comfyui_version.py), or why there is none."""
    import re

    from comfy_harness import find_comfyui

    comfy = find_comfyui()
    if comfy is None:
        return "no ComfyUI (COMFYUI_PATH unset or wrong, none in custom_nodes/.. or ~/comfy/ComfyUI)"
    version_file = comfy / "comfyui_version.py"
    found = re.search(r'__version__\s*=\s*"([^"]+)"', version_file.read_text()) if version_file.is_file() else None
    return f"ComfyUI {found.group(1) if found else '(version unknown)'} at {comfy}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Say loudly how many ComfyUI integration tests ran, so a skipped suite cannot pass unnoticed."""
    counts = {}
    for outcome in ("passed", "failed", "skipped", "error"):
        for rep in terminalreporter.stats.get(outcome, []):
            if "tests/integration/" in getattr(rep, "nodeid", "") and getattr(rep, "when", "call") in ("call", "setup"):
                if outcome == "passed" and rep.when != "call":
                    continue
                counts[outcome] = counts.get(outcome, 0) + 1
    ran = counts.get("passed", 0) + counts.get("failed", 0) + counts.get("error", 0)
    terminalreporter.write_sep("=", "ComfyUI integration tests")
    terminalreporter.write_line(
        f"ComfyUI integration tests: {ran} ran ({counts.get('passed', 0)} passed, {counts.get('failed', 0)} failed, "
        f"{counts.get('error', 0)} errors), {counts.get('skipped', 0)} skipped, on {comfyui_under_test()}"
    )
    if counts.get("skipped") and not ran:
        terminalreporter.write_line("!! ComfyUI was not found: the integration tests were SKIPPED (see README)")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The tiny SD1.5 checkpoint (nodes/tiny_checkpoint.py), built once for the integration and the browser servers.
    Only tests that run against ComfyUI ask for it (they are skipped, unset up, when ComfyUI is absent)."""
    from comfy_harness import build_tiny_checkpoint, find_comfyui

    return build_tiny_checkpoint(find_comfyui(), tmp_path_factory.mktemp("ckpt") / "tiny_sd15.safetensors")
