"""SD3 (rectified flow, MMDiT) end to end on a real ComfyUI server: a checkpoint the stock loader detects as SD3.

The checkpoint (nodes/tiny_checkpoint.py ``sd3``: a depth-2 MMDiT, the full CLIP-L and CLIP-G, no T5, a 16-channel
TAESD) is built once per session and dropped into the shared server's models/checkpoints. The LoRA is written in
diffusers' SD3 layout; both ComfyUI's LoraLoader and diffusers must apply every key of it.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_sdxl import assert_stock_lora_renders_like_train_steps, install_checkpoint, keys_and_metadata
from test_sdxl import render as sdxl_render
from test_sdxl import train_graph as sdxl_train_graph

SD3 = "tiny_sd3.safetensors"
KSAMPLER = {"seed": 7, "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}


@pytest.fixture(scope="session")
def sd3(server, sd3_checkpoint):
    install_checkpoint(server, sd3_checkpoint, SD3)
    return server


def render(prefix: str, base: int, model=None, lora: str | None = None) -> dict:
    """One 64x64 SD3 image: from the checkpoint, through LoraLoader(``lora``), or from the ``model`` link."""
    return sdxl_render(SD3, prefix, lora=lora, base=base, model=model, latent="EmptySD3LatentImage", ksampler=KSAMPLER)


def train_graph(name: str, steps: int, **train) -> dict:
    """test_sdxl.py's training graph on the SD3 checkpoint: flow settings (no min-SNR, logit-normal sigmas), rank 4
    alpha 8, gradient checkpointing, the LoRA in fp32 with its checkpoint."""
    graph = sdxl_train_graph(SD3, name, steps, **{"min_snr_gamma": 0.0, "timestep_sampling": "logit_normal",
                                                  "learning_rate": 5e-3, "gradient_checkpointing": True, **train})
    graph["3"]["inputs"].update(alpha=8.0)
    del graph["3"]["inputs"]["clip"]
    graph["4"]["inputs"].pop("text_encoder_lr")
    graph["5"]["inputs"].update(dtype="fp32", save_checkpoint=True)
    return graph


@pytest.fixture(scope="module")
def trained(sd3):
    """Base render; 4 steps with previews at 2 and 4 (saved in fp32 + its checkpoint) and a render from Train Steps'
    MODEL output in the same prompt; base render again."""
    before = sd3.run(render("sd3_base_before", 100))
    assert before.status == "success", before.error
    graph = train_graph("sd3_lora", steps=4, preview_every=2)
    graph.update(render("sd3_kiln_model", 200, model=["4", 1]))
    result = sd3.run(graph, timeout=1200)
    assert result.status == "success", result.error
    return before, result


def test_sd3_trains_a_flow_lora_with_progress_and_previews_in_diffusers_sd3_layout(sd3, trained):
    _, result = trained
    steps = [d["value"] for d in result.of_type("progress") if d.get("node") == "4" and d.get("max") == 4]
    assert sorted(set(steps)) == [1, 2, 3, 4]
    assert len(result.history["outputs"]["4"]["kiln_previews"]) == 2  # steps 2 and 4, ComfyUI's flow sampler
    losses = [h[1] for h in result.history["outputs"]["4"]["kiln_history"]]
    assert len(losses) == 4 and all(np.isfinite(losses))
    keys, meta = keys_and_metadata(sd3, "sd3_lora")
    assert keys and all(k.startswith("transformer.transformer_blocks.") for k in keys)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)  # no .alpha: diffusers refuses it
    modules = {k.rsplit(".", 2)[0] for k in keys}
    for block in ("transformer.transformer_blocks.0.", "transformer.transformer_blocks.1."):
        assert {block + f"attn.{m}" for m in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj",
                                              "to_out.0")} <= modules
        assert {block + m for m in ("ff.net.0.proj", "ff.net.2")} <= modules
    assert "transformer.transformer_blocks.0.attn.to_add_out" in modules  # the last block's context side has none
    assert "transformer.transformer_blocks.1.attn.to_add_out" not in modules
    assert meta["ss_base_model_version"] == "medium"
    assert meta["modelspec.architecture"] == "stable-diffusion-3-medium/lora"
    assert meta["modelspec.implementation"] == "diffusers"


def test_sd3_lora_loads_every_key_in_the_stock_lora_loader_and_renders_like_train_steps_model(sd3, trained):
    """Saved in fp32, the stock LoraLoader (W + B A merged into ComfyUI's fused qkv slices) renders what Train Steps'
    MODEL (Kiln's unmerged adapters) renders, within rounding; the LoRA moves the image far more than that; the base
    renders as before (nothing mutated the shared model)."""
    graph = {**render("sd3_stock_lora", 300, lora="sd3_lora.safetensors"), **render("sd3_base_after", 400)}
    assert_stock_lora_renders_like_train_steps(sd3, trained, graph, ("107", "207", "307", "407"))


def test_diffusers_sd3_loads_every_key_and_the_deltas_are_kilns_fused_adapters(sd3, trained):
    """diffusers' SD3 loader (``StableDiffusion3Pipeline.lora_state_dict`` + ``load_lora_into_transformer``) on a
    diffusers SD3Transformer2DModel of the same architecture: one peft LoRA layer per file module, scale 1, and
    to_q/to_k/to_v's ``B @ A`` stacked is the delta Kiln's fused-qkv adapter adds (alpha / rank * up @ down, read
    from the run's checkpoint)."""
    diffusers = pytest.importorskip("diffusers")
    from peft.tuners.lora import LoraLayer

    path = sd3.base / "models" / "loras" / "sd3_lora.safetensors"
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=4096, caption_projection_dim=128, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=64)
    state_dict = diffusers.StableDiffusion3Pipeline.lora_state_dict(str(path))
    diffusers.StableDiffusion3Pipeline.load_lora_into_transformer(state_dict, transformer=transformer,
                                                                  adapter_name="kiln")
    injected = {n: m for n, m in transformer.named_modules() if isinstance(m, LoraLayer)}
    file_modules = {k[len("transformer."):].rsplit(".", 2)[0] for k in state_dict}
    assert set(injected) == file_modules
    for name, layer in injected.items():
        assert layer.scaling["kiln"] == 1.0, name
        assert torch.equal(layer.lora_A["kiln"].weight, state_dict[f"transformer.{name}.lora_A.weight"]), name
        assert torch.equal(layer.lora_B["kiln"].weight, state_dict[f"transformer.{name}.lora_B.weight"]), name

    checkpoint = next((sd3.base / "output" / "lora_kiln" / "sd3_lora" / "checkpoints").glob("*.kiln.safetensors"))
    kiln = load_file(str(checkpoint))
    alpha_over_rank = 8.0 / 4  # Inject LoRA's alpha 8, rank 4
    for block in (0, 1):
        for side, parts in (("x_block", ("to_q", "to_k", "to_v")), ("context_block", ("add_q_proj", "add_k_proj",
                                                                                      "add_v_proj"))):
            prefix = f"unet.joint_blocks.{block}.{side}.attn.qkv"
            fused = alpha_over_rank * kiln[f"weights/{prefix}.lora_up.weight"] @ kiln[f"weights/{prefix}.lora_down.weight"]
            split = torch.cat([injected[f"transformer_blocks.{block}.attn.{p}"].lora_B["kiln"].weight
                               @ injected[f"transformer_blocks.{block}.attn.{p}"].lora_A["kiln"].weight
                               for p in parts])
            assert fused.abs().max() > 0
            torch.testing.assert_close(split, fused, rtol=1e-5, atol=1e-7)


def test_sd3_refuses_min_snr_text_encoder_training_and_init_lora_by_name(sd3):
    graph = train_graph("sd3_bad", steps=1, min_snr_gamma=5.0)
    result = sd3.run(graph)
    assert result.status == "error"
    assert "min_snr_gamma=5" in result.error["exception_message"] and "set min_snr_gamma to 0" in \
        result.error["exception_message"]
    graph = train_graph("sd3_bad_te", steps=1)
    graph["3"]["inputs"].update(train_text_encoder=True, clip=["1", 1])
    result = sd3.run(graph)
    assert result.status == "error" and result.error["node_type"] == "KilnInjectLoRA"
    assert "train_text_encoder is not offered for SD3/SD3.5" in result.error["exception_message"]


def test_sd3_trains_on_fp8_stored_weights_from_the_stock_unet_loader(sd3, trained):
    """UNETLoader with weight_dtype fp8_e4m3fn keeps the MMDiT's weights in fp8 (ComfyUI casts them per layer); the
    adapters train beside them in fp32, the loss stays finite, and the LoRA has the fp32 run's layers and shapes."""
    target = sd3.base / "models" / "diffusion_models" / SD3
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        os.link(sd3.base / "models" / "checkpoints" / SD3, target)  # UNETLoader takes the diffusion model's keys
    graph = train_graph("sd3_fp8", steps=2)
    graph["6"] = {"class_type": "UNETLoader", "inputs": {"unet_name": SD3, "weight_dtype": "fp8_e4m3fn"}}
    graph["3"]["inputs"]["model"] = ["6", 0]
    graph["5"]["inputs"]["save_checkpoint"] = False
    result = sd3.run(graph, timeout=1200)
    assert result.status == "success", result.error
    losses = [h[1] for h in result.history["outputs"]["4"]["kiln_history"]]
    assert len(losses) == 2 and all(np.isfinite(losses))
    fp8 = load_file(str(sd3.base / "models" / "loras" / "sd3_fp8.safetensors"))
    fp32 = load_file(str(sd3.base / "models" / "loras" / "sd3_lora.safetensors"))
    assert {k: v.shape for k, v in fp8.items()} == {k: v.shape for k, v in fp32.items()}
    untrained = sorted(k for k, v in fp8.items() if k.endswith("lora_B.weight") and v.abs().sum() == 0)
    # everything trained but the last block's text queries: that block's text outputs are dropped (context_pre_only),
    # so its text-side q gets no gradient (its adapter is carried, as in the fp32 run)
    assert untrained == ["transformer.transformer_blocks.1.attn.add_q_proj.lora_B.weight"], untrained


def test_sd3_cancel_keeps_a_checkpoint_and_the_requeue_resumes_from_it(sd3):
    from test_sdxl import cancel_then_requeue

    # the tiny MMDiT runs 8 steps in about 0.1 s, before a Cancel sent at step 2 arrives: enough steps to land in
    cancel_then_requeue(sd3, train_graph("sd3_cancel", steps=400), "sd3_cancel", 400)
