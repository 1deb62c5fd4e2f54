"""Dataset settings, validated once when they are created."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from .._validate import check_choice, check_int, check_range

__all__ = ["CAPTION_EXTENSIONS", "FRAME_SAMPLING", "MAX_FRAMES", "ON_ERROR_CHOICES", "DatasetConfig"]

logger = logging.getLogger(__name__)

CAPTION_EXTENSIONS: tuple[str, ...] = (".txt", ".caption")
ON_ERROR_CHOICES: tuple[str, ...] = ("error", "skip")
FRAME_SAMPLING: tuple[str, ...] = ("head", "uniform")
MAX_FRAMES = 257

_MIN_SIDE = 64
_MAX_SIDE = 4096


def _check_type(name: str, value: object, kind: type, what: str) -> None:
    if not isinstance(value, kind):
        raise ValueError(f"{name}={value!r} must be {what}")  # noqa: TRY004 -- config errors are ValueError


def _check_multiple(name: str, value: int, of: int) -> None:
    if value % of:
        raise ValueError(f"{name}={value!r} must be a multiple of {of}")


@dataclass(frozen=True)
class DatasetConfig:
    """Where the training images are and how they are turned into samples.

    Rules (each broken rule raises ``ValueError`` naming the value and what is allowed):

    * ``resolution``: 64..4096, a multiple of 8. Buckets hold at most ``resolution**2`` pixels.
    * ``min_bucket`` / ``max_bucket``: 64..4096, multiples of 8, ``min_bucket <= max_bucket``. If ``resolution``
      lies outside ``[min_bucket, max_bucket]`` the range is widened to include it (``min_bucket`` is lowered to
      ``resolution``, or ``max_bucket`` raised to it), so the defaults work with any resolution; the stored fields
      hold the widened values.
    * ``bucket_step``: 8..256, a multiple of 8. Bucket sides are multiples of it (plus the square
      ``(resolution, resolution)``, which is always a bucket).
    * ``bucketing=False``: every image is resized to cover ``resolution x resolution`` and center-cropped, so
      non-square images lose their edges.
    * ``caption_extension``: ``".txt"`` or ``".caption"`` (``"txt"`` and upper case are accepted and normalised).
    * ``trigger_word``: any text, stripped; empty means none.
    * ``default_repeats``: 1..1000, for images not inside an ``N_name`` folder.
    * ``on_error``: ``"error"`` stops at bad files, ``"skip"`` leaves them out and reports them.
    * ``max_image_pixels``: 1..2**31; larger images are refused before they are decoded (decompression bombs).
      Video frames are held to the same limit.

    Video clips (``.mp4``, ``.webm``, ``.mov``, ``.mkv``, ``.avi``, ``.m4v``, animated ``.gif``; see
    :mod:`lora_core.data.video`):

    * ``frames``: frames per training sample, 1..257 and ``4k+1`` (1, 5, 9, ... 33, 49, 81): the Wan VAE encodes
      the first frame alone and then 4 at a time. ``1`` is an image model's dataset: video files are left out (named
      in a warning; a folder of nothing else is refused) and an animated GIF trains as its first frame. With
      ``frames > 1`` every clip gives one sample per window of ``frames`` frames, and images stay one-frame samples.
    * ``frame_sampling``: ``"head"`` takes one window from the start of each clip; ``"uniform"`` takes ``windows``
      windows spread evenly from its start to its end.
    * ``windows``: 1..64, windows per clip with ``"uniform"`` (a short clip gives fewer; ``1`` is the head).
    * ``fps``: 1..120, the model's frame rate (16 for Wan 2.1, 24 for Wan 2.2 5B). Clips are resampled to it by
      presentation time, so variable-frame-rate clips are sampled correctly.
    * ``max_clip_seconds``: 1..86400; a longer clip is refused (trim it).
    """

    folder: str
    resolution: int = 512
    bucketing: bool = True
    min_bucket: int = 256
    max_bucket: int = 1024
    bucket_step: int = 64
    caption_extension: str = ".txt"
    trigger_word: str = ""
    default_repeats: int = 1
    on_error: str = "error"
    max_image_pixels: int = 178_956_970
    frames: int = 1
    frame_sampling: str = "head"
    windows: int = 1
    fps: float = 16.0
    max_clip_seconds: float = 600.0

    def __post_init__(self) -> None:
        folder = self.folder
        if isinstance(folder, os.PathLike):
            folder = os.fspath(folder)
        _check_type("folder", folder, str, "a string path")
        if not folder.strip():
            raise ValueError("folder='' must name the dataset folder")
        object.__setattr__(self, "folder", folder)

        check_int("resolution", self.resolution, _MIN_SIDE, _MAX_SIDE)
        _check_multiple("resolution", self.resolution, 8)
        _check_type("bucketing", self.bucketing, bool, "True or False")
        check_int("bucket_step", self.bucket_step, 8, 256)
        _check_multiple("bucket_step", self.bucket_step, 8)
        for name in ("min_bucket", "max_bucket"):
            value = getattr(self, name)
            check_int(name, value, _MIN_SIDE, _MAX_SIDE)
            _check_multiple(name, value, 8)
        if self.min_bucket > self.max_bucket:
            raise ValueError(
                f"min_bucket={self.min_bucket} is larger than max_bucket={self.max_bucket}; "
                "min_bucket must be <= max_bucket"
            )
        if self.resolution < self.min_bucket:
            logger.info("min_bucket lowered from %d to resolution=%d", self.min_bucket, self.resolution)
            object.__setattr__(self, "min_bucket", self.resolution)
        if self.resolution > self.max_bucket:
            logger.info("max_bucket raised from %d to resolution=%d", self.max_bucket, self.resolution)
            object.__setattr__(self, "max_bucket", self.resolution)

        ext = self.caption_extension
        if isinstance(ext, str):
            ext = ext.strip().lower()
            if ext and not ext.startswith("."):
                ext = "." + ext
        check_choice("caption_extension", ext, CAPTION_EXTENSIONS)
        object.__setattr__(self, "caption_extension", ext)

        _check_type("trigger_word", self.trigger_word, str, "a string")
        object.__setattr__(self, "trigger_word", self.trigger_word.strip())

        check_int("default_repeats", self.default_repeats, 1, 1000)
        check_choice("on_error", self.on_error, ON_ERROR_CHOICES)
        check_int("max_image_pixels", self.max_image_pixels, 1, 2**31)

        check_int("frames", self.frames, 1, MAX_FRAMES)
        if (self.frames - 1) % 4:
            raise ValueError(
                f"frames={self.frames} must be 4k+1 (1, 5, 9, ... 33, 49, 81): the Wan VAE encodes the first frame "
                "alone and then 4 at a time"
            )
        check_choice("frame_sampling", self.frame_sampling, FRAME_SAMPLING)
        check_int("windows", self.windows, 1, 64)
        check_range("fps", self.fps, 1, 120)
        object.__setattr__(self, "fps", float(self.fps))
        check_range("max_clip_seconds", self.max_clip_seconds, 1, 86400)
        object.__setattr__(self, "max_clip_seconds", float(self.max_clip_seconds))
