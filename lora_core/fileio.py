"""Atomic, pickle-free file writes and reads."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

logger = logging.getLogger(__name__)


class SaveError(OSError):
    """A write failed; the previous file at the destination (if any) is untouched."""


class NotEnoughSpace(SaveError):
    """Refused before writing: the folder's disk has less free space than the file needs (plus a reserve)."""

    def __init__(self, folder: Path, needed: int, free: int) -> None:
        self.folder, self.needed, self.free = folder, needed, free
        super().__init__(errno.ENOSPC, self.describe(str(folder)))

    def describe(self, folder: str) -> str:
        return (f"not enough free space in {folder}: writing needs {_size(self.needed)} ({self.needed} bytes, with a "
                f"{_size(FREE_SPACE_RESERVE)} reserve) and {_size(self.free)} are free; free some space and try "
                "again. Nothing already written was touched")


FREE_SPACE_RESERVE = 64 << 20  # left free after any write: a full disk breaks more than this write


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def check_free_space(folder: str | os.PathLike[str], nbytes: int) -> None:
    """Raise :class:`NotEnoughSpace` unless ``folder``'s disk can take ``nbytes`` and still keep the reserve."""
    folder = Path(folder)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:  # cannot tell (a special file system): let the write itself report a problem
        return
    needed = nbytes + FREE_SPACE_RESERVE
    if free < needed:
        raise NotEnoughSpace(folder, needed, free)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to a temp file beside ``path``, fsync it, then rename over ``path``.

    The free space is checked first (:func:`check_free_space`): too little raises :class:`NotEnoughSpace`
    before anything is written. A crash or a full disk at any point leaves either the old file or the new one,
    never a mix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(path.parent, len(data))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        hint = " (the disk is full: free some space and save again)" if exc.errno == errno.ENOSPC else ""
        raise SaveError(exc.errno, f"could not write {path}{hint}; any previous file there is intact: {exc}") from exc
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> Path:
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write_bytes(path, st_save(clean, metadata=dict(metadata) if metadata else None))


def load_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read tensors and metadata. Anything that is not a safetensors file is refused, never unpickled."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(
            f"{path.name}: only .safetensors files are loaded (pickled .ckpt/.pt/.bin files can run code); "
            "convert it to safetensors first"
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise ValueError(f"{path.name}: not a valid safetensors file ({exc}); re-download or re-export it") from exc
    return tensors, metadata


def dumps(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))
