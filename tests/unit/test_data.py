"""Unit tests for lora_core.data: config, images, buckets, captions, scanning. Images are made on the fly."""

from __future__ import annotations

import ast
import hashlib
import io
import logging
import os
import pickle
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from lora_core.data import (
    IMAGE_EXTENSIONS,
    DatasetConfig,
    DatasetError,
    ImageRecord,
    ScanResult,
    apply_trigger,
    assign_bucket,
    buckets_for_config,
    dataset_fingerprint,
    file_digest,
    fit_to_bucket,
    image_to_tensor,
    make_buckets,
    open_image,
    read_caption_file,
    read_metadata_csv,
    read_metadata_jsonl,
    scan_dataset,
    tag_frequency,
)

BIG = 10**9

# --------------------------------------------------------------------------------------------------------------------
# helpers


def save(
    path: Path, size: tuple[int, int] = (64, 48), color: tuple[int, ...] = (200, 30, 10), mode: str = "RGB"
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width x height`` but that has no pixel data at all."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk + end)
    return path


def noisy(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def cfg(folder: Path, **kw: object) -> DatasetConfig:
    return DatasetConfig(folder=str(folder), **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------------------
# the module stays framework independent


def test_data_package_imports_only_stdlib_numpy_pil_torch() -> None:
    allowed = {"numpy", "PIL", "torch", "lora_core", "av"}  # av: PyAV decodes the clips
    pkg = Path(__file__).resolve().parents[2] / "lora_core" / "data"
    files = sorted(pkg.glob("*.py"))
    assert len(files) >= 6
    for file in files:
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [(node.module or "").split(".")[0]]
            else:
                continue
            for root in roots:
                assert root in allowed or root in sys.stdlib_module_names, f"{file.name} imports {root}"


# --------------------------------------------------------------------------------------------------------------------
# config


def test_config_defaults_are_valid_and_frozen(tmp_path: Path) -> None:
    c = cfg(tmp_path)
    assert (c.resolution, c.min_bucket, c.max_bucket, c.bucket_step) == (512, 256, 1024, 64)
    assert c.on_error == "error"
    assert c.caption_extension == ".txt"
    assert c.default_repeats == 1
    with pytest.raises(AttributeError):
        c.resolution = 768  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"resolution": 32}, "resolution=32"),
        ({"resolution": 4104}, "resolution=4104"),
        ({"resolution": 516}, "multiple of 8"),
        ({"resolution": 512.0}, "resolution=512.0"),
        ({"resolution": True}, "resolution=True"),
        ({"bucket_step": 4}, "bucket_step=4"),
        ({"bucket_step": 12}, "multiple of 8"),
        ({"bucket_step": 264}, "bucket_step=264"),
        ({"min_bucket": 32}, "min_bucket=32"),
        ({"max_bucket": 8192}, "max_bucket=8192"),
        ({"min_bucket": 100}, "multiple of 8"),
        ({"min_bucket": 1024, "max_bucket": 512}, "min_bucket=1024"),
        ({"caption_extension": ".md"}, "caption_extension='.md'"),
        ({"on_error": "ignore"}, "on_error='ignore'"),
        ({"default_repeats": 0}, "default_repeats=0"),
        ({"default_repeats": 1001}, "default_repeats=1001"),
        ({"max_image_pixels": 0}, "max_image_pixels=0"),
        ({"max_image_pixels": 2**31 + 1}, "max_image_pixels="),
        ({"bucketing": "yes"}, "bucketing='yes'"),
        ({"trigger_word": 5}, "trigger_word=5"),
    ],
)
def test_config_rejects_bad_values_naming_them(tmp_path: Path, kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ValueError, match="^") as info:
        cfg(tmp_path, **kwargs)
    assert needle in str(info.value)


def test_config_error_names_allowed_range(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"allowed: \[64, 4096\]"):
        cfg(tmp_path, resolution=32)
    with pytest.raises(ValueError, match="choose one of: error, skip"):
        cfg(tmp_path, on_error="nope")


def test_config_empty_folder_rejected() -> None:
    with pytest.raises(ValueError, match="folder"):
        DatasetConfig(folder="  ")


def test_config_widens_bucket_range_to_include_resolution(tmp_path: Path) -> None:
    big = cfg(tmp_path, resolution=2048)
    assert (big.min_bucket, big.max_bucket) == (256, 2048)
    small = cfg(tmp_path, resolution=128)
    assert (small.min_bucket, small.max_bucket) == (128, 1024)
    assert (128, 128) in buckets_for_config(small)


def test_config_normalises_caption_extension_and_trigger(tmp_path: Path) -> None:
    c = cfg(tmp_path, caption_extension="CAPTION", trigger_word="  ohwx \n")
    assert c.caption_extension == ".caption"
    assert c.trigger_word == "ohwx"
    assert cfg(tmp_path, caption_extension="txt").caption_extension == ".txt"


def test_config_accepts_pathlike_folder(tmp_path: Path) -> None:
    assert DatasetConfig(folder=tmp_path).folder == str(tmp_path)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------------------
# DatasetError


def test_dataset_error_message_names_file_and_fix() -> None:
    e = DatasetError("the file is broken", path=Path("/x/photo_03.png"), fix="Delete it")
    assert isinstance(e, ValueError)
    assert str(e) == "photo_03.png: the file is broken. Delete it."
    assert e.path == Path("/x/photo_03.png")
    relabeled = e.replace(label="10_cat/photo_03.png", fix="Re-export it")
    assert str(relabeled) == "10_cat/photo_03.png: the file is broken. Re-export it."
    assert relabeled.path == e.path


