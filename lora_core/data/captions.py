"""Reading captions: sidecar text files, HuggingFace-style metadata.csv / metadata.jsonl, trigger words, tags."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from .errors import DatasetError, reading

__all__ = [
    "apply_trigger",
    "decode_text",
    "normalize_caption",
    "read_caption_file",
    "read_metadata_csv",
    "read_metadata_jsonl",
    "split_tags",
    "tag_frequency",
]

logger = logging.getLogger(__name__)

_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_FIX_UTF8 = "Open it in a text editor and save it as UTF-8"
_METADATA_COLUMNS = ("file_name", "text")


def _read_bytes(path: Path) -> bytes:
    with reading(path):
        return path.read_bytes()


def decode_text(data: bytes, path: str | os.PathLike[str]) -> str:
    """Decode a text file: UTF-8 with or without BOM (UTF-16 with a BOM is accepted too, as Notepad writes it).

    Invalid UTF-8 raises :class:`DatasetError` naming the file and the byte offset of the first bad byte.
    """
    if data.startswith(_UTF16_BOMS):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as e:
            raise DatasetError(
                f"the file starts with a UTF-16 byte-order mark but is not valid UTF-16 (byte offset {e.start})",
                path=path,
                fix=_FIX_UTF8,
            ) from None
    skip = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = skip + e.start
        raise DatasetError(
            f"the file is not valid UTF-8 text (byte 0x{data[offset]:02x} at byte offset {offset})",
            path=path,
            fix=_FIX_UTF8,
        ) from None


def normalize_caption(text: str) -> str:
    """CRLF and CR become LF, surrounding whitespace is stripped."""
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def read_caption_file(path: str | os.PathLike[str]) -> str:
    """The caption in a sidecar file, normalised with :func:`normalize_caption`. An empty file gives ``""``."""
    path = Path(path)
    return normalize_caption(decode_text(_read_bytes(path), path))


def _normalize_key(name: str) -> str:
    key = name.strip().replace("\\", "/")
    while key.startswith("./"):
        key = key[2:]
    return key


def _add_row(path: Path, out: dict[str, str], seen: dict[str, int], *, key: str, text: str, line: int) -> None:
    if key in seen:
        raise DatasetError(
            f"{key!r} is listed twice (lines {seen[key]} and {line})",
            path=path,
            fix="Keep one row per image",
        )
    seen[key] = line
    out[key] = text


def read_metadata_csv(path: str | os.PathLike[str]) -> dict[str, str]:
    """``{file_name: caption}`` from a HuggingFace imagefolder ``metadata.csv``.

    The header must contain ``file_name`` and ``text`` (other columns are ignored). Blank lines are skipped.
    Captions are normalised like sidecar files; file names are stripped, ``\\`` becomes ``/`` and a leading ``./``
    is dropped. Missing columns, a row without a file name or text, a duplicate file name, or CSV syntax errors
    raise :class:`DatasetError` naming the line.
    """
    path = Path(path)
    text = decode_text(_read_bytes(path), path)
    reader = csv.reader(io.StringIO(text, newline=""))
    out: dict[str, str] = {}
    seen: dict[str, int] = {}
    try:
        header: list[str] | None = None
        for row in reader:
            if not row or all(not cell.strip() for cell in row):
                continue
            if header is None:
                header = [cell.strip() for cell in row]
                missing = [c for c in _METADATA_COLUMNS if c not in header]
                if missing:
                    raise DatasetError(
                        f"the header is {header!r} but it must contain the columns 'file_name' and 'text' "
                        f"(missing: {', '.join(missing)})",
                        path=path,
                        fix="Rename the columns so the first line reads file_name,text",
                    )
                name_col, text_col = header.index("file_name"), header.index("text")
                continue
            line = reader.line_num
            if len(row) <= max(name_col, text_col):
                raise DatasetError(
                    f"line {line} has {len(row)} column(s) but the header has {len(header)}",
                    path=path,
                    fix="Give every row a file_name and a text cell (quote captions that contain commas)",
                )
            key = _normalize_key(row[name_col])
            if not key:
                raise DatasetError(f"line {line} has an empty file_name", path=path, fix="Fill it in or delete the row")
            _add_row(path, out, seen, key=key, text=normalize_caption(row[text_col]), line=line)
    except csv.Error as e:
        raise DatasetError(
            f"line {reader.line_num} is not valid CSV ({e})", path=path, fix="Fix the quoting on that line"
        ) from None
    if header is None:
        raise DatasetError(
            "the file is empty; it needs a header line file_name,text", path=path, fix="Add the header or delete it"
        )
    return out


def read_metadata_jsonl(path: str | os.PathLike[str]) -> dict[str, str]:
    """``{file_name: caption}`` from a ``metadata.jsonl`` with one ``{"file_name": ..., "text": ...}`` per line.

    Blank lines are skipped; other keys are ignored. A line that is not a JSON object with string ``file_name`` and
    ``text``, or a duplicate file name, raises :class:`DatasetError` naming the line number.
    """
    path = Path(path)
    text = decode_text(_read_bytes(path), path)
    out: dict[str, str] = {}
    seen: dict[str, int] = {}
    fix_line = 'Each line must be one JSON object like {"file_name": "a.png", "text": "a caption"}'
    for number, line in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise DatasetError(f"line {number} is not valid JSON ({e})", path=path, fix=fix_line) from None
        if not isinstance(obj, dict):
            raise DatasetError(f"line {number} is a JSON {type(obj).__name__}, not an object", path=path, fix=fix_line)
        for key in _METADATA_COLUMNS:
            if not isinstance(obj.get(key), str):
                what = "is missing" if key not in obj else f"is {type(obj[key]).__name__}, not a string"
                raise DatasetError(f"line {number}: {key!r} {what}", path=path, fix=fix_line)
        for key in _METADATA_COLUMNS:
            try:
                obj[key].encode("utf-8")
            except UnicodeEncodeError:
                raise DatasetError(
                    f"line {number}: {key!r} contains an unpaired \\u surrogate escape", path=path, fix=fix_line
                ) from None
        name = _normalize_key(obj["file_name"])
        if not name:
            raise DatasetError(f"line {number} has an empty file_name", path=path, fix="Fill it in or delete the line")
        _add_row(path, out, seen, key=name, text=normalize_caption(obj["text"]), line=number)
    return out


def split_tags(caption: str) -> list[str]:
    """Comma-separated tags, stripped, empty ones dropped, case kept."""
    return [tag for tag in (part.strip() for part in caption.split(",")) if tag]


def apply_trigger(caption: str, trigger: str) -> str:
    """Put the trigger word first: ``"trigger, caption"``.

    Left unchanged when the caption already starts with the trigger as whole tag(s) (``"ohwx, man"`` with trigger
    ``"ohwx"``, but not ``"ohwxy, man"``); an empty caption becomes just the trigger; an empty trigger changes
    nothing. A trigger with commas (``"ohwx, man"``) counts as several tags.
    """
    trigger_tags = split_tags(trigger)
    caption = caption.strip()
    if not trigger_tags:
        return caption
    joined = ", ".join(trigger_tags)
    if not caption:
        return joined
    if split_tags(caption)[: len(trigger_tags)] == trigger_tags:
        return caption
    return f"{joined}, {caption}"


def tag_frequency(captions: Iterable[str | None]) -> dict[str, int]:
    """How often each comma-separated tag occurs (kohya's ``ss_tag_frequency`` for one folder); ``None`` skipped."""
    counts: Counter[str] = Counter()
    for caption in captions:
        if caption:
            counts.update(split_tags(caption))
    return dict(counts)
