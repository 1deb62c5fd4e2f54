"""Video clips for video LoRAs (Wan 2.1 / 2.2): probing, resampling to the model's frame rate, reading windows.

PyAV (FFmpeg) reads the containers; nothing here parses video by hand.

A clip is resampled BY PRESENTATION TIME to the target rate ``fps``: target frame ``k`` is the source frame shown at
``t0 + k / fps`` (the last frame whose timestamp is at or before that time; ``t0`` is the first frame's timestamp).
So a 32 fps clip sampled at 16 fps uses every second frame, an 8 fps clip shows each frame twice, and
variable-frame-rate clips (phones, screen recordings, GIFs with per-frame delays) are sampled where their frames
really are. A training sample is a window of ``frames`` consecutive target-rate frames starting at target index
``start``; :func:`window_starts` picks the windows of a clip.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from .._validate import check_choice, check_int, check_range
from .config import FRAME_SAMPLING
from .errors import DatasetError, file_size
from .images import MIN_IMAGE_SIDE

__all__ = [
    "FRAME_SAMPLING",
    "VIDEO_EXTENSIONS",
    "ClipInfo",
    "available_frames",
    "is_clip_file",
    "probe_clip",
    "read_clip_frames",
    "window_starts",
]

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v", ".gif")
# A .gif is a clip only when it is animated; a one-frame GIF stays an image.
_ALWAYS_VIDEO = frozenset(VIDEO_EXTENSIONS) - {".gif"}
SEEK_AFTER_S = 3  # read_clip_frames seeks to windows that start later than this (earlier ones decode from the start)

_FIX_REENCODE = "Re-encode it, e.g. ffmpeg -i in.mp4 -c:v libx264 out.mp4, or delete it"
_VARIABLE_TOLERANCE = Fraction(1, 10)  # frame intervals further than this from their median make a clip variable-rate
_MAX_SLACK = Fraction(1, 1000)  # seconds a timestamp may be late (its rounding to the time base) and still count
_COUNT_EPS = 1e-6  # target frames: float noise in duration * fps


@dataclass(frozen=True)
class ClipInfo:
    """What :func:`probe_clip` found out about a clip.

    * ``width`` / ``height``: the size of the frames as shown, upright (a rotation flag applied).
    * ``duration_s``: from the frame timestamps: last minus first, plus the last frame's own duration.
    * ``source_fps``: the average source rate, ``frame_count / duration_s`` (0 when the duration is unknown).
    * ``frame_count``: the video frames in the file (counted from its packets, not decoded).
    * ``variable_rate``: the intervals between frames differ by more than 10 % (and more than one time-base tick)
      from their median: the clip is a variable-frame-rate one and is resampled by timestamp.
    * ``rotation``: the display rotation in degrees the file asks for (phones), 0 when none; frames are turned by it.
    """

    width: int
    height: int
    duration_s: float
    source_fps: float
    frame_count: int
    variable_rate: bool = False
    rotation: int = 0

    def __post_init__(self) -> None:
        check_int("width", self.width, 1)
        check_int("height", self.height, 1)
        check_range("duration_s", self.duration_s, 0)
        check_range("source_fps", self.source_fps, 0)
        check_int("frame_count", self.frame_count, 1)
        if not isinstance(self.variable_rate, bool):
            raise ValueError(f"variable_rate={self.variable_rate!r} must be True or False")
        check_int("rotation", self.rotation)
        object.__setattr__(self, "duration_s", float(self.duration_s))
        object.__setattr__(self, "source_fps", float(self.source_fps))


# ----------------------------------------------------------------------------------------------------------------------
# helpers


def _check_file(path: Path) -> None:
    file_size(path, _FIX_REENCODE)


def _open(path: Path) -> av.container.InputContainer:
    try:
        return av.open(str(path), mode="r")
    except av.error.FFmpegError as e:
        if isinstance(e, OSError) and not isinstance(e, av.error.InvalidDataError) and e.errno is not None:
            # a real I/O error (permissions, ...), not a format problem
            raise DatasetError(
                f"the file cannot be read ({e.strerror or e})", path=path, fix="Check its permissions"
            ) from e
        raise DatasetError(
            f"not a readable video: the container is corrupt or not a video despite the '{path.suffix}' extension "
            f"(FFmpeg: {getattr(e, 'strerror', None) or e})",
            path=path,
            fix=_FIX_REENCODE,
        ) from e
    except OSError as e:
        raise DatasetError(
            f"the file cannot be read ({e.strerror or e})", path=path, fix="Check its permissions"
        ) from e


def _video_stream(container: av.container.InputContainer, path: Path) -> av.video.stream.VideoStream:
    streams = container.streams.video
    if not streams:
        others = sorted({s.type for s in container.streams})
        held = f" (it holds only {', '.join(others)})" if others else " (it holds no streams: no frames were recorded)"
        raise DatasetError(
            f"the file has no video stream{held}",
            path=path,
            fix="Use a file with a video track, or delete it",
        )
    return streams[0]


def _check_size(path: Path, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise DatasetError(
            f"the frames are {width}x{height} = {width * height:,} pixels, over the limit "
            f"max_image_pixels={max_pixels:,} (decompression-bomb guard)",
            path=path,
            fix="Downscale it, e.g. ffmpeg -i in.mp4 -vf scale=-2:720 out.mp4, or raise max_image_pixels if you "
            "trust the file",
        )
    if width < MIN_IMAGE_SIDE or height < MIN_IMAGE_SIDE:
        raise DatasetError(
            f"the frames are {width}x{height}, too small to train on, at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}",
            path=path,
            fix="Delete it or replace it with a larger version",
        )


def _slack(time_base: Fraction) -> Fraction:
    """How late a timestamp may be and still count as on time: its rounding, at most 1 ms."""
    return min(Fraction(time_base), _MAX_SLACK)


def _rotation(frame: av.VideoFrame) -> int:
    try:
        return int(round(float(getattr(frame, "rotation", 0) or 0))) % 360
    except (TypeError, ValueError):  # side data PyAV cannot read: treat as upright
        return 0


def _has_alpha(frame: av.VideoFrame) -> bool:
    return any(getattr(c, "is_alpha", False) for c in frame.format.components)


def _to_rgb(frame: av.VideoFrame) -> Image.Image:
    """A decoded frame as 8-bit RGB; transparency (GIF, VP9 with alpha) is composited over white, as for images."""
    if _has_alpha(frame):
        rgba = frame.to_ndarray(format="rgba").astype(np.float32)
        alpha = rgba[..., 3:4] / 255.0
        rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
        image = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
    else:
        image = frame.to_image().convert("RGB")
    # a phone's rotation flag, applied as players and ComfyUI's own Load Video apply it (counter-clockwise degrees)
    turns = _rotation(frame) // 90 % 4
    return image.transpose(_TURNS[turns]) if turns else image


_TURNS = {1: Image.Transpose.ROTATE_90, 2: Image.Transpose.ROTATE_180, 3: Image.Transpose.ROTATE_270}


# ----------------------------------------------------------------------------------------------------------------------
# public API


def is_animated(path: str | os.PathLike[str]) -> bool:
    """Whether PIL sees more than one frame in an image file (animated GIF / WEBP / PNG); False when it cannot open it."""
    try:
        with Image.open(path) as img:
            return bool(getattr(img, "is_animated", False))
    except Exception:  # noqa: BLE001 - broken or hostile file: open_image reports it
        return False


def is_clip_file(path: str | os.PathLike[str]) -> bool:
    """Whether the scanner reads ``path`` as a clip: a video container (``.mp4``, ``.webm``, ``.mov``, ``.mkv``, ``.avi``,
    ``.m4v``), or an animated ``.gif``.

    A GIF with one frame is an image. A GIF PIL cannot open counts as an image too, so that the image checks report
    what is wrong with it. Nothing is decoded.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in _ALWAYS_VIDEO:
        return True
    return suffix == ".gif" and is_animated(path)