def test_dataset_error_pickles_with_its_fields() -> None:
    e = DatasetError("bad", path=Path("a.png"), fix="Fix it", label="sub/a.png")
    back = pickle.loads(pickle.dumps(e))
    assert (str(back), back.path, back.problem, back.fix, back.label) == (str(e), e.path, "bad", "Fix it", "sub/a.png")


# --------------------------------------------------------------------------------------------------------------------
# images: good inputs


@pytest.mark.parametrize("ext", sorted(IMAGE_EXTENSIONS))
def test_open_every_supported_extension(tmp_path: Path, ext: str) -> None:
    path = save(tmp_path / f"img{ext}", (40, 24), (0, 0, 255))
    img = open_image(path, BIG)
    assert img.mode == "RGB"
    assert img.size == (40, 24)
    r, g, b = img.getpixel((20, 12))
    assert b > 200
    assert r < 60
    assert g < 60


def test_open_rgb_keeps_pixels_exactly(tmp_path: Path) -> None:
    src = noisy((33, 17))
    src.save(tmp_path / "n.png")
    out = open_image(tmp_path / "n.png", BIG)
    assert np.array_equal(np.asarray(out), np.asarray(src))


def test_open_cmyk_converts_to_rgb(tmp_path: Path) -> None:
    im = Image.new("CMYK", (16, 16), (0, 0, 0, 0))
    im.putpixel((1, 1), (255, 0, 0, 0))
    im.putpixel((2, 2), (0, 0, 0, 255))
    im.save(tmp_path / "c.tif")
    out = open_image(tmp_path / "c.tif", BIG)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 1)) == (0, 255, 255)
    assert out.getpixel((2, 2)) == (0, 0, 0)


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_open_16bit_is_scaled_not_clipped(tmp_path: Path, ext: str) -> None:
    a = np.zeros((16, 16), np.uint16)
    a[0, 0], a[0, 1], a[0, 2], a[0, 3] = 65535, 257 * 100, 257 * 200, 300
    Image.fromarray(a).save(tmp_path / f"g{ext}")
    out = open_image(tmp_path / f"g{ext}", BIG)
    assert out.mode == "RGB"
    # clipping would give 255 for everything >= 255; scaling gives value/257
    assert [out.getpixel((x, 0))[0] for x in range(4)] == [255, 100, 200, 1]
    assert out.getpixel((5, 5)) == (0, 0, 0)


def test_open_float_image_in_unit_range_is_scaled(tmp_path: Path) -> None:
    a = np.full((16, 16), 0.5, np.float32)
    a[0, 0] = 1.0
    Image.fromarray(a).save(tmp_path / "f.tif")
    out = open_image(tmp_path / "f.tif", BIG)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((3, 3)) == (128, 128, 128)


@pytest.mark.parametrize("ext", [".png", ".gif"])
def test_open_palette_transparency_becomes_white(tmp_path: Path, ext: str) -> None:
    p = Image.new("P", (16, 16), 0)
    p.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    p.putpixel((0, 0), 1)
    p.save(tmp_path / f"p{ext}", transparency=0)
    out = open_image(tmp_path / f"p{ext}", BIG)
    assert out.mode == "RGB"
    assert out.getpixel((5, 5)) == (255, 255, 255)  # palette index 0 is transparent: white, not (10, 20, 30)
    assert out.getpixel((0, 0)) == (200, 100, 50)


def test_rgba_palette_in_memory_composites_over_white() -> None:
    p = Image.new("P", (4, 4), 0)
    p.putpalette([10, 20, 30, 0, 200, 100, 50, 255] + [0, 0, 0, 255] * 254, "RGBA")  # index 0 fully transparent
    p.putpixel((1, 1), 1)
    t = image_to_tensor(p)
    assert torch.equal(t[0, 0], torch.ones(3))
    assert torch.allclose(t[1, 1] * 255, torch.tensor([200.0, 100.0, 50.0]))


def test_open_rgba_composites_over_white(tmp_path: Path) -> None:
    im = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    im.putpixel((1, 1), (0, 0, 0, 128))
    im.putpixel((2, 2), (10, 200, 30, 255))
    im.save(tmp_path / "a.png")
    out = open_image(tmp_path / "a.png", BIG)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert all(abs(v - 127) <= 1 for v in out.getpixel((1, 1)))
    assert out.getpixel((2, 2)) == (10, 200, 30)


def test_open_la_composites_over_white(tmp_path: Path) -> None:
    im = Image.new("LA", (16, 16), (0, 0))
    im.putpixel((3, 3), (50, 255))
    im.save(tmp_path / "la.png")
    out = open_image(tmp_path / "la.png", BIG)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((3, 3)) == (50, 50, 50)


def test_open_grayscale_replicates_channels(tmp_path: Path) -> None:
    save(tmp_path / "l.png", (16, 16), 77, mode="L")
    assert open_image(tmp_path / "l.png", BIG).getpixel((4, 4)) == (77, 77, 77)


def _rotated_jpeg(path: Path, orientation: int = 6) -> Path:
    """A 40x20 JPEG, left half red, right half blue, with an EXIF orientation tag."""
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, exif=exif.tobytes(), quality=95)
    return path


