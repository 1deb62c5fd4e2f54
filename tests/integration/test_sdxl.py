"""SDXL end to end on a real ComfyUI server: checkpoints the stock CheckpointLoaderSimple detects as SDXL.

One epsilon and one v-prediction (+ zero-terminal SNR) SDXL checkpoint are built once per session (a 152 M
UNet with the full CLIP-L and CLIP-G, see nodes/tiny_checkpoint.py) and dropped into the shared server's
models/checkpoints, so these tests share the server of the other integration tests.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from comfy_harness import build_tiny_checkpoint, find_comfyui

KSAMPLER = {"seed": 7, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}
XL, XL_V = "tiny_sdxl.safetensors", "tiny_sdxl_vpred_ztsnr.safetensors"


def _install(server, built, name):
    target = server.base / "models" / "checkpoints" / name
    if not target.exists():
        try:
            os.link(built, target)
        except OSError:
            shutil.copy(built, target)


@pytest.fixture(scope="session")
def sdxl(server, sdxl_checkpoint):
    _install(server, sdxl_checkpoint, XL)
    return server


@pytest.fixture(scope="session")
def sdxl_vpred(server, tmp_path_factory):
    built = build_tiny_checkpoint(find_comfyui(), tmp_path_factory.mktemp("xlv") / XL_V, size="sdxl", flags=("--ztsnr",))
    _install(server, built, XL_V)
    return server


def render(ckpt: str, prefix: str, lora: str | None = None, base: int = 100) -> dict:
    """Nodes rendering one 64x64 image from ``ckpt`` (through the stock LoraLoader when ``lora`` is given)."""
    i = [str(base + k) for k in range(8)]
    graph = {i[0]: {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}}
    model, clip = [i[0], 0], [i[0], 1]
    if lora:
        graph[i[1]] = {"class_type": "LoraLoader", "inputs": {"model": model, "clip": clip, "lora_name": lora,
                                                               "strength_model": 1.0, "strength_clip": 1.0}}
        model, clip = [i[1], 0], [i[1], 1]
    graph.update({
        i[2]: {"class_type": "CLIPTextEncode", "inputs": {"text": "a kilnshape circle", "clip": clip}},
        i[3]: {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip}},
        i[4]: {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        i[5]: {"class_type": "KSampler", "inputs": {**KSAMPLER, "model": model, "positive": [i[2], 0],
                                                    "negative": [i[3], 0], "latent_image": [i[4], 0]}},
        i[6]: {"class_type": "VAEDecode", "inputs": {"samples": [i[5], 0], "vae": [i[0], 2]}},
        i[7]: {"class_type": "SaveImage", "inputs": {"images": [i[6], 0], "filename_prefix": prefix}},
    })
    return graph


def image(server, result, node_id: str) -> np.ndarray:
    info = result.history["outputs"][node_id]["images"][0]
    return np.asarray(Image.open(server.base / "output" / info["subfolder"] / info["filename"]), dtype=np.int16)


def train_graph(ckpt: str, name: str, steps: int, text_encoder: bool = False, **train) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "KilnLoadDataset", "inputs": {
            "folder": "shapes", "vae": ["1", 2], "clip": ["1", 1], "resolution": 64, "bucketing": True,
            "trigger_word": "", "repeats": 1, "caption_extension": ".txt", "on_error": "error"}},
        "3": {"class_type": "KilnInjectLoRA", "inputs": {
            "model": ["1", 0], "name": name, "rank": 4, "alpha": 4.0, "targets": "attn+ff", "algorithm": "lora",
            "conv_rank": 0, "dropout": 0.0, "init_lora": "none", "seed": 0, "train_text_encoder": text_encoder,
            "clip": ["1", 1]}},
        "4": {"class_type": "KilnTrainSteps", "inputs": {
            "state": ["3", 0], "dataset": ["2", 0], "steps": steps, "learning_rate": 1e-3, "optimizer": "adamw",
            "scheduler": "constant", "warmup_steps": 0, "schedule_steps": 0, "batch_size": 2, "grad_accum": 1,
            "precision": "fp32", "gradient_checkpointing": False, "min_snr_gamma": 5.0, "noise_offset": 0.0,
            "save_every": 0, "preview_every": 0, "preview_prompt": "a kilnshape circle", "preview_seed": 0,
            "preview_size": 64, "preview_steps": 2, "text_encoder_lr": 5e-4, "max_grad_norm": 1.0, **train}},
        "5": {"class_type": "KilnSaveLoRA", "inputs": {"state": ["4", 0], "filename": name, "dtype": "fp16",
                                                       "save_checkpoint": False}},
    }


def keys_and_metadata(server, name):
    with safe_open(str(server.base / "models" / "loras" / f"{name}.safetensors"), "pt") as f:
        return list(f.keys()), f.metadata()


@pytest.fixture(scope="module")
def xl_trained(sdxl):
    """The base render before training, one SDXL run (both text encoders, a preview), the base render after."""
    before = sdxl.run(render(XL, "xl_base_before"))
    assert before.status == "success", before.error
    result = sdxl.run(train_graph(XL, "xl_lora", steps=4, text_encoder=True, preview_every=2), timeout=1200)
    assert result.status == "success", result.error
    return before, result


def test_sdxl_trains_with_progress_and_previews_and_saves_kohya_sdxl_keys(sdxl, xl_trained):
    _, result = xl_trained
    steps = [d["value"] for d in result.of_type("progress") if d.get("node") == "4" and d.get("max") == 4]
    assert steps[-1] == 4 and sorted(set(steps)) == [1, 2, 3, 4]
    assert len(result.history["outputs"]["4"]["kiln_previews"]) == 2  # steps 2 and 4, through ComfyUI's sampler
    assert len(result.previews) >= 2
    keys, meta = keys_and_metadata(sdxl, "xl_lora")
    bases = {k.split(".")[0] for k in keys}
    unet = {b for b in bases if b.startswith("lora_unet_")}
    assert unet and all(b.startswith(("lora_unet_input_blocks_", "lora_unet_output_blocks_")) for b in unet)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in unet  # kohya's SDXL (LDM) names
    te1 = {b for b in bases if b.startswith("lora_te1_text_model_encoder_layers_")}
    te2 = {b for b in bases if b.startswith("lora_te2_text_model_encoder_layers_")}
    assert len(te1) == 12 * 6 and len(te2) == 32 * 6  # q/k/v/out/fc1/fc2 of CLIP-L and CLIP-G
    assert bases == unet | te1 | te2
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_v_parameterization"] == "False" and meta["modelspec.prediction_type"] == "epsilon"
    assert meta["ss_sd_model_name"] == XL
    assert json.loads(meta["ss_resolution"].replace("(", "[").replace(")", "]")) == [64, 64]


def test_stock_lora_loader_applies_every_sdxl_key_and_the_base_renders_as_before(sdxl, xl_trained):
    before, _ = xl_trained
    log_start = len(sdxl.log())
    graph = {**render(XL, "xl_with_lora", lora="xl_lora.safetensors", base=200),
             **render(XL, "xl_base_after", base=300)}
    result = sdxl.run(graph)
    assert result.status == "success", result.error
    log = sdxl.log()[log_start:]
    assert "lora key not loaded" not in log, log[-2000:]
    base_before, base_after = image(sdxl, before, "107"), image(sdxl, result, "307")
    assert np.array_equal(base_before, base_after)  # the shared SDXL model is untouched by training
    assert np.abs(image(sdxl, result, "207") - base_after).mean() > 0.5  # the LoRA changes the image


def test_v_prediction_sdxl_with_zero_terminal_snr_trains_on_its_own_schedule(sdxl_vpred):
    result = sdxl_vpred.run(train_graph(XL_V, "xl_vpred", steps=3, min_snr_gamma=5.0), timeout=1200)
    assert result.status == "success", result.error
    history = result.history["outputs"]["4"]["kiln_history"]
    assert len(history) == 3 and all(np.isfinite(h[1]) for h in history)  # min-SNR stays finite at SNR 0
    _, meta = keys_and_metadata(sdxl_vpred, "xl_vpred")
    assert meta["ss_v_parameterization"] == "True" and meta["ss_zero_terminal_snr"] == "True"
    assert meta["modelspec.prediction_type"] == "v"


def test_the_shipped_sdxl_example_workflow_trains_on_an_sdxl_checkpoint(sdxl):
    from comfy_harness import load_api

    wf = load_api("train_sdxl_lora")
    assert wf["2"]["inputs"]["resolution"] == 1024 and wf["4"]["inputs"]["gradient_checkpointing"] is True
    wf["1"]["inputs"]["ckpt_name"] = XL
    wf["2"]["inputs"].update(folder="shapes", resolution=64)
    wf["3"]["inputs"].update(name="xl_example", rank=4, alpha=4.0)
    wf["4"]["inputs"].update(steps=2, warmup_steps=0, save_every=0, preview_every=2, preview_size=64,
                             preview_steps=2)
    result = sdxl.run(wf, timeout=1200)
    assert result.status == "success", result.error
    _, meta = keys_and_metadata(sdxl, "xl_example")
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_steps"] == "2"
    assert meta["ss_gradient_checkpointing"] == "True"


def test_lcm_sampling_is_refused_at_inject_lora_by_name(server):
    graph = train_graph("tiny_sd15.safetensors", "lcm_refused", steps=1)
    graph["6"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["1", 0], "sampling": "lcm",
                                                                     "zsnr": False}}
    graph["3"]["inputs"]["model"] = ["6", 0]
    result = server.run(graph)
    assert result.status == "error"
    assert result.error["node_type"] == "KilnInjectLoRA"
    message = result.error["exception_message"]
    assert "LCM" in message and "50 sigmas" in message and "Inject LoRA" in message, message
