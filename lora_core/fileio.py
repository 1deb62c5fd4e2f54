"""Atomic, pickle-free file writes and reads."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

logger = logging.getLogger(__name__)


class SaveError(OSError):
    """A write failed; the previous file at the destination (if any) is untouched."""


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to a temp file beside ``path``, fsync it, then rename over ``path``.

    A crash or a full disk at any point leaves either the old file or the new one, never a mix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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
