"""Dataset settings, validated once when they are created."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from .._validate import check_choice, check_int

__all__ = ["CAPTION_EXTENSIONS", "ON_ERROR_CHOICES", "DatasetConfig"]

logger = logging.getLogger(__name__)

CAPTION_EXTENSIONS: tuple[str, ...] = (".txt", ".caption")
ON_ERROR_CHOICES: tuple[str, ...] = ("error", "skip")

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
