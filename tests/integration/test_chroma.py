"""Chroma (FLUX.1-schnell's blocks, de-distilled, one modulation network, T5 only) end to end on a real ComfyUI server.

The model is the smallest Chroma ComfyUI's detection accepts (nodes/tiny_checkpoint.py ``chroma``: one double- and one
single-stream block at the real width plus the fixed-size modulation network, 631 M parameters) from the stock
UNETLoader, with a 16-channel TAESD from the stock VAELoader. Its text encoder is the test-only TestTinyChromaCLIP node
(ComfyUI's PixArt tokenizer and T5 classes, a one-layer T5): the stock CLIPLoader always builds the full T5-XXL. The
LoRA is kohya's FLUX layout; ComfyUI's LoraLoader and diffusers' Chroma pipeline (its kohya FLUX converter) must apply
every key of it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_flux import KOHYA_FLUX_BASES, assert_diffusers_applies_the_kohya_flux_file
from test_sdxl import assert_stock_lora_renders_like_train_steps, install_checkpoint, keys_and_metadata

from comfy_harness import load_api, text_to_image

CHROMA, VAE = "tiny_chroma.safetensors", "tiny_chroma_vae.safetensors"
# one sampler step: every network call runs the fixed-size modulation network (344 rows through 5 layers of width 5120,
# about 5 s a step at CFG on two CPU cores), which no smaller Chroma can shrink
KSAMPLER = {"seed": 7, "steps": 1, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}
ALPHA, RANK = 8.0, 4


@pytest.fixture(scope="session")
def chroma(server, chroma_files):
    unet, vae = chroma_files
    install_checkpoint(server, unet, CHROMA, "diffusion_models")
    install_checkpoint(server, vae, VAE, "vae")
    return server


def loaders(base: int) -> dict:
    """UNETLoader, the tiny Chroma text encoder and VAELoader as nodes ``base``, ``base + 1``, ``base + 2``."""
    return {
        str(base): {"class_type": "UNETLoader", "inputs": {"unet_name": CHROMA, "weight_dtype": "default"}},
        str(base + 1): {"class_type": "TestTinyChromaCLIP", "inputs": {"seed": 0}},
        str(base + 2): {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
    }


def render(prefix: str, base: int, model: list | None = None, lora: str | None = None) -> dict:
    """One 64x64 Chroma image as ComfyUI's Chroma example makes it (positive and empty negative, real CFG 4), from
    the UNETLoader, through LoraLoaderModelOnly(``lora``) or from the ``model`` link."""
    return text_to_image(loaders(base), base, prefix, KSAMPLER, model, lora, negative="")


def example_graph(name: str, steps: int, **train) -> dict:
    """example_workflows/api/train_chroma_lora.json as shipped (UNETLoader fp8, CLIPLoader t5xxl "chroma", VAELoader
    ae), with only what a test must change: the file names, the tiny T5 in place of the full one, the sizes, fp32 on
    the CPU (fp8 weights train in test_flux.py, slower on a CPU), a learning rate that shows in two steps, rank 4."""
    wf = load_api("train_chroma_lora")
    assert wf["1"]["class_type"] == "UNETLoader" and wf["1"]["inputs"]["weight_dtype"] == "fp8_e4m3fn"
    assert wf["7"]["class_type"] == "CLIPLoader" and wf["7"]["inputs"]["type"] == "chroma"
    assert wf["4"]["inputs"]["min_snr_gamma"] == 0.0 and wf["4"]["inputs"]["gradient_checkpointing"]
    wf["1"]["inputs"].update(unet_name=CHROMA, weight_dtype="default")
    wf["7"] = {"class_type": "TestTinyChromaCLIP", "inputs": {"seed": 0}}
    wf["8"]["inputs"]["vae_name"] = VAE
    wf["2"]["inputs"].update(folder="shapes", resolution=64)
    wf["3"]["inputs"].update(name=name, rank=RANK, alpha=ALPHA)
    wf["4"]["inputs"].update(steps=steps, learning_rate=5e-3, warmup_steps=0, scheduler="constant", batch_size=2,
                             precision="fp32", preview_size=64, preview_steps=1, **train)
    wf["5"]["inputs"].update(filename=name, dtype="fp32")
    return wf


@pytest.fixture(scope="module")
def trained(chroma):
    """Base render; the shipped example trains 2 steps (batch 2: the whole dataset once) with a preview at step 2, and
    a render from Train Steps' MODEL output in the same prompt."""
    before = chroma.run(render("chroma_base_before", 100))
    assert before.status == "success", before.error
    graph = example_graph("chroma_lora", steps=2, preview_every=2)
    graph.update(render("chroma_kiln_model", 200, model=["4", 1]))
    result = chroma.run(graph, timeout=1200)
    assert result.status == "success", result.error
    return before, result


def test_chroma_trains_with_progress_and_previews_and_saves_kohya_flux_keys(chroma, trained):
    _, result = trained
    steps = [d["value"] for d in result.of_type("progress") if d.get("node") == "4" and d.get("max") == 2]
    assert sorted(set(steps)) == [1, 2]
    assert len(result.history["outputs"]["4"]["kiln_previews"]) == 1  # ComfyUI's sampler at CFG 4, empty negative
    losses = [h[1] for h in result.history["outputs"]["4"]["kiln_history"]]
    assert len(losses) == 2 and all(np.isfinite(losses))
    keys, meta = keys_and_metadata(chroma, "chroma_lora")
    bases = {k.split(".")[0] for k in keys}
    # as FLUX.1's, and nothing of the modulation network (distilled_guidance_layer)
    assert bases == KOHYA_FLUX_BASES, sorted(bases ^ KOHYA_FLUX_BASES)
    assert meta["ss_base_model_version"] == "flux1"
    assert meta["modelspec.architecture"] == "chroma/lora"
    assert meta["modelspec.implementation"] == "https://huggingface.co/lodestones/Chroma"
    assert "ss_guidance_scale" not in meta  # Chroma is not guidance-distilled: ComfyUI feeds it 0, so does Kiln
    assert meta["ss_timestep_sampling"] == "logit_normal"


def test_chroma_lora_loads_every_key_in_the_stock_lora_loader_and_renders_like_train_steps_model(chroma, trained):
    """Saved in fp32, the stock LoraLoaderModelOnly (W + B A merged) renders what Train Steps' MODEL (Kiln's
    unmerged adapters) renders, within rounding, at CFG 4; the LoRA moves the image far more; the base is as before."""
    graph = {**render("chroma_stock_lora", 300, lora="chroma_lora.safetensors"), **render("chroma_base_after", 400)}
    assert_stock_lora_renders_like_train_steps(chroma, trained, graph, ("109", "209", "309", "409"))


def test_diffusers_chroma_loads_every_key_and_the_deltas_are_kilns_fused_adapters(chroma, trained):
    """diffusers' Chroma loader (``ChromaPipeline``: the kohya FLUX converter) on a diffusers ChromaTransformer2DModel
    of the same architecture applies every key of the file, with Kiln's deltas."""
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):  # the layout only
        transformer = diffusers.ChromaTransformer2DModel(num_layers=1, num_single_layers=1)
    assert_diffusers_applies_the_kohya_flux_file(diffusers.ChromaPipeline, transformer, chroma, "chroma_lora", ALPHA,
                                                 RANK)
