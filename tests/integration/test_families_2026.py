"""Z-Image, FLUX.2 and Qwen-Image (ComfyUI v0.33+) end to end on a real ComfyUI server.

FLUX.2 is a Klein-like model small enough for a CPU (nodes/tiny_checkpoint.py ``flux2``: one double- and one
single-stream block of width 128) loaded by the stock UNETLoader, which detects it from its shapes. ComfyUI detects
Z-Image and Qwen-Image only at their real widths (hundreds of millions of parameters for a single block), so the
test-only TestTinyDiffusionModel node loads tiny ones through ComfyUI's own ``load_diffusion_model_state_dict``. The
text encoders are ComfyUI's own Qwen3 / Qwen2.5-VL classes in a 64-wide configuration (TestTinyQwenCLIP), the VAEs
tiny files for the stock VAELoader (TAESD with 16 or 128 channels, a Wan 2.1 VAE for Qwen-Image).

Each family: progress and previews on auto settings, the file layout its ecosystem loads (ComfyUI's LoraLoader with
no ``lora key not loaded``, rendering what Train Steps' MODEL renders; diffusers' loader for the family with every
key and the same deltas), fp8 weights training with chained nodes continuing exactly, Cancel and resume. And one
model without a family entry (Lumina Image 2) through the generic path on the same server: previews, the kohya file
of its own paths, the stock LoraLoader rendering what Train Steps' MODEL renders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file
from test_sdxl import (
    assert_stock_lora_renders_like_train_steps,
    cancel_then_requeue,
    keys_and_metadata,
)

from comfy_harness import FILES_2026, kiln_nodes, link_models, text_to_image
from conftest import COMFY

pytestmark = pytest.mark.skipif(
    COMFY is None or "class ZImage" not in (COMFY / "comfy" / "supported_models.py").read_text(),
    reason="Z-Image, FLUX.2 and Qwen-Image need ComfyUI v0.33 or newer (COMFYUI_PATH)")

ALPHA, RANK = 8.0, 4
KSAMPLER = {"seed": 7, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}
ATTN_FF = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0", "feed_forward.w1",
           "feed_forward.w2", "feed_forward.w3")
QWEN_MODULES = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
                "txt_mlp.net.2")
FLUX2_PARTS = {  # Kiln's layer -> the diffusers layers it is (stacked along the output rows)
    "double_blocks.0.img_attn.qkv": ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                     "transformer_blocks.0.attn.to_v"],
    "double_blocks.0.txt_attn.qkv": ["transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.add_k_proj",
                                     "transformer_blocks.0.attn.add_v_proj"],
    "double_blocks.0.img_attn.proj": ["transformer_blocks.0.attn.to_out.0"],
    "double_blocks.0.txt_attn.proj": ["transformer_blocks.0.attn.to_add_out"],
    "double_blocks.0.img_mlp.0": ["transformer_blocks.0.ff.linear_in"],
    "double_blocks.0.img_mlp.2": ["transformer_blocks.0.ff.linear_out"],
    "double_blocks.0.txt_mlp.0": ["transformer_blocks.0.ff_context.linear_in"],
    "double_blocks.0.txt_mlp.2": ["transformer_blocks.0.ff_context.linear_out"],
    "single_blocks.0.linear1": ["single_transformer_blocks.0.attn.to_qkv_mlp_proj"],
    "single_blocks.0.linear2": ["single_transformer_blocks.0.attn.to_out"],
}
BLOCKS_Z = ("layers.0", "noise_refiner.0", "context_refiner.0")
ZIMAGE_PARTS = {
    **{f"{b}.attention.qkv": [f"{b}.attention.to_q", f"{b}.attention.to_k", f"{b}.attention.to_v"] for b in BLOCKS_Z},
    **{f"{b}.attention.out": [f"{b}.attention.to_out.0"] for b in BLOCKS_Z},
    **{f"{b}.feed_forward.w{i}": [f"{b}.feed_forward.w{i}"] for b in BLOCKS_Z for i in (1, 2, 3)},
}
QWEN_PARTS = {f"transformer_blocks.0.{m}": [f"transformer_blocks.0.{m}"] for m in QWEN_MODULES}


@dataclass(frozen=True)
class Spec:
    family: str  # Kiln's family name
    model: str  # ComfyUI's model class / the TestTinyDiffusionModel choice; "" = the tiny FLUX.2 file
    clip_type: str  # CLIPLoader type
    vae: str  # the VAE file kind
    keys: frozenset[str]  # the file's module keys (without the lora_A/lora_down... suffix)
    base_version: str
    architecture: str
    parts: dict[str, list[str]]
    mixin: str  # diffusers' LoRA loader mixin for the family
    example: str  # the shipped example workflow (example_workflows/api)
    dead: frozenset[str] = frozenset()  # adapters no gradient reaches in a one-block model (the last block's text side)
    learning_rate: float = 5e-3

    def model_node(self, weight_dtype: str = "default") -> dict:
        if not self.model:
            return {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_flux2.safetensors",
                                                           "weight_dtype": weight_dtype}}
        return {"class_type": "TestTinyDiffusionModel", "inputs": {"model": self.model, "seed": 0,
                                                                    "weight_dtype": weight_dtype}}


def _kohya(prefix_paths) -> frozenset[str]:
    return frozenset("lora_unet_" + p.replace(".", "_") for p in prefix_paths)


SPECS = {
    "zimage": Spec("Z-Image", "ZImage", "lumina2", "taesd16",
                   frozenset(f"diffusion_model.{b}.{m}" for b in BLOCKS_Z for m in ATTN_FF),
                   "zimage", "Z-Image/lora", ZIMAGE_PARTS, "ZImageLoraLoaderMixin", "train_zimage_lora"),
    "flux2": Spec("FLUX.2", "", "flux2", "taef2", _kohya(FLUX2_PARTS), "flux2", "Flux.2-dev/lora", FLUX2_PARTS,
                  "Flux2LoraLoaderMixin", "train_flux2_klein_lora"),
    # the text stream's queries, output and MLP only feed text tokens, which the last block's output drops
    "qwen_image": Spec("Qwen-Image", "QwenImage", "qwen_image", "wan21", _kohya(QWEN_PARTS), "qwen_image",
                       "Qwen-Image/lora", QWEN_PARTS, "QwenImageLoraLoaderMixin", "train_qwen_image_lora",
                       dead=frozenset(f"transformer_blocks.0.{m}" for m in ("attn.add_q_proj", "attn.to_add_out",
                                                                             "txt_mlp.net.0.proj", "txt_mlp.net.2")),
                       learning_rate=5e-2),
}


def loaders(spec: Spec, base: int, weight_dtype: str = "default") -> dict:
    return {
        str(base): spec.model_node(weight_dtype),
        str(base + 1): {"class_type": "TestTinyQwenCLIP", "inputs": {"type": spec.clip_type, "seed": 0}},
        str(base + 2): {"class_type": "VAELoader", "inputs": {
            "vae_name": spec.vae if spec.vae == "taef2" else f"tiny_{spec.vae}.safetensors"}},
    }


def render(spec: Spec, prefix: str, base: int, model: list | None = None, lora: str | None = None) -> dict:
    """One 64 x 64 image as a user's graph makes it (CLIPTextEncode, EmptySD3LatentImage, KSampler at cfg 1), from
    the loader, through LoraLoaderModelOnly(``lora``), or from the ``model`` link."""
    return text_to_image(loaders(spec, base), base, prefix, KSAMPLER, model, lora)


def train_graph(spec: Spec, name: str, steps: int, weight_dtype: str = "default", **train) -> dict:
    """Loaders -> Load Dataset -> Inject LoRA (rank 4, alpha 8, attn+ff) -> Train Steps (its auto settings; fp32, batch
    1 on the CPU) -> Save LoRA (fp32, with its checkpoint)."""
    graph = loaders(spec, 1, weight_dtype)
    graph.update({
        "4": {"class_type": "KilnTrainSteps", "inputs": {
            "state": ["7", 0], "dataset": ["6", 0], "steps": steps, "learning_rate": spec.learning_rate,
            "optimizer": "adamw",
            "scheduler": "constant", "warmup_steps": 0, "schedule_steps": 0, "batch_size": 1, "grad_accum": 1,
            "precision": "fp32", "gradient_checkpointing": False, "min_snr_gamma": -1.0, "noise_offset": 0.0,
            "save_every": 0, "preview_every": 0, "preview_prompt": "a kilnshape circle", "preview_seed": 0,
            "preview_size": 64, "preview_steps": 2, "timestep_sampling": "auto", **train}},
        **kiln_nodes(name, RANK, ALPHA, model=["1", 0], clip=["2", 0], vae=["3", 0]),
    })
    return graph


@pytest.fixture(scope="module")
def installed(server, families_2026_files):
    link_models(families_2026_files, server.base, FILES_2026)
    return server


@pytest.fixture(scope="module", params=list(SPECS))
def trained(request, installed):
    """Per family: the base render, then 4 steps with previews at 2 and 4 and a render from Train Steps' MODEL."""
    spec = SPECS[request.param]
    before = installed.run(render(spec, f"{request.param}_base_before", 100))
    assert before.status == "success", before.error
    graph = train_graph(spec, f"{request.param}_lora", steps=4, preview_every=2)
    graph.update(render(spec, f"{request.param}_kiln_model", 200, model=["4", 1]))
    result = installed.run(graph, timeout=1200)
    assert result.status == "success", result.error
    return request.param, before, result