def test_open_applies_exif_orientation(tmp_path: Path) -> None:
    out = open_image(_rotated_jpeg(tmp_path / "r.jpg"), BIG)
    assert out.size == (20, 40)  # width and height swapped
    top, bottom = out.getpixel((10, 3)), out.getpixel((10, 36))
    # orientation 6 = rotate 90 degrees clockwise for display: the stored left (red) half ends up on top
    assert top[0] > 200
    assert top[2] < 60
    assert bottom[2] > 200
    assert bottom[0] < 60


def test_open_survives_broken_exif(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    path = save(tmp_path / "x.png", (20, 10))

    def boom(*_a: object, **_k: object) -> Image.Image:
        raise SyntaxError("corrupt EXIF")

    monkeypatch.setattr(ImageOps, "exif_transpose", boom)
    with caplog.at_level(logging.WARNING):
        out = open_image(path, BIG)
    assert out.size == (20, 10)
    assert out.mode == "RGB"
    assert "EXIF" in caplog.text
    assert "x.png" in caplog.text


def test_image_to_tensor_layout_and_range() -> None:
    im = Image.new("RGB", (5, 3), (255, 0, 51))
    t = image_to_tensor(im)
    assert t.shape == (3, 5, 3)
    assert t.dtype == torch.float32
    assert torch.allclose(t[0, 0], torch.tensor([1.0, 0.0, 0.2]))
    assert float(t.min()) >= 0.0
    assert float(t.max()) <= 1.0
    gray = image_to_tensor(Image.new("L", (2, 4), 255))
    assert gray.shape == (4, 2, 3)
    assert bool((gray == 1.0).all())


# --------------------------------------------------------------------------------------------------------------------
# images: bad inputs


def test_open_zero_byte_file(tmp_path: Path) -> None:
    (tmp_path / "empty_01.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="empty_01.png: the file is empty") as info:
        open_image(tmp_path / "empty_01.png", BIG)
    assert info.value.path == tmp_path / "empty_01.png"
    assert "delete it" in str(info.value)


def test_open_non_image_with_image_extension(tmp_path: Path) -> None:
    (tmp_path / "notes.jpg").write_text("this is not a picture")
    with pytest.raises(DatasetError, match="notes.jpg: not a readable image") as info:
        open_image(tmp_path / "notes.jpg", BIG)
    assert "'.jpg'" in str(info.value)
    assert "Re-export" in str(info.value)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_open_truncated_image(tmp_path: Path, fmt: str) -> None:
    buf = io.BytesIO()
    noisy((64, 64)).save(buf, fmt)
    data = buf.getvalue()
    path = tmp_path / f"photo_03.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="truncated or corrupt") as info:
        open_image(path, BIG)
    assert str(info.value).startswith(f"photo_03.{fmt.lower()}: ")
    assert "Re-export it or delete it" in str(info.value)


def test_open_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="ghost.png: the file does not exist"):
        open_image(tmp_path / "ghost.png", BIG)


@pytest.mark.parametrize("size", [(1, 1), (7, 64), (64, 7)])
def test_open_too_small(tmp_path: Path, size: tuple[int, int]) -> None:
    path = save(tmp_path / "tiny.png", size)
    with pytest.raises(DatasetError, match=r"tiny.png: the image is \d+x\d+, too small to train on, at least 8x8"):
        open_image(path, BIG)


def test_open_8x8_is_enough(tmp_path: Path) -> None:
    assert open_image(save(tmp_path / "ok.png", (8, 8)), BIG).size == (8, 8)


def test_open_over_pixel_limit(tmp_path: Path) -> None:
    path = save(tmp_path / "huge.png", (100, 50))
    with pytest.raises(DatasetError, match="huge.png: the image is 100x50 = 5,000 pixels") as info:
        open_image(path, 4_999)
    assert "max_image_pixels=4,999" in str(info.value)
    assert open_image(path, 5_000).size == (100, 50)


def test_pixel_limit_is_checked_from_the_header_before_decoding(tmp_path: Path) -> None:
    # The file has no pixel data: decoding would fail as "truncated"; the size check must come first.
    path = png_header_only(tmp_path / "bomb.png", 5000, 4000)
    with pytest.raises(DatasetError, match="bomb.png: the image is 5000x4000"):
        open_image(path, 1_000_000)
    with pytest.raises(DatasetError, match="bomb.png: the file is truncated or corrupt"):
        open_image(path, 5000 * 4000)


def test_real_decompression_bomb_is_refused_with_default_limits(tmp_path: Path) -> None:
    limit_before = Image.MAX_IMAGE_PIXELS
    path = png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(DatasetError, match="bomb.png: .*max_image_pixels=178,956,970"):
        open_image(path, DatasetConfig(folder="x").max_image_pixels)
    assert Image.MAX_IMAGE_PIXELS == limit_before


def test_limit_above_pils_is_honoured_and_pils_limit_restored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save(tmp_path / "big.png", (40, 40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL alone would refuse 1,600 pixels
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    assert open_image(path, 10_000).size == (40, 40)
    assert Image.MAX_IMAGE_PIXELS == 100
    with pytest.raises(DatasetError, match="big.png: the image is 40x40"), pytest.warns(Image.DecompressionBombWarning):
        open_image(path, 1_000)  # PIL (limit raised to 1,000 for this call) warns, then our own check refuses
    assert Image.MAX_IMAGE_PIXELS == 100


# --------------------------------------------------------------------------------------------------------------------
# buckets


def test_make_buckets_default_rules() -> None:
    buckets = make_buckets(512, 256, 1024, 64)
    assert (512, 512) in buckets
    assert len(buckets) == len(set(buckets)) > 5
    for w, h in buckets:
        assert w * h <= 512 * 512
        assert w % 64 == 0
        assert h % 64 == 0
        assert 256 <= w <= 1024
        assert 256 <= h <= 1024
        assert (h, w) in buckets
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios)
    assert (256, 1024) in buckets
    assert (1024, 256) in buckets


def test_make_buckets_always_has_the_square() -> None:
    buckets = make_buckets(520, 256, 1024, 64)
    assert (520, 520) in buckets
    assert all(w * h <= 520 * 520 for w, h in buckets)


def test_make_buckets_rejects_resolution_outside_range() -> None:
    with pytest.raises(ValueError, match="min_side=600"):
        make_buckets(512, 600, 1024, 64)
    with pytest.raises(ValueError, match="max_side=256"):
        make_buckets(512, 128, 256, 64)


def test_buckets_for_config_without_bucketing_is_the_square(tmp_path: Path) -> None:
    assert buckets_for_config(cfg(tmp_path, bucketing=False, resolution=768)) == [(768, 768)]


def test_assign_bucket_exact_aspect_and_square() -> None:
    buckets = make_buckets(512, 256, 1024, 64)
    assert assign_bucket(1000, 1000, buckets) == (512, 512)
    assert assign_bucket(1280, 768, buckets) == (640, 384)
    assert assign_bucket(768, 1280, buckets) == (384, 640)
    assert assign_bucket(10_000, 10, buckets) == (1024, 256)  # extreme shapes go to the most extreme bucket


def test_assign_bucket_ties_prefer_larger_area() -> None:
    assert assign_bucket(100, 100, [(64, 64), (128, 128)]) == (128, 128)
    assert assign_bucket(50, 100, [(128, 256), (64, 128)]) == (128, 256)


@pytest.mark.parametrize(
    ("resolution", "lo", "hi", "step"), [(512, 256, 1024, 64), (1024, 256, 2048, 64), (768, 128, 1536, 32)]
)
def test_assign_bucket_keeps_aspect_ratio_within_one_step(resolution: int, lo: int, hi: int, step: int) -> None:
    """Matched on one side, the image's other side is within one step of the bucket, and no bucket is closer."""
    buckets = make_buckets(resolution, lo, hi, step)
    ratios = [w / h for w, h in buckets]
    checked = 0
    for width in range(40, 2400, 37):
        for height in range(40, 2400, 53):
            if not min(ratios) <= width / height <= max(ratios):
                continue
            bw, bh = assign_bucket(width, height, buckets)
            other = min(abs(height * bw / width - bh), abs(width * bh / height - bw))
            assert other <= step, (width, height, (bw, bh))
            err = abs(np.log(width / height) - np.log(bw / bh))
            best = min(abs(np.log(width / height) - np.log(w / h)) for w, h in buckets)
            assert err <= best + 1e-12
            checked += 1
    assert checked > 1000


def test_fit_to_bucket_keeps_aspect_and_crops_only_the_excess() -> None:
    im = Image.new("RGB", (300, 200), (255, 0, 0))
    im.paste((0, 0, 255), (150, 0, 300, 200))  # left red, right blue
    out, box = fit_to_bucket(im, (640, 384))
    assert out.size == (640, 384)
    # resized to 640x427 (same 3:2 ratio), 43 rows of excess split top/bottom
    assert box == (0, 21, 640, 405)
    row = np.asarray(out)[192]
    assert row[316, 0] > 200
    assert row[316, 2] < 60
    assert row[324, 2] > 200
    assert row[324, 0] < 60


def test_fit_to_bucket_center_crops_a_tall_image() -> None:
    im = Image.new("L", (200, 400), 255)
    im.paste(0, (0, 0, 200, 40))  # black band on the top 10%
    out, box = fit_to_bucket(im, (512, 512))
    assert out.size == (512, 512)
    assert box == (0, 256, 512, 768)
    assert np.asarray(out).min() > 200  # the band was in the cropped-off excess


def test_fit_to_bucket_center_crops_a_wide_image() -> None:
    im = Image.new("L", (400, 100), 255)
    im.paste(0, (0, 0, 20, 100))  # black band on the left 5%
    im.paste(0, (380, 0, 400, 100))  # and on the right 5%
    out, box = fit_to_bucket(im, (256, 256))
    assert box == (384, 0, 640, 256)  # resized to 1024x256, 768 columns of excess split evenly
    assert np.asarray(out).min() > 200


def test_fit_to_bucket_exact_ratio_has_no_crop_and_upscales() -> None:
    out, box = fit_to_bucket(noisy((128, 77)), (640, 384))
    assert out.size == (640, 384)
    assert box[0] == 0
    assert box[2] == 640
    assert box[3] - box[1] == 384
    assert box[1] <= 1
    same, box2 = fit_to_bucket(noisy((64, 64), 1), (64, 64))
    assert box2 == (0, 0, 64, 64)
    assert np.array_equal(np.asarray(same), np.asarray(noisy((64, 64), 1)))


# --------------------------------------------------------------------------------------------------------------------
# captions


def test_caption_bom_crlf_cr_and_whitespace(tmp_path: Path) -> None:
    p = tmp_path / "a.txt"
    p.write_bytes(b"\xef\xbb\xbf  a cat,\r\nsitting\rdown  \r\n")
    assert read_caption_file(p) == "a cat,\nsitting\ndown"


def test_caption_empty_is_empty_string(tmp_path: Path) -> None:
    (tmp_path / "e.txt").write_bytes(b" \r\n")
    assert read_caption_file(tmp_path / "e.txt") == ""


def test_caption_utf16_with_bom_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "w.txt").write_bytes("\ufeffkatze, süß".encode("utf-16-le"))
    assert read_caption_file(tmp_path / "w.txt") == "katze, süß"


def test_caption_invalid_utf8_names_file_and_offset(tmp_path: Path) -> None:
    (tmp_path / "photo_07.txt").write_bytes(b"hello \xff world")
    with pytest.raises(DatasetError) as info:
        read_caption_file(tmp_path / "photo_07.txt")
    msg = str(info.value)
    assert msg.startswith("photo_07.txt: ")
    assert "byte offset 6" in msg
    assert "save it as UTF-8" in msg


def test_caption_invalid_utf8_offset_counts_the_bom(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_bytes(b"\xef\xbb\xbfab\xc3")
    with pytest.raises(DatasetError, match="byte offset 5"):
        read_caption_file(tmp_path / "b.txt")


def test_metadata_csv_reads_rows_ignoring_extra_columns(tmp_path: Path) -> None:
    p = tmp_path / "metadata.csv"
    p.write_bytes(
        b'\xef\xbb\xbfid, file_name ,text,score\r\n1,a.png,"a cat, sitting",9\r\n\r\n2,./sub\\b.png,  dog  ,1\r\n'
    )
    assert read_metadata_csv(p) == {"a.png": "a cat, sitting", "sub/b.png": "dog"}


def test_metadata_csv_missing_columns_names_header(tmp_path: Path) -> None:
    p = tmp_path / "metadata.csv"
    p.write_text("image,caption\na.png,cat\n")
    with pytest.raises(DatasetError) as info:
        read_metadata_csv(p)
    msg = str(info.value)
    assert msg.startswith("metadata.csv: ")
    assert "['image', 'caption']" in msg
    assert "'file_name' and 'text'" in msg


def test_metadata_csv_duplicate_names_both_lines(tmp_path: Path) -> None:
    p = tmp_path / "metadata.csv"
    p.write_text("file_name,text\na.png,one\nb.png,two\na.png,three\n")
    with pytest.raises(DatasetError, match=r"metadata.csv: 'a.png' is listed twice \(lines 2 and 4\)"):
        read_metadata_csv(p)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("file_name,text\na.png\n", "line 2 has 1 column"),
        ("file_name,text\n,cat\n", "line 2 has an empty file_name"),
        ("", "the file is empty"),
        ("file_name,text\n" + "a.png," + "x" * 200_000 + "\n", "line 2 is not valid CSV"),
    ],
)
def test_metadata_csv_bad_rows(tmp_path: Path, text: str, needle: str) -> None:
    p = tmp_path / "metadata.csv"
    p.write_text(text)
    with pytest.raises(DatasetError, match="^metadata.csv: ") as info:
        read_metadata_csv(p)
    assert needle in str(info.value)


