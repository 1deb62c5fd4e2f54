"""Bounded fuzzing of the dataset layer: hostile bytes and text may only ever produce DatasetError."""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lora_core.data import (
    DatasetConfig,
    DatasetError,
    ScanResult,
    apply_trigger,
    assign_bucket,
    fit_to_bucket,
    make_buckets,
    open_image,
    read_caption_file,
    read_metadata_csv,
    read_metadata_jsonl,
    scan_dataset,
    split_tags,
)

T = TypeVar("T")

# PIL warns about the corrupt TIFF tags the fuzzer produces; that is expected noise here, not a finding.
pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning:PIL\..*")

FUZZ = settings(
    max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)

_IMAGE_NAMES = ("a.png", "b.jpg", "c.webp", "d.gif", "e.tif", "f.bmp", "A.PNG", "g.jpeg")


def _valid_image_bytes(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


_SEEDS = {fmt: _valid_image_bytes(fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")}

# random blobs, and real images with bytes flipped / cut short, which get past the format sniffing
_blobs = st.one_of(
    st.binary(max_size=256),
    st.builds(
        lambda seed, cut, flips: _mutate(seed, cut, flips),
        st.sampled_from(sorted(_SEEDS)),
        st.integers(0, 2000),
        st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=6),
    ),
)


def _mutate(fmt: str, cut: int, flips: list[tuple[int, int]]) -> bytes:
    data = bytearray(_SEEDS[fmt])
    for pos, value in flips:
        data[pos % len(data)] = value
    return bytes(data[: max(1, len(data) - cut)])


_csv_text = st.one_of(
    st.text(max_size=200),
    st.builds(
        lambda rows: "file_name,text\n" + "\n".join(rows),
        st.lists(st.text(alphabet=st.sampled_from('ab.png,"\r\n\\ xé'), max_size=20), max_size=8),
    ),
)
_jsonl_text = st.one_of(
    st.text(max_size=200),
    st.lists(
        st.one_of(
            st.builds(
                lambda n, t: f'{{"file_name": {n}, "text": {t}}}',
                st.sampled_from(['"a.png"', "1", "null", '""']),
                st.sampled_from(['"x"', "2", "[]", '"\\ud800"', '"ok']),
            ),
            st.text(max_size=30),
        ),
        max_size=6,
    ).map("\n".join),
)


def _only_dataset_error(fn: Callable[..., T], *args: object) -> T | DatasetError:
    """Call ``fn``; a DatasetError is returned for inspection, any other exception fails the test."""
    try:
        return fn(*args)
    except DatasetError as e:
        assert str(e).strip()
        assert e.problem
        return e


@FUZZ
@given(data=st.binary(max_size=300))
def test_caption_reader_random_bytes(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "cap.txt"
        path.write_bytes(data)
        out = _only_dataset_error(read_caption_file, path)
        if isinstance(out, DatasetError):
            assert str(out).startswith("cap.txt: ")
        else:
            assert out == out.strip()
            assert "\r" not in out


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), _csv_text.map(lambda t: t.encode("utf-8", "surrogatepass"))))
def test_metadata_csv_random_input(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "metadata.csv"
        path.write_bytes(data)
        out = _only_dataset_error(read_metadata_csv, path)
        if isinstance(out, DatasetError):
            assert str(out).startswith("metadata.csv: ")
        else:
            assert all(isinstance(k, str) and k and isinstance(v, str) for k, v in out.items())


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), _jsonl_text.map(lambda t: t.encode("utf-8", "surrogatepass"))))
def test_metadata_jsonl_random_input(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "metadata.jsonl"
        path.write_bytes(data)
        out = _only_dataset_error(read_metadata_jsonl, path)
        if isinstance(out, DatasetError):
            assert str(out).startswith("metadata.jsonl: ")
        else:
            for k, v in out.items():
                k.encode("utf-8")
                v.encode("utf-8")


@FUZZ
@given(blob=_blobs, name=st.sampled_from(_IMAGE_NAMES), limit=st.sampled_from([64, 10_000, 178_956_970]))
def test_open_image_random_blobs(blob: bytes, name: str, limit: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(blob)
        out = _only_dataset_error(open_image, path, limit)
        if isinstance(out, DatasetError):
            assert str(out).startswith(f"{name}: ")
        else:
            assert out.mode == "RGB"
            assert min(out.size) >= 8
            assert out.size[0] * out.size[1] <= limit


@FUZZ
@given(
    files=st.dictionaries(st.sampled_from(_IMAGE_NAMES), _blobs, min_size=1, max_size=4),
    captions=st.dictionaries(st.sampled_from(("a.txt", "b.caption", "A.txt", "c.TXT")), st.binary(max_size=40)),
    csv=st.one_of(st.none(), _csv_text),
    jsonl=st.one_of(st.none(), _jsonl_text),
    on_error=st.sampled_from(["error", "skip"]),
    trigger=st.sampled_from(["", "ohwx", "a, b"]),
)
def test_scan_dataset_random_folder(
    files: dict[str, bytes],
    captions: dict[str, bytes],
    csv: str | None,
    jsonl: str | None,
    on_error: str,
    trigger: str,
) -> None:
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        sub = root / "3_sub"
        sub.mkdir()
        for i, (name, blob) in enumerate(files.items()):
            (root if i % 2 == 0 else sub).joinpath(name).write_bytes(blob)
        for name, blob in captions.items():
            (root / name).write_bytes(blob)
        if csv is not None:
            (root / "metadata.csv").write_bytes(csv.encode("utf-8", "surrogatepass"))
        if jsonl is not None:
            (sub / "metadata.jsonl").write_bytes(jsonl.encode("utf-8", "surrogatepass"))
        config = DatasetConfig(
            str(root),
            resolution=64,
            min_bucket=64,
            max_bucket=128,
            bucket_step=8,
            on_error=on_error,
            trigger_word=trigger,
        )
        out = _only_dataset_error(scan_dataset, config)
        if isinstance(out, ScanResult):
            assert out.num_images >= 1
            assert out.num_samples == sum(3 if r.path.parent == sub else 1 for r in out.records)
            for r in out.records:
                assert r.bucket[0] * r.bucket[1] <= 64 * 64
                if r.caption is not None and trigger:
                    assert split_tags(r.caption)[: len(split_tags(trigger))] == split_tags(trigger)
            if on_error == "error":
                assert out.skipped == ()


@FUZZ
@given(caption=st.text(max_size=60), trigger=st.text(max_size=20))
def test_apply_trigger_puts_trigger_first_and_is_idempotent(caption: str, trigger: str) -> None:
    once = apply_trigger(caption, trigger)
    tags = split_tags(trigger)
    assert split_tags(once)[: len(tags)] == tags
    assert apply_trigger(once, trigger) == once
    if not tags:
        assert once == caption.strip()


@FUZZ
@given(width=st.integers(8, 300), height=st.integers(8, 300), res=st.sampled_from([64, 128, 192]))
def test_fit_to_bucket_always_gives_exact_bucket_size(width: int, height: int, res: int) -> None:
    buckets = make_buckets(res, 64, 2 * res, 16)
    bucket = assign_bucket(width, height, buckets)
    assert bucket in buckets
    out, (left, top, right, bottom) = fit_to_bucket(Image.new("RGB", (width, height)), bucket)
    assert out.size == bucket
    assert (right - left, bottom - top) == bucket
    assert left >= 0
    assert top >= 0
    assert left == 0 or top == 0  # only one side is ever cropped