def test_trains_with_progress_and_previews_on_auto_settings_and_writes_the_family_layout(installed, trained):
    key, _, result = trained
    spec = SPECS[key]
    steps = [d["step"] for d in result.of_type("kiln.train.progress") if d.get("node") == "4"]
    out = result.history["outputs"]["4"]
    assert steps and steps[-1] == 4 and [h[0] for h in out["kiln_history"]] == [1, 2, 3, 4]
    assert len(out["kiln_previews"]) == 2
    assert f"auto for {spec.family}: min_snr_gamma 0, timestep_sampling logit_normal" in out["text"][0]
    assert all(math.isfinite(h[1]) for h in out["kiln_history"])
    keys, meta = keys_and_metadata(installed, f"{key}_lora")
    suffixes = {"lora_A.weight", "lora_B.weight"} if spec.family == "Z-Image" else \
        {"lora_down.weight", "lora_up.weight", "alpha"}
    modules = {k.rsplit(".", 2 if k.endswith(".weight") else 1)[0] for k in keys}
    assert modules == spec.keys, sorted(modules ^ spec.keys)
    assert {k[len(m) + 1:] for k in keys for m in modules if k.startswith(m + ".")} == suffixes
    assert meta["ss_base_model_version"] == spec.base_version
    assert meta["modelspec.architecture"] == spec.architecture
    assert meta["ss_timestep_sampling"] == "logit_normal" and meta["ss_min_snr_gamma"] == "0.0"