def test_metadata_jsonl_reads_lines(tmp_path: Path) -> None:
    p = tmp_path / "metadata.jsonl"
    p.write_text('{"file_name": "a.png", "text": " cat ", "x": 1}\n\n{"file_name": "b.png", "text": ""}\r\n')
    assert read_metadata_jsonl(p) == {"a.png": "cat", "b.png": ""}


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ('{"file_name": "a.png", "text": "x"}\n{oops\n', "line 2 is not valid JSON"),
        ('\n\n["a.png", "x"]\n', "line 3 is a JSON list"),
        ('{"file_name": "a.png"}\n', "line 1: 'text' is missing"),
        ('{"file_name": "a.png", "text": 3}\n', "line 1: 'text' is int"),
        ('{"file_name": "a.png", "text": "\\ud800"}\n', "line 1: 'text' contains an unpaired"),
        ('{"file_name": "a.png", "text": "x"}\n{"file_name": "a.png", "text": "y"}\n', "lines 1 and 2"),
        ("[" * 100_000 + "\n", "line 1 is not valid JSON"),
    ],
)
def test_metadata_jsonl_bad_lines(tmp_path: Path, body: str, needle: str) -> None:
    p = tmp_path / "metadata.jsonl"
    p.write_text(body)
    with pytest.raises(DatasetError, match="^metadata.jsonl: ") as info:
        read_metadata_jsonl(p)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("caption", "trigger", "expected"),
    [
        ("a man, smiling", "ohwx", "ohwx, a man, smiling"),
        ("ohwx, a man", "ohwx", "ohwx, a man"),
        ("ohwx", "ohwx", "ohwx"),
        ("  ohwx ,a man", "ohwx", "ohwx ,a man"),
        ("ohwxy, a man", "ohwx", "ohwx, ohwxy, a man"),
        ("ohwx man, smiling", "ohwx", "ohwx, ohwx man, smiling"),
        ("a man, ohwx", "ohwx", "ohwx, a man, ohwx"),
        ("", "ohwx", "ohwx"),
        ("a man", "", "a man"),
        ("a man", "ohwx,  man", "ohwx, man, a man"),
        ("ohwx, man, smiling", "ohwx, man", "ohwx, man, smiling"),
    ],
)
def test_apply_trigger(caption: str, trigger: str, expected: str) -> None:
    assert apply_trigger(caption, trigger) == expected


