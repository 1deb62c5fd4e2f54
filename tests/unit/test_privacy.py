"""What a shared LoRA or checkpoint reveals: redaction, kohya's model hashes, the base model's name, name limits."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from lora_core import AdapterConfig, AdapterSet, TrainState
from lora_core.fileio import atomic_save_safetensors
from lora_core.formats.kohya import (
    ARCHITECTURES,
    KohyaNaming,
    addnet_hashes,
    build_metadata,
    save_lora,
    with_addnet_hashes,
)
from lora_core.formats.privacy import Identity, Redactor, redact_metadata
from tiny_models import make_unet

ROOT = Path(__file__).resolve().parents[2]
ALICE = Identity(home="/home/alice", users=("alice",), hosts=("alice-laptop",))
WINDOWS = Identity(home="C:\\Users\\Bob", users=("Bob",), hosts=("BOB-PC",))


def _load_node_module(name: str):
    """nodes/<name>.py imports nothing from ComfyUI; load it by path (the nodes package needs ComfyUI)."""
    spec = importlib.util.spec_from_file_location(f"kiln_{name}", ROOT / "nodes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


model_source = _load_node_module("model_source")
file_names = _load_node_module("file_names")


# ---- redaction --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/home/alice/photos/cat", "cat"),
        ("/data/sets/cat/", "cat"),
        ("/home/alice", "~"),
        ("/srv/users/alice", "<user>"),  # a base name that is the user name says too much
        ("see /srv/users/alice; ok", "see <user>; ok"),
        ("~/photos/cat", "cat"),
        ("file:///home/alice/a/b.png", "b.png"),
        ("/srv/My Photos/set 1", "set 1"),  # a whole-string path may have spaces
        ("my_dataset", "my_dataset"),  # relative names stay
        ("kiln/my_lora", "kiln/my_lora"),
        ("alice", "alice"),  # a lone word is not a path component
        ("alice/photos", "<user>/photos"),
        ("../alice/photos", "../<user>/photos"),
        ("malice/photos", "malice/photos"),
        ("folder /home/alice/photos/cat does not exist", "folder cat does not exist"),
        ("see https://civitai.com/models/1/x and /data/a/b.png.", "see https://civitai.com/models/1/x and b.png."),
        ("1/2/3 and a/b", "1/2/3 and a/b"),
        ("trained on alice-laptop tonight", "trained on <host> tonight"),
        ("line one\n/home/alice/x/y\nalice/z", "line one\ny\n<user>/z"),
        ("", ""),
    ],
)
def test_posix_paths_become_base_names_and_identities_disappear(text, expected):
    assert Redactor(ALICE).text(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("C:\\Users\\Bob\\Pictures\\cat set", "cat set"),
        ("D:/datasets/cat", "cat"),
        ("\\\\nas\\share\\cat", "cat"),
        ("copied from C:\\Users\\Bob\\Downloads\\x.png today", "copied from x.png today"),
        ("made on bob-pc", "made on <host>"),
    ],
)
def test_windows_paths_are_recognised_on_any_machine(text, expected):
    assert Redactor(WINDOWS).text(text) == expected


def test_home_inside_a_longer_text_is_replaced_even_when_not_a_clean_path():
    r = Redactor(ALICE)
    assert r.text("cd /home/alice; ls") == "cd ~; ls"
    assert r.text("HOME=/home/alice") == "HOME=~"


def test_json_values_are_redacted_recursively_keys_included():
    prompt = {
        "2": {"class_type": "KilnLoadDataset", "inputs": {"folder": "/home/alice/photos/cat", "clip": ["1", 1],
                                                          "resolution": 512}},
        "9": {"class_type": "Note", "inputs": {"text": "from /mnt/alice-laptop/sets/a on alice-laptop"}},
        "/home/alice/key/x": [True, None, 1.5, ["/var/tmp/x/y"]],
    }
    out = Redactor(ALICE).value(prompt)
    assert out["2"]["inputs"] == {"folder": "cat", "clip": ["1", 1], "resolution": 512}
    assert out["9"]["inputs"]["text"] == "from a on <host>"
    assert out["x"] == [True, None, 1.5, ["y"]]
    assert "alice" not in json.dumps(out).replace("<user>", "")


def test_metadata_values_holding_json_are_redacted_inside_and_clean_values_keep_their_exact_text():
    meta = {
        "prompt": json.dumps({"2": {"inputs": {"folder": "/home/alice/photos"}}}),
        "workflow": json.dumps({"nodes": [{"widgets_values": ["/home/alice/photos", 512]}]}),
        "ss_tag_frequency": json.dumps({"1_cat": {"cat": 3}}),  # nothing to redact: byte-identical
        "ss_training_comment": "trained on alice-laptop",
        "ss_network_dim": "16",
    }
    out = redact_metadata(meta, ALICE)
    assert json.loads(out["prompt"]) == {"2": {"inputs": {"folder": "photos"}}}
    assert json.loads(out["workflow"]) == {"nodes": [{"widgets_values": ["photos", 512]}]}
    assert out["ss_tag_frequency"] == meta["ss_tag_frequency"]
    assert out["ss_training_comment"] == "trained on <host>"
    assert out["ss_network_dim"] == "16"
    kept = redact_metadata(meta, ALICE, keep=("prompt", "workflow"))
    assert kept["prompt"] == meta["prompt"] and kept["workflow"] == meta["workflow"]


def test_this_machines_home_user_and_host_are_found_and_removed():
    home = Path.home()
    r = Redactor()
    assert r.text(str(home / "secret" / "photos")) == "photos"
    said = r.text(f"dataset at {home}/My Photos/cat, built on {socket.gethostname()}")
    if len(str(home)) > 1:
        assert str(home) not in said
    host = socket.gethostname()
    if len(host) >= 2 and host.lower() not in ("localhost",):
        assert host not in said


def test_an_identity_of_root_or_a_bare_drive_matches_nothing():
    assert Identity(home="/").home == ""
    assert Identity(home="C:\\").home == ""
    assert Redactor(Identity(home="/")).text("a /b c") == "a /b c"


# ---- checkpoints ------------------------------------------------------------------------------


def _state(info=None) -> TrainState:
    unet = make_unet()
    adapters = AdapterSet.create({"unet": unet}, AdapterConfig(rank=4, alpha=2, unet_targets="attn"), seed=0)
    return TrainState.from_adapters(adapters, info=info or {})


def test_checkpoint_info_and_extra_metadata_are_redacted_but_resume_data_is_exact(tmp_path):
    home = str(Path.home()) if len(str(Path.home())) > 1 else "/home/someone"
    secret = f"{tmp_path}/private/photos"
    state = _state({"dataset_dirs": {"1_photos": {"n_repeats": 1}}, "source": secret,
                    "note": f"{home}/kiln/x.txt"}).replace(step=7, optimizer_name="adamw")
    path = state.save(tmp_path / "c.kiln.safetensors", extra_metadata={"kiln_name": "run", "origin": secret})
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    for value in meta.values():
        assert str(tmp_path) not in value and home not in value
    back = TrainState.load(path)
    assert back.info["source"] == "photos" and back.info["note"] == "x.txt"
    assert meta["origin"] == "photos" and meta["kiln_name"] == "run"
    assert back.step == 7 and back.specs == state.specs
    assert all(torch.equal(back.weights[k], v) for k, v in state.weights.items())
    full = TrainState.load(state.save(tmp_path / "d.kiln.safetensors", redact=False))
    assert full.info["source"] == secret


# ---- kohya's hashes ---------------------------------------------------------------------------


def _independent_hashes(path: Path) -> tuple[str, str]:
    """How sd-webui-additional-networks reads the two hashes of a file, written from scratch.

    New hash: SHA-256 of the file after its header. Legacy hash: if the file has any non-ss_* metadata, re-serialise
    its tensors with only the ss_* metadata and take bytes 0x100000..0x110000, else read them from the file.
    """
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    new = hashlib.sha256(data[8 + n:]).hexdigest()
    header = json.loads(data[8:8 + n])
    meta = header.get("__metadata__", {})
    if any(not k.startswith("ss_") for k in meta):
        tensors = load_file(str(path))
        data = st_save(tensors, {k: v for k, v in meta.items() if k.startswith("ss_")})
    return new, hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def test_sshs_hashes_match_what_additional_networks_computes_from_the_written_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {  # more than 1.1 MiB, so the legacy hash covers real bytes, in two dtypes as a LoRA has
        "lora_unet_a.lora_down.weight": torch.randn(64, 4096, generator=g).half(),
        "lora_unet_a.lora_up.weight": torch.randn(4096, 64, generator=g).half(),
        "lora_unet_a.alpha": torch.tensor(8.0),
    }
    meta = {"ss_network_dim": "64", "ss_output_name": "x", "modelspec.title": "x",
            "workflow": json.dumps({"nodes": list(range(500))})}  # non-ss_ data moves the header, not the hashes
    final = with_addnet_hashes(tensors, meta)
    path = atomic_save_safetensors(tensors, tmp_path / "x.safetensors", final)
    new, legacy = _independent_hashes(path)
    assert final["sshs_model_hash"] == new
    assert final["sshs_legacy_hash"] == legacy
    assert legacy != hashlib.sha256(b"").hexdigest()[:8]
    # the hashes depend on the ss_* metadata only
    assert addnet_hashes(tensors, {**meta, "workflow": "{}"}) == (new, legacy)
    assert addnet_hashes(tensors, {**meta, "ss_output_name": "a longer name"})[1] != legacy  # header grew


def test_save_lora_writes_the_hashes_of_its_own_bytes(tmp_path):
    state = _state({"resolution": (64, 64)})
    meta = build_metadata(state, title="t", extra={"prompt": "{}"})
    path = save_lora(state, tmp_path / "t.safetensors", KohyaNaming(path_maps={}), metadata=meta)
    with safe_open(str(path), "pt") as f:
        got = f.metadata()
    assert (got["sshs_model_hash"], got["sshs_legacy_hash"]) == _independent_hashes(path)


# ---- modelspec --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "architecture", "implementation"),
    [  # architecture as kohya's sai_model_spec writes it; the implementation never "diffusers" for a kohya file
        ("sd_v1", "stable-diffusion-v1/lora", "https://github.com/kohya-ss/sd-scripts"),
        ("sd_v2", "stable-diffusion-v2-512/lora", "https://github.com/kohya-ss/sd-scripts"),
        ("sd_v2_768_v", "stable-diffusion-v2-768-v/lora", "https://github.com/kohya-ss/sd-scripts"),
        ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "https://github.com/Stability-AI/generative-models"),
    ],
)
def test_modelspec_architecture_and_implementation(version, architecture, implementation):
    assert version in ARCHITECTURES
    meta = build_metadata(_state(), title="t", base_model_version=version, base_model_name="base.safetensors")
    assert meta["modelspec.architecture"] == architecture
    assert meta["modelspec.implementation"] == implementation
    assert meta["ss_sd_model_name"] == "base.safetensors"


# ---- the base model's file name, from the prompt ----------------------------------------------


def _prompt(**nodes):
    return {k: {"class_type": v[0], "inputs": v[1]} for k, v in nodes.items()}


def test_model_name_follows_model_passing_nodes_to_the_loader():
    prompt = _prompt(**{
        "1": ("CheckpointLoaderSimple", {"ckpt_name": "SD15\\realistic\\v1-5-pruned.safetensors"}),
        "2": ("LoraLoader", {"model": ["1", 0], "clip": ["1", 1], "lora_name": "style.safetensors"}),
        "3": ("ModelSamplingDiscrete", {"model": ["2", 0], "sampling": "eps"}),
        "4": ("KilnInjectLoRA", {"model": ["3", 0], "name": "x"}),
        "5": ("KilnTrainSteps", {"state": ["4", 0]}),
        "6": ("KilnInjectLoRA", {"model": ["5", 1], "name": "y"}),
    })
    assert model_source.model_file_name(prompt, "4") == "v1-5-pruned.safetensors"
    assert model_source.model_file_name(prompt, "6") == "v1-5-pruned.safetensors"  # through Train Steps' state


@pytest.mark.parametrize(
    ("loader", "inputs", "expected"),
    [
        ("UNETLoader", {"unet_name": "flux/flux1-dev.safetensors", "weight_dtype": "default"}, "flux1-dev.safetensors"),
        ("CheckpointLoader", {"config_name": "v1.yaml", "ckpt_name": "a.ckpt"}, "a.ckpt"),
        ("SomeCustomLoader", {"ckpt_name": "/abs/models/custom.safetensors"}, "custom.safetensors"),
        ("DiffusersLoader", {"model_path": "stable-diffusion-v1-5"}, "stable-diffusion-v1-5"),
    ],
)
def test_model_name_reads_each_loader_kind(loader, inputs, expected):
    prompt = _prompt(**{"1": (loader, inputs), "2": ("KilnLoadCheckpoint", {"model": ["1", 0]})})
    assert model_source.model_file_name(prompt, "2") == expected


def test_model_name_through_a_primitive_and_a_merge_and_in_subgraph_ids():
    prompt = _prompt(**{
        "7": ("PrimitiveString", {"value": "base.safetensors"}),
        "5:1": ("CheckpointLoaderSimple", {"ckpt_name": ["7", 0]}),
        "5:2": ("CheckpointLoaderSimple", {"ckpt_name": "other.safetensors"}),
        "5:3": ("ModelMergeSimple", {"model1": ["5:1", 0], "model2": ["5:2", 0], "ratio": 0.5}),
        "5:4": ("KilnInjectLoRA", {"model": ["5:3", 0]}),
    })
    assert model_source.model_file_name(prompt, "5:4") == "base.safetensors"


@pytest.mark.parametrize(
    "prompt",
    [None, {}, {"4": {"class_type": "KilnInjectLoRA", "inputs": {}}},
     {"4": {"class_type": "KilnInjectLoRA", "inputs": {"model": ["9", 0]}}},  # dangling link
     {"4": {"class_type": "KilnInjectLoRA", "inputs": {"model": ["5", 0]}},  # a cycle
      "5": {"class_type": "X", "inputs": {"model": ["6", 0]}}, "6": {"class_type": "Y", "inputs": {"model": ["5", 0]}}},
     {"4": {"class_type": "KilnInjectLoRA", "inputs": {"model": ["5", 0]}}, "5": "garbage"}],
)
def test_model_name_is_empty_when_the_prompt_does_not_say(prompt):
    assert model_source.model_file_name(prompt, "4") == ""


def test_the_shipped_example_names_its_checkpoint():
    api = json.loads((ROOT / "example_workflows" / "api" / "train_sd15_lora.json").read_text())
    inject = next(k for k, v in api.items() if v["class_type"] == "KilnInjectLoRA")
    assert model_source.model_file_name(api, inject) == api["1"]["inputs"]["ckpt_name"]


# ---- name limits and what a client is shown ----------------------------------------------------


def _name_max(folder: Path) -> int:
    try:
        return min(os.pathconf(folder, "PC_NAME_MAX"), 255)
    except (AttributeError, OSError, ValueError):
        return 255


def test_a_300_character_file_name_is_refused_before_writing_without_the_server_path(tmp_path):
    root = tmp_path / "models" / "loras"
    with pytest.raises(ValueError) as info:
        file_names.check_file_name(root, "x" * 300, ".safetensors", what="filename")
    message = str(info.value)
    assert "too long" in message and "300 bytes" in message and "choose a shorter name" in message
    assert str(tmp_path) not in message and len(message) < 400
    assert not root.exists()


def test_the_longest_accepted_file_name_really_can_be_written_even_numbered(tmp_path):
    limit = _name_max(tmp_path) - len(".safetensors") - len("_00000") - file_names.TEMP_EXTRA
    file_names.check_file_name(tmp_path, "a" * limit, ".safetensors")
    with pytest.raises(ValueError, match=f"at most {limit} fit"):
        file_names.check_file_name(tmp_path, "a" * (limit + 1), ".safetensors")
    tensors = {"t": torch.zeros(1)}
    atomic_save_safetensors(tensors, tmp_path / ("a" * limit + "_00001.safetensors"))  # temp name fits too
    # bytes, not characters: "é" is two bytes in UTF-8
    with pytest.raises(ValueError, match="too long"):
        file_names.check_file_name(tmp_path, "é" * (limit // 2 + 1), ".safetensors")
    with pytest.raises(ValueError, match="the folder name 'ffff"):
        file_names.check_file_name(tmp_path, "f" * 300 + "/ok", ".safetensors")


def test_the_longest_accepted_lora_name_fits_its_run_folder_and_checkpoints(tmp_path):
    limit = _name_max(tmp_path) - file_names.CHECKPOINT_EXTRA - file_names.TEMP_EXTRA
    name = "r" * limit
    file_names.check_run_name(tmp_path, name)
    with pytest.raises(ValueError, match="too long"):
        file_names.check_run_name(tmp_path, name + "r")
    state = _state()
    state.save(tmp_path / name / "checkpoints" / f"{name}_step12345678_cancelled.kiln.safetensors")


def test_paths_are_shown_relative_to_labelled_folders_and_never_absolute(tmp_path):
    loras = tmp_path / "models" / "loras"
    roots = {"models/loras": loras, "output/lora_kiln": tmp_path / "output" / "lora_kiln"}
    assert file_names.shown_path(loras / "kiln" / "x.safetensors", roots) == "models/loras/kiln/x.safetensors"
    assert file_names.shown_path(tmp_path / "output" / "lora_kiln" / "a" / "c.kiln.safetensors", roots) == (
        "output/lora_kiln/a/c.kiln.safetensors")
    assert file_names.shown_path(Path("/elsewhere/deep/y.safetensors"), roots) == "y.safetensors"
    said = file_names.scrub(f"name 'x' resolves outside {loras} (through a symlink?)", roots)
    assert said == "name 'x' resolves outside models/loras (through a symlink?)"
