"""Which folders a node may read and write: the decision, without ComfyUI (``nodes/corridor/folders.py`` feeds it).

The rule follows ComfyUI-Manager's convention for risky operations: what is risky is allowed when the server
listens on loopback only (nobody else can queue a prompt). Here the risky thing is a dataset folder outside
ComfyUI's own folders (input, output, models and every registered model folder): a server reachable from other
machines refuses it unless the person running it allowed that folder with :data:`ALLOWED_FOLDERS_VAR`. Paths are
compared after resolving symlinks and ``..``, so neither can lead outside an allowed root.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

ALLOWED_FOLDERS_VAR = "KILN_ALLOWED_FOLDERS"
LOOPBACK_NAMES = frozenset({"localhost", "localhost."})


def is_loopback_address(address: str) -> bool:
    """``127.0.0.0/8``, ``::1`` (also ``[::1]``, ``::ffff:127.0.0.1``, with a ``%zone``) or ``localhost``."""
    host = address.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    host = host.split("%", 1)[0]
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def listens_on_loopback_only(listen: str | None) -> bool:
    """ComfyUI's ``--listen`` value (comma-separated addresses): True when every address is a loopback one.

    ``None`` or an empty value would make the web server bind every interface, so it is not loopback.
    """
    if not listen:
        return False
    addresses = [a for a in (part.strip() for part in listen.split(",")) if a]
    return bool(addresses) and all(is_loopback_address(a) for a in addresses)


def parse_allowed_folders(value: str | None, separator: str = os.pathsep) -> tuple[Path, ...]:
    """The roots listed in :data:`ALLOWED_FOLDERS_VAR` (``/data/datasets:/mnt/photos``), resolved.

    Raises ``ValueError`` naming an entry that is not an absolute path (a relative root would depend on the
    directory ComfyUI was started from).
    """
    roots = []
    for entry in (value or "").split(separator):
        text = entry.strip()
        if not text:
            continue
        path = Path(text).expanduser()
        if not path.is_absolute():
            raise ValueError(
                f"{ALLOWED_FOLDERS_VAR} lists {text!r}, which is not an absolute path; list absolute folders "
                f"separated by {separator!r}, e.g. {ALLOWED_FOLDERS_VAR}=/data/datasets{separator}/mnt/photos"
            )
        roots.append(_real(path))
    return tuple(roots)


def is_within(path: Path, roots: Iterable[Path]) -> bool:
    """Whether ``path`` (symlinks and ``..`` resolved) is one of ``roots`` or inside one (roots resolved too)."""
    real = _real(path)
    for root in roots:
        r = _real(root)
        if real == r or r in real.parents:
            return True
    return False


def _real(path: Path) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


@dataclass(frozen=True)
class FolderAccess:
    """The facts the decision needs; :meth:`refusal` is the decision."""

    comfy_roots: tuple[Path, ...]  # ComfyUI's input, output, models and registered model folders
    allowed_roots: tuple[Path, ...] = ()  # from KILN_ALLOWED_FOLDERS
    local: bool = True  # no web server, or one that listens on loopback only
    listen: str = "127.0.0.1"  # for the message
    input_dir: Path | None = None  # for the message: where datasets go

    def refusal(self, folder: Path, what: str = "folder") -> str | None:
        """``None`` when ``folder`` may be used, else the message saying why not and how to allow it."""
        if self.local or is_within(folder, self.comfy_roots) or is_within(folder, self.allowed_roots):
            return None
        real = _real(folder)
        shown = f"{folder} (which resolves to {real})" if real != Path(folder) else str(folder)
        move = f"put the images in a folder under {self.input_dir} and give its name, or " if self.input_dir else ""
        return (
            f"{what} {shown} is outside ComfyUI's input, output and models folders, and this ComfyUI server "
            f"listens on {self.listen!r}, so anyone who can reach it could read or write that folder: refused. To "
            f"use it, {move}allow it by starting ComfyUI with the environment variable "
            f"{ALLOWED_FOLDERS_VAR}={real} (several folders separated by {os.pathsep!r})."
        )


def merge_roots(*groups: Sequence[Path]) -> tuple[Path, ...]:
    """The distinct resolved roots of ``groups``, in order."""
    seen: dict[Path, None] = {}
    for group in groups:
        for p in group:
            seen.setdefault(_real(p), None)
    return tuple(seen)