def test_tag_frequency_counts_stripped_tags_keeping_case() -> None:
    freq = tag_frequency(["ohwx, a cat , Cat", "ohwx,,a cat", None, "", "a cat"])
    assert freq == {"ohwx": 2, "a cat": 3, "Cat": 1}


# --------------------------------------------------------------------------------------------------------------------
# scanning


def test_scan_flat_folder_captions_and_order(tmp_path: Path) -> None:
    save(tmp_path / "b.png", (64, 64))
    (tmp_path / "b.txt").write_text("from txt")
    save(tmp_path / "a.jpg", (96, 64))
    (tmp_path / "a.caption").write_text("from caption file")  # the other extension is a fallback
    save(tmp_path / "c.webp", (64, 96))
    save(tmp_path / "d.png", (64, 64))
    (tmp_path / "metadata.csv").write_text("file_name,text\nc.webp,from csv\nb.png,csv loses to txt\n")
    (tmp_path / "readme.md").write_text("not an image")
    result = scan_dataset(cfg(tmp_path))
    assert isinstance(result, ScanResult)
    assert [r.path.name for r in result.records] == ["a.jpg", "b.png", "c.webp", "d.png"]
    got = {r.path.name: (r.caption, r.caption_source) for r in result.records}
    assert got == {
        "a.jpg": ("from caption file", "caption"),
        "b.png": ("from txt", "txt"),
        "c.webp": ("from csv", "metadata.csv"),
        "d.png": (None, None),
    }
    assert result.num_images == 4
    assert result.num_samples == 4
    assert [r.path.name for r in result.uncaptioned] == ["d.png"]
    assert result.skipped == ()
    assert all(r.path.is_absolute() for r in result.records)


