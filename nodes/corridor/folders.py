"""ComfyUI's folders, safe names inside them, and the captioner model folders."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import folder_paths

from ...lora_core.folder_access import (
    ALLOWED_FOLDERS_VAR,
    FolderAccess,
    listens_on_loopback_only,
    merge_roots,
    parse_allowed_folders,
)
from .errors import KilnUserError


def input_directory() -> Path:
    return Path(folder_paths.get_input_directory())


def output_directory() -> Path:
    return Path(folder_paths.get_output_directory())


_overrides: dict[str, Path] = {}


def configure_directories(runs: Path | None = None, loras: Path | None = None) -> None:
    """Headless runs put everything under their own output folder (``None`` restores ComfyUI's folders)."""
    _overrides.clear()
    if runs is not None:
        _overrides["runs"] = Path(runs)
    if loras is not None:
        _overrides["loras"] = Path(loras)


def loras_directory() -> Path:
    return _overrides.get("loras") or Path(folder_paths.get_folder_paths("loras")[0])


def runs_directory() -> Path:
    """Where each LoRA's working files go: ``<runs>/<name>/{checkpoints,logs,samples}``."""
    return _overrides.get("runs") or output_directory() / "lora_kiln"


def run_directory(name: str) -> Path:
    return safe_child(runs_directory(), name, "")


def display_path(path: Path) -> str:
    """A path as the user may see it: relative to ComfyUI's base folder (``models/loras/x.safetensors``).

    Outside it, the full path only in a local headless run; a web client never sees the server's absolute paths
    (it gets the base name), the same rule as the LoRA's metadata.
    """
    base = Path(folder_paths.base_path)
    for candidate, root in ((path, base), (path.resolve(), base.resolve())):
        try:
            return candidate.relative_to(root).as_posix()
        except ValueError:
            continue
    return path.name if web_server_running() else str(path)


def lora_names() -> list[str]:
    return [n for n in folder_paths.get_filename_list("loras") if n.lower().endswith(".safetensors")]


def lora_path(name: str) -> Path:
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise KilnUserError(f"LoRA {name!r} was not found in models/loras; refresh the page and pick it again")
    return Path(path)


_SAFE_PART = re.compile(r"^[\w\-. ]+$", re.UNICODE)


def safe_child(root: Path, relative: str, suffix: str) -> Path:
    """``root/relative`` + suffix, refusing anything that would land outside ``root`` (``..``, absolute, symlinks)."""
    rel = relative.strip().replace("\\", "/")
    if not rel or rel.startswith("/") or re.match(r"^[A-Za-z]:", rel):
        raise KilnUserError(f"name {relative!r} must be a relative name like 'my_lora' or 'kiln/my_lora'")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if any(p == ".." or not _SAFE_PART.match(p) for p in parts):
        raise KilnUserError(
            f"name {relative!r} may only use letters, digits, '-', '_', '.', spaces and '/' between folders "
            "(no '..')"
        )
    name = parts[-1]
    if suffix and name.lower().endswith(suffix):
        name = name[: -len(suffix)]
    target = root.joinpath(*parts[:-1], name + suffix)
    root_real = root.resolve()
    parent_real = target.parent.resolve() if target.parent.exists() else None
    if parent_real is not None and root_real != parent_real and root_real not in parent_real.parents:
        raise KilnUserError(
            f"name {relative!r} resolves outside {display_path(root)} (through a symlink?); choose another name")
    if target.is_symlink():
        raise KilnUserError(f"{target.name} is a symlink; refusing to write through it")
    return target


def unused_path(path: Path) -> Path:
    """``path`` if free, else ``name_00001.ext``, ``name_00002.ext``...: never overwrite silently."""
    if not path.exists():
        return path
    stem, suffix = path.name[: -len("".join(path.suffixes))] or path.stem, "".join(path.suffixes)
    for i in range(1, 100_000):
        candidate = path.with_name(f"{stem}_{i:05d}{suffix}")
        if not candidate.exists():
            return candidate
    raise KilnUserError(f"too many files named {stem}* in {display_path(path.parent)}")


def checkpoint_directory(name: str) -> Path:
    return run_directory(name) / "checkpoints"


def logs_directory(name: str) -> Path:
    return run_directory(name) / "logs"


def samples_directory(name: str) -> Path:
    return run_directory(name) / "samples"


CAPTIONERS_FOLDER = "captioners"


def captioner_directories() -> list[Path]:
    """``models/captioners`` (registered with ComfyUI's folder_paths, so extra_model_paths.yaml can add more)."""
    default = os.path.join(folder_paths.models_dir, CAPTIONERS_FOLDER)
    if CAPTIONERS_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[CAPTIONERS_FOLDER] = ([default], set())
    elif default not in folder_paths.folder_names_and_paths[CAPTIONERS_FOLDER][0]:
        folder_paths.add_model_folder_path(CAPTIONERS_FOLDER, default)
    try:
        os.makedirs(default, exist_ok=True)  # so users find where models go
    except OSError:
        pass
    return [Path(p) for p in folder_paths.get_folder_paths(CAPTIONERS_FOLDER)]


def captioner_names() -> list[str]:
    """The model folders in models/captioners (each a Hugging Face model folder)."""
    names: set[str] = set()
    for root in captioner_directories():
        try:
            names.update(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            continue
    return sorted(names, key=str.lower)


def captioner_path(name: str) -> Path:
    """The folder of captioner ``name``; if there is none, where it is expected (the caller's error names it)."""
    roots = captioner_directories()
    for root in roots:
        candidate = root / name
        if name and "/" not in name and "\\" not in name and name not in (".", "..") and candidate.is_dir():
            return candidate
    return roots[0] / (name or "<name>")



# ---- which folders a prompt may read and write (decision: lora_core/folder_access.py) ----------------

_NOT_DATA_FOLDERS = {"custom_nodes"}  # registered with folder_paths, but code, not models or data


def comfy_roots() -> tuple[Path, ...]:
    """ComfyUI's input, output and models folders and every registered model folder (extra_model_paths too)."""
    roots = [input_directory(), output_directory(), Path(folder_paths.models_dir)]
    for name, (paths, _) in list(folder_paths.folder_names_and_paths.items()):
        if name not in _NOT_DATA_FOLDERS:
            roots.extend(Path(p) for p in paths)
    return merge_roots(roots)


def listen_address() -> str | None:
    """ComfyUI's ``--listen`` (``127.0.0.1`` by default; ``0.0.0.0,::`` for a bare ``--listen``)."""
    import comfy.cli_args

    return getattr(comfy.cli_args.args, "listen", None)


def web_server_running() -> bool:
    """Whether this process serves ComfyUI's web server (``kiln.py`` runs headless: no one else can queue)."""
    module = sys.modules.get("server")
    cls = getattr(module, "PromptServer", None)
    return isinstance(cls, type) and isinstance(getattr(cls, "instance", None), cls)


def folder_access() -> FolderAccess:
    listen = listen_address()
    if not web_server_running() or listens_on_loopback_only(listen):
        return FolderAccess(comfy_roots=(), local=True, listen=str(listen))
    try:
        allowed = parse_allowed_folders(os.environ.get(ALLOWED_FOLDERS_VAR))
    except ValueError as exc:
        raise KilnUserError(str(exc)) from None
    return FolderAccess(comfy_roots=comfy_roots(), allowed_roots=allowed, local=False, listen=str(listen),
                        input_dir=input_directory())


def check_data_folder(path: Path, what: str = "folder") -> Path:
    """``path`` if prompts may read and write it here, else a :class:`KilnUserError` saying how to allow it."""
    message = folder_access().refusal(path, what)
    if message is not None:
        raise KilnUserError(message)
    return path
