"""Auto Caption's engine: policy, model folders, tiny random BLIP / Florence-2 end to end, files on disk."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from lora_core.caption import (
    WRITE_TARGETS,
    CaptionError,
    CaptionEvents,
    CaptionMemo,
    CaptionSettings,
    WriteLedger,
    caption_images,
    caption_policy,
    ensure_trigger,
    frame,
    inspect_model_folder,
    load_captioner,
)
from lora_core.caption.tiny import WORDS, build_tiny_blip, build_tiny_florence2
from lora_core.data import DatasetConfig, dataset_fingerprint, read_metadata_csv, scan_dataset

# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory) -> Path:
    return build_tiny_blip(tmp_path_factory.mktemp("captioners") / "tiny-blip")


@pytest.fixture(scope="module")
def florence_dir(tmp_path_factory) -> Path:
    return build_tiny_florence2(tmp_path_factory.mktemp("captioners") / "tiny-florence")


@pytest.fixture(scope="module")
def blip(blip_dir):
    info = inspect_model_folder(blip_dir)
    return info, load_captioner(info)


@pytest.fixture(scope="module")
def florence(florence_dir):
    info = inspect_model_folder(florence_dir)
    return info, load_captioner(info)


def make_images(folder: Path, n: int = 3, size=(48, 40)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img_{i:02d}.png"
        Image.new("RGB", size, (40 * i, 200 - 30 * i, 90)).save(p)
        paths.append(p)
    return paths


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(paths, model, **settings):
    info, captioner = model
    kwargs = {k: settings.pop(k) for k in ("events", "memo", "ledger", "load") if k in settings}
    kwargs.setdefault("memo", None)
    kwargs.setdefault("ledger", WriteLedger())
    return caption_images(paths, info, CaptionSettings(**settings), captioner=captioner, **kwargs)


# ---- policy (pure) ---------------------------------------------------------------------------


def test_keep_policy_keeps_existing_and_fills_missing() -> None:
    assert caption_policy("hand fixed, blue cat", "generated", "keep", trigger="sks") == "hand fixed, blue cat"
    assert caption_policy(None, "a cat", "keep") == "a cat"
    assert caption_policy("   ", "a cat", "keep", trigger="sks") == "sks, a cat"  # blank counts as missing


def test_overwrite_and_append_policies() -> None:
    assert caption_policy("old text", "a cat", "overwrite") == "a cat"
    assert caption_policy("old text", "a cat", "append") == "old text, a cat"
    assert caption_policy("old text,", "a cat", "append") == "old text, a cat"
    # appending again the same generated text does not stack it
    assert caption_policy("old text, a cat", "a cat", "append") == "old text, a cat"
    assert caption_policy(None, "a cat", "append", trigger="sks") == "sks, a cat"
    with pytest.raises(ValueError, match="policy='replace'"):
        caption_policy("x", "y", "replace")


def test_trigger_goes_first_and_is_never_doubled() -> None:
    assert caption_policy(None, "a cat on a sofa", "overwrite", trigger="sks") == "sks, a cat on a sofa"
    assert caption_policy("old", "a cat", "append", trigger="sks") == "sks, old, a cat"
    assert caption_policy("sks, old", "a cat", "append", trigger="sks") == "sks, old, a cat"
    assert caption_policy(None, "a cat", "overwrite", trigger="sks", prefix="photo of sks") == "photo of sks, a cat"
    assert caption_policy(None, "sks cat", "overwrite", trigger="SKS") == "sks cat"  # case-insensitive
    assert ensure_trigger("sksx cat", "sks") == "sks, sksx cat"  # whole words only
    assert ensure_trigger("a cat", "sks, ohwx") == "sks, ohwx, a cat"
    assert ensure_trigger("ohwx cat", "sks, ohwx") == "sks, ohwx cat"
    assert ensure_trigger("", "sks") == "sks"
    assert ensure_trigger("a  cat\n on sofa", "") == "a cat on sofa"


def test_prefix_and_suffix_joining() -> None:
    assert frame("a cat", "photo of sks") == "photo of sks, a cat"
    assert frame("a cat", "a photo of ") == "a photo of a cat"
    assert frame("a cat", "masterpiece,") == "masterpiece, a cat"
    assert frame("a cat", "", "studio light") == "a cat, studio light"
    assert frame("a cat", "", ". Studio light") == "a cat. Studio light"
    assert frame("a cat", "", " in the rain") == "a cat in the rain"
    assert frame("", "only prefix", "") == "only prefix"
    assert caption_policy(None, "a cat", "overwrite", trigger="sks", prefix="a photo of ", suffix="4k") == (
        "sks, a photo of a cat, 4k"
    )


# ---- model folders -----------------------------------------------------------------------------


def test_missing_model_folder_names_folder_files_and_where_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(CaptionError) as err:
        inspect_model_folder(tmp_path / "captioners" / "blip-base")
    msg = str(err.value)
    assert str(tmp_path / "captioners" / "blip-base") in msg and "does not exist" in msg
    assert "config.json" in msg and "model.safetensors" in msg and "preprocessor_config.json" in msg
    assert "Salesforce/blip-image-captioning-base" in msg and "florence-community/Florence-2-base" in msg


def test_incomplete_model_folder_lists_the_missing_files(blip_dir: Path, tmp_path: Path) -> None:
    broken = shutil.copytree(blip_dir, tmp_path / "blip")
    (broken / "tokenizer.json").unlink()
    (broken / "vocab.txt").unlink()
    (broken / "processor_config.json").unlink()
    with pytest.raises(CaptionError) as err:
        inspect_model_folder(broken)
    msg = str(err.value)
    assert f"{broken} (BLIP) is incomplete" in msg
    assert "preprocessor_config.json" in msg and "tokenizer.json or vocab.txt" in msg
    assert "hf download Salesforce/blip-image-captioning" in msg
    (broken / "config.json").unlink()
    with pytest.raises(CaptionError, match="config.json is missing"):
        inspect_model_folder(broken)


def test_pickled_weights_are_refused(blip_dir: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(blip_dir, tmp_path / "blip")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(CaptionError, match=r"found only pytorch_model\.bin.*only reads \.safetensors"):
        inspect_model_folder(folder)


def test_remote_code_and_unknown_models_are_refused(florence_dir: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(florence_dir, tmp_path / "flo")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.Y"}}))
    with pytest.raises(CaptionError, match=r"trust_remote_code.*florence-community/Florence-2-base"):
        inspect_model_folder(folder)
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(CaptionError, match=r"type 'llama'.*not support"):
        inspect_model_folder(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CaptionError, match="not valid JSON"):
        inspect_model_folder(folder)


def test_corrupt_weights_give_a_clear_load_error(blip_dir: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(blip_dir, tmp_path / "blip")
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CaptionError, match=rf"could not load the BLIP captioner from {folder}"):
        load_captioner(inspect_model_folder(folder))


# ---- captioning end to end ---------------------------------------------------------------------


@pytest.mark.parametrize("which", ["blip", "florence"])
def test_sidecars_are_written_next_to_the_images_and_images_are_untouched(which, request, tmp_path: Path) -> None:
    model = request.getfixturevalue(which)
    paths = make_images(tmp_path / "data", 3)
    before = {p: digest(p) for p in paths}
    report = run(paths, model, max_new_tokens=12, batch_size=2)
    assert [o.status for o in report.outcomes] == ["new"] * 3 and report.generated == 3
    for p, o in zip(paths, report.outcomes):
        sidecar = p.with_suffix(".txt")
        assert o.written == (sidecar,) and o.source == "txt"
        text = sidecar.read_text(encoding="utf-8")
        assert text == o.caption and text.strip() == text and "\n" not in text
        words = text.split()
        assert 1 <= len(words) and all(any(w2 in w for w2 in WORDS) or w.isalpha() for w in words)
        assert digest(p) == before[p]
    assert sorted(f.name for f in (tmp_path / "data").iterdir()) == sorted(
        [p.name for p in paths] + [p.with_suffix(".txt").name for p in paths])  # no temp files left
    # Load Dataset reads exactly what was written
    scanned = scan_dataset(DatasetConfig(folder=str(tmp_path / "data")))
    assert [r.caption for r in scanned.records] == [o.caption for o in report.outcomes]


def test_engine_captions_equal_a_plain_transformers_loop(blip, florence, tmp_path: Path) -> None:
    paths = make_images(tmp_path / "data", 2)
    for (info, captioner), prompt in ((blip, ""), (florence, "<CAPTION>")):
        report = run(paths, (info, captioner), prompt=prompt, max_new_tokens=10, write_to="metadata.csv",
                     policy="overwrite")
        images = [Image.open(p).convert("RGB") for p in paths]
        processor, model = captioner.processor, captioner.model
        if prompt:
            inputs = processor(images=images, text=[prompt] * 2, return_tensors="pt")
        else:
            inputs = processor(images=images, return_tensors="pt")
        with torch.inference_mode():
            ids = model.generate(**inputs, max_new_tokens=10, num_beams=1, do_sample=False)
        plain = [" ".join(t.split()) for t in processor.batch_decode(ids, skip_special_tokens=True)]
        assert [o.generated for o in report.outcomes] == plain


def test_keep_overwrite_append_on_disk(blip, tmp_path: Path) -> None:
    paths = make_images(tmp_path / "data", 3)
    fixed = paths[0].with_suffix(".txt")
    fixed.write_text("hand fixed caption", encoding="utf-8")
    stat = fixed.stat()
    report = run(paths, blip, max_new_tokens=8)  # keep
    assert [o.status for o in report.outcomes] == ["kept", "new", "new"] and report.generated == 2
    assert fixed.read_text(encoding="utf-8") == "hand fixed caption"
    assert fixed.stat().st_mtime_ns == stat.st_mtime_ns  # not even rewritten
    second = paths[1].with_suffix(".txt").read_text(encoding="utf-8")

    report = run(paths, blip, max_new_tokens=8, policy="append")
    text = fixed.read_text(encoding="utf-8")
    assert report.outcomes[0].status == "appended"
    assert text.startswith("hand fixed caption, ") and text == "hand fixed caption, " + report.outcomes[0].generated
    assert [o.status for o in report.outcomes[1:]] == ["unchanged", "unchanged"]  # already end with it
    assert paths[1].with_suffix(".txt").read_text(encoding="utf-8") == second
    run(paths, blip, max_new_tokens=8, policy="append")
    assert fixed.read_text(encoding="utf-8") == text  # idempotent: not appended twice

    report = run(paths, blip, max_new_tokens=8, policy="overwrite", trigger="sks")
    assert [o.status for o in report.outcomes] == ["overwritten"] * 3
    for p, o in zip(paths, report.outcomes):
        assert p.with_suffix(".txt").read_text(encoding="utf-8") == f"sks, {o.generated}"


def test_trigger_prefix_suffix_placement_in_files(florence, tmp_path: Path) -> None:
    paths = make_images(tmp_path / "data", 2)
    report = run(paths, florence, max_new_tokens=6, trigger="ohwx", prefix="a photo of ", suffix="studio light")
    for p, o in zip(paths, report.outcomes):
        text = p.with_suffix(".txt").read_text(encoding="utf-8")
        assert text == f"ohwx, a photo of {o.generated}, studio light"
        assert text.count("ohwx") == 1


def test_unicode_round_trip_through_sidecars_and_metadata(blip, tmp_path: Path) -> None:
    existing = "Ünïcödé 猫 — “quoted”, émoji 🐈"
    for target in ("sidecar", "metadata.csv"):
        folder = tmp_path / target
        paths = make_images(folder, 2)
        if target == "sidecar":
            paths[0].with_suffix(".txt").write_text(existing, encoding="utf-8")
        else:
            (folder / "metadata.csv").write_text(f'file_name,text\nimg_00.png,"{existing}"\n', encoding="utf-8")
        report = run(paths, blip, max_new_tokens=5, policy="append", trigger="ñandú", suffix="東京", write_to=target)
        assert report.outcomes[0].caption.startswith(f"ñandú, {existing}, ")
        for p, o in zip(paths, report.outcomes):
            assert o.caption.startswith("ñandú, ") and o.caption.endswith(", 東京")
            if target == "sidecar":
                assert p.with_suffix(".txt").read_bytes().decode("utf-8") == o.caption
        if target == "metadata.csv":
            rows = read_metadata_csv(folder / "metadata.csv")
            assert [rows[p.name] for p in paths] == [o.caption for o in report.outcomes]
        scanned = scan_dataset(DatasetConfig(folder=str(folder)))
        assert [r.caption for r in scanned.records] == [o.caption for o in report.outcomes]


def test_metadata_csv_keeps_other_rows_and_columns(florence, tmp_path: Path) -> None:
    paths = make_images(tmp_path / "data", 3)
    meta = tmp_path / "data" / "metadata.csv"
    meta.write_text('file_name,text,score\nimg_00.png,"kept, by hand",5\nother.png,not an image here,1\n',
                    encoding="utf-8")
    report = run(paths, florence, max_new_tokens=5, write_to="metadata.csv")
    assert [o.status for o in report.outcomes] == ["kept", "new", "new"]
    assert [o.source for o in report.outcomes] == ["metadata.csv"] * 3
    assert not any(p.with_suffix(".txt").exists() for p in paths)
    lines = meta.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "file_name,text,score" and lines[1] == 'img_00.png,"kept, by hand",5'
    assert lines[2] == "other.png,not an image here,1"
    rows = read_metadata_csv(meta)
    assert rows["img_01.png"] == report.outcomes[1].caption and rows["img_02.png"] == report.outcomes[2].caption


def test_existing_caption_file_is_updated_in_place_and_jsonl_is_used(blip, tmp_path: Path) -> None:
    paths = make_images(tmp_path / "data", 2)
    paths[0].with_suffix(".caption").write_text("old caption", encoding="utf-8")
    (tmp_path / "data" / "metadata.jsonl").write_text('{"file_name": "img_01.png", "text": "from jsonl"}\n')
    report = run(paths, blip, max_new_tokens=5, policy="overwrite", write_to="sidecar + metadata.csv")
    assert report.outcomes[0].written[0] == paths[0].with_suffix(".caption")
    assert not paths[0].with_suffix(".txt").exists()
    assert not (tmp_path / "data" / "metadata.csv").exists()  # the existing jsonl is updated instead
    rows = [json.loads(line) for line in (tmp_path / "data" / "metadata.jsonl").read_text().splitlines()]
    assert {r["file_name"]: r["text"] for r in rows} == {p.name: o.caption for p, o in zip(paths, report.outcomes)}


def test_corrupt_image_gives_a_clear_error_and_keeps_earlier_captions(blip, tmp_path: Path) -> None:
    paths = make_images(tmp_path / "data", 3)
    paths[2].write_bytes(paths[2].read_bytes()[:60])  # truncated PNG
    with pytest.raises(CaptionError) as err:
        run(paths, blip, max_new_tokens=5, batch_size=1)
    assert "img_02.png" in str(err.value) and "corrupt" in str(err.value)
    assert "captions written so far are kept" in str(err.value)
    assert paths[0].with_suffix(".txt").is_file() and paths[1].with_suffix(".txt").is_file()
    assert not paths[2].with_suffix(".txt").exists()


def test_cancel_between_batches_keeps_what_was_written(florence, tmp_path: Path) -> None:
    paths = make_images(tmp_path / "data", 5)

    class StopAfterFirstBatch(CaptionEvents):
        def __init__(self) -> None:
            self.progress: list[tuple[int, int]] = []
            self.started: int | None = None

        def on_start(self, total: int) -> None:
            self.started = total

        def on_progress(self, done, total, outcomes) -> None:
            self.progress.append((done, total))

        def should_stop(self) -> bool:
            return bool(self.progress)

    events = StopAfterFirstBatch()
    report = run(paths, florence, max_new_tokens=5, batch_size=2, events=events)
    assert report.cancelled and events.started == 5 and events.progress == [(2, 5)]
    assert [p.with_suffix(".txt").exists() for p in paths] == [True, True, False, False, False]
    assert len(report.outcomes) == 2


def test_memo_skips_the_model_when_only_the_framing_changes(blip_dir: Path, tmp_path: Path) -> None:
    paths = make_images(tmp_path / "data", 3)
    info = inspect_model_folder(blip_dir)
    memo = CaptionMemo()
    loads = []

    def load(info, device, dtype):
        loads.append(device)
        return load_captioner(info, device, dtype)

    first = caption_images(paths, info, CaptionSettings(max_new_tokens=6), load=load, memo=memo, ledger=WriteLedger())
    assert first.generated == 3 and first.reused == 0 and len(loads) == 1

    def no_load(*_):
        raise AssertionError("the model should not be loaded")

    again = caption_images(paths, info, CaptionSettings(max_new_tokens=6, policy="overwrite", trigger="sks"),
                           load=no_load, memo=memo, ledger=WriteLedger())
    assert again.generated == 0 and again.reused == 3
    assert [o.caption for o in again.outcomes] == [f"sks, {o.caption}" for o in first.outcomes]
    # a different generation setting is a different caption: the model runs again
    third = caption_images(paths, info, CaptionSettings(max_new_tokens=4, policy="overwrite"), load=load, memo=memo,
                           ledger=WriteLedger())
    assert third.generated == 3 and len(loads) == 2
    # nothing to caption (all kept): the model is not even loaded
    kept = caption_images(paths, info, CaptionSettings(), load=no_load, memo=None, ledger=WriteLedger())
    assert [o.status for o in kept.outcomes] == ["kept"] * 3


def test_written_captions_do_not_count_as_changes_but_user_edits_do(blip, tmp_path: Path) -> None:
    folder = tmp_path / "data"
    paths = make_images(folder, 3)
    ledger = WriteLedger()
    before = dataset_fingerprint(folder, stat_view=ledger.view)
    assert before == dataset_fingerprint(folder)  # an empty ledger changes nothing
    run(paths, blip, max_new_tokens=5, ledger=ledger, write_to="sidecar + metadata.csv")
    assert dataset_fingerprint(folder) != before
    assert dataset_fingerprint(folder, stat_view=ledger.view) == before
    run(paths, blip, max_new_tokens=3, ledger=ledger, policy="overwrite")  # a second write: still Kiln's own
    assert dataset_fingerprint(folder, stat_view=ledger.view) == before
    paths[1].with_suffix(".txt").write_text("fixed by hand", encoding="utf-8")
    assert dataset_fingerprint(folder, stat_view=ledger.view) != before


def test_florence_refuses_tasks_that_are_not_captions(florence, tmp_path: Path) -> None:
    paths = make_images(tmp_path / "data", 1)
    with pytest.raises(CaptionError, match=r"<OD> does not produce a caption"):
        run(paths, florence, prompt="<OD>")
    with pytest.raises(CaptionError, match="takes no extra text"):
        run(paths, florence, prompt="<CAPTION> of a cat")


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="batch_size=0"):
        CaptionSettings(batch_size=0)
    with pytest.raises(ValueError, match="write_to='json'"):
        CaptionSettings(write_to="json")
    assert "sidecar" in WRITE_TARGETS


# ---- WD14 ONNX tagger (optional: onnxruntime) --------------------------------------------------


@pytest.fixture(scope="module")
def wd14_dir(tmp_path_factory) -> Path:
    pytest.importorskip("onnx", reason="building the tiny WD14 tagger needs the onnx package")
    pytest.importorskip("onnxruntime", reason="the WD14 tagger needs onnxruntime (optional)")
    from lora_core.caption.tiny import build_tiny_wd14

    return build_tiny_wd14(tmp_path_factory.mktemp("captioners") / "tiny-wd14")


def colour_images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rgb, size in (("a_red", (220, 40, 40), (60, 40)), ("b_green", (40, 200, 60), (40, 40)),
                            ("c_blue", (40, 40, 220), (30, 50))):
        Image.new("RGB", size, rgb).save(folder / f"{name}.png")
        paths.append(folder / f"{name}.png")
    return paths


@pytest.mark.parametrize("fixed_batch", [False, True])
def test_wd14_tagger_writes_known_tags(wd14_dir: Path, tmp_path: Path, fixed_batch: bool) -> None:
    folder = wd14_dir
    if fixed_batch:  # older taggers have a batch dimension fixed to 1
        from lora_core.caption.tiny import build_tiny_wd14

        folder = build_tiny_wd14(tmp_path / "wd14-fixed", fixed_batch=True)
    info = inspect_model_folder(folder)
    assert info.kind.name == "wd14"
    paths = colour_images(tmp_path / "data")
    report = caption_images(paths, info, CaptionSettings(batch_size=2, trigger="sks"), memo=None, ledger=WriteLedger())
    assert [p.with_suffix(".txt").read_text(encoding="utf-8") for p in paths] == [
        "sks, red, 1girl, ^_^, hair ribbon",
        "sks, green, 1girl, ^_^, hair ribbon",
        "sks, blue, 1girl, ^_^, hair ribbon",
    ]
    assert report.generated == 3


def test_wd14_thresholds_come_from_the_prompt(wd14_dir: Path, tmp_path: Path) -> None:
    info = inspect_model_folder(wd14_dir)
    tagger = load_captioner(info)
    red = [Image.new("RGB", (40, 40), (220, 40, 40))]
    assert tagger.caption(red, "0.4", 75, 1) == ["red, 1girl, ^_^"]
    assert tagger.caption(red, "0.35 0.7", 75, 1) == ["kiln \\(character\\), red, 1girl, ^_^, hair ribbon"]
    assert tagger.caption(red, "", 2, 1) == ["red, 1girl"]  # max_tokens caps the number of tags
    with pytest.raises(CaptionError, match="thresholds like '0.35'"):
        tagger.caption(red, "<CAPTION>", 75, 1)
    with pytest.raises(CaptionError, match="between 0 and 1"):
        tagger.caption(red, "1.5", 75, 1)


def test_wd14_folder_problems_are_explained(wd14_dir: Path, tmp_path: Path, monkeypatch) -> None:
    folder = shutil.copytree(wd14_dir, tmp_path / "wd14")
    (folder / "selected_tags.csv").unlink()
    with pytest.raises(CaptionError, match=r"\(WD14 tagger\) is incomplete: missing selected_tags.csv.*SmilingWolf/wd-vit"):
        inspect_model_folder(folder)
    shutil.copy(wd14_dir / "selected_tags.csv", folder / "selected_tags.csv")
    with (folder / "selected_tags.csv").open("a", encoding="utf-8") as f:
        f.write("99,extra_tag,0,1\n")
    with pytest.raises(CaptionError, match="11 tags.*different models"):
        load_captioner(inspect_model_folder(folder))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(CaptionError, match=r"optional package onnxruntime: install it.*pip install onnxruntime"):
        inspect_model_folder(wd14_dir)


def test_a_clip_is_captioned_from_its_middle_frame_next_to_images(blip, tmp_path: Path) -> None:
    """A folder with a clip: Auto Caption's engine opens its middle frame (what a captioner can look at), writes the
    clip's sidecar like an image's, and Load Dataset reads it back for every window of the clip."""
    import av
    import numpy as np

    from lora_core.data import clip_still

    paths = make_images(tmp_path / "data", 1)
    clip = tmp_path / "data" / "walk.mp4"
    with av.open(str(clip), "w") as out:  # frame i is grey level 20 * i
        stream = out.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=16)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(9):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    assert abs(float(np.asarray(clip_still(clip, 10**9)).mean()) - 80) < 6  # frame 4 of 0..8
    report = run([*paths, clip], blip, max_new_tokens=8)
    assert [o.status for o in report.outcomes] == ["new", "new"]
    text = clip.with_suffix(".txt").read_text(encoding="utf-8")
    assert text and text == report.outcomes[1].caption
    scanned = scan_dataset(DatasetConfig(folder=str(tmp_path / "data"), frames=5, frame_sampling="uniform", windows=2))
    assert [r.caption for r in scanned.records if r.is_clip] == [text, text]
