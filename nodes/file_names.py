"""Names of the files Kiln writes: length limits checked before writing, paths shown without the server's folders.

No ComfyUI import: the callers pass the folders (``comfy_bridge.loras_directory()`` etc.). A name that is too long
for the file system used to fail deep in the write with ``[Errno 36] File name too long: '<full server path>'``;
here it fails first, saying which part is too long, the limit, and never where the server keeps its files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

NAME_MAX = 255  # bytes per path component on ext4, XFS, btrfs, APFS, NTFS (UTF-16 units there)
PATH_MAX = 260 if os.name == "nt" else 4096
# lora_core.fileio.atomic_write_bytes writes ".<name>.<8 random characters>.tmp" beside the target first.
TEMP_EXTRA = len("..") + 8 + len(".tmp")
UNUSED_SUFFIX = len("_00000")  # comfy_bridge.unused_path appends this when the name is taken
# Checkpoints: "<name>_step<8 digits><tag>.kiln.safetensors" in "<runs>/<name>/checkpoints/".
CHECKPOINT_EXTRA = len("_step") + 8 + len("_cancelled") + len(".kiln.safetensors")
CHECKPOINT_FOLDER = "checkpoints"


def _limits(folder: Path) -> tuple[int, int]:
    """(NAME_MAX, PATH_MAX) of the file system ``folder`` is on (its nearest existing ancestor)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    name_max, path_max = NAME_MAX, PATH_MAX
    for key, default in (("PC_NAME_MAX", NAME_MAX), ("PC_PATH_MAX", PATH_MAX)):
        try:
            value = os.pathconf(probe, key)
        except (AttributeError, OSError, ValueError):  # Windows has no pathconf
            value = default
        if key == "PC_NAME_MAX":
            name_max = min(value, NAME_MAX) if value > 0 else NAME_MAX
        else:
            path_max = value if value > 0 else PATH_MAX
    return name_max, path_max


def _parts(relative: str) -> list[str]:
    return [p for p in relative.strip().replace("\\", "/").split("/") if p not in ("", ".")]


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[:n] + "…"


def _check(what: str, relative: str, folders: list[str], last: str, extra: int, full_path: str,
           name_max: int, path_max: int) -> None:
    """``last`` is the user's part of the file name; Kiln adds up to ``extra`` bytes to it (suffixes, temp name)."""
    size = len(last.encode("utf-8"))
    if size + extra > name_max:
        raise ValueError(
            f"{what} {_short(relative)!r} is too long: {size} bytes, and at most {max(name_max - extra, 0)} fit "
            f"(the file system allows {name_max} bytes per file name, and Kiln adds up to {extra} for the suffix, "
            "a number and a temporary name while writing); choose a shorter name"
        )
    for part in folders:
        size = len(part.encode("utf-8"))
        if size > name_max:
            raise ValueError(
                f"{what} {_short(relative)!r}: the folder name {_short(part)!r} is {size} bytes, over the file "
                f"system's limit of {name_max} bytes per name; choose a shorter name"
            )
    size = len(full_path.encode("utf-8")) + extra
    if size > path_max:
        raise ValueError(
            f"{what} {_short(relative)!r}: the whole path would be {size} bytes, over this system's limit of "
            f"{path_max}; choose a shorter name or fewer folders"
        )


def check_file_name(root: Path, relative: str, suffix: str, what: str = "name") -> None:
    """Refuse (``ValueError``) a ``relative`` name whose file ``root/relative+suffix`` could not be written.

    Room is kept for the number :func:`comfy_bridge.unused_path` may append and for the temporary file.
    """
    parts = _parts(relative)
    if not parts:
        return
    stem = parts[-1][: -len(suffix)] if suffix and parts[-1].lower().endswith(suffix) else parts[-1]
    name_max, path_max = _limits(root)
    full = os.path.join(str(root), *parts[:-1], stem)
    extra = len(suffix.encode("utf-8")) + UNUSED_SUFFIX + TEMP_EXTRA
    _check(what, relative, parts[:-1], stem, extra, full, name_max, path_max)


def check_run_name(root: Path, name: str, what: str = "name") -> None:
    """Refuse a LoRA ``name`` whose run folder ``root/name`` or checkpoint files could not be written."""
    parts = _parts(name)
    if not parts:
        return
    name_max, path_max = _limits(root)
    full = os.path.join(str(root), *parts, CHECKPOINT_FOLDER, parts[-1])
    _check(what, name, parts, parts[-1], CHECKPOINT_EXTRA + TEMP_EXTRA, full, name_max, path_max)


def shown_path(path: Path, roots: Mapping[str, Path]) -> str:
    """``path`` as a client may see it: relative to the first of ``roots`` (label -> folder) that holds it,
    prefixed with its label (``models/loras/x.safetensors``); else its base name. Never an absolute path."""
    for label, root in roots.items():
        for candidate, base in ((path, root), (path.resolve(), root.resolve())):
            try:
                rel = candidate.relative_to(base)
            except ValueError:
                continue
            return str(PurePosixPath(label, rel.as_posix())) if rel.parts else label
    return path.name


def scrub(message: str, roots: Mapping[str, Path]) -> str:
    """``message`` with each of ``roots`` (absolute folders) written as its label instead."""
    pairs = []
    for label, root in roots.items():
        pairs += [(str(root), label), (str(root.resolve()), label)]
    for absolute, label in sorted(set(pairs), key=lambda p: len(p[0]), reverse=True):
        message = message.replace(absolute, label)
    return message
