"""Scanning a dataset folder into validated image and clip records.

Layouts:

* flat: images directly in the folder (not recursive), each repeated ``default_repeats`` times;
* kohya: subfolders named ``N_name`` (``N`` = 1..1000) whose images are repeated ``N`` times, plus any images
  directly in the folder (``default_repeats``). Other subfolders are ignored with a warning; hidden ones
  (``.name``) silently.

Captions, per image, first found wins: ``<stem><caption_extension>`` next to the image, the other caption
extension (``.txt`` / ``.caption``), then ``metadata.csv`` or ``metadata.jsonl`` in the same folder (keyed by file
name). Names are matched exactly first and then ignoring case. No caption gives ``caption=None``.

Video clips (``.mp4``, ``.webm``, ``.mov``, ``.mkv``, ``.avi``, ``.m4v``, animated ``.gif``) sit next to the images and
are captioned the same way. With ``frames > 1`` each clip gives one record per window of ``frames`` frames at ``fps``
(see :func:`lora_core.data.video.window_starts`) and images give one-frame records; with ``frames == 1`` (an image
model) video files are left out and named in a warning, and an animated GIF trains as its first frame, as it did
before clips.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .._validate import check_int
from .buckets import assign_bucket, buckets_for_config
from .captions import apply_trigger, read_caption_file, read_metadata_csv, read_metadata_jsonl
from .config import CAPTION_EXTENSIONS, DatasetConfig
from .errors import DatasetError
from .images import IMAGE_EXTENSIONS, open_image
from .video import (
    VIDEO_EXTENSIONS,
    ClipInfo,
    available_frames,
    is_animated,
    is_clip_file,
    probe_clip,
    window_starts,
)

__all__ = ["ImageRecord", "ScanResult", "dataset_fingerprint", "file_digest", "scan_dataset"]

logger = logging.getLogger(__name__)

_REPEAT_DIR = re.compile(r"^(\d+)_(.+)$")
_MAX_REPEATS = 1000
_METADATA_READERS: tuple[tuple[str, Callable[[Path], dict[str, str]]], ...] = (
    ("metadata.csv", read_metadata_csv),
    ("metadata.jsonl", read_metadata_jsonl),
)
_LIST_LIMIT = 10
_UPSCALE_WARN = 2.0
_SKIP_HINT = "or set on_error='skip' to skip bad files"
_MEDIA_EXTENSIONS = frozenset(IMAGE_EXTENSIONS) | frozenset(VIDEO_EXTENSIONS)


@dataclass(frozen=True)
class ImageRecord:
    """One usable training sample: an image, or one window of a video clip.

    ``caption`` is ``None`` when no caption was found (Auto Caption can fill it in), otherwise the caption with the
    trigger word applied. ``width`` / ``height`` are the upright size (after EXIF orientation; for a clip the size
    of its frames as shown, a rotation flag applied); ``bucket`` is the ``(width, height)`` it trains at.

    ``frames`` is the number of frames of the sample (1 for an image) and ``start`` the first frame of a clip's
    window, counted at the dataset's ``fps`` (see :func:`lora_core.data.video.read_clip_frames`). One clip gives one
    record per window, all with the same ``path``.
    """

    path: Path
    caption: str | None
    caption_source: str | None
    repeats: int
    width: int
    height: int
    bucket: tuple[int, int]
    frames: int = 1
    start: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if self.caption is not None and not isinstance(self.caption, str):
            raise ValueError(f"caption={self.caption!r} must be a string or None")
        check_int("repeats", self.repeats, 1)
        check_int("width", self.width, 1)
        check_int("height", self.height, 1)
        if len(self.bucket) != 2:
            raise ValueError(f"bucket={self.bucket!r} must be (width, height)")
        check_int("bucket width", self.bucket[0], 1)
        check_int("bucket height", self.bucket[1], 1)
        object.__setattr__(self, "bucket", tuple(self.bucket))
        check_int("frames", self.frames, 1)
        check_int("start", self.start, 0)
        if (self.frames != 1 or self.start != 0) and self.path.suffix.lower() not in VIDEO_EXTENSIONS:
            raise ValueError(
                f"frames={self.frames}, start={self.start} for {self.path.name}: an image has frames=1 and start=0"
            )

    @property
    def is_clip(self) -> bool:
        """Read from a video file: a video container (``.mp4``, ``.webm``, ...), or a ``.gif`` sampled as more than one
        frame (a GIF read as one frame is an image)."""
        suffix = self.path.suffix.lower()
        return suffix in VIDEO_EXTENSIONS and (suffix != ".gif" or self.frames > 1)


@dataclass(frozen=True)
class ScanResult:
    """What a scan found: usable records, files left out (``on_error='skip'``) and warnings for the user."""

    records: tuple[ImageRecord, ...]
    skipped: tuple[tuple[Path, str], ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def num_images(self) -> int:
        """Every record: images plus clip windows (each window is one sample)."""
        return len(self.records)

    @property
    def num_clips(self) -> int:
        """The records that are clip windows (``num_images - num_clips`` are images)."""
        return sum(1 for r in self.records if r.is_clip)

    @property
    def num_samples(self) -> int:
        """Images counted with their repeats: the samples in one epoch."""
        return sum(r.repeats for r in self.records)

    @property
    def uncaptioned(self) -> tuple[ImageRecord, ...]:
        return tuple(r for r in self.records if r.caption is None)


def _names(items: list[str], limit: int = _LIST_LIMIT) -> str:
    shown = ", ".join(items[:limit])
    return f"{shown} and {len(items) - limit} more" if len(items) > limit else shown


def _list_dir(path: Path) -> list[os.DirEntry[str]]:
    with os.scandir(path) as it:
        return sorted(it, key=lambda e: e.name)


def _is_file(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


@dataclass
class _Folder:
    path: Path
    prefix: str  # "" for the top folder, "10_cat/" for a repeat folder
    repeats: int
    files: list[str] = field(default_factory=list)


class _Scanner:
    def __init__(self, config: DatasetConfig) -> None:
        self.config = config
        self.root = Path(config.folder).expanduser().absolute()
        self.buckets = buckets_for_config(config)
        self.records: list[ImageRecord] = []
        self.skipped: list[tuple[Path, str]] = []
        self.warnings: list[str] = []
        self.errors: list[DatasetError] = []
        self.empty_captions: list[str] = []
        self.upscaled: list[str] = []
        self.ignored_dirs: list[str] = []
        self.variable_rate: list[str] = []
        self.left_out_clips: list[str] = []  # frames=1 (an image model): video files are not training data
        self.gif_stills: list[str] = []  # frames=1: an animated GIF trains as its first frame, as before clips
        self.animated_stills: list[str] = []  # animated WEBP / PNG: read as images (their first frame)

    # -- reporting --------------------------------------------------------------------------------------------------

    def warn(self, message: str) -> None:
        logger.warning("%s", message)
        self.warnings.append(message)

    def problem(self, err: DatasetError, file: Path, skip_note: str = "") -> None:
        """A bad file: collected for raising (on_error='error') or recorded and skipped (on_error='skip')."""
        if self.config.on_error == "skip":
            reason = err.problem + (f"; {skip_note}" if skip_note else "")
            logger.warning("skipped %s: %s", err.label or file, reason)
            self.skipped.append((file, reason))
        else:
            self.errors.append(err)

    # -- layout -----------------------------------------------------------------------------------------------------

    def folders(self) -> list[_Folder]:
        root = self.root
        if not root.exists():
            raise DatasetError(
                f"folder {str(root)!r} does not exist",
                path=root,
                label="dataset",
                fix="Check the path; it is read on the machine that runs ComfyUI",
            )
        if not root.is_dir():
            raise DatasetError(
                f"{str(root)!r} is a file, not a folder",
                path=root,
                label="dataset",
                fix="Give the folder that holds it",
            )
        try:
            entries = _list_dir(root)
        except OSError as e:
            raise DatasetError(
                f"folder {str(root)!r} cannot be listed ({e.strerror or e})",
                path=root,
                label="dataset",
                fix="Check its permissions",
            ) from e

        top = _Folder(root, "", self.config.default_repeats, [e.name for e in entries if _is_file(e)])
        repeat_folders: list[_Folder] = []
        ignored: list[str] = []
        for entry in entries:
            if not _is_dir(entry) or entry.name.startswith("."):
                continue
            match = _REPEAT_DIR.match(entry.name)
            if match is None:
                ignored.append(entry.name)
                continue
            repeats = int(match.group(1))
            sub = root / entry.name
            if not 1 <= repeats <= _MAX_REPEATS:
                self.problem(
                    DatasetError(
                        f"the repeat count {repeats} is out of range; allowed: 1..{_MAX_REPEATS}",
                        path=sub,
                        label=entry.name + "/",
                        fix=f"Rename the folder, e.g. to 10_{match.group(2)}",
                    ),
                    sub,
                    "the folder was skipped",
                )
                continue
            try:
                files = [e.name for e in _list_dir(sub) if _is_file(e)]
            except OSError as e:
                self.problem(
                    DatasetError(
                        f"the folder cannot be listed ({e.strerror or e})",
                        path=sub,
                        label=entry.name + "/",
                        fix="Check its permissions",
                    ),
                    sub,
                    "the folder was skipped",
                )
                continue
            repeat_folders.append(_Folder(sub, entry.name + "/", repeats, files))
        self.ignored_dirs = ignored
        if ignored:
            self.warn(
                f"ignored {len(ignored)} subfolder(s) not named like 10_name (repeats_name): {_names(ignored)}; "
                "only images directly in the folder or in N_name subfolders are used"
            )
        return [top, *repeat_folders]

    # -- per folder -------------------------------------------------------------------------------------------------

    def scan_folder(self, folder: _Folder, images: list[str]) -> None:
        by_case: dict[str, list[str]] = {}
        for name in folder.files:
            by_case.setdefault(name.casefold(), []).append(name)
        present = set(folder.files)

        # Names that differ only by case or extension would share one caption file: refuse to guess.
        by_stem: dict[str, list[str]] = {}
        for name in images:
            by_stem.setdefault(Path(name).stem.casefold(), []).append(name)
        usable: list[str] = []
        for name in images:
            group = by_stem[Path(name).stem.casefold()]
            if len(group) == 1:
                usable.append(name)
            elif name == group[0]:
                labels = [folder.prefix + n for n in group]
                self.problem(
                    DatasetError(
                        f"{' and '.join(labels)} have the same name apart from case or extension, so they would share "
                        f"one caption file",
                        path=folder.path / group[0],
                        label=labels[0],
                        fix="Rename one of them",
                    ),
                    folder.path / group[0],
                    f"all of {', '.join(labels)} were skipped",
                )

        metadata, metadata_name = self.read_metadata(folder, by_case)
        meta_by_case: dict[str, list[str]] = {}
        for key in metadata:
            meta_by_case.setdefault(key.casefold(), []).append(key)
        meta_key: dict[str, str] = {}  # image name -> its metadata row (exact name first, then ignoring case)
        for name in images:
            if name in metadata:
                meta_key[name] = name
            elif len(meta_by_case.get(name.casefold(), ())) == 1:
                meta_key[name] = meta_by_case[name.casefold()][0]

        exts = (self.config.caption_extension, *(e for e in CAPTION_EXTENSIONS if e != self.config.caption_extension))
        for name in usable:
            label = folder.prefix + name
            path = folder.path / name
            caption: str | None = None
            source: str | None = None
            as_clip = is_clip_file(path)
            if as_clip and self.config.frames == 1:  # still images only (an image model, or frames=1 on purpose)
                if path.suffix.lower() != ".gif":
                    self.left_out_clips.append(label)
                    continue
                as_clip = False
                self.gif_stills.append(label)
            clip: ClipInfo | None = None
            starts: list[int] = []
            try:
                for ext in exts:
                    sidecar = self.find(folder, present, by_case, Path(name).stem + ext)
                    if sidecar is not None:
                        try:
                            caption = read_caption_file(folder.path / sidecar)
                        except DatasetError as e:
                            raise e.replace(label=folder.prefix + sidecar) from None
                        source = ext.lstrip(".")
                        break
                else:
                    if name in meta_key:
                        caption, source = metadata[meta_key[name]], metadata_name
                if as_clip:
                    clip, starts = self.probe(path)
                    width, height = clip.width, clip.height
                else:
                    with open_image(path, self.config.max_image_pixels) as img:
                        width, height = img.size
                    if self.config.frames > 1 and path.suffix.lower() in (".webp", ".png") and is_animated(path):
                        self.animated_stills.append(label)
            except DatasetError as e:
                bad = e.path if e.path is not None else path
                note = "" if bad == path else f"{'clip' if as_clip else 'image'} {label} was skipped"
                self.problem(e.replace(label=folder.prefix + bad.name), bad, note)
                continue
            if clip is not None and clip.variable_rate:
                self.variable_rate.append(f"{label} ({clip.source_fps:.3g} fps on average)")
            if caption is not None:
                if not caption:
                    self.empty_captions.append(label)
                if self.config.trigger_word:
                    caption = apply_trigger(caption, self.config.trigger_word)
            bucket = assign_bucket(width, height, self.buckets)
            if max(bucket[0] / width, bucket[1] / height) > _UPSCALE_WARN:
                self.upscaled.append(f"{label} ({width}x{height} -> {bucket[0]}x{bucket[1]})")
            if clip is None:
                self.records.append(ImageRecord(path, caption, source, folder.repeats, width, height, bucket))
            for start in starts:
                self.records.append(
                    ImageRecord(path, caption, source, folder.repeats, width, height, bucket, self.config.frames, start)
                )

        unused = sorted(set(metadata) - set(meta_key.values()))
        if unused:
            self.warn(
                f"{folder.prefix}{metadata_name} lists {len(unused)} file(s) that do not exist in its folder or are "
                f"not images or clips; their rows are ignored: {_names(unused)}"
            )

    def probe(self, path: Path) -> tuple[ClipInfo, list[int]]:
        """Check one clip against the config: its info and the start of every training window."""
        config = self.config
        info = probe_clip(path, config.max_image_pixels)
        if info.duration_s > config.max_clip_seconds:
            raise DatasetError(
                f"the clip is {info.duration_s:.1f} s long, over the {config.max_clip_seconds:g} s a clip may have",
                path=path,
                fix="Trim or split it, e.g. ffmpeg -i in.mp4 -t 60 -c copy out.mp4",
            )
        available = available_frames(info, config.fps)
        starts = window_starts(available, config.frames, config.frame_sampling, config.windows)
        if not starts:
            raise DatasetError(
                f"holds {available} frames at {config.fps:g} fps ({info.duration_s:.2f} s); "
                f"frames={config.frames} needs {config.frames / config.fps:.2f} s",
                path=path,
                fix="Lower frames, or remove the clip",
            )
        return info, starts

    def find(self, folder: _Folder, present: set[str], by_case: dict[str, list[str]], name: str) -> str | None:
        """The file called ``name`` in the folder: exact match first, then ignoring case if that is unambiguous."""
        if name in present:
            return name
        candidates = by_case.get(name.casefold(), [])
        if len(candidates) > 1:
            labels = [folder.prefix + c for c in candidates]
            raise DatasetError(
                f"{' and '.join(labels)} differ only by case, so it is unclear which one to use",
                path=folder.path / candidates[0],
                fix="Rename or delete one of them",
            )
        return candidates[0] if candidates else None

    def read_metadata(self, folder: _Folder, by_case: dict[str, list[str]]) -> tuple[dict[str, str], str]:
        found: list[tuple[str, str, Callable[[Path], dict[str, str]]]] = []
        for canonical, reader in _METADATA_READERS:
            names = by_case.get(canonical, [])
            if names:
                found.append((canonical, names[0], reader))
        if not found:
            return {}, ""
        if len(found) > 1:
            where = folder.prefix or "dataset folder"
            self.warn(
                f"{where}: both metadata.csv and metadata.jsonl exist; using {found[0][1]}, ignoring {found[1][1]}"
            )
        canonical, actual, reader = found[0]
        path = folder.path / actual
        try:
            return reader(path), canonical
        except DatasetError as e:
            self.problem(
                e.replace(label=folder.prefix + actual),
                path,
                "it was ignored, so images without a caption file in that folder have no caption",
            )
            return {}, canonical

    # -- whole scan -------------------------------------------------------------------------------------------------

    def run(self) -> ScanResult:
        folders = self.folders()
        per_folder: list[tuple[_Folder, list[str]]] = []
        other_files: list[str] = []
        hidden: list[str] = []
        for folder in folders:
            images: list[str] = []
            for name in folder.files:
                if Path(name).suffix.lower() not in _MEDIA_EXTENSIONS:
                    other_files.append(folder.prefix + name)
                elif name.startswith("."):  # macOS "._x.jpg" resource forks and the like
                    hidden.append(folder.prefix + name)
                else:
                    images.append(name)
            if folder.prefix and not images:
                self.warn(f"{folder.prefix} contains no images")
            per_folder.append((folder, images))
        if hidden:
            self.warn(f"ignored {len(hidden)} hidden file(s) starting with '.': {_names(hidden)}")

        total = sum(len(images) for _, images in per_folder)
        if total == 0:
            self.raise_no_images(other_files, hidden)

        for folder, images in per_folder:
            self.scan_folder(folder, images)

        if self.errors:
            first, rest = self.errors[0], self.errors[1:]
            fix = f"{first.fix}, {_SKIP_HINT}" if first.fix else _SKIP_HINT[0].upper() + _SKIP_HINT[1:]
            if rest:
                fix += f" ({len(rest)} more problem(s): {_names([e.label or '?' for e in rest])})"
            raise first.replace(fix=fix)
        if not self.records and self.left_out_clips:
            raise DatasetError(
                f"holds only video clips ({_names(self.left_out_clips, 3)}), and frames=1 trains on still images",
                path=self.root,
                label="dataset",
                fix="Clips train video models: connect a Wan model's VAE to Load Dataset and set frames (e.g. 33)",
            )
        if not self.records:
            reasons = [f"{p.name}: {r}" for p, r in self.skipped]
            raise DatasetError(
                f"none of the {total} image(s) and clip(s) in {str(self.root)!r} could be used ({_names(reasons, 3)})",
                path=self.root,
                label="dataset",
                fix="Fix or replace the files listed above",
            )
        if self.empty_captions:
            self.warn(
                f"{len(self.empty_captions)} image(s) have an empty caption"
                f"{' (they train on the trigger word only)' if self.config.trigger_word else ''}: "
                f"{_names(self.empty_captions)}"
            )
        if self.left_out_clips:
            self.warn(
                f"left out {len(self.left_out_clips)} video clip(s), which train video models (a Wan VAE and frames > 1)"
                f": {_names(self.left_out_clips)}"
            )
        if self.gif_stills:
            self.warn(
                f"{len(self.gif_stills)} animated GIF(s) train as their first frame (frames=1): {_names(self.gif_stills)}"
            )
        if self.animated_stills:
            self.warn(
                f"{len(self.animated_stills)} animated WEBP/PNG file(s) train as still images (their first frame), not "
                f"as clips: {_names(self.animated_stills)}; convert them to train on their motion, e.g. "
                "ffmpeg -i clip.webp clip.mp4"
            )
        if self.variable_rate:
            self.warn(
                f"{len(self.variable_rate)} clip(s) have a variable frame rate; they are resampled by timestamp to "
                f"{self.config.fps:g} fps: {_names(self.variable_rate)}"
            )
        if self.upscaled:
            self.warn(
                f"{len(self.upscaled)} image(s) are much smaller than their bucket and are upscaled more than "
                f"{_UPSCALE_WARN:g}x, which looks blurry: {_names(self.upscaled)}"
            )
        records = sorted(self.records, key=lambda r: (r.path.relative_to(self.root).as_posix(), r.start))
        return ScanResult(tuple(records), tuple(self.skipped), tuple(self.warnings))

    def raise_no_images(self, other_files: list[str], hidden: list[str]) -> None:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        if other_files:
            found = (
                f"found {len(other_files)} file(s) ({_names(other_files, 5)}), none with an image extension ({exts}) "
                f"or a video extension ({', '.join(VIDEO_EXTENSIONS)})"
            )
        else:
            found = "found no files"
        if hidden:
            found += f"; {len(hidden)} hidden file(s) starting with '.' are ignored"
        if self.ignored_dirs:
            found += (
                f"; subfolders are read only when named like 10_name, so {_names(self.ignored_dirs, 5)} were not read"
            )
        raise DatasetError(
            f"no images in {str(self.root)!r}: {found}",
            path=self.root,
            label="dataset",
            fix="Put the training images directly in this folder (or in subfolders named like 10_name)",
        )


def scan_dataset(config: DatasetConfig) -> ScanResult:
    """Find, validate and caption every training image and clip of ``config.folder``.

    Every image is fully decoded once (:func:`open_image`); every clip is probed (:func:`probe_clip`: its packets
    are read and its first frame decoded) and gives one record per window. With ``on_error='error'`` the first
    problem is raised as :class:`DatasetError` (its message counts the other problems); with ``on_error='skip'`` bad
    files are logged and listed in ``ScanResult.skipped``. A missing folder, a folder without images or clips, or no
    usable file at all always raises. Records are sorted by their path relative to the folder (a clip's windows by
    their start).
    """
    return _Scanner(config).run()


def dataset_fingerprint(
    folder: str | os.PathLike[str], stat_view: Callable[[str, int, int], tuple[int, int] | None] | None = None
) -> str:
    """A cheap hash of (relative path, size, mtime_ns) of every file the scanner could read, for change detection.

    Covers every file in the folder and in its immediate subfolders, whatever its extension (images, clips, captions,
    metadata; the scanner reads nothing deeper), plus the subfolder names. Nothing is opened. A missing or unreadable
    folder gives a fixed fingerprint rather than an error, so change detection never fails; scanning reports the
    problem.

    ``stat_view(path, size, mtime_ns)`` may present a file differently: it returns the ``(size, mtime_ns)`` to hash,
    or ``None`` to leave the file out. Auto Caption passes its write ledger (``lora_core.caption.WRITTEN.view``) so
    that the caption files it wrote itself do not count as changes.
    """
    root = Path(folder).expanduser()
    digest = hashlib.sha256()
    try:
        top = _list_dir(root)
    except OSError as e:
        digest.update(f"unreadable\0{type(e).__name__}\0{root}".encode("utf-8", "surrogateescape"))
        return digest.hexdigest()
    for entry in top:
        _fingerprint_entry(digest.update, entry, entry.name, stat_view)
        if _is_dir(entry):
            try:
                children = _list_dir(Path(entry.path))
            except OSError:
                continue
            for child in children:
                _fingerprint_entry(digest.update, child, f"{entry.name}/{child.name}", stat_view)
    return digest.hexdigest()


def _fingerprint_entry(
    update: Callable[[bytes], object],
    entry: os.DirEntry[str],
    rel: str,
    stat_view: Callable[[str, int, int], tuple[int, int] | None] | None = None,
) -> None:
    try:
        st = entry.stat()
        is_dir = entry.is_dir()
    except OSError:  # vanished or dangling: its name still counts
        update(f"?\0{rel}\n".encode("utf-8", "surrogateescape"))
        return
    kind = "d" if is_dir else "f"
    size = 0 if is_dir else st.st_size
    mtime = 0 if is_dir else st.st_mtime_ns
    if stat_view is not None and not is_dir:
        shown = stat_view(entry.path, size, mtime)
        if shown is None:
            return
        size, mtime = shown
    update(f"{kind}\0{rel}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))


def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of the file's bytes, as hex (a content key for caches)."""
    path = Path(path)
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError as e:
        raise DatasetError(f"the file cannot be read ({e.strerror or e})", path=path, fix="Check the path") from e
    return digest.hexdigest()