def test_scan_caption_extension_choice_wins(tmp_path: Path) -> None:
    save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("txt")
    (tmp_path / "a.caption").write_text("caption")
    assert scan_dataset(cfg(tmp_path)).records[0].caption == "txt"
    record = scan_dataset(cfg(tmp_path, caption_extension=".caption")).records[0]
    assert (record.caption, record.caption_source) == ("caption", "caption")


def test_scan_metadata_jsonl_and_case_insensitive_match(tmp_path: Path) -> None:
    save(tmp_path / "Photo.PNG")
    save(tmp_path / "B.png")
    (tmp_path / "b.TXT").write_text("sidecar with other case")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "photo.png", "text": "from jsonl"}\n')
    got = {r.path.name: (r.caption, r.caption_source) for r in scan_dataset(cfg(tmp_path)).records}
    assert got == {"B.png": ("sidecar with other case", "txt"), "Photo.PNG": ("from jsonl", "metadata.jsonl")}


def test_scan_kohya_repeat_folders(tmp_path: Path) -> None:
    save(tmp_path / "10_cat" / "a.png")
    save(tmp_path / "10_cat" / "b.png")
    save(tmp_path / "3_dog" / "a.png")  # same name in another folder is fine
    save(tmp_path / "top.png")
    save(tmp_path / "notes" / "x.png")
    save(tmp_path / ".cache" / "y.png")
    (tmp_path / "5_empty").mkdir()
    (tmp_path / "5_empty" / "note.txt").write_text("no images here")
    result = scan_dataset(cfg(tmp_path, default_repeats=2))
    assert "5_empty/ contains no images" in result.warnings
    got = [(r.path.relative_to(tmp_path).as_posix(), r.repeats) for r in result.records]
    assert got == [("10_cat/a.png", 10), ("10_cat/b.png", 10), ("3_dog/a.png", 3), ("top.png", 2)]
    assert result.num_samples == 10 + 10 + 3 + 2
    ignored = [w for w in result.warnings if "ignored" in w and "subfolder" in w]
    assert len(ignored) == 1
    assert "notes" in ignored[0]
    assert ".cache" not in ignored[0]


def test_scan_flat_folder_is_not_recursive(tmp_path: Path) -> None:
    save(tmp_path / "a.png")
    save(tmp_path / "sub" / "deep.png")
    result = scan_dataset(cfg(tmp_path))
    assert [r.path.name for r in result.records] == ["a.png"]
    assert any("sub" in w for w in result.warnings)


def test_scan_kohya_metadata_is_per_folder(tmp_path: Path) -> None:
    save(tmp_path / "5_x" / "a.png")
    (tmp_path / "5_x" / "metadata.csv").write_text("file_name,text\na.png,inside\n")
    save(tmp_path / "a.png")
    got = {r.path.relative_to(tmp_path).as_posix(): r.caption for r in scan_dataset(cfg(tmp_path)).records}
    assert got == {"5_x/a.png": "inside", "a.png": None}


def test_scan_repeat_count_out_of_range(tmp_path: Path) -> None:
    save(tmp_path / "0_zero" / "a.png")
    save(tmp_path / "2_ok" / "b.png")
    with pytest.raises(DatasetError, match=r"0_zero/: the repeat count 0 is out of range; allowed: 1..1000"):
        scan_dataset(cfg(tmp_path))
    result = scan_dataset(cfg(tmp_path, on_error="skip"))
    assert [r.path.name for r in result.records] == ["b.png"]
    assert result.skipped[0][0] == tmp_path / "0_zero"


def test_scan_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist") as info:
        scan_dataset(cfg(tmp_path / "nope"))
    assert "nope" in str(info.value)
    assert "Check the path" in str(info.value)