def probe_clip(path: str | os.PathLike[str], max_pixels: int) -> ClipInfo:
    """Open a clip and find its size, duration, frame rate and frame count; every problem is a :class:`DatasetError`.

    The packets are demuxed (cheap) to read every frame's timestamp, and only the first frame is decoded, to prove
    that the stream decodes and to learn its real size. Raises ``DatasetError`` naming the file and the fix for: a
    missing, unreadable or empty file; a corrupt container or one that is not a video; no video stream; frames over
    ``max_pixels`` (checked from the stream header before anything is decoded, and again on the first frame) or
    smaller than 8x8; no decodable frame; frames without timestamps, or several frames with the same timestamp
    (these cannot be resampled by time).
    """
    path = Path(path)
    check_int("max_pixels", max_pixels, 1)
    _check_file(path)
    container = _open(path)
    try:
        stream = _video_stream(container, path)
        ctx = stream.codec_context
        if ctx.width and ctx.height:
            _check_size(path, ctx.width, ctx.height, max_pixels)
        time_base = stream.time_base
        if time_base is None or time_base <= 0:
            raise DatasetError(
                "the video stream has no time base, so its frames have no times", path=path, fix=_FIX_REENCODE
            )

        stamps: list[int] = []
        durations: dict[int, int] = {}
        missing = 0
        reordered = False  # B-frames: packet durations are decode-order (dts) steps, not display times
        first: av.VideoFrame | None = None
        decode_error: Exception | None = None
        try:
            for packet in container.demux(stream):
                if packet.size == 0 or packet.is_discard:  # flush packets; pre-roll an edit list cuts away
                    continue
                if packet.pts is None:
                    missing += 1
                else:
                    stamps.append(packet.pts)
                    durations[packet.pts] = packet.duration or 0
                    reordered = reordered or (packet.dts is not None and packet.dts != packet.pts)
                if first is None:
                    try:
                        first = next(iter(packet.decode()), None)
                    except av.error.FFmpegError as e:
                        decode_error = e
            if first is None:
                try:
                    first = next(iter(stream.decode(None)), None)  # flush: the decoder may hold frames back
                except av.error.FFmpegError as e:
                    decode_error = e
        except av.error.FFmpegError as e:
            raise DatasetError(
                f"the file is truncated or corrupt (FFmpeg: {getattr(e, 'strerror', None) or e})",
                path=path,
                fix=_FIX_REENCODE,
            ) from e

        count = len(stamps) + missing
        if first is None:
            why = f" (FFmpeg: {getattr(decode_error, 'strerror', None) or decode_error})" if decode_error else ""
            held = f"{count} packet(s)" if count else "no frames"
            raise DatasetError(
                f"no frame of the video could be decoded; the stream holds {held}{why}", path=path, fix=_FIX_REENCODE
            )
        _check_size(path, first.width, first.height, max_pixels)
        if missing:
            raise DatasetError(
                f"{missing} of {count} frame(s) have no timestamp, so the clip cannot be resampled by time",
                path=path,
                fix=_FIX_REENCODE,
            )
        stamps.sort()
        repeated = sum(1 for a, b in zip(stamps, stamps[1:]) if a == b)
        if repeated:
            raise DatasetError(
                f"{repeated} of {count} frame(s) repeat another frame's timestamp (broken timestamps), so the clip "
                "cannot be resampled by time",
                path=path,
                fix=_FIX_REENCODE,
            )

        tb = Fraction(time_base)
        intervals = [(b - a) * tb for a, b in zip(stamps, stamps[1:])]
        median = statistics.median(intervals) if intervals else Fraction(0)
        # the last frame is shown for its own duration (a GIF's delay), or, where that is unknown or only a decode
        # step, for the usual interval
        last = Fraction(0) if reordered else durations.get(stamps[-1], 0) * tb
        if last <= 0:
            last = median
        if last <= 0 and stream.average_rate:
            last = 1 / Fraction(stream.average_rate)
        duration = (stamps[-1] - stamps[0]) * tb + max(last, Fraction(0))
        tolerance = max(median * _VARIABLE_TOLERANCE, tb)
        variable = any(abs(d - median) > tolerance for d in intervals)
        source_fps = count / duration if duration > 0 else Fraction(0)
        turned = _rotation(first) in (90, 270)  # the frames as shown: upright (see _to_rgb)
        return ClipInfo(
            width=first.height if turned else first.width,
            height=first.width if turned else first.height,
            duration_s=float(duration),
            source_fps=float(source_fps),
            frame_count=count,
            variable_rate=variable,
            rotation=_rotation(first),
        )
    finally:
        container.close()


