"""FLUX.1 (rectified flow, double/single-stream DiT, guidance-distilled) end to end on a real ComfyUI server.

The model is the smallest FLUX.1-dev ComfyUI's detection accepts (nodes/tiny_checkpoint.py ``flux``: one double- and
one single-stream block at the real width, 545 M parameters) loaded by the stock UNETLoader, with a 16-channel TAESD
from the stock VAELoader. Its text encoder comes from the test-only TestTinyFluxCLIP node (tests/fixture_nodes:
ComfyUI's FluxTokenizer, CLIP-L and T5 classes, a one-layer T5), since the stock DualCLIPLoader always builds the
full 4.7 B T5-XXL. The LoRA is kohya's FLUX layout; ComfyUI's LoraLoader and diffusers' kohya converter must apply
every key of it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_sdxl import (
    assert_stock_lora_renders_like_train_steps,
    cancel_then_requeue,
    install_checkpoint,
    keys_and_metadata,
)

from comfy_harness import kiln_nodes, text_to_image

FLUX, VAE = "tiny_flux.safetensors", "tiny_flux_vae.safetensors"
KSAMPLER = {"seed": 7, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}
ALPHA, RANK = 8.0, 4
T5_TOKENS = 32  # T5 tokens per caption (ComfyUI pads FLUX captions to 256): 48 tokens per 64 px image in all


@pytest.fixture(scope="session")
def flux(server, flux_files):
    unet, vae = flux_files
    install_checkpoint(server, unet, FLUX, "diffusion_models")
    install_checkpoint(server, vae, VAE, "vae")
    return server


def loaders(base: int, weight_dtype: str = "default") -> dict:
    """UNETLoader, the tiny FLUX text encoder and VAELoader as nodes ``base``, ``base + 1``, ``base + 2``."""
    return {
        str(base): {"class_type": "UNETLoader", "inputs": {"unet_name": FLUX, "weight_dtype": weight_dtype}},
        str(base + 1): {"class_type": "TestTinyFluxCLIP", "inputs": {"seed": 0, "t5_min_length": T5_TOKENS}},
        str(base + 2): {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
    }


def render(prefix: str, base: int, model: list | None = None, lora: str | None = None) -> dict:
    """One 64x64 FLUX image as a user's graph makes it: CLIPTextEncode -> FluxGuidance 3.5 -> KSampler (cfg 1),
    from the UNETLoader, through LoraLoaderModelOnly(``lora``) or from the ``model`` link."""
    return text_to_image(loaders(base), base, prefix, KSAMPLER, model, lora, guidance=3.5)


def train_graph(name: str, steps: int, weight_dtype: str = "default", **train) -> dict:
    """UNETLoader + tiny FLUX CLIP + VAELoader -> Load Dataset -> Inject LoRA (rank 4, alpha 8) -> Train Steps (flow
    settings: no min-SNR, logit-normal, batch 1, fp32 on the CPU) -> Save LoRA (fp32, with its checkpoint)."""
    graph = loaders(1, weight_dtype)
    graph.update({
        "4": {"class_type": "KilnTrainSteps", "inputs": {
            "state": ["7", 0], "dataset": ["6", 0], "steps": steps, "learning_rate": 5e-3, "optimizer": "adamw",
            "scheduler": "constant", "warmup_steps": 0, "schedule_steps": 0, "batch_size": 1, "grad_accum": 1,
            "precision": "fp32", "gradient_checkpointing": True, "min_snr_gamma": 0.0, "noise_offset": 0.0,
            "save_every": 0, "preview_every": 0, "preview_prompt": "a kilnshape circle", "preview_seed": 0,
            "preview_size": 64, "preview_steps": 2, "max_grad_norm": 1.0, "timestep_sampling": "logit_normal",
            **train}},
        **kiln_nodes(name, RANK, ALPHA, model=["1", 0], clip=["2", 0], vae=["3", 0]),
    })
    return graph


@pytest.fixture(scope="module")
def trained(flux):
    """Base render; 4 steps with previews at 2 and 4 and a render from Train Steps' MODEL output in the same prompt."""
    before = flux.run(render("flux_base_before", 100))
    assert before.status == "success", before.error
    graph = train_graph("flux_lora", steps=4, preview_every=2)
    graph.update(render("flux_kiln_model", 200, model=["4", 1]))
    result = flux.run(graph, timeout=1200)
    assert result.status == "success", result.error
    return before, result


DOUBLE = ("img_attn_qkv", "img_attn_proj", "txt_attn_qkv", "txt_attn_proj", "img_mlp_0", "img_mlp_2", "txt_mlp_0",
          "txt_mlp_2")