def test_scan_folder_is_a_file(tmp_path: Path) -> None:
    f = save(tmp_path / "a.png")
    with pytest.raises(DatasetError, match="is a file, not a folder"):
        scan_dataset(cfg(f))


def test_scan_no_images_lists_what_was_found(tmp_path: Path) -> None:
    for name in ("a.txt", "b.psd", "c.md"):
        (tmp_path / name).write_text("x")
    with pytest.raises(DatasetError) as info:
        scan_dataset(cfg(tmp_path))
    msg = str(info.value)
    assert str(tmp_path) in msg
    assert "found 3 file(s)" in msg
    assert "b.psd" in msg
    assert "none with an image extension" in msg
    assert ".png" in msg


def test_scan_no_images_mentions_unread_subfolders(tmp_path: Path) -> None:
    save(tmp_path / "cats" / "a.png")
    with pytest.raises(DatasetError, match="cats were not read"):
        scan_dataset(cfg(tmp_path))


def test_scan_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="found no files"):
        scan_dataset(cfg(tmp_path))


def test_scan_ignores_macos_resource_forks(tmp_path: Path) -> None:
    save(tmp_path / "a.jpg")
    (tmp_path / "._a.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    result = scan_dataset(cfg(tmp_path))
    assert [r.path.name for r in result.records] == ["a.jpg"]
    assert any("._a.jpg" in w for w in result.warnings)


@pytest.mark.parametrize(("first", "second"), [("a.png", "A.PNG"), ("a.png", "a.jpg"), ("Shot.webp", "shot.PNG")])
def test_scan_names_differing_only_by_case_or_extension(tmp_path: Path, first: str, second: str) -> None:
    save(tmp_path / first)
    save(tmp_path / second)
    save(tmp_path / "other.png")
    with pytest.raises(DatasetError) as info:
        scan_dataset(cfg(tmp_path))
    msg = str(info.value)
    assert first in msg
    assert second in msg
    assert "Rename one" in msg
    result = scan_dataset(cfg(tmp_path, on_error="skip"))
    assert [r.path.name for r in result.records] == ["other.png"]
    assert len(result.skipped) == 1
    assert first in result.skipped[0][1]
    assert second in result.skipped[0][1]


def _bad_folder(tmp_path: Path) -> Path:
    save(tmp_path / "good_1.png")
    (tmp_path / "bad_empty.png").write_bytes(b"")
    (tmp_path / "bad_text.jpg").write_text("hello")
    buf = io.BytesIO()
    noisy((64, 64)).save(buf, "PNG")
    (tmp_path / "bad_trunc.png").write_bytes(buf.getvalue()[:300])
    save(tmp_path / "bad_tiny.png", (1, 1))
    save(tmp_path / "good_2.jpg")
    return tmp_path


def test_scan_error_mode_raises_first_bad_file_and_counts_the_rest(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        scan_dataset(cfg(_bad_folder(tmp_path)))
    msg = str(info.value)
    assert msg.startswith("bad_empty.png: the file is empty")
    assert "on_error='skip'" in msg
    assert "3 more problem(s)" in msg
    assert "bad_text.jpg" in msg
    assert "bad_tiny.png" in msg
    assert info.value.path == tmp_path / "bad_empty.png"


def test_scan_skip_mode_records_bad_files_and_continues(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        result = scan_dataset(cfg(_bad_folder(tmp_path), on_error="skip"))
    assert [r.path.name for r in result.records] == ["good_1.png", "good_2.jpg"]
    skipped = {p.name: reason for p, reason in result.skipped}
    assert set(skipped) == {"bad_empty.png", "bad_text.jpg", "bad_trunc.png", "bad_tiny.png"}
    assert "empty" in skipped["bad_empty.png"]
    assert "was skipped" not in skipped["bad_empty.png"]  # the reason does not repeat the file's own name
    assert "not a readable image" in skipped["bad_text.jpg"]
    assert "truncated or corrupt" in skipped["bad_trunc.png"]
    assert "too small" in skipped["bad_tiny.png"]
    for name in skipped:
        assert name in caplog.text


def test_scan_skip_mode_with_nothing_usable_still_fails(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="none of the 1 image"):
        scan_dataset(cfg(tmp_path, on_error="skip"))


def test_scan_bad_caption_file(tmp_path: Path) -> None:
    save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(b"caf\xe9")
    save(tmp_path / "b.png")
    with pytest.raises(DatasetError, match=r"^a.txt: the file is not valid UTF-8 .*byte offset 3.*save it as UTF-8"):
        scan_dataset(cfg(tmp_path))
    result = scan_dataset(cfg(tmp_path, on_error="skip"))
    assert [r.path.name for r in result.records] == ["b.png"]
    assert result.skipped[0][0] == tmp_path / "a.txt"
    assert "image a.png was skipped" in result.skipped[0][1]


def test_scan_bad_metadata_file(tmp_path: Path) -> None:
    save(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_text("image,caption\na.png,cat\n")
    with pytest.raises(DatasetError, match="^metadata.csv: the header is"):
        scan_dataset(cfg(tmp_path))
    result = scan_dataset(cfg(tmp_path, on_error="skip"))
    assert result.records[0].caption is None
    assert result.skipped[0][0] == tmp_path / "metadata.csv"


def test_scan_metadata_rows_for_missing_files_warn(tmp_path: Path) -> None:
    save(tmp_path / "a.png")
    save(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("sidecar")
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,cat\nb.png,dog\ngone.png,x\nlost.jpg,y\n")
    result = scan_dataset(cfg(tmp_path))
    got = {r.path.name: r.caption for r in result.records}
    assert got == {"a.png": "cat", "b.png": "sidecar"}
    warning = [w for w in result.warnings if "metadata.csv" in w]
    assert len(warning) == 1
    assert "gone.png" in warning[0]
    assert "lost.jpg" in warning[0]
    assert "b.png" not in warning[0]


def test_scan_applies_trigger_and_warns_on_empty_captions(tmp_path: Path) -> None:
    save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a man")
    save(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("  \n")
    save(tmp_path / "c.png")
    save(tmp_path / "d.png")
    (tmp_path / "d.txt").write_text("ohwx, already")
    result = scan_dataset(cfg(tmp_path, trigger_word="ohwx"))
    got = {r.path.name: r.caption for r in result.records}
    assert got == {"a.png": "ohwx, a man", "b.png": "ohwx", "c.png": None, "d.png": "ohwx, already"}
    assert any("empty caption" in w and "b.png" in w for w in result.warnings)
    plain = {r.path.name: r.caption for r in scan_dataset(cfg(tmp_path)).records}
    assert plain["a.png"] == "a man"
    assert plain["b.png"] == ""


def test_scan_uses_exif_corrected_size_for_the_bucket(tmp_path: Path) -> None:
    _rotated_jpeg(tmp_path / "r.jpg")
    record = scan_dataset(cfg(tmp_path, resolution=256, min_bucket=64, max_bucket=512, bucket_step=64)).records[0]
    assert (record.width, record.height) == (20, 40)
    assert record.bucket == (192, 320)  # portrait bucket from the upright size; the stored 40x20 would be landscape


def test_scan_buckets_follow_config(tmp_path: Path) -> None:
    save(tmp_path / "wide.png", (300, 100))
    save(tmp_path / "tall.png", (100, 200))
    by_name = {r.path.name: r.bucket for r in scan_dataset(cfg(tmp_path)).records}
    assert by_name["wide.png"][0] > by_name["wide.png"][1]
    assert by_name["tall.png"][0] < by_name["tall.png"][1]
    off = scan_dataset(cfg(tmp_path, bucketing=False, resolution=256))
    assert {r.bucket for r in off.records} == {(256, 256)}


def test_scan_pixel_limit(tmp_path: Path) -> None:
    save(tmp_path / "big.png", (200, 100))
    save(tmp_path / "small.png", (64, 64))
    with pytest.raises(DatasetError, match="big.png: the image is 200x100 = 20,000 pixels, over the limit"):
        scan_dataset(cfg(tmp_path, max_image_pixels=10_000))
    result = scan_dataset(cfg(tmp_path, max_image_pixels=10_000, on_error="skip"))
    assert [r.path.name for r in result.records] == ["small.png"]


def test_scan_warns_about_heavy_upscaling(tmp_path: Path) -> None:
    save(tmp_path / "small.png", (64, 64))
    save(tmp_path / "fine.png", (600, 600))
    warning = [w for w in scan_dataset(cfg(tmp_path)).warnings if "upscaled" in w]
    assert len(warning) == 1
    assert "small.png" in warning[0]
    assert "fine.png" not in warning[0]


def test_image_record_validates() -> None:
    with pytest.raises(ValueError, match="repeats=0"):
        ImageRecord(Path("a.png"), None, None, 0, 10, 10, (64, 64))
    with pytest.raises(ValueError, match="bucket"):
        ImageRecord(Path("a.png"), None, None, 1, 10, 10, (64,))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------------------
# fingerprint and digest


def test_dataset_fingerprint_tracks_changes(tmp_path: Path) -> None:
    save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("cat")
    save(tmp_path / "10_x" / "b.png")
    first = dataset_fingerprint(tmp_path)
    assert first == dataset_fingerprint(str(tmp_path))
    assert len(first) == 64

    st = (tmp_path / "a.txt").stat()
    (tmp_path / "a.txt").write_text("a dog")
    os.utime(tmp_path / "a.txt", ns=(st.st_atime_ns, st.st_mtime_ns))  # only the size changes
    second = dataset_fingerprint(tmp_path)
    assert second != first

    st = (tmp_path / "a.txt").stat()
    os.utime(tmp_path / "a.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # mtime only
    third = dataset_fingerprint(tmp_path)
    assert third != second

    (tmp_path / "10_x" / "b.png").rename(tmp_path / "10_x" / "c.png")  # file in a repeat folder renamed
    assert dataset_fingerprint(tmp_path) != third


def test_dataset_fingerprint_of_missing_folder_does_not_raise(tmp_path: Path) -> None:
    fp = dataset_fingerprint(tmp_path / "missing")
    assert isinstance(fp, str)
    assert fp == dataset_fingerprint(tmp_path / "missing")
    (tmp_path / "missing").mkdir()
    assert dataset_fingerprint(tmp_path / "missing") != fp


def test_file_digest(tmp_path: Path) -> None:
    p = tmp_path / "x.bin"
    p.write_bytes(b"abc" * 1000)
    assert file_digest(p) == hashlib.sha256(b"abc" * 1000).hexdigest()
    with pytest.raises(DatasetError, match="nope.bin"):
        file_digest(tmp_path / "nope.bin")
