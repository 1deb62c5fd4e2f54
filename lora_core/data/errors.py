"""The one exception type the dataset layer raises for bad user data."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["DatasetError", "file_size", "reading"]


class DatasetError(ValueError):
    """A problem with the user's dataset: a bad file, a bad folder, a bad caption or metadata file.

    The message always starts with the file (or folder) it is about and ends with what to do, e.g.
    ``"photo_03.png: the file is truncated or corrupt (PIL: ...). Re-export it or delete it."``

    Attributes:
        path: the file or folder the problem is about, or ``None`` when there is none.
        problem: what is wrong, without the label and without the fix.
        fix: what the user can do about it (may be empty).
        label: how the file is named in the message (by default the file name; the scanner uses the path relative
            to the dataset folder so that files in different subfolders can be told apart).
    """

    def __init__(
        self,
        problem: str,
        *,
        path: str | os.PathLike[str] | None = None,
        fix: str = "",
        label: str | None = None,
    ) -> None:
        self.path: Path | None = Path(path) if path is not None else None
        self.problem = problem
        self.fix = fix
        if label is None and self.path is not None:
            label = self.path.name or str(self.path)
        self.label = label
        super().__init__(self._compose())

    def _compose(self) -> str:
        text = f"{self.label}: {self.problem}" if self.label else self.problem
        return f"{text}. {self.fix}." if self.fix else f"{text}."

    def replace(self, *, problem: str | None = None, fix: str | None = None, label: str | None = None) -> DatasetError:
        """A copy with some parts changed (the path is kept); the original traceback is not carried over."""
        return DatasetError(
            self.problem if problem is None else problem,
            path=self.path,
            fix=self.fix if fix is None else fix,
            label=self.label if label is None else label,
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (self.problem, self.path, self.fix, self.label))


def _rebuild(problem: str, path: Path | None, fix: str, label: str | None) -> DatasetError:
    return DatasetError(problem, path=path, fix=fix, label=label)


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turn the OS's errors about reading ``path`` into a :class:`DatasetError` naming it and what to do."""
    try:
        yield
    except FileNotFoundError:
        raise DatasetError("the file does not exist", path=path, fix="Check the path") from None
    except OSError as e:
        raise DatasetError(
            f"the file cannot be read ({e.strerror or e})", path=path, fix="Check its permissions"
        ) from e


def file_size(path: Path, empty_fix: str) -> int:
    """The size of a readable, non-empty file, else a :class:`DatasetError` (``empty_fix``: what to do if empty)."""
    with reading(path):
        size = path.stat().st_size
    if size == 0:
        raise DatasetError("the file is empty (0 bytes)", path=path, fix=empty_fix)
    return size