def test_the_stock_lora_loader_applies_every_key_and_renders_like_train_steps(installed, trained):
    """Saved in fp32, LoraLoaderModelOnly (W + B A merged) renders what Train Steps' MODEL (Kiln's unmerged
    adapters) renders, within rounding; the LoRA moves the image; the base renders as before."""
    key, before, result = trained
    spec = SPECS[key]
    graph = {**render(spec, f"{key}_stock_lora", 300, lora=f"{key}_lora.safetensors"),
             **render(spec, f"{key}_base_after", 400)}
    assert_stock_lora_renders_like_train_steps(installed, (before, result), graph, ("109", "209", "309", "409"))


def _diffusers_transformer(key: str):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    if key == "zimage":
        return diffusers.ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=384, n_layers=1, n_refiner_layers=1,
            n_heads=3, n_kv_heads=3, cap_feat_dim=64, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])
    if key == "flux2":
        return diffusers.Flux2Transformer2DModel(
            patch_size=1, in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=128,
            num_attention_heads=1, joint_attention_dim=192, axes_dims_rope=(32, 32, 32, 32), guidance_embeds=False)
    return diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=64, axes_dims_rope=(8, 28, 28))


def test_diffusers_loads_every_key_with_kilns_deltas(installed, trained):
    """diffusers' own LoRA loader for the family (``lora_state_dict``, then ``load_lora_into_transformer``) on a
    diffusers transformer of the same architecture: one peft layer per file module, and its deltas (stacked where
    Kiln's layer is fused) are Kiln's, alpha / rank * up @ down from the run's checkpoint."""
    from peft.tuners.lora import LoraLayer

    key, _, _ = trained
    spec = SPECS[key]
    import diffusers.loaders as loaders_module

    mixin = getattr(loaders_module, spec.mixin)
    transformer = _diffusers_transformer(key)
    state_dict = mixin.lora_state_dict(str(installed.base / "models" / "loras" / f"{key}_lora.safetensors"))
    mixin.load_lora_into_transformer(state_dict, transformer=transformer, adapter_name="kiln")
    injected = {n: m for n, m in transformer.named_modules() if isinstance(m, LoraLayer)}
    assert set(injected) == {p for parts in spec.parts.values() for p in parts}, sorted(injected)

    def delta(name: str) -> torch.Tensor:
        layer = injected[name]
        return layer.scaling["kiln"] * layer.lora_B["kiln"].weight @ layer.lora_A["kiln"].weight

    checkpoint = next((installed.base / "output" / "lora_kiln" / f"{key}_lora" / "checkpoints")
                      .glob("*.kiln.safetensors"))
    kiln = load_file(str(checkpoint))
    for path, parts in spec.parts.items():
        up, down = kiln[f"weights/unet.{path}.lora_up.weight"], kiln[f"weights/unet.{path}.lora_down.weight"]
        ours = ALPHA / RANK * up @ down
        assert (ours.abs().max() > 0) != (path in spec.dead), path
        torch.testing.assert_close(torch.cat([delta(p) for p in parts]), ours, rtol=1e-5, atol=1e-7, msg=path)


