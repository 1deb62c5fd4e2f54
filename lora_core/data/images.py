"""Opening training images safely: full decode, EXIF orientation, every colour mode to 8-bit RGB."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import DatasetError, file_size

__all__ = ["IMAGE_EXTENSIONS", "MIN_IMAGE_SIDE", "image_to_tensor", "open_image"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MIN_IMAGE_SIDE = 8

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})

_FIX_REPLACE = "Re-export it or delete it"
# Serialises the rare case where PIL's process-wide pixel limit must be raised for a moment (see _pil_pixel_limit).
_PIL_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _pil_pixel_limit(max_pixels: int) -> Iterator[None]:
    """Make sure PIL's own decompression-bomb check does not refuse what ``max_pixels`` allows.

    With PIL's limit at or above ``max_pixels`` (the usual case) nothing is touched: anything PIL refuses is over
    our limit too. Only when the caller allows more than PIL does, the global limit is raised to ``max_pixels`` for
    this one decode, under a lock, and put back afterwards.
    """
    current = Image.MAX_IMAGE_PIXELS
    if current is None or max_pixels <= current:
        yield
        return
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _over_limit(path: Path, max_pixels: int, size: tuple[int, int] | None) -> DatasetError:
    if size is None:
        what = "the image has more pixels than allowed"
    else:
        w, h = size
        what = f"the image is {w}x{h} = {w * h:,} pixels"
    return DatasetError(
        f"{what}, over the limit max_image_pixels={max_pixels:,} (decompression-bomb guard)",
        path=path,
        fix="Downscale it, or raise max_image_pixels if you trust the file",
    )


def _sixteen_bit_to_8(img: Image.Image) -> Image.Image:
    """Scale a 16-bit or 32-bit integer / float greyscale image to 8-bit "L" by its range, never by clipping.

    * ``I;16*``: the full 0..65535 range maps to 0..255.
    * ``I``: values within 0..65535 are taken as 16-bit data (PIL opens some 16-bit files as "I"); anything else
      is stretched from its own min..max.
    * ``F``: values within 0..1 are taken as normalised; anything else is stretched from its own min..max.
    """
    arr = np.asarray(img).astype(np.float64)
    if arr.size == 0:
        return Image.new("L", img.size)
    finite = np.isfinite(arr)
    if not finite.all():
        arr = np.where(finite, arr, 0.0)
    lo, hi = float(arr.min()), float(arr.max())
    if img.mode.startswith("I;16") or (img.mode == "I" and lo >= 0 and hi <= 65535):
        scaled = arr / 257.0
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        scaled = arr * 255.0
    elif hi > lo:
        scaled = (arr - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.zeros_like(arr)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))  # 2-D uint8 -> mode "L"


def _has_transparency(img: Image.Image) -> bool:
    """Alpha channel, a transparent colour / palette index, or an RGBA palette (``has_transparency_data`` needs
    Pillow 10.1; this works on every supported Pillow)."""
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        return True
    return img.mode == "P" and img.palette is not None and img.palette.mode == "RGBA"


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited over white."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _sixteen_bit_to_8(img)
    if _has_transparency(img):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def open_image(path: str | os.PathLike[str], max_pixels: int) -> Image.Image:
    """Open, fully decode and normalise one image; every problem becomes a :class:`DatasetError`.

    Returns an 8-bit RGB image with its EXIF orientation applied (so ``size`` is the upright size). CMYK, 16-bit
    greyscale (scaled, not clipped), palette, and images with transparency (composited over white) are converted.

    Raises ``DatasetError`` naming the file and the fix for: a missing or unreadable file, a zero-byte file, a file
    that is not an image, a truncated or corrupt image, an image with more than ``max_pixels`` pixels (checked from
    the header before decoding), and an image smaller than 8x8.
    """
    path = Path(path)
    file_size(path, _FIX_REPLACE)

    with _pil_pixel_limit(max_pixels):
        try:
            img = Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise _over_limit(path, max_pixels, None) from None
        except Image.UnidentifiedImageError:
            raise DatasetError(
                f"not a readable image: the content is not a supported image format despite the "
                f"'{path.suffix}' extension",
                path=path,
                fix="Re-export it as PNG or JPEG, or delete it",
            ) from None
        except OSError as e:
            if e.errno is not None:  # a real I/O error, not a format problem
                raise DatasetError(
                    f"the file cannot be read ({e.strerror or e})", path=path, fix="Check its permissions"
                ) from e
            raise DatasetError(f"the file is corrupt (PIL: {e})", path=path, fix=_FIX_REPLACE) from e
        except Exception as e:  # PIL raises many types on hostile headers
            raise DatasetError(f"the file is corrupt (PIL: {e!r})", path=path, fix=_FIX_REPLACE) from e

        with img:
            width, height = img.size
            if width * height > max_pixels:
                raise _over_limit(path, max_pixels, (width, height))
            if width < MIN_IMAGE_SIDE or height < MIN_IMAGE_SIDE:
                raise DatasetError(
                    f"the image is {width}x{height}, too small to train on, at least "
                    f"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} (64x64 recommended)",
                    path=path,
                    fix="Delete it or replace it with a larger version",
                )
            try:
                img.load()
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                raise _over_limit(path, max_pixels, (width, height)) from None
            except Exception as e:  # truncated data, bad chunks, decoder errors of any type
                raise DatasetError(f"the file is truncated or corrupt (PIL: {e})", path=path, fix=_FIX_REPLACE) from e

            try:
                upright = ImageOps.exif_transpose(img)
            except Exception as e:  # a broken EXIF block should not lose an otherwise good image
                logger.warning(
                    "%s: EXIF orientation could not be read (%s); using the image as stored",
                    path.name,
                    e,
                    exc_info=True,
                )
                upright = img

            try:
                rgb = _to_rgb(upright)
            except Exception as e:
                raise DatasetError(
                    f"its colour mode {upright.mode!r} cannot be converted to RGB (PIL: {e})",
                    path=path,
                    fix="Re-save it as an 8-bit RGB PNG or JPEG",
                ) from e
    return rgb


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """An image as a float32 tensor ``[H, W, 3]`` in ``0..1`` (ComfyUI's IMAGE layout without the batch dim)."""
    if img.mode != "RGB":
        img = _to_rgb(img)
    arr = np.array(img, dtype=np.float32)
    arr /= 255.0
    return torch.from_numpy(arr)