# kohya's FLUX layout of a 1 + 1 block model with attn+ff targets (FLUX.1 and Chroma alike)
KOHYA_FLUX_BASES = {f"lora_unet_double_blocks_0_{m}" for m in DOUBLE} | {
    "lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_0_linear2"}
# Kiln's fused layers -> the diffusers layers its kohya converter splits them into (stacked along the output rows)
DIFFUSERS_PARTS = {
    "double_blocks.0.img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "double_blocks.0.txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "double_blocks.0.img_attn.proj": ["attn.to_out.0"],
    "double_blocks.0.txt_attn.proj": ["attn.to_add_out"],
    "double_blocks.0.img_mlp.0": ["ff.net.0.proj"],
    "double_blocks.0.txt_mlp.2": ["ff_context.net.2"],
    "single_blocks.0.linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "single_blocks.0.linear2": ["proj_out"],
}


def assert_diffusers_applies_the_kohya_flux_file(pipeline, transformer, server, name: str, alpha: float,
                                                 rank: int) -> None:
    """diffusers' loader for ``pipeline`` (``lora_state_dict``: its kohya FLUX converter, then
    ``load_lora_into_transformer``) on ``transformer`` (a diffusers model of the same architecture, meta weights
    allowed): one peft layer per converted module, and the q/k/v (+ MLP-in) deltas stacked are the delta of Kiln's
    fused qkv / linear1 adapter (alpha / rank * up @ down, read from run ``name``'s checkpoint)."""
    from peft.tuners.lora import LoraLayer

    state_dict = pipeline.lora_state_dict(str(server.base / "models" / "loras" / f"{name}.safetensors"))
    assert state_dict and all(k.startswith("transformer.") for k in state_dict)
    transformer.to_empty(device="cpu")
    pipeline.load_lora_into_transformer(state_dict, network_alphas=None, transformer=transformer,
                                        adapter_name="kiln")  # kohya: alpha folded by the converter
    injected = {n: m for n, m in transformer.named_modules() if isinstance(m, LoraLayer)}
    assert set(injected) == {k[len("transformer."):].rsplit(".", 2)[0] for k in state_dict}

    def delta(layer_name: str) -> torch.Tensor:
        layer = injected[layer_name]
        return layer.scaling["kiln"] * layer.lora_B["kiln"].weight @ layer.lora_A["kiln"].weight

    checkpoint = next((server.base / "output" / "lora_kiln" / name / "checkpoints").glob("*.kiln.safetensors"))
    kiln = load_file(str(checkpoint))
    for path, parts in DIFFUSERS_PARTS.items():
        prefix = "transformer_blocks.0." if path.startswith("double") else "single_transformer_blocks.0."
        up, down = kiln[f"weights/unet.{path}.lora_up.weight"], kiln[f"weights/unet.{path}.lora_down.weight"]
        ours = alpha / rank * up @ down
        assert ours.abs().max() > 0, path
        theirs = torch.cat([delta(prefix + p) for p in parts])
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-7, msg=path)


@pytest.mark.compat
def test_flux_trains_with_progress_and_previews_and_saves_kohya_flux_keys(flux, trained):
    _, result = trained
    steps = [d["value"] for d in result.of_type("progress") if d.get("node") == "4" and d.get("max") == 4]
    assert sorted(set(steps)) == [1, 2, 3, 4]
    assert len(result.history["outputs"]["4"]["kiln_previews"]) == 2  # steps 2 and 4, ComfyUI's sampler at cfg 1
    losses = [h[1] for h in result.history["outputs"]["4"]["kiln_history"]]
    assert len(losses) == 4 and all(np.isfinite(losses))
    keys, meta = keys_and_metadata(flux, "flux_lora")
    bases = {k.split(".")[0] for k in keys}
    assert bases == KOHYA_FLUX_BASES, sorted(bases ^ KOHYA_FLUX_BASES)
    assert {k.split(".", 1)[1] for k in keys} == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert meta["ss_base_model_version"] == "flux1"
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    assert meta["ss_guidance_scale"] == "1.0" and meta["ss_timestep_sampling"] == "logit_normal"
    assert "modelspec.prediction_type" not in meta  # modelspec has no word for flow


@pytest.mark.compat
def test_flux_lora_loads_every_key_in_the_stock_lora_loader_and_renders_like_train_steps_model(flux, trained):
    """Saved in fp32, the stock LoraLoaderModelOnly (W + B A merged) renders what Train Steps' MODEL (Kiln's
    unmerged adapters) renders, within rounding; the LoRA moves the image far more; the base renders as before."""
    graph = {**render("flux_stock_lora", 300, lora="flux_lora.safetensors"), **render("flux_base_after", 400)}
    assert_stock_lora_renders_like_train_steps(flux, trained, graph, ("109", "209", "309", "409"))


