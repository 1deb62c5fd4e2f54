"""Unit tests for video clips in lora_core.data: probing, resampling by time, windows, scanning. Clips are made on the
fly with PyAV; every frame is a solid grey whose level encodes its index (7 * i), so a test can tell which source
frame was sampled."""

from __future__ import annotations

import os
import pickle
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from lora_core.data import (
    FRAME_SAMPLING,
    VIDEO_EXTENSIONS,
    ClipInfo,
    DatasetConfig,
    DatasetError,
    ImageRecord,
    available_frames,
    dataset_fingerprint,
    is_clip_file,
    probe_clip,
    read_clip_frames,
    scan_dataset,
    window_starts,
)

BIG = 10**9
W, H = 64, 48
STEP = 7  # grey level per frame index: up to 36 frames stay within 0..255
MP4_CODEC = "libx264" if "libx264" in av.codecs_available else "mpeg4"
needs_vp9 = pytest.mark.skipif("libvpx-vp9" not in av.codecs_available, reason="this PyAV build has no VP9 encoder")

# --------------------------------------------------------------------------------------------------------------------
# helpers


def grey(i: int) -> np.ndarray:
    return np.full((H, W, 3), STEP * i, np.uint8)


def write_clip(
    path: Path,
    n: int,
    rate: int = 16,
    *,
    codec: str | None = None,
    pts: list[int] | None = None,
    time_base: Fraction | None = None,
    size: tuple[int, int] = (W, H),
) -> Path:
    """``n`` frames at ``rate`` fps, or at the timestamps ``pts`` (in ``time_base``) for a variable-rate clip."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if codec is None:
        codec = "libvpx-vp9" if path.suffix == ".webm" else MP4_CODEC
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        if time_base is not None:
            stream.codec_context.time_base = time_base
            stream.time_base = time_base
        for i in range(n):
            arr = np.full((size[1], size[0], 3), STEP * i, np.uint8)
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_gif(path: Path, durations_ms: list[int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = [Image.fromarray(grey(i)) for i in range(len(durations_ms))]
    duration = durations_ms if len(frames) > 1 else durations_ms[0]
    frames[0].save(path, save_all=len(frames) > 1, append_images=frames[1:], duration=duration, loop=0)
    return path


def save_image(path: Path, size: tuple[int, int] = (W, H)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 10)).save(path)
    return path


def index_of(img: Image.Image) -> int:
    """Which source frame an image shows (lossy codecs shift the grey level by a few steps at most)."""
    return round(img.getpixel((W // 2, H // 2))[0] / STEP)


def indices(frames: list[Image.Image]) -> list[int]:
    return [index_of(f) for f in frames]


def cfg(folder: Path, **kw: object) -> DatasetConfig:
    return DatasetConfig(folder=str(folder), **kw)  # type: ignore[arg-type]


def raises(fn, *args: object, **kw: object) -> DatasetError:  # type: ignore[no-untyped-def]
    with pytest.raises(DatasetError) as info:
        fn(*args, **kw)
    return info.value


# --------------------------------------------------------------------------------------------------------------------
# the module stays framework independent


# --------------------------------------------------------------------------------------------------------------------
# config


def test_config_video_defaults_keep_image_datasets_as_they_were(tmp_path: Path) -> None:
    c = cfg(tmp_path)
    assert (c.frames, c.frame_sampling, c.windows, c.fps, c.max_clip_seconds) == (1, "head", 1, 16.0, 600.0)
    assert FRAME_SAMPLING == ("head", "uniform")
    assert VIDEO_EXTENSIONS == (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v", ".gif")


@pytest.mark.parametrize("frames", [1, 5, 9, 17, 33, 49, 81, 257])
def test_config_accepts_4k_plus_1_frames(tmp_path: Path, frames: int) -> None:
    assert cfg(tmp_path, frames=frames).frames == frames


@pytest.mark.parametrize("frames", [2, 4, 16, 32, 80])
def test_config_refuses_frames_that_are_not_4k_plus_1(tmp_path: Path, frames: int) -> None:
    with pytest.raises(ValueError) as info:
        cfg(tmp_path, frames=frames)
    msg = str(info.value)
    assert f"frames={frames} must be 4k+1 (1, 5, 9, ... 33, 49, 81)" in msg
    assert "the Wan VAE encodes the first frame alone and then 4 at a time" in msg


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("frames", 0, "out of range"),
        ("frames", 261, "out of range"),
        ("frames", 33.0, "must be an integer"),
        ("frames", True, "must be an integer"),
        ("frame_sampling", "random", "choose one of: head, uniform"),
        ("windows", 0, "out of range"),
        ("windows", 65, "out of range"),
        ("fps", 0, "out of range"),
        ("fps", 121, "out of range"),
        ("fps", float("nan"), "finite"),
        ("fps", "16", "must be a number"),
        ("max_clip_seconds", 0.5, "out of range"),
    ],
)
def test_config_refuses_bad_video_settings(tmp_path: Path, field: str, value: object, needle: str) -> None:
    with pytest.raises(ValueError, match=field) as info:
        cfg(tmp_path, **{field: value})
    assert needle in str(info.value)


def test_config_fps_becomes_float(tmp_path: Path) -> None:
    c = cfg(tmp_path, fps=24, max_clip_seconds=60)
    assert isinstance(c.fps, float) and c.fps == 24.0
    assert isinstance(c.max_clip_seconds, float)


# --------------------------------------------------------------------------------------------------------------------
# windows


def test_window_starts_head_is_one_window_at_zero() -> None:
    assert window_starts(100, 33, "head", 5) == [0]
    assert window_starts(33, 33, "head", 1) == [0]


def test_window_starts_uniform_spreads_from_start_to_end() -> None:
    # linspace(0, 67, 5) = 0, 16.75, 33.5, 50.25, 67
    assert window_starts(100, 33, "uniform", 5) == [0, 17, 34, 50, 67]
    assert window_starts(100, 33, "uniform", 2) == [0, 67]
    assert window_starts(100, 33, "uniform", 1) == [0]


def test_window_starts_uniform_deduplicates_on_short_clips() -> None:
    assert window_starts(34, 33, "uniform", 5) == [0, 1]
    assert window_starts(33, 33, "uniform", 8) == [0]


def test_window_starts_too_short_is_empty() -> None:
    assert window_starts(32, 33, "head", 1) == []
    assert window_starts(0, 1, "uniform", 3) == []


def test_window_starts_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="frame_sampling"):
        window_starts(10, 5, "tail", 1)
    with pytest.raises(ValueError, match="windows"):
        window_starts(10, 5, "uniform", 0)


# --------------------------------------------------------------------------------------------------------------------
# probing and reading


def test_probe_constant_rate_clip(tmp_path: Path) -> None:
    info = probe_clip(write_clip(tmp_path / "a.mp4", 32, rate=32), BIG)
    assert (info.width, info.height, info.frame_count) == (W, H, 32)
    assert info.duration_s == pytest.approx(1.0, abs=1e-3)
    assert info.source_fps == pytest.approx(32.0, rel=1e-3)
    assert not info.variable_rate
    assert available_frames(info, 16) == 16
    assert available_frames(info, 32) == 32
    assert available_frames(info, 24) == 24


def test_resampling_32_fps_to_16_picks_every_second_frame(tmp_path: Path) -> None:
    path = write_clip(tmp_path / "a.mp4", 32, rate=32)
    frames = read_clip_frames(path, 16, 0, 9, BIG)
    assert [f.size for f in frames] == [(W, H)] * 9
    assert all(f.mode == "RGB" for f in frames)
    assert indices(frames) == [0, 2, 4, 6, 8, 10, 12, 14, 16]
    assert indices(read_clip_frames(path, 16, 3, 5, BIG)) == [6, 8, 10, 12, 14]
    assert indices(read_clip_frames(path, 16, 11, 5, BIG)) == [22, 24, 26, 28, 30]  # the last window that fits


def test_resampling_8_fps_to_16_shows_each_frame_twice(tmp_path: Path) -> None:
    path = write_clip(tmp_path / "slow.mp4", 5, rate=8)
    info = probe_clip(path, BIG)
    assert available_frames(info, 16) == 10
    frames = read_clip_frames(path, 16, 0, 9, BIG)
    assert indices(frames) == [0, 0, 1, 1, 2, 2, 3, 3, 4]
    assert len({id(f) for f in frames}) == 9  # repeated frames are copies, not one shared object


@needs_vp9
def test_webm_clip_reads_like_mp4(tmp_path: Path) -> None:
    path = write_clip(tmp_path / "a.webm", 12, rate=16)
    info = probe_clip(path, BIG)
    assert (info.width, info.height, info.frame_count) == (W, H, 12)
    assert available_frames(info, 16) == 12
    assert indices(read_clip_frames(path, 16, 2, 5, BIG)) == [2, 3, 4, 5, 6]


# pts in ms: intervals 40, 20, 70, 20, 150, 50, 50, 50 -- a phone-style variable-rate clip
VFR_PTS = [0, 40, 60, 130, 150, 300, 350, 400, 450]


def test_variable_rate_clip_is_sampled_by_time(tmp_path: Path) -> None:
    path = write_clip(tmp_path / "phone.mp4", len(VFR_PTS), pts=VFR_PTS, time_base=Fraction(1, 1000))
    info = probe_clip(path, BIG)
    assert info.variable_rate
    assert info.frame_count == len(VFR_PTS)
    assert info.duration_s == pytest.approx(0.5, abs=0.02)  # last pts 450 ms + the last frame's 50 ms
    assert available_frames(info, 20) == 10
    # targets every 50 ms: the last frame shown at 0, 50, 100, ... 450 ms
    assert indices(read_clip_frames(path, 20, 0, 10, BIG)) == [0, 1, 2, 4, 4, 4, 5, 6, 7, 8]
    assert indices(read_clip_frames(path, 20, 3, 2, BIG)) == [4, 4]


def test_animated_gif_uses_its_per_frame_delays(tmp_path: Path) -> None:
    path = write_gif(tmp_path / "anim.gif", [100, 50, 200, 100, 70])  # frames start at 0, 100, 150, 350, 450 ms
    assert is_clip_file(path)
    info = probe_clip(path, BIG)
    assert info.frame_count == 5
    assert info.duration_s == pytest.approx(0.52)
    assert info.variable_rate
    assert available_frames(info, 20) == 11
    assert indices(read_clip_frames(path, 20, 0, 11, BIG)) == [0, 0, 1, 2, 2, 2, 2, 3, 3, 4, 4]


def test_one_frame_gif_is_an_image(tmp_path: Path) -> None:
    assert not is_clip_file(write_gif(tmp_path / "still.gif", [100]))
    assert not is_clip_file(save_image(tmp_path / "a.png"))
    assert is_clip_file(tmp_path / "missing.MOV")  # by extension; probing reports what is wrong with it
    (tmp_path / "junk.gif").write_bytes(b"not a gif")
    assert not is_clip_file(tmp_path / "junk.gif")  # open_image reports it as a broken image


def test_corrupt_clip_names_the_file_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "broken.mp4"
    path.write_bytes(np.random.default_rng(0).bytes(4000))
    err = raises(probe_clip, path, BIG)
    assert err.path == path
    assert str(err).startswith("broken.mp4: not a readable video")
    assert "ffmpeg -i in.mp4 -c:v libx264 out.mp4" in str(err)


def test_truncated_and_empty_clips_are_refused(tmp_path: Path) -> None:
    good = write_clip(tmp_path / "good.mp4", 8).read_bytes()
    (tmp_path / "half.mp4").write_bytes(good[: len(good) // 2])
    assert "half.mp4" in str(raises(probe_clip, tmp_path / "half.mp4", BIG))
    (tmp_path / "empty.webm").write_bytes(b"")
    assert "empty.webm: the file is empty (0 bytes)" in str(raises(probe_clip, tmp_path / "empty.webm", BIG))
    assert "does not exist" in str(raises(probe_clip, tmp_path / "gone.mp4", BIG))


def test_audio_only_file_has_no_video_stream(tmp_path: Path) -> None:
    path = tmp_path / "voice.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    err = raises(probe_clip, path, BIG)
    assert str(err).startswith("voice.mp4: the file has no video stream (it holds only audio)")


def zero_payload(src: Path, dst: Path) -> Path:
    """The same mp4 with every byte of its media data zeroed: the container is fine, no frame decodes."""
    data = bytearray(src.read_bytes())
    at = data.find(b"mdat")
    size = int.from_bytes(data[at - 4 : at], "big")
    data[at + 4 : at - 4 + size] = bytes(size - 8)
    dst.write_bytes(bytes(data))
    return dst


def test_clip_without_a_decodable_frame_is_refused(tmp_path: Path) -> None:
    path = zero_payload(write_clip(tmp_path / "src" / "a.mp4", 6), tmp_path / "blank.mp4")
    err = raises(probe_clip, path, BIG)
    assert str(err).startswith("blank.mp4: no frame of the video could be decoded")
    assert "Re-encode it" in str(err)


def test_frames_over_the_pixel_limit_are_refused_before_decoding(tmp_path: Path) -> None:
    path = write_clip(tmp_path / "big.mp4", 3)
    err = raises(probe_clip, path, W * H - 1)
    assert f"the frames are {W}x{H}" in str(err)
    assert "max_image_pixels" in str(err)
    assert "max_image_pixels" in str(raises(read_clip_frames, path, 16, 0, 1, W * H - 1))


def test_reading_a_clip_that_got_shorter_says_it_changed(tmp_path: Path) -> None:
    path = write_clip(tmp_path / "a.mp4", 20)
    assert len(read_clip_frames(path, 16, 12, 5, BIG)) == 5
    write_clip(path, 8)
    err = raises(read_clip_frames, path, 16, 12, 5, BIG)
    assert "changed since the dataset was scanned" in str(err)
    assert "a.mp4" in str(err)
    (tmp_path / "a.mp4").write_bytes(b"garbage" * 100)
    assert "not a readable video" in str(raises(read_clip_frames, path, 16, 0, 5, BIG))


def test_clip_info_validates(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="frame_count"):
        ClipInfo(width=W, height=H, duration_s=1.0, source_fps=16.0, frame_count=0)
    with pytest.raises(ValueError, match="duration_s"):
        ClipInfo(width=W, height=H, duration_s=-1.0, source_fps=16.0, frame_count=1)


# --------------------------------------------------------------------------------------------------------------------
# records


def test_image_record_video_fields_and_is_clip(tmp_path: Path) -> None:
    image = ImageRecord(tmp_path / "a.png", None, None, 1, W, H, (64, 64))
    assert (image.frames, image.start, image.is_clip) == (1, 0, False)
    clip = ImageRecord(tmp_path / "a.MP4", None, None, 1, W, H, (64, 64), frames=33, start=17)
    assert clip.is_clip
    assert ImageRecord(tmp_path / "a.gif", None, None, 1, W, H, (64, 64), frames=5).is_clip
    assert not ImageRecord(tmp_path / "a.gif", None, None, 1, W, H, (64, 64)).is_clip  # a one-frame GIF: an image
    with pytest.raises(ValueError, match="an image has frames=1"):
        ImageRecord(tmp_path / "a.png", None, None, 1, W, H, (64, 64), frames=5)
    with pytest.raises(ValueError, match="start"):
        ImageRecord(tmp_path / "a.mp4", None, None, 1, W, H, (64, 64), frames=5, start=-1)
    assert pickle.loads(pickle.dumps(clip)) == clip


# --------------------------------------------------------------------------------------------------------------------
# scanning


def test_scan_mixes_images_and_clip_windows(tmp_path: Path) -> None:
    save_image(tmp_path / "photo.png")
    write_clip(tmp_path / "walk.mp4", 20)
    write_gif(tmp_path / "still.gif", [100])
    (tmp_path / "walk.txt").write_text("a person walking")
    result = scan_dataset(cfg(tmp_path, frames=9))
    by_name = {r.path.name: r for r in result.records}
    assert sorted(by_name) == ["photo.png", "still.gif", "walk.mp4"]
    assert (by_name["photo.png"].frames, by_name["photo.png"].is_clip) == (1, False)
    assert (by_name["still.gif"].frames, by_name["still.gif"].is_clip) == (1, False)
    walk = by_name["walk.mp4"]
    assert (walk.frames, walk.start, walk.is_clip, walk.width, walk.height) == (9, 0, True, W, H)
    assert walk.caption == "a person walking" and walk.caption_source == "txt"
    assert walk.bucket == by_name["photo.png"].bucket  # clips bucket by resolution like images
    assert (result.num_images, result.num_clips) == (3, 1)
    assert result.skipped == ()


def test_scan_uniform_windows_give_one_record_per_window(tmp_path: Path) -> None:
    write_clip(tmp_path / "long.mp4", 32, rate=16)  # 32 frames at 16 fps: windows of 9 start at 0..23
    write_clip(tmp_path / "sub" / "x.mp4", 2)  # ignored subfolder, only warned about
    result = scan_dataset(cfg(tmp_path, frames=9, frame_sampling="uniform", windows=4, default_repeats=2))
    assert [r.start for r in result.records] == [0, 8, 15, 23]
    assert {(r.path.name, r.frames, r.repeats) for r in result.records} == {("long.mp4", 9, 2)}
    assert (result.num_clips, result.num_samples) == (4, 8)
    last = result.records[-1]
    assert indices(read_clip_frames(last.path, 16, last.start, last.frames, BIG)) == list(range(23, 32))


def test_scan_resamples_to_the_configured_fps(tmp_path: Path) -> None:
    write_clip(tmp_path / "fast.mp4", 32, rate=32)
    for fps, starts in ((16, [0, 6, 11]), (32, [0, 14, 27])):  # 16 or 32 frames available
        result = scan_dataset(cfg(tmp_path, frames=5, fps=fps, frame_sampling="uniform", windows=3))
        assert [r.start for r in result.records] == starts


def test_with_frames_1_video_files_are_left_out_by_name_and_animated_gifs_train_as_their_first_frame(
        tmp_path: Path) -> None:
    """frames=1 is an image model's dataset (Load Dataset sets it for an image VAE): what it trained before clips
    existed still trains (an animated GIF as its first frame), video files are left out with a note naming them, and a
    folder of clips alone is refused with what to connect."""
    save_image(tmp_path / "photo.png")
    write_clip(tmp_path / "a_clip.mp4", 4)
    write_gif(tmp_path / "b_anim.gif", [100, 100])
    scan = scan_dataset(cfg(tmp_path))
    assert [(r.path.name, r.frames) for r in scan.records] == [("b_anim.gif", 1), ("photo.png", 1)]
    assert not scan.skipped and scan.num_clips == 0
    assert any("left out 1 video clip(s)" in w and "a_clip.mp4" in w for w in scan.warnings), scan.warnings
    assert any("1 animated GIF(s) train as their first frame" in w for w in scan.warnings), scan.warnings
    only_clips = tmp_path / "clips"
    write_clip(only_clips / "walk.mp4", 4)
    msg = str(raises(scan_dataset, cfg(only_clips)))
    assert "holds only video clips (walk.mp4), and frames=1 trains on still images" in msg
    assert "connect a Wan model's VAE to Load Dataset and set frames" in msg


def test_animated_webp_with_frames_trains_as_a_still_and_says_how_to_make_it_a_clip(tmp_path: Path) -> None:
    frames = [Image.fromarray(grey(i)) for i in range(3)]
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:], duration=100, loop=0)
    write_clip(tmp_path / "walk.mp4", 10)
    scan = scan_dataset(cfg(tmp_path, frames=5))
    assert sorted((r.path.name, r.frames) for r in scan.records) == [("anim.webp", 1), ("walk.mp4", 5)]
    assert any("animated WEBP/PNG" in w and "anim.webp" in w and "ffmpeg -i clip.webp clip.mp4" in w
               for w in scan.warnings), scan.warnings


def test_scan_too_short_clip_says_how_many_frames_it_holds(tmp_path: Path) -> None:
    write_clip(tmp_path / "short.mp4", 10)
    err = raises(scan_dataset, cfg(tmp_path, frames=33))
    msg = str(err)
    assert msg.startswith("short.mp4: holds 10 frames at 16 fps (0.62 s); frames=33 needs 2.06 s")
    assert "Lower frames, or remove the clip" in msg
    assert "on_error='skip'" in msg


def test_scan_refuses_huge_clips(tmp_path: Path) -> None:
    write_clip(tmp_path / "long.mp4", 35)  # 2.19 s
    err = raises(scan_dataset, cfg(tmp_path, frames=5, max_clip_seconds=2))
    assert str(err).startswith("long.mp4: the clip is 2.2 s long, over the 2 s a clip may have")
    assert "Trim or split it" in str(err)


def test_scan_skips_each_bad_clip_and_goes_on(tmp_path: Path) -> None:
    save_image(tmp_path / "photo.png")
    write_clip(tmp_path / "good.mp4", 12)
    write_clip(tmp_path / "short.mp4", 3)
    (tmp_path / "corrupt.mp4").write_bytes(np.random.default_rng(1).bytes(3000))
    zero_payload(write_clip(tmp_path / "src" / "s.mp4", 6), tmp_path / "blank.mp4")
    write_clip(tmp_path / "huge.mp4", 6, size=(128, 96))
    config = cfg(tmp_path, frames=5, on_error="skip", max_image_pixels=W * H)
    result = scan_dataset(config)
    assert [(r.path.name, r.frames) for r in result.records] == [("good.mp4", 5), ("photo.png", 1)]
    reasons = {p.name: why for p, why in result.skipped}
    assert sorted(reasons) == ["blank.mp4", "corrupt.mp4", "huge.mp4", "short.mp4"]
    assert reasons["short.mp4"].startswith("holds 3 frames at 16 fps")
    assert "not a readable video" in reasons["corrupt.mp4"]
    assert "no frame of the video could be decoded" in reasons["blank.mp4"]
    assert "max_image_pixels" in reasons["huge.mp4"]
    # the same folder with on_error='error' stops at the first bad clip and counts the rest
    msg = str(raises(scan_dataset, cfg(tmp_path, frames=5, max_image_pixels=W * H)))
    assert msg.startswith("blank.mp4: no frame of the video could be decoded")
    assert "3 more problem(s): corrupt.mp4, huge.mp4, short.mp4" in msg


def test_scan_warns_about_variable_rate_clips(tmp_path: Path) -> None:
    write_clip(tmp_path / "phone.mp4", len(VFR_PTS), pts=VFR_PTS, time_base=Fraction(1, 1000))
    write_clip(tmp_path / "steady.mp4", 9)
    result = scan_dataset(cfg(tmp_path, frames=5, fps=20))
    assert result.num_clips == 2
    warnings = [w for w in result.warnings if "variable frame rate" in w]
    assert len(warnings) == 1
    assert "resampled by timestamp to 20 fps" in warnings[0]
    assert "phone.mp4" in warnings[0] and "steady.mp4" not in warnings[0]


def test_scan_captions_clips_from_sidecars_and_metadata(tmp_path: Path) -> None:
    write_clip(tmp_path / "a.mp4", 6)
    write_clip(tmp_path / "b.mov", 6)
    write_gif(tmp_path / "c.gif", [60] * 6)
    (tmp_path / "a.caption").write_text("from a sidecar")
    (tmp_path / "metadata.csv").write_text("file_name,text\nb.mov,from metadata\nC.GIF,gif row\n")
    result = scan_dataset(cfg(tmp_path, frames=5, trigger_word="ohwx"))
    got = {r.path.name: (r.caption, r.caption_source) for r in result.records}
    assert got == {
        "a.mp4": ("ohwx, from a sidecar", "caption"),
        "b.mov": ("ohwx, from metadata", "metadata.csv"),
        "c.gif": ("ohwx, gif row", "metadata.csv"),
    }
    assert result.num_clips == 3


@needs_vp9
def test_scan_reads_webm_in_a_repeat_folder(tmp_path: Path) -> None:
    write_clip(tmp_path / "3_dance" / "d.webm", 10)
    (tmp_path / "3_dance" / "d.txt").write_text("dancing")
    result = scan_dataset(cfg(tmp_path, frames=9))
    (rec,) = result.records
    assert (rec.path.name, rec.repeats, rec.frames, rec.caption) == ("d.webm", 3, 9, "dancing")


def test_scan_same_stem_rule_covers_clips(tmp_path: Path) -> None:
    save_image(tmp_path / "photo.png")
    write_clip(tmp_path / "photo.mp4", 6)
    write_clip(tmp_path / "other.mp4", 6)
    msg = str(raises(scan_dataset, cfg(tmp_path, frames=5)))
    assert "photo.mp4 and photo.png have the same name apart from case or extension" in msg
    result = scan_dataset(cfg(tmp_path, frames=5, on_error="skip"))
    assert [r.path.name for r in result.records] == ["other.mp4"]


def test_scan_of_a_folder_without_media_lists_the_video_extensions(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("x")
    msg = str(raises(scan_dataset, cfg(tmp_path, frames=5)))
    assert "none with an image extension" in msg
    assert ".mp4, .webm, .mov, .mkv, .avi, .m4v, .gif" in msg


def test_fingerprint_changes_when_a_clip_changes(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "a.mp4", 6)
    before = dataset_fingerprint(tmp_path)
    assert dataset_fingerprint(tmp_path) == before
    stat = clip.stat()
    write_clip(clip, 7)
    os.utime(clip, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime: the size still tells
    assert dataset_fingerprint(tmp_path) != before
    changed = dataset_fingerprint(tmp_path)
    write_clip(tmp_path / "2_more" / "b.mov", 3)  # a clip in a repeat folder counts too
    assert dataset_fingerprint(tmp_path) != changed


def test_a_phone_s_rotation_flag_turns_the_frames_and_the_size_upright(tmp_path, monkeypatch):
    """A clip whose display matrix says 90 degrees (phones): frames come out turned as players and ComfyUI's Load Video
    show them (counter-clockwise), and the probed size is the upright one, so the bucket fits what trains. PyAV cannot
    write the flag, so the flag is what ``_rotation`` reads."""
    import lora_core.data.video as video

    path = tmp_path / "phone.mp4"
    with av.open(str(path), "w") as container:  # left half dark, right half light
        stream = container.add_stream(MP4_CODEC, rate=16)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        arr = np.full((32, 64, 3), 230, np.uint8)
        arr[:, :32] = 20
        for _ in range(5):
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    upright = read_clip_frames(path, 16.0, 0, 1, BIG)[0]
    assert upright.size == (64, 32)
    assert (probe_clip(path, BIG).width, probe_clip(path, BIG).height) == (64, 32)
    monkeypatch.setattr(video, "_rotation", lambda frame: 90)
    info = probe_clip(path, BIG)
    assert (info.width, info.height, info.rotation) == (32, 64, 90)
    turned = np.asarray(read_clip_frames(path, 16.0, 0, 1, BIG)[0], dtype=np.int16)
    assert turned.shape == (64, 32, 3)
    # counter-clockwise: the left (dark) half of the stored frame is now the bottom
    assert turned[:24].mean() > 200 and turned[40:].mean() < 50


def _indexed_clip(path: Path, n: int, gop: int) -> Path:
    """``n`` frames at 16 fps whose red and green levels encode the frame index, a keyframe every ``gop`` frames."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(MP4_CODEC, rate=16)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.codec_context.gop_size = gop
        for i in range(n):
            arr = np.zeros((H, W, 3), np.uint8)
            arr[..., 0], arr[..., 1] = STEP * (i % 30), STEP * (i // 30)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.parametrize("gop", [8, 250])  # keyframes every half second, or only the first
def test_a_window_late_in_a_long_clip_is_read_by_seeking_and_gives_the_frames_a_full_decode_gives(
        tmp_path: Path, monkeypatch, gop: int) -> None:
    import lora_core.data.video as video

    clip = _indexed_clip(tmp_path / "long.mp4", 160, gop)  # 10 s
    seeks: list[int] = []
    real_first = video._first_pts
    monkeypatch.setattr(video, "_first_pts", lambda p: seeks.append(1) or real_first(p))
    late = read_clip_frames(clip, 16.0, 120, 9, BIG)  # starts at 7.5 s: past SEEK_AFTER_S, so it seeks
    assert seeks == [1]
    monkeypatch.setattr(video, "SEEK_AFTER_S", 10**6)
    full = read_clip_frames(clip, 16.0, 120, 9, BIG)
    assert len(seeks) == 1  # the full decode did not seek
    assert [np.asarray(a).tobytes() == np.asarray(b).tobytes() for a, b in zip(late, full)] == [True] * 9

    def index(img: Image.Image) -> int:
        r, g = np.asarray(img, dtype=np.float64)[..., :2].reshape(-1, 2).mean(axis=0)
        return round(r / STEP) + 30 * round(g / STEP)

    assert [index(f) for f in late] == list(range(120, 129))
