"""Aspect-ratio buckets: images of similar shape are trained together at about the same pixel count.

Each bucket is ``(width, height)``. Every image goes to the bucket whose aspect ratio is closest to its own, is
resized to just cover it (aspect ratio kept), and the small excess on one side is center-cropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from typing import TYPE_CHECKING

from PIL import Image

from .._validate import check_int

if TYPE_CHECKING:
    from .config import DatasetConfig

__all__ = ["assign_bucket", "bucket_range", "buckets_for_config", "fit_to_bucket", "make_buckets"]

Bucket = tuple[int, int]


def bucket_range(resolution: int) -> tuple[int, int]:
    """The shortest and longest bucket side the nodes use for a training resolution (kohya's usual range).

    256 .. 1024 at SD1.5's 512 px; up to 2048 at SDXL's 1024 px (a 512 x 2048 panorama keeps its shape).
    """
    return min(256, resolution), max(1024, 2 * resolution)


def make_buckets(resolution: int, min_side: int, max_side: int, step: int) -> list[Bucket]:
    """All buckets ``(w, h)`` for a target ``resolution``, sorted from tallest to widest.

    For every width ``w`` that is a multiple of ``step`` within ``[min_side, max_side]`` the bucket gets the largest
    height ``h`` (also a multiple of ``step`` within the range) with ``w * h <= resolution**2``; the transposed
    bucket ``(h, w)`` is added too, so the set is symmetric. The square ``(resolution, resolution)`` is always
    included, even when ``resolution`` is not a multiple of ``step``.
    """
    check_int("resolution", resolution, 1)
    check_int("step", step, 1)
    check_int("min_side", min_side, 1, resolution)
    check_int("max_side", max_side, resolution)
    area = resolution * resolution
    lo = -(-min_side // step) * step
    hi = max_side // step * step
    found: set[Bucket] = {(resolution, resolution)}
    for w in range(lo, hi + 1, step):
        h = min(hi, area // w // step * step)
        if h >= lo:
            found.add((w, h))
            found.add((h, w))
    return sorted(found, key=lambda b: (Fraction(b[0], b[1]), b[0]))


def buckets_for_config(config: DatasetConfig) -> list[Bucket]:
    """The buckets a config trains with: :func:`make_buckets`, or just the square when bucketing is off."""
    if not config.bucketing:
        return [(config.resolution, config.resolution)]
    return make_buckets(config.resolution, config.min_bucket, config.max_bucket, config.bucket_step)


def _ratio_distance(width: int, height: int, bucket: Bucket) -> Fraction:
    """``exp(|log(w/h) - log(bw/bh)|)`` as an exact fraction, so ties are real ties."""
    r = Fraction(width * bucket[1], height * bucket[0])
    return r if r >= 1 else 1 / r


def assign_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest to ``width / height`` in log space; ties go to the larger area."""
    check_int("width", width, 1)
    check_int("height", height, 1)
    if not buckets:
        raise ValueError("buckets is empty; need at least one (width, height) bucket")
    return min(buckets, key=lambda b: (_ratio_distance(width, height, b), -b[0] * b[1], b))


def fit_to_bucket(img: Image.Image, bucket: Bucket) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Resize ``img`` (LANCZOS, aspect ratio kept) to just cover ``bucket``, then center-crop the excess.

    Returns the image of exactly the bucket size and the crop box ``(left, top, right, bottom)`` in the coordinates
    of the resized image (``(0, 0, w, h)`` when nothing was cropped; SDXL's crop conditioning uses ``(top, left)``).
    When the image's aspect ratio differs from the bucket's, one side loses its excess; with bucketing off every
    image goes to the square bucket this way, so non-square images lose their edges.
    """
    bw, bh = bucket
    check_int("bucket width", bw, 1)
    check_int("bucket height", bh, 1)
    w, h = img.size
    if w < 1 or h < 1:
        raise ValueError(f"image size {w}x{h} is empty; need at least 1x1")
    # Scale by the larger of the two ratios so the image covers the bucket on both sides.
    if Fraction(bw, w) >= Fraction(bh, h):
        new_w, new_h = bw, max(bh, round(Fraction(h * bw, w)))
    else:
        new_w, new_h = max(bw, round(Fraction(w * bh, h))), bh
    resized = img if (new_w, new_h) == (w, h) else img.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left = (new_w - bw) // 2
    top = (new_h - bh) // 2
    box = (left, top, left + bw, top + bh)
    out = resized.crop(box) if (new_w, new_h) != (bw, bh) else resized.copy()
    return out, box
