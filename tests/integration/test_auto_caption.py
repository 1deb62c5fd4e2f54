"""Auto Caption on a real ComfyUI server: caption in the training graph, files, policy, cache, errors, Cancel."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from comfy_harness import PromptRejected, make_images, tiny_train_workflow
from lora_core.caption.tiny import build_tiny_blip, build_tiny_florence2

CAPTION = {"prompt": "", "max_tokens": 8, "batch_size": 2, "beams": 1, "trigger_word": "kilnsks", "prefix": "",
           "suffix": "", "existing_captions": "keep", "write_to": "sidecar"}


@pytest.fixture(scope="module")
def captioners(server):
    root = server.base / "models" / "captioners"
    build_tiny_blip(root / "tiny-blip")
    build_tiny_florence2(root / "tiny-florence")
    return root


def caption_graph(name: str, folder: str, **caption_inputs) -> dict:
    """Load Checkpoint -> Load Dataset -> Auto Caption -> Inject LoRA -> Train Steps (2 steps) -> Save LoRA."""
    wf = tiny_train_workflow(name, steps=2)
    wf["2"]["inputs"]["folder"] = folder
    wf["10"] = {"class_type": "KilnAutoCaption",
                "inputs": {**CAPTION, "model": "tiny-blip", "dataset": ["2", 0], **caption_inputs}}
    wf["4"]["inputs"]["dataset"] = ["10", 0]
    return wf


def cached_nodes(result) -> set[str]:
    return {n for d in result.of_type("execution_cached") for n in d["nodes"]}


def test_auto_caption_in_the_training_graph(server, captioners):
    folder = make_images(server.base / "input" / "caption_set", n=4, captions=False)
    hand = folder / "img_00.txt"
    hand.write_text("hand fixed, red circle", encoding="utf-8")
    images = {p: p.read_bytes() for p in folder.glob("*.png")}

    wf = caption_graph("captioned", "caption_set")
    first = server.run(wf)
    assert first.status == "success", first.error
    assert hand.read_text(encoding="utf-8") == "hand fixed, red circle"  # keep: the hand fix stays
    written = {i: (folder / f"img_{i:02d}.txt").read_text(encoding="utf-8") for i in range(1, 4)}
    for text in written.values():
        assert text.startswith("kilnsks, ") and text.count("kilnsks") == 1 and len(text.split()) >= 2
    assert all(p.read_bytes() == data for p, data in images.items())  # images untouched
    assert sorted(p.name for p in folder.iterdir()) == sorted([f"img_{i:02d}.{e}" for i in range(4) for e in ("png", "txt")])

    ui = first.history["outputs"]["10"]["text"][0]
    assert "4 images: 3 new, 1 kept; 3 caption files written" in ui
    assert "[kept] img_00.png: hand fixed, red circle" in ui
    for i, text in written.items():
        assert f"[new] img_{i:02d}.png: {text}" in ui

    # the captions fed Train Steps directly: they are in the LoRA's tag frequency
    with safe_open(str(server.base / "models" / "loras" / "captioned.safetensors"), "pt") as f:
        tags = json.loads(f.metadata()["ss_tag_frequency"])["1_caption_set"]
    assert tags["kilnsks"] == 3 and tags["hand fixed"] == 1 and tags["red circle"] == 1

    # re-queue without changes: nothing re-runs (the files Auto Caption wrote are not 'changes')
    second = server.run(wf)
    assert second.status == "success", second.error
    assert {"2", "10", "4", "5"} <= cached_nodes(second)

    # a hand edit of a written caption: Load Dataset and Auto Caption re-run, and 'keep' keeps the edit
    (folder / "img_02.txt").write_text("fixed later by hand", encoding="utf-8")
    third = server.run(wf)
    assert third.status == "success", third.error
    assert not {"2", "10"} & cached_nodes(third)
    assert (folder / "img_02.txt").read_text(encoding="utf-8") == "fixed later by hand"
    ui = third.history["outputs"]["10"]["text"][0]
    assert "4 images: 4 kept; 0 caption files written" in ui and "model tiny-blip (BLIP) not needed" in ui


def test_caption_a_folder_into_metadata_csv_with_florence(server, captioners):
    folder = make_images(server.base / "input" / "caption_folder", n=3, captions=False)
    graph = {"1": {"class_type": "KilnAutoCaption", "inputs": {
        **CAPTION, "model": "tiny-florence", "folder": "caption_folder", "prompt": "<CAPTION>", "trigger_word": "",
        "prefix": "a photo of ", "write_to": "metadata.csv", "existing_captions": "overwrite"}}}
    result = server.run(graph)
    assert result.status == "success", result.error
    lines = (folder / "metadata.csv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "file_name,text" and [line.split(",")[0] for line in lines[1:]] == [
        "img_00.png", "img_01.png", "img_02.png"]
    assert all(line.split(",", 1)[1].startswith("a photo of ") for line in lines[1:])
    assert not list(folder.glob("*.txt"))
    assert "3 images: 3 new; 1 caption files written" in result.history["outputs"]["1"]["text"][0]
    again = server.run(graph)
    assert "1" in cached_nodes(again)


def test_missing_or_incomplete_model_is_a_clear_error(server, captioners):
    make_images(server.base / "input" / "caption_missing", n=2, captions=False)
    with pytest.raises(PromptRejected) as err:
        server.run(caption_graph("nomodel", "caption_missing", model="blip-base"))
    details = json.dumps(err.value.body)
    assert "captioners/blip-base does not exist" in details
    assert "config.json" in details and "Salesforce/blip-image-captioning-base" in details

    broken = captioners / "broken-blip"
    build_tiny_blip(broken)
    (broken / "tokenizer.json").unlink()
    (broken / "vocab.txt").unlink()
    with pytest.raises(PromptRejected) as err:
        server.run(caption_graph("nomodel", "caption_missing", model="broken-blip"))
    assert "(BLIP) is incomplete: missing tokenizer.json or vocab.txt" in json.dumps(err.value.body)


def test_corrupt_image_stops_with_the_file_named(server, captioners):
    folder = make_images(server.base / "input" / "caption_corrupt", n=3, captions=False)
    graph = {"1": {"class_type": "KilnAutoCaption", "inputs": {**CAPTION, "model": "tiny-blip",
                                                               "folder": "caption_corrupt", "batch_size": 1}}}
    (folder / "img_02.png").write_bytes((folder / "img_02.png").read_bytes()[:60])
    result = server.run(graph)
    assert result.status == "error"
    assert "img_02.png" in result.error["exception_message"] and "corrupt" in result.error["exception_message"]


def test_cancel_keeps_the_captions_written_so_far(server, captioners):
    build_tiny_blip(captioners / "small-blip", size="small")
    folder = make_images(server.base / "input" / "caption_cancel", n=24, size=(96, 96), captions=False)
    graph = {"1": {"class_type": "KilnAutoCaption", "inputs": {**CAPTION, "model": "small-blip",
                                                               "folder": "caption_cancel", "batch_size": 1,
                                                               "max_tokens": 20}}}
    seen = []

    def on_message(kind, data):
        if kind == "progress" and data.get("node") == "1":
            seen.append(data["value"])
            if len(seen) == 2:
                server.interrupt()

    result = server.run(graph, on_message=on_message, timeout=300)
    assert result.status == "interrupted"
    # one step per image (batch_size 1); ComfyUI >= 0.3.7x sends a bar update only every 100 ms or so, so the second
    # message may already count more than 2
    assert seen[0] == 1 and seen[1] >= 2 and seen == sorted(seen)
    texts = [d["text"] for d in result.of_type("progress_text") if d["node"] == "1"]
    assert texts and texts[0].startswith("1/24 images · ") and "images/s · ETA " in texts[0]
    written = sorted(folder.glob("*.txt"))
    assert 2 <= len(written) < 24
    for path in written:
        assert path.read_text(encoding="utf-8").startswith("kilnsks, ")
    assert not list(folder.glob(".*.tmp"))
    assert server.get("/system_stats")


def test_node_is_registered_with_tooltips_and_its_caption_view_is_served(server, captioners):
    info = server.get("/object_info/KilnAutoCaption")["KilnAutoCaption"]
    assert info["category"] == "LoRA Kiln/data" and info["output_node"] is True
    assert info["output"] == ["KILN_DATASET", "STRING"]
    inputs = {**info["input"]["required"], **info["input"].get("optional", {})}
    assert all(spec[1].get("tooltip") for spec in inputs.values())
    assert {"tiny-blip", "tiny-florence"} <= set(inputs["model"][1]["options"])
    assert inputs["existing_captions"][1]["default"] == "keep"
    assert any(e.endswith("/kiln_caption_view.js") for e in server.get("/extensions"))


def test_wd14_tagger_tags_feed_training(server, captioners):
    pytest.importorskip("onnx", reason="building the tiny WD14 tagger needs the onnx package")
    pytest.importorskip("onnxruntime", reason="the WD14 tagger needs onnxruntime (optional)")
    from lora_core.caption.tiny import build_tiny_wd14

    build_tiny_wd14(captioners / "tiny-wd14")
    folder = make_images(server.base / "input" / "caption_tags", n=3, captions=False)
    wf = caption_graph("tagged", "caption_tags", model="tiny-wd14", prompt="0.4", trigger_word="")
    wf["2"]["inputs"]["trigger_word"] = "kilnwd"  # Load Dataset's trigger is applied on top for training
    result = server.run(wf)
    assert result.status == "success", result.error
    for i in range(3):  # the tiny tagger's tags are known: 1girl (0.50) and ^_^ (0.45) pass 0.4, ribbon (0.38) not
        tags = (folder / f"img_{i:02d}.txt").read_text(encoding="utf-8").split(", ")
        assert {"1girl", "^_^"} <= set(tags) and not {"hair ribbon", "solo", "kilnwd"} & set(tags)
        assert tags.index("1girl") < tags.index("^_^")  # most probable first
    with safe_open(str(server.base / "models" / "loras" / "tagged.safetensors"), "pt") as f:
        freq = json.loads(f.metadata()["ss_tag_frequency"])["1_caption_tags"]
    assert freq["kilnwd"] == 3 and freq["1girl"] == 3 and freq["^_^"] == 3
    assert "Load Dataset's trigger word 'kilnwd' is applied on top" in result.history["outputs"]["10"]["text"][0]
