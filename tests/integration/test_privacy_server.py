"""What a LoRA saved through a real ComfyUI server reveals about the machine: no paths, home, user or host name.

One training run (a dataset given as an absolute folder outside ComfyUI's input, and a UI workflow that names the
home folder, the user and the host); every other case re-runs only Save LoRA (ComfyUI caches the rest).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import re
import socket
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from comfy_harness import make_images, tiny_train_workflow

NAME = "privacy"


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def _identity() -> tuple[str, str, str]:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = Path.home().name
    return str(Path.home()), user, socket.gethostname()


@pytest.fixture(scope="module")
def private(server, tmp_path_factory):
    """The graph, trained once, with the private facts it carries."""
    dataset = make_images(tmp_path_factory.mktemp("private") / "holiday_photos", n=4)
    home, user, host = _identity()
    wf = tiny_train_workflow(NAME, steps=4)
    wf["2"]["inputs"]["folder"] = str(dataset)
    wf["5"]["inputs"].update(save_checkpoint=True)
    ui = {"nodes": [  # what the frontend sends as extra_pnginfo.workflow, with the same absolute folder in it
        {"id": 2, "type": "KilnLoadDataset", "widgets_values": [str(dataset), 64, True, "", 1, ".txt", "error"]},
        {"id": 9, "type": "Note", "widgets_values": [
            f"made by {user} on {host}; models in {home}/comfy/models, copies in C:\\Users\\{user}\\loras"]},
    ]}
    result = server.run(wf, extra_data={"extra_pnginfo": {"workflow": ui}})
    assert result.status == "success", result.error
    return {"workflow": wf, "ui": ui, "dataset": dataset, "result": result}


def _secrets(server, dataset: Path) -> list[str]:
    home, user, _ = _identity()
    found = {str(server.base), str(server.base.resolve()), str(dataset), str(dataset.resolve()),
             str(dataset.parent), f"/{user}/", f"\\{user}\\"}
    if len(home) > 1:
        found.add(home)
    return sorted(found)


def _assert_reveals_nothing(server, meta: dict[str, str], dataset: Path) -> None:
    host = socket.gethostname()
    host_word = re.compile(rf"(?<![\w-]){re.escape(host)}(?![\w-])", re.IGNORECASE) if host else None
    for key, value in meta.items():
        for secret in _secrets(server, dataset):
            assert secret not in value, f"{key} contains {secret!r}: {value[:300]}"
        if host_word is not None and host.lower() != "localhost":
            assert not host_word.search(value), f"{key} names the host {host!r}: {value[:300]}"


def test_a_saved_lora_reveals_no_path_home_user_or_host(server, private):
    meta = _metadata(server.base / "models" / "loras" / f"{NAME}.safetensors")
    _assert_reveals_nothing(server, meta, private["dataset"])
    prompt = json.loads(meta["prompt"])
    assert prompt["2"]["inputs"]["folder"] == "holiday_photos"  # the folder by its base name
    assert prompt["4"]["class_type"] == "KilnTrainSteps"
    workflow = json.loads(meta["workflow"])
    assert workflow["nodes"][0]["widgets_values"][0] == "holiday_photos"
    assert "<host>" in workflow["nodes"][1]["widgets_values"][0]
    assert json.loads(meta["ss_dataset_dirs"]) == {"1_holiday_photos": {"n_repeats": 1, "img_count": 4}}
    assert meta["ss_sd_model_name"] == "tiny_sd15.safetensors"


def test_the_checkpoint_saved_with_it_reveals_nothing_either(server, private):
    ckpts = sorted((server.base / "output" / "lora_kiln" / NAME / "checkpoints").glob("*.kiln.safetensors"))
    assert ckpts
    meta = _metadata(ckpts[-1])
    _assert_reveals_nothing(server, meta, private["dataset"])
    info = json.loads(meta["kiln_state"])["info"]
    assert "1_holiday_photos" in info["dataset_dirs"]
    text = private["result"].history["outputs"]["5"]["text"]
    assert any(line.startswith("checkpoint: output/lora_kiln/") for line in text), text
    assert all(str(server.base) not in line for line in text), text


def test_the_kohya_hashes_are_those_of_the_written_file(server, private):
    path = server.base / "models" / "loras" / f"{NAME}.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + n])["__metadata__"]
    ss_only = st_save(load_file(str(path)), {k: v for k, v in meta.items() if k.startswith("ss_")})
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + n:]).hexdigest()
    assert meta["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]


def test_embed_workflow_full_keeps_the_absolute_folder_and_none_embeds_nothing(server, private):
    for mode in ("full", "none"):
        wf = json.loads(json.dumps(private["workflow"]))
        wf["5"]["inputs"].update(filename=f"{NAME}_{mode}", embed_workflow=mode, save_checkpoint=False)
        result = server.run(wf, extra_data={"extra_pnginfo": {"workflow": private["ui"]}})
        assert result.status == "success", result.error
        assert "4" not in {d.get("node") for d in result.of_type("executing")}  # training came from the cache
        meta = _metadata(server.base / "models" / "loras" / f"{NAME}_{mode}.safetensors")
        if mode == "full":
            assert json.loads(meta["prompt"])["2"]["inputs"]["folder"] == str(private["dataset"])
            assert json.loads(meta["workflow"]) == private["ui"]
        else:
            assert "prompt" not in meta and "workflow" not in meta
        rest = {k: v for k, v in meta.items() if k not in ("prompt", "workflow")}
        _assert_reveals_nothing(server, rest, private["dataset"])


def test_a_300_character_name_is_refused_clearly_without_server_paths(server, private):
    wf = json.loads(json.dumps(private["workflow"]))
    wf["5"]["inputs"].update(filename="n" * 300, save_checkpoint=False)
    result = server.run(wf)
    assert result.status == "error"
    err = result.error
    assert err["node_type"] == "KilnSaveLoRA"
    message = err["exception_message"]
    assert "too long" in message and "300 bytes" in message and "nothing was written" in message
    assert "Errno" not in message and str(server.base) not in message
    assert not list((server.base / "models" / "loras").glob("nnnn*"))

    wf = json.loads(json.dumps(private["workflow"]))
    wf["3"]["inputs"]["name"] = "m" * 300
    result = server.run(wf)
    assert result.status == "error" and result.error["node_type"] == "KilnInjectLoRA"
    assert "too long" in result.error["exception_message"]
    assert str(server.base) not in result.error["exception_message"]


def test_a_name_escaping_through_a_symlink_is_refused_without_server_paths(server, private, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    link = server.base / "models" / "loras" / "privacy_link"
    link.symlink_to(outside, target_is_directory=True)
    wf = json.loads(json.dumps(private["workflow"]))
    wf["5"]["inputs"].update(filename="privacy_link/x", save_checkpoint=False)
    result = server.run(wf)
    assert result.status == "error"
    message = result.error["exception_message"]
    assert "resolves outside models/loras" in message and str(server.base) not in message
    assert not list(outside.iterdir())