@pytest.mark.parametrize("key", list(SPECS))
def test_fp8_weights_train_and_chained_steps_continue_exactly(installed, key):
    """fp8_e4m3fn weights (as UNETLoader's weight_dtype keeps them; ComfyUI casts per layer): 1 + 1 chained Train
    Steps and one 2-step node, from one Inject LoRA, give bit-identical losses and LoRAs, and every adapter trains."""
    spec = SPECS[key]
    graph = train_graph(spec, f"{key}_fp8_2", steps=2, weight_dtype="fp8_e4m3fn")
    graph["5"]["inputs"]["save_checkpoint"] = False
    graph["8"] = {"class_type": "KilnTrainSteps", "inputs": {**graph["4"]["inputs"], "steps": 1}}
    graph["9"] = {"class_type": "KilnTrainSteps", "inputs": {**graph["8"]["inputs"], "state": ["8", 0]}}
    graph["10"] = {"class_type": "KilnSaveLoRA", "inputs": {**graph["5"]["inputs"], "state": ["9", 0],
                                                            "filename": f"{key}_fp8_1_1"}}
    result = installed.run(graph, timeout=1200)
    assert result.status == "success", result.error
    one, chained = result.history["outputs"]["4"]["kiln_history"], result.history["outputs"]["9"]["kiln_history"]
    assert [h[0] for h in chained] == [1, 2] and chained == one
    loras = installed.base / "models" / "loras"
    two, one_one = load_file(str(loras / f"{key}_fp8_2.safetensors")), load_file(str(loras / f"{key}_fp8_1_1.safetensors"))
    assert two.keys() == one_one.keys() and all(torch.equal(two[k], one_one[k]) for k in two)
    ups = {k: v for k, v in two.items() if k.endswith(("lora_up.weight", "lora_B.weight"))}
    trained = {k for k, v in ups.items() if v.abs().sum() > 0}
    assert len(trained) == len(ups) - len(SPECS[key].dead) > 0, sorted(set(ups) - trained)


@pytest.mark.parametrize("key", list(SPECS))
def test_cancel_keeps_a_checkpoint_and_the_requeue_resumes(installed, key):
    graph = train_graph(SPECS[key], f"{key}_cancel", steps=300)  # tiny models step in milliseconds: room to cancel
    graph["5"]["inputs"]["save_checkpoint"] = False
    cancel_then_requeue(installed, graph, f"{key}_cancel", 300)


