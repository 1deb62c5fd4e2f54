"""Reading the captions an image already has and writing new ones, the way Load Dataset will read them back.

Lookup order (as in :func:`lora_core.data.scan_dataset`): a sidecar ``<stem>.txt`` / ``<stem>.caption`` next to
the image (the configured extension first; exact name, else ignoring case), then a row in the folder's
``metadata.csv`` or ``metadata.jsonl``.

Writes are atomic (temp file + fsync + rename) and recorded in the write ledger. Only caption files are ever
written: a target with an image extension is refused. Sidecars are written at once; metadata files are rewritten
on :meth:`CaptionStore.flush` (the caption loop flushes after every batch).
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..data import CAPTION_EXTENSIONS, IMAGE_EXTENSIONS, DatasetError, decode_text, normalize_caption
from ..data.captions import read_metadata_csv, read_metadata_jsonl
from ..fileio import SaveError, atomic_write_bytes
from .errors import CaptionError
from .ledger import WRITTEN, WriteLedger, file_stat

__all__ = ["WRITE_TARGETS", "CaptionStore", "Existing"]

WRITE_TARGETS: tuple[str, ...] = ("sidecar", "metadata.csv", "sidecar + metadata.csv")
_METADATA = ("metadata.csv", "metadata.jsonl")


@dataclass(frozen=True)
class Existing:
    """The caption an image has on disk: ``text`` is ``None`` when it has none; ``source`` names where it is
    (``"txt"``, ``"caption"``, ``"metadata.csv"``, ``"metadata.jsonl"``) and ``file`` the file."""

    text: str | None
    source: str | None
    file: Path | None


@dataclass
class _Folder:
    path: Path
    by_name: dict[str, list[str]]  # casefolded file name -> actual names
    metadata_file: Path | None = None
    header: list[str] = field(default_factory=list)
    rows: list[dict[str, str]] = field(default_factory=list)  # csv rows / jsonl objects, in file order
    index: dict[str, int] = field(default_factory=dict)  # normalised file_name -> row
    dirty: bool = False


def _norm_key(name: str) -> str:
    key = name.strip().replace("\\", "/")
    while key.startswith("./"):
        key = key[2:]
    return key


class CaptionStore:
    """Existing captions of images, and the writer of new ones, for any number of folders."""

    def __init__(self, write_to: str = "sidecar", caption_extension: str = ".txt", ledger: WriteLedger = WRITTEN) -> None:
        if write_to not in WRITE_TARGETS:
            raise ValueError(f"write_to={write_to!r} is not allowed; choose one of: {', '.join(WRITE_TARGETS)}")
        ext = caption_extension if caption_extension.startswith(".") else "." + caption_extension
        if ext.lower() not in CAPTION_EXTENSIONS:
            raise ValueError(f"caption_extension={caption_extension!r} must be one of {', '.join(CAPTION_EXTENSIONS)}")
        self.write_to = write_to
        self.extensions = (ext.lower(), *(e for e in CAPTION_EXTENSIONS if e != ext.lower()))
        self.ledger = ledger
        self._folders: dict[Path, _Folder] = {}
        self.notes: list[str] = []

    # ---- reading ---------------------------------------------------------------------------------------

    def _folder(self, path: Path) -> _Folder:
        folder = self._folders.get(path)
        if folder is not None:
            return folder
        try:
            names = [e.name for e in os.scandir(path) if e.is_file()]
        except OSError as exc:
            raise CaptionError(f"folder {path} cannot be listed ({exc.strerror or exc}); check its permissions") from exc
        by_name: dict[str, list[str]] = {}
        for name in sorted(names):
            by_name.setdefault(name.casefold(), []).append(name)
        folder = _Folder(path, by_name)
        for meta in _METADATA:
            found = by_name.get(meta)
            if found:
                folder.metadata_file = path / found[0]
                self._read_metadata(folder)
                break
        self._folders[path] = folder
        return folder

    def _read_metadata(self, folder: _Folder) -> None:
        file = folder.metadata_file
        assert file is not None
        try:  # the dataset layer's readers validate (duplicates, missing columns, bad UTF-8) with clear messages
            (read_metadata_csv if file.name.lower().endswith(".csv") else read_metadata_jsonl)(file)
            text = decode_text(file.read_bytes(), file)
        except (DatasetError, OSError) as exc:
            raise CaptionError(f"{exc} (Auto Caption reads and updates this file; fix or delete it)") from None
        if file.name.lower().endswith(".csv"):
            rows = [r for r in csv.reader(io.StringIO(text, newline="")) if r and any(c.strip() for c in r)]
            folder.header = [c.strip() for c in rows[0]]
            for row in rows[1:]:
                folder.rows.append({h: (row[i] if i < len(row) else "") for i, h in enumerate(folder.header)})
        else:
            for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
                if line.strip():
                    folder.rows.append(json.loads(line))
        folder.index = {_norm_key(str(r["file_name"])): i for i, r in enumerate(folder.rows)}

    def _sidecar(self, folder: _Folder, image: Path) -> Path | None:
        for ext in self.extensions:
            want = image.stem + ext
            if want in folder.by_name.get(want.casefold(), []):
                return folder.path / want
            candidates = folder.by_name.get(want.casefold(), [])
            if len(candidates) == 1:
                return folder.path / candidates[0]
        return None

    def _row(self, folder: _Folder, image: Path) -> int | None:
        if image.name in folder.index:
            return folder.index[image.name]
        matches = [i for k, i in folder.index.items() if k.casefold() == image.name.casefold()]
        return matches[0] if len(matches) == 1 else None

    def existing(self, image: str | os.PathLike[str]) -> Existing:
        """The caption ``image`` has on disk now (what Load Dataset would read, without its trigger word)."""
        image = Path(image)
        folder = self._folder(image.parent)
        sidecar = self._sidecar(folder, image)
        if sidecar is not None:
            try:
                data = sidecar.read_bytes()
                return Existing(normalize_caption(decode_text(data, sidecar)), sidecar.suffix.lower().lstrip("."), sidecar)
            except (DatasetError, OSError) as exc:
                raise CaptionError(f"{exc} (the caption file of {image.name}; fix or delete it)") from None
        row = self._row(folder, image)
        if row is not None and folder.metadata_file is not None:
            return Existing(normalize_caption(str(folder.rows[row].get("text", ""))), folder.metadata_file.name.lower(),
                            folder.metadata_file)
        return Existing(None, None, None)

    # ---- writing ---------------------------------------------------------------------------------------

    def _atomic(self, path: Path, data: bytes) -> None:
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            raise CaptionError(f"refusing to write {path}: it has an image extension")
        before = file_stat(path)
        try:
            atomic_write_bytes(path, data)
        except SaveError as exc:
            raise CaptionError(f"could not write {path}: {exc}. Check that the folder is writable") from None
        self.ledger.record(path, before)

    def write(self, image: str | os.PathLike[str], caption: str) -> tuple[str, list[Path]]:
        """Store ``caption`` for ``image``; returns (the source Load Dataset will read it from, files written now)."""
        image = Path(image)
        folder = self._folder(image.parent)
        written: list[Path] = []
        source = ""
        if self.write_to in ("sidecar", "sidecar + metadata.csv"):
            target = self._sidecar(folder, image) or image.with_name(image.stem + self.extensions[0])
            if target == image:
                raise CaptionError(f"refusing to write over the image {image}")
            self._atomic(target, caption.encode("utf-8"))
            folder.by_name.setdefault(target.name.casefold(), [target.name])
            written.append(target)
            source = target.suffix.lower().lstrip(".")
        if self.write_to in ("metadata.csv", "sidecar + metadata.csv"):
            self._set_row(folder, image, caption)
            if not source:
                sidecar = self._sidecar(folder, image)
                if sidecar is not None:
                    self.notes.append(
                        f"{image.name}: Load Dataset reads {sidecar.name} before {folder.metadata_file.name}; "
                        f"delete {sidecar.name} to use the new caption"
                    )
                    source = sidecar.suffix.lower().lstrip(".")
                else:
                    source = folder.metadata_file.name.lower()
        return source, written

    def _set_row(self, folder: _Folder, image: Path, caption: str) -> None:
        if folder.metadata_file is None:
            folder.metadata_file = folder.path / "metadata.csv"
            folder.header = ["file_name", "text"]
            folder.by_name.setdefault("metadata.csv", ["metadata.csv"])
        row = self._row(folder, image)
        if row is None:
            entry: dict[str, str] = {h: "" for h in folder.header} if folder.header else {}
            entry["file_name"] = image.name
            folder.rows.append(entry)
            row = len(folder.rows) - 1
            folder.index[image.name] = row
        folder.rows[row]["text"] = caption
        folder.dirty = True

    def flush(self) -> list[Path]:
        """Write every metadata file changed since the last flush; returns them."""
        out = []
        for folder in self._folders.values():
            if not folder.dirty or folder.metadata_file is None:
                continue
            if folder.metadata_file.name.lower().endswith(".csv"):
                buf = io.StringIO()
                writer = csv.writer(buf, lineterminator="\n")
                writer.writerow(folder.header)
                for r in folder.rows:
                    writer.writerow([r.get(h, "") for h in folder.header])
                data = buf.getvalue()
            else:
                data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in folder.rows)
            self._atomic(folder.metadata_file, data.encode("utf-8"))
            folder.dirty = False
            out.append(folder.metadata_file)
        return out