def available_frames(info: ClipInfo, fps: float) -> int:
    """How many frames at ``fps`` the clip holds: the target times ``k / fps`` within its duration (at least 1)."""
    check_range("fps", fps, 0, lo_inclusive=False)
    return max(1, math.ceil(info.duration_s * fps - _COUNT_EPS))


def window_starts(available: int, frames: int, mode: str, windows: int) -> list[int]:
    """The first target-rate frame of every training window of a clip; ``[]`` when the clip is too short.

    * ``"head"``: one window at 0.
    * ``"uniform"``: ``windows`` windows spread evenly from the start to the end of the clip: the starts are
      ``linspace(0, available - frames, windows)`` rounded half up, without duplicates (a short clip gives fewer
      windows than asked for). ``windows=1`` is the head.
    """
    check_int("available", available, 0)
    check_int("frames", frames, 1)
    check_choice("frame_sampling", mode, FRAME_SAMPLING)
    check_int("windows", windows, 1)
    if available < frames:
        return []
    if mode == "head" or windows == 1:
        return [0]
    span, steps = available - frames, windows - 1
    return sorted({(2 * i * span + steps) // (2 * steps) for i in range(windows)})


def read_clip_frames(
    path: str | os.PathLike[str], fps: float, start: int, frames: int, max_pixels: int
) -> list[Image.Image]:
    """Decode the window ``start .. start + frames - 1`` (target-rate indices) of a clip as RGB images.

    Target frame ``k`` is the source frame shown at ``t0 + k / fps``. A window starting more than
    :data:`SEEK_AFTER_S` seconds in is decoded from the keyframe before it (else from the clip's start), and decoding
    stops as soon as the last needed frame is known, so the rest of a long clip is never decoded. All
    returned frames have the size of the first one (a frame of another size, which some streams switch to, is
    resized to it). Raises :class:`DatasetError` when the file cannot be decoded, a frame is over ``max_pixels``,
    a frame has no timestamp, or the clip ends before the window does (it changed since it was scanned).
    """
    path = Path(path)
    check_range("fps", fps, 0, lo_inclusive=False)
    check_int("start", start, 0)
    check_int("frames", frames, 1)
    check_int("max_pixels", max_pixels, 1)
    _check_file(path)
    fps_q = Fraction(fps)
    targets = [Fraction(start + i) / fps_q for i in range(frames)]

    out: list[Image.Image] = []
    size: tuple[int, int] | None = None

    def emit(img: Image.Image) -> None:
        nonlocal size
        if size is None:
            size = img.size
        elif img.size != size:
            img = img.resize(size, Image.Resampling.LANCZOS)
        out.append(img if not out or img is not out[-1] else img.copy())

    # a window well into the clip: jump to the keyframe before it instead of decoding everything up to it (the first
    # frame's timestamp, t0, is read first: the window's times count from it)
    first = _first_pts(path) if targets[0] > SEEK_AFTER_S and path.suffix.lower() != ".gif" else None
    try:
        return _read_window(path, targets, frames, max_pixels, fps, start, first, emit, out)
    except (_SeekMissed, DatasetError):  # could not seek before the window, or the stream after a seek was not one
        if first is None:  # to trust (leading frames of an open GOP): decode from the start, which says what is wrong
            raise
        out.clear()
        size = None
        return _read_window(path, targets, frames, max_pixels, fps, start, None, emit, out)


class _SeekMissed(Exception):
    """A seek landed after the window's first target time (a container without a usable index)."""


def _first_pts(path: Path) -> int | None:
    """The presentation timestamp of a clip's first decoded frame (None when it has none)."""
    container = _open(path)
    try:
        stream = _video_stream(container, path)
        for frame in container.decode(stream):
            return frame.pts
        return None
    except av.error.FFmpegError:
        return None
    finally:
        container.close()


def _read_window(
    path: Path, targets: list[Fraction], frames: int, max_pixels: int, fps: float, start: int, first: int | None,
    emit: Callable[[Image.Image], None], out: list[Image.Image],
) -> list[Image.Image]:
    """read_clip_frames' decoding loop; ``first``: the clip's first timestamp, to seek to the window from."""
    fps_q = Fraction(fps)
    container = _open(path)
    try:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"
        tb = Fraction(stream.time_base) if stream.time_base else None
        if tb is None or tb <= 0:
            raise DatasetError("the video stream has no time base", path=path, fix=_FIX_REENCODE)
        slack = _slack(tb)
        t0: int | None = first
        seeked = False
        if first is not None:
            try:  # the keyframe at or before a second ahead of the window
                container.seek(first + int((targets[0] - 1) / tb), stream=stream, backward=True, any_frame=False)
                seeked = True
            except av.error.FFmpegError:
                raise _SeekMissed from None
        prev: tuple[av.VideoFrame, Fraction] | None = None  # the last frame decoded and its time from t0
        prev_img: Image.Image | None = None
        intervals: list[Fraction] = []
        try:
            for frame in container.decode(stream):
                if frame.pts is None:
                    raise DatasetError(
                        "a frame has no timestamp, so the clip cannot be resampled by time",
                        path=path,
                        fix=_FIX_REENCODE,
                    )
                _check_size(path, frame.width, frame.height, max_pixels)
                if t0 is None:
                    t0 = frame.pts
                when = (frame.pts - t0) * tb
                if seeked and prev is None and when > targets[0] + slack:
                    raise _SeekMissed
                # every pending target before this frame's time shows the previous frame
                while prev is not None and len(out) < frames and targets[len(out)] + slack < when:
                    if prev_img is None:
                        prev_img = _to_rgb(prev[0])
                    emit(prev_img)
                if len(out) == frames:
                    break
                if prev is not None:
                    if when <= prev[1]:
                        raise DatasetError("the frame timestamps do not increase", path=path, fix=_FIX_REENCODE)
                    intervals.append(when - prev[1])
                prev, prev_img = (frame, when), None
        except av.error.FFmpegError as e:
            raise DatasetError(
                f"decoding failed (FFmpeg: {getattr(e, 'strerror', None) or e})", path=path, fix=_FIX_REENCODE
            ) from e

        if len(out) < frames:
            if prev is None:
                raise DatasetError("no frame of the video could be decoded", path=path, fix=_FIX_REENCODE)
            frame, when = prev
            # shown for its own duration or the usual interval, whichever is longer (probe_clip takes one of them)
            own = Fraction(getattr(frame, "duration", None) or 0) * tb
            end = when + max(own, statistics.median(intervals) if intervals else Fraction(0))
            if targets[-1] >= end + slack:
                shown = float(end * fps_q)
                raise DatasetError(
                    f"the clip ends after {shown:.1f} frames at {fps:g} fps, before frame {start + frames} that "
                    "the window needs; it changed since the dataset was scanned",
                    path=path,
                    fix="Run Load Dataset again so the clip is scanned anew",
                )
            if prev_img is None:
                prev_img = _to_rgb(frame)
            while len(out) < frames:
                emit(prev_img)
    finally:
        container.close()
    return out


def clip_still(path: str | os.PathLike[str], max_pixels: int, fps: float = 16.0) -> Image.Image:
    """The frame in the middle of a clip (RGB): what a captioner looks at to describe it."""
    info = probe_clip(path, max_pixels)
    middle = (available_frames(info, fps) - 1) // 2
    return read_clip_frames(path, fps, middle, 1, max_pixels)[0]


def open_picture(path: str | os.PathLike[str], max_pixels: int) -> Image.Image:
    """An image as :func:`~lora_core.data.images.open_image` opens it, or a clip's middle frame (:func:`clip_still`)."""
    from .images import open_image

    return clip_still(path, max_pixels) if is_clip_file(path) else open_image(path, max_pixels)