def test_diffusers_flux_loads_every_key_and_the_deltas_are_kilns_fused_adapters(flux, trained):
    """diffusers' FluxPipeline loader on a diffusers FluxTransformer2DModel of the same architecture applies every key
    of the file, with Kiln's deltas (see assert_diffusers_applies_the_kohya_flux_file)."""
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):  # the layout only: 545 M parameters need no memory to check names and shapes
        transformer = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56))
    assert_diffusers_applies_the_kohya_flux_file(diffusers.FluxPipeline, transformer, flux, "flux_lora", ALPHA, RANK)


def test_flux_refuses_min_snr_and_text_encoder_training_by_name(flux):
    result = flux.run(train_graph("flux_bad", steps=1, min_snr_gamma=5.0))
    assert result.status == "error"
    assert "min_snr_gamma=5" in result.error["exception_message"]
    assert "set min_snr_gamma to 0" in result.error["exception_message"]
    graph = train_graph("flux_bad_te", steps=1)
    graph["7"]["inputs"].update(train_text_encoder=True, clip=["2", 0])
    result = flux.run(graph)
    assert result.status == "error" and result.error["node_type"] == "KilnInjectLoRA"
    assert "train_text_encoder is not offered for FLUX.1" in result.error["exception_message"]


def test_a_freshly_placed_train_steps_trains_flux_on_its_auto_defaults(flux):
    """Train Steps as placed (every input at its /object_info default: min_snr_gamma and timestep_sampling auto)
    trains FLUX.1; the node says what auto chose, and the run trains what an explicit flow setting trains."""
    defaults = flux.defaults("KilnTrainSteps")
    assert defaults["min_snr_gamma"] == -1.0 and defaults["timestep_sampling"] == "auto"
    graph = train_graph("flux_auto", steps=1)
    graph["4"]["inputs"] = {**defaults, "state": ["7", 0], "dataset": ["6", 0], "steps": 1, "precision": "fp32"}
    graph["8"] = {"class_type": "KilnTrainSteps", "inputs": {**graph["4"]["inputs"], "min_snr_gamma": 0.0,
                                                            "timestep_sampling": "logit_normal"}}
    graph["9"] = {"class_type": "KilnSaveLoRA", "inputs": {**graph["5"]["inputs"], "state": ["8", 0],
                                                           "filename": "flux_explicit"}}
    result = flux.run(graph, timeout=1200)
    assert result.status == "success", result.error
    auto, explicit = result.history["outputs"]["4"], result.history["outputs"]["8"]
    assert "auto for FLUX.1: min_snr_gamma 0, timestep_sampling logit_normal" in auto["text"][0]
    assert auto["kiln_history"] == explicit["kiln_history"]


def test_flux_trains_on_fp8_stored_weights_and_chained_steps_continue_exactly(flux, trained):
    """UNETLoader with weight_dtype fp8_e4m3fn keeps the weights in fp8 (ComfyUI casts them per layer; nothing
    dequantises the model): 1 + 1 chained Train Steps and one 2-step node, from one Inject LoRA, give bit-identical
    LoRAs and losses, every adapter trains, and the file has the fp32 run's layers and shapes."""
    graph = train_graph("flux_fp8_2", steps=2, weight_dtype="fp8_e4m3fn")
    graph["5"]["inputs"]["save_checkpoint"] = False
    graph["8"] = {"class_type": "KilnTrainSteps", "inputs": {**graph["4"]["inputs"], "steps": 1}}
    graph["9"] = {"class_type": "KilnTrainSteps", "inputs": {**graph["8"]["inputs"], "state": ["8", 0]}}
    graph["10"] = {"class_type": "KilnSaveLoRA", "inputs": {**graph["5"]["inputs"], "state": ["9", 0],
                                                            "filename": "flux_fp8_1_1"}}
    result = flux.run(graph, timeout=1200)
    assert result.status == "success", result.error
    one, chained = result.history["outputs"]["4"]["kiln_history"], result.history["outputs"]["9"]["kiln_history"]
    assert [h[0] for h in chained] == [1, 2] and chained == one
    assert all(math.isfinite(h[1]) for h in one)
    loras = flux.base / "models" / "loras"
    two, one_one = load_file(str(loras / "flux_fp8_2.safetensors")), load_file(str(loras / "flux_fp8_1_1.safetensors"))
    different = [k for k in two if not torch.equal(two[k], one_one[k])]
    assert two.keys() == one_one.keys() and different == [], different[:3]
    fp32 = load_file(str(loras / "flux_lora.safetensors"))
    assert {k: v.shape for k, v in two.items()} == {k: v.shape for k, v in fp32.items()}
    assert all(v.abs().sum() > 0 for k, v in two.items() if k.endswith("lora_up.weight"))


