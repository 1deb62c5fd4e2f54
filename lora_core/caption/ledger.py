"""A record of the caption files Kiln itself wrote, so change detection can tell them from the user's edits.

Load Dataset re-runs when a file in its folder changes (size or mtime). Auto Caption writes caption files into
that folder, which would make every re-queue look like an edit and re-run the whole graph. Every write goes
through :meth:`WriteLedger.record`; :meth:`WriteLedger.view` then presents a file that is still exactly as Kiln
left it (same size and mtime) as it was *before* Kiln's first write, or as absent if it did not exist. A file
edited afterwards by anyone else no longer matches and shows its real state.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

__all__ = ["WRITTEN", "WriteLedger", "file_stat"]

Stat = tuple[int, int]  # (size, mtime_ns)


def file_stat(path: str | os.PathLike[str]) -> Stat | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _key(path: str | os.PathLike[str]) -> str:
    return os.path.normcase(os.path.realpath(path))


class WriteLedger:
    """Thread-safe map ``path -> (stat after Kiln's write, stat before Kiln's first write or None)``."""

    def __init__(self, limit: int = 200_000) -> None:
        self._entries: OrderedDict[str, tuple[Stat, Stat | None]] = OrderedDict()
        self._lock = threading.Lock()
        self._limit = limit

    def __len__(self) -> int:
        return len(self._entries)

    def _original(self, key: str, stat: Stat | None) -> Stat | None:
        entry = self._entries.get(key)
        if entry is not None and entry[0] == stat:
            return entry[1]
        return stat

    def record(self, path: str | os.PathLike[str], before: Stat | None) -> None:
        """Note that Kiln just wrote ``path``, whose stat was ``before`` (``None``: it did not exist)."""
        after = file_stat(path)
        if after is None:
            return
        key = _key(path)
        with self._lock:
            original = self._original(key, before)  # a second write keeps the state before the first one
            self._entries[key] = (after, original)
            self._entries.move_to_end(key)
            while len(self._entries) > self._limit:
                self._entries.popitem(last=False)

    def view(self, path: str | os.PathLike[str], size: int, mtime_ns: int) -> Stat | None:
        """The stat change detection should see for ``path`` (``None``: treat the file as absent)."""
        if not self._entries:
            return size, mtime_ns
        with self._lock:
            return self._original(_key(path), (size, mtime_ns))

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


WRITTEN = WriteLedger()
