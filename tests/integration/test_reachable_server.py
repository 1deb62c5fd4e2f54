"""A server others can reach (``--listen 0.0.0.0``) reads and writes only ComfyUI's folders and allowed ones.

The server binds every interface, but every request of these tests goes to 127.0.0.1. The loopback server of the
other tests (ComfyUI's default) accepts any absolute folder (test_privacy_server.py trains from one).
"""

from __future__ import annotations

import os

import pytest

from comfy_harness import ComfyServer, find_comfyui, make_images
from lora_core.caption.tiny import build_tiny_blip

VAR = "KILN_ALLOWED_FOLDERS"


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    root = tmp_path_factory.mktemp("reach")
    return {"outside": make_images(root / "outside" / "cats", n=2),
            "allowed": make_images(root / "allowed" / "dogs", n=2),
            "root": root}


@pytest.fixture(scope="module")
def reachable(tmp_path_factory, tiny_checkpoint, places):
    base = tmp_path_factory.mktemp("reachable_base")
    srv = ComfyServer(find_comfyui(), base, tiny_checkpoint, extra_args=["--listen", "0.0.0.0"])
    make_images(base / "input" / "inside", n=2)
    (base / "input" / "escape").symlink_to(places["outside"], target_is_directory=True)
    build_tiny_blip(base / "models" / "captioners" / "tiny-blip")
    before = os.environ.get(VAR)
    os.environ[VAR] = os.pathsep.join([str(places["root"] / "allowed"), str(places["root"] / "not_there")])
    try:
        srv.start()
    finally:
        if before is None:
            os.environ.pop(VAR, None)
        else:
            os.environ[VAR] = before
    yield srv
    srv.stop()


def load_dataset_graph(folder: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "2": {"class_type": "KilnLoadDataset", "inputs": {
            "folder": folder, "vae": ["1", 2], "clip": ["1", 1], "resolution": 64, "bucketing": True,
            "trigger_word": "", "repeats": 1, "caption_extension": ".txt", "on_error": "error"}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}},
    }


def test_the_server_really_listens_beyond_loopback(reachable):
    assert "--listen" in reachable.proc.args and "0.0.0.0" in reachable.proc.args
    assert "0.0.0.0" in reachable.log()  # ComfyUI says where it listens


def test_a_folder_outside_comfyui_is_refused_naming_it_and_the_variable(reachable, places):
    result = reachable.run(load_dataset_graph(str(places["outside"])))
    assert result.status == "error"
    err = result.error
    assert err["node_type"] == "KilnLoadDataset"
    message = err["exception_message"]
    assert str(places["outside"]) in message and f"{VAR}=" in message and "0.0.0.0" in message
    assert str(reachable.base / "input") in message  # where to put it instead
    assert reachable.get("/system_stats")


@pytest.mark.parametrize("folder", ["escape", "../../outside/cats", "inside/../../outside"])
def test_symlinks_and_dotdot_cannot_leave_the_input_folder(reachable, folder):
    result = reachable.run(load_dataset_graph(folder))
    assert result.status == "error"
    assert VAR in result.error["exception_message"]


def test_a_folder_inside_input_is_read(reachable):
    result = reachable.run(load_dataset_graph("inside"))
    assert result.status == "success", result.error
    assert "2 images" in result.history["outputs"]["2"]["text"][0]


def test_an_absolute_path_into_input_is_read(reachable):
    result = reachable.run(load_dataset_graph(str(reachable.base / "input" / "inside" / ".")))
    assert result.status == "success", result.error


def test_a_folder_the_variable_allows_is_read(reachable, places):
    result = reachable.run(load_dataset_graph(str(places["allowed"])))
    assert result.status == "success", result.error
    assert "2 images" in result.history["outputs"]["2"]["text"][0]


def test_auto_caption_writes_nothing_outside_and_says_why(reachable, places):
    graph = {"1": {"class_type": "KilnAutoCaption", "inputs": {
        "model": "tiny-blip", "folder": str(places["outside"]), "prompt": "", "max_tokens": 8, "batch_size": 2,
        "beams": 1, "trigger_word": "", "prefix": "", "suffix": "", "existing_captions": "overwrite",
        "write_to": "sidecar + metadata.csv"}}}
    before = {p.name: p.read_bytes() for p in places["outside"].iterdir()}
    result = reachable.run(graph)
    assert result.status == "error"
    assert result.error["node_type"] == "KilnAutoCaption"
    assert str(places["outside"]) in result.error["exception_message"] and VAR in result.error["exception_message"]
    assert {p.name: p.read_bytes() for p in places["outside"].iterdir()} == before  # no caption read into the UI
    assert "a kilnshape circle" not in str(result.messages)  # the existing captions were not shown either