def test_flux_cancel_keeps_a_checkpoint_and_the_requeue_resumes_from_it(flux):
    graph = train_graph("flux_cancel", steps=8)
    graph["5"]["inputs"]["save_checkpoint"] = False
    cancel_then_requeue(flux, graph, "flux_cancel", 8)


def test_the_shipped_flux_example_workflow_trains_with_its_loaders_pointed_at_the_tiny_flux(flux):
    """example_workflows/api/train_flux_lora.json as shipped (UNETLoader fp8, DualCLIPLoader clip_l + t5xxl "flux",
    VAELoader ae): only the file names, the text encoder (the tiny T5 in place of the full one), the sizes and the
    weight dtype (fp8 training is tested above and is slower on a CPU) change."""
    from comfy_harness import load_api

    wf = load_api("train_flux_lora")
    assert wf["1"]["inputs"]["weight_dtype"] == "fp8_e4m3fn" and wf["7"]["inputs"]["type"] == "flux"
    assert wf["4"]["inputs"]["min_snr_gamma"] == 0.0 and wf["4"]["inputs"]["guidance"] == 1.0
    wf["1"]["inputs"].update(unet_name=FLUX, weight_dtype="default")  # fp8 trains above; fp32 is faster on a CPU
    wf["7"] = {"class_type": "TestTinyFluxCLIP", "inputs": {"seed": 0, "t5_min_length": T5_TOKENS}}
    wf["8"]["inputs"]["vae_name"] = VAE
    wf["2"]["inputs"].update(folder="shapes", resolution=64)
    wf["3"]["inputs"].update(name="flux_example", rank=4, alpha=4.0)
    wf["4"]["inputs"].update(steps=2, warmup_steps=0, save_every=0, preview_every=2, preview_size=64,
                             preview_steps=2)
    result = flux.run(wf, timeout=1200)
    assert result.status == "success", result.error
    assert len(result.history["outputs"]["4"]["kiln_previews"]) == 1
    _, meta = keys_and_metadata(flux, "flux_example")
    assert meta["ss_base_model_version"] == "flux1" and meta["ss_steps"] == "2"
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["ss_gradient_checkpointing"] == "True"


@pytest.fixture(scope="module")
def flux_scaled_fp8(flux, tmp_path_factory):
    """The tiny FLUX.1-dev as an "fp8 scaled" diffusion-model file (every Linear fp8 with its scale_weight and the
    scaled_fp8 marker, as the fp8-scaled FLUX files people share): quantized layers on ComfyUI >= 0.3.7x."""
    from comfy_harness import build_tiny_checkpoint, find_comfyui

    path = build_tiny_checkpoint(find_comfyui(), tmp_path_factory.mktemp("flux_fp8") / "tiny_flux_scaled.safetensors",
                                 size="flux", flags=("--quant", "scaled_fp8"))
    install_checkpoint(flux, path, path.name, "diffusion_models")
    return path.name


@pytest.mark.compat
def test_an_fp8_scaled_flux_trains_every_targeted_layer_and_the_stock_loader_applies_every_key(
        flux, trained, flux_scaled_fp8):
    graph = train_graph("flux_scaled", steps=2)
    graph["1"]["inputs"]["unet_name"] = flux_scaled_fp8
    graph["5"]["inputs"]["save_checkpoint"] = False
    result = flux.run(graph, timeout=1200)
    assert result.status == "success", result.error
    assert result.history["outputs"]["7"]["text"][0] == trained[1].history["outputs"]["7"]["text"][0]  # same layers
    scaled = load_file(str(flux.base / "models" / "loras" / "flux_scaled.safetensors"))
    plain = load_file(str(flux.base / "models" / "loras" / "flux_lora.safetensors"))
    assert set(scaled) == set(plain)
    ups = [v for k, v in scaled.items() if k.endswith("lora_up.weight")]
    assert ups and all(v.abs().sum() > 0 for v in ups)  # every adapter trained
    log_start = len(flux.log())
    lora = render("flux_scaled_lora", 500, lora="flux_scaled.safetensors")
    lora["500"]["inputs"]["unet_name"] = flux_scaled_fp8
    base = render("flux_scaled_base", 600)
    base["600"]["inputs"]["unet_name"] = flux_scaled_fp8
    stock = flux.run({**lora, **base})
    assert stock.status == "success", stock.error
    assert "lora key not loaded" not in flux.log()[log_start:]
    from test_sdxl import image

    assert np.abs(image(flux, stock, "509") - image(flux, stock, "609")).mean() > 1.0