def test_explicit_min_snr_on_these_flow_models_is_refused_by_name(installed):
    result = installed.run(train_graph(SPECS["zimage"], "zimage_bad", steps=1, min_snr_gamma=5.0))
    assert result.status == "error"
    assert "min_snr_gamma=5" in result.error["exception_message"]
    assert "set min_snr_gamma to 0" in result.error["exception_message"]


@pytest.mark.parametrize("key", list(SPECS))
def test_the_shipped_example_workflow_trains_with_its_loaders_pointed_at_the_tiny_model(installed, key):
    """example_workflows/api/<family>.json as shipped (UNETLoader, CLIPLoader of the family's type, VAELoader; auto
    settings, gradient checkpointing, previews): only the loaders (the tiny model, encoder and VAE in their place),
    the sizes and the step counts change."""
    from comfy_harness import load_api

    spec = SPECS[key]
    wf = load_api(spec.example)
    assert wf["1"]["class_type"] == "UNETLoader" and wf["7"]["class_type"] == "CLIPLoader"
    assert wf["7"]["inputs"]["type"] == spec.clip_type
    assert wf["4"]["inputs"]["min_snr_gamma"] == -1.0 and wf["4"]["inputs"]["timestep_sampling"] == "auto"
    tiny = loaders(spec, 1)
    wf["1"], wf["8"] = tiny["1"], tiny["3"]
    wf["7"] = tiny["2"]
    wf["2"]["inputs"].update(folder="shapes", resolution=64)
    wf["3"]["inputs"].update(name=f"{key}_example", rank=4, alpha=4.0)
    wf["4"]["inputs"].update(steps=2, preview_every=2, preview_size=64, save_every=0, warmup_steps=0)
    result = installed.run(wf, timeout=1200)
    assert result.status == "success", result.error
    out = result.history["outputs"]["4"]
    assert [h[0] for h in out["kiln_history"]] == [1, 2] and len(out["kiln_previews"]) == 1
    assert (installed.base / "models" / "loras" / f"{key}_example.safetensors").exists()


def test_a_model_without_a_family_entry_trains_generically_with_previews_and_loads_in_the_stock_lora_loader(installed):
    """Lumina Image 2 (ComfyUI's Lumina2; no Kiln family entry) through the generic path on the server: Train Steps
    on auto settings with a preview; the kohya file of its own module paths names the ComfyUI class; the stock
    LoraLoaderModelOnly applies every key and renders what Train Steps' MODEL renders; the base renders as before."""
    spec = Spec("Lumina2", "Lumina2", "lumina2", "taesd16", frozenset(), "lumina2", "lumina2/lora", {}, "", "",
                learning_rate=5e-2)
    before = installed.run(render(spec, "generic_base_before", 100))
    assert before.status == "success", before.error
    graph = train_graph(spec, "generic_lora", steps=2, preview_every=2)
    graph.update(render(spec, "generic_kiln_model", 200, model=["4", 1]))
    result = installed.run(graph, timeout=1200)
    assert result.status == "success", result.error
    out = result.history["outputs"]["4"]
    assert len(out["kiln_previews"]) == 1 and "auto for Lumina2: min_snr_gamma 0" in out["text"][0]
    keys, meta = keys_and_metadata(installed, "generic_lora")
    assert keys and all(k.startswith("lora_unet_") for k in keys), keys[:5]
    assert any("attention_qkv" in k for k in keys) and any("feed_forward" in k for k in keys), sorted(keys)
    assert not any("adaLN" in k or "embedder" in k for k in keys), sorted(keys)  # attn+ff found by structure
    assert meta["ss_base_model_version"] == "lumina2" and meta["modelspec.architecture"] == "lumina2/lora"
    stock = {**render(spec, "generic_stock_lora", 300, lora="generic_lora.safetensors"),
             **render(spec, "generic_base_after", 400)}
    assert_stock_lora_renders_like_train_steps(installed, (before, result), stock, ("109", "209", "309", "409"))
