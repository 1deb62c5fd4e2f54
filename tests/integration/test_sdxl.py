"""SDXL end to end on a real ComfyUI server: checkpoints the stock CheckpointLoaderSimple detects as SDXL.

One epsilon SDXL checkpoint is built once per session (a 152 M UNet with the full CLIP-L and CLIP-G, see
nodes/tiny_checkpoint.py), and a v-prediction (+ zero-terminal SNR) one made from it (the same weights plus two keys);
both go into the shared server's models/checkpoints, so these tests share the server of the other integration tests.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from comfy_harness import link_models

KSAMPLER = {"seed": 7, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}
XL, XL_V = "tiny_sdxl.safetensors", "tiny_sdxl_vpred_ztsnr.safetensors"


def install_checkpoint(server, built, name, folder: str = "checkpoints"):
    """Put a session-built model file into the shared server's models/<folder> (a hard link when it can)."""
    link_models({name: built}, server.base, {name: folder})


@pytest.fixture(scope="session")
def sdxl(server, sdxl_checkpoint):
    install_checkpoint(server, sdxl_checkpoint, XL)
    return server


@pytest.fixture(scope="session")
def sdxl_vpred(server, sdxl_checkpoint, tmp_path_factory):
    """The tiny SDXL with the ``v_pred`` and ``ztsnr`` keys (what ``tiny_checkpoint --ztsnr`` adds; the same weights,
    written in seconds instead of built again)."""
    sd = load_file(str(sdxl_checkpoint))
    sd.update(v_pred=torch.tensor([]), ztsnr=torch.tensor([]))
    built = tmp_path_factory.mktemp("xlv") / XL_V
    save_file(sd, str(built))
    del sd
    install_checkpoint(server, built, XL_V)
    return server


def render(ckpt: str, prefix: str, lora: str | None = None, base: int = 100, model: list | None = None,
           latent: str = "EmptyLatentImage", ksampler: dict | None = None) -> dict:
    """Nodes rendering one 64x64 image from ``ckpt`` (through the stock LoraLoader when ``lora`` is given, from the
    ``model`` link when one is given); test_sd3.py renders with an SD3 latent and sampler settings."""
    i = [str(base + k) for k in range(8)]
    graph = {i[0]: {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}}
    model, clip = model or [i[0], 0], [i[0], 1]
    if lora:
        graph[i[1]] = {"class_type": "LoraLoader", "inputs": {"model": model, "clip": clip, "lora_name": lora,
                                                               "strength_model": 1.0, "strength_clip": 1.0}}
        model, clip = [i[1], 0], [i[1], 1]
    graph.update({
        i[2]: {"class_type": "CLIPTextEncode", "inputs": {"text": "a kilnshape circle", "clip": clip}},
        i[3]: {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip}},
        i[4]: {"class_type": latent, "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        i[5]: {"class_type": "KSampler", "inputs": {**(ksampler or KSAMPLER), "model": model, "positive": [i[2], 0],
                                                    "negative": [i[3], 0], "latent_image": [i[4], 0]}},
        i[6]: {"class_type": "VAEDecode", "inputs": {"samples": [i[5], 0], "vae": [i[0], 2]}},
        i[7]: {"class_type": "SaveImage", "inputs": {"images": [i[6], 0], "filename_prefix": prefix}},
    })
    return graph


def assert_stock_lora_renders_like_train_steps(server, trained: tuple, graph: dict,
                                              ids: tuple[str, str, str, str]) -> None:
    """Runs ``graph`` (a render through the stock LoraLoader and, after it, one from the base): ComfyUI logs no
    ``lora key not loaded``, and against ``trained`` (the base render before training, and the training prompt that
    rendered from Train Steps' MODEL) the LoRA loaded renders what Kiln's unmerged adapters render, within rounding;
    it moves the image far more than that; the base renders as before. ``ids``: the SaveImage nodes (base before,
    Train Steps' MODEL, stock LoRA, base after)."""
    log_start = len(server.log())
    stock = server.run(graph)
    assert stock.status == "success", stock.error
    assert "lora key not loaded" not in server.log()[log_start:]
    before, result = trained
    base, kiln = image(server, before, ids[0]), image(server, result, ids[1])
    loaded, after = image(server, stock, ids[2]), image(server, stock, ids[3])
    diff, effect = np.abs(kiln - loaded), np.abs(loaded - base).mean()
    assert diff.mean() < 0.25 and diff.max() <= 2, (diff.mean(), diff.max(), effect, np.abs(kiln - base).mean())
    assert effect > 10 * 0.25, effect
    assert np.array_equal(base, after)


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
    """The base render before training and one SDXL run of 2 steps (both text encoders, a preview after each)."""
    before = sdxl.run(render(XL, "xl_base_before"))
    assert before.status == "success", before.error
    result = sdxl.run(train_graph(XL, "xl_lora", steps=2, text_encoder=True, preview_every=1), timeout=1200)
    assert result.status == "success", result.error
    return before, result


@pytest.mark.compat
def test_sdxl_trains_with_progress_and_previews_and_saves_kohya_sdxl_keys(sdxl, xl_trained):
    _, result = xl_trained
    steps = [d["value"] for d in result.of_type("progress") if d.get("node") == "4" and d.get("max") == 2]
    assert steps[-1] == 2 and sorted(set(steps)) == [1, 2]
    assert len(result.history["outputs"]["4"]["kiln_previews"]) == 2  # steps 1 and 2, through ComfyUI's sampler
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


@pytest.mark.compat
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


# ---- issue 12: Train Steps' outputs = LoraLoader(saved file), chained runs, init_lora, diffusers' SDXL loader ----

def render_from(model, clip, vae, prefix: str, base: int) -> dict:
    """:func:`render`'s nodes without its CheckpointLoaderSimple: from these MODEL / CLIP / VAE links."""
    graph = render(XL, prefix, base=base)
    del graph[str(base)]
    i = [str(base + k) for k in range(8)]
    graph[i[2]]["inputs"]["clip"] = graph[i[3]]["inputs"]["clip"] = clip
    graph[i[5]]["inputs"]["model"] = model
    graph[i[6]]["inputs"]["vae"] = vae
    return graph


def lora_tensors(server, name) -> dict:
    return load_file(str(server.base / "models" / "loras" / f"{name}.safetensors"))


@pytest.fixture(scope="module")
def xl_continued(sdxl, xl_trained):
    """One prompt: Inject LoRA with ``init_lora`` = the fixture's SDXL LoRA (UNet + te1 + te2, rank 4 / alpha 4),
    asked for rank 8 / alpha 16 and seed 1, saved untrained (fp16) and after one Train Steps step with both text
    encoders (fp32), rendered with Train Steps' MODEL and CLIP outputs."""
    graph = train_graph(XL, "xl_init", steps=1, text_encoder=True, learning_rate=5e-3, text_encoder_lr=5e-3)
    graph["3"]["inputs"].update(init_lora="xl_lora.safetensors", rank=8, alpha=16.0, seed=1)
    graph["5"]["inputs"].update(filename="xl_init_one", dtype="fp32")
    graph["6"] = {"class_type": "KilnSaveLoRA", "inputs": {"state": ["3", 0], "filename": "xl_init_copy",
                                                           "dtype": "fp16", "save_checkpoint": False}}
    graph.update(render_from(["4", 1], ["4", 4], ["1", 2], "xl_kiln_outputs", base=400))
    result = sdxl.run(graph, timeout=1200)
    assert result.status == "success", result.error
    return result


def test_sdxl_train_steps_model_and_clip_render_like_the_stock_lora_loader_with_the_saved_file(sdxl, xl_trained,
                                                                                               xl_continued):
    """Both text encoders train, so the CLIP output's te1/te2 patches are compared as well as the UNet's adapters.

    Saved in fp32, both sides apply the same numbers; only ComfyUI merging ``W + alpha / rank * up @ down`` into
    the weights versus Kiln adding ``x @ down @ up`` beside them differs (fp32 rounding, ~1e-6 relative). After
    two Euler steps, TAESD and 8-bit quantisation that flips at most a few pixels by one level: mean below 0.25
    of 255, no pixel more than 2 levels off. The LoRA moves the image far more than that (checked against the
    base render of ``xl_trained``, same sampler settings), so a missing or mis-scaled patch fails.
    """
    log_start = len(sdxl.log())
    stock = sdxl.run(render(XL, "xl_stock_lora", lora="xl_init_one.safetensors", base=500))
    assert stock.status == "success", stock.error
    assert "lora key not loaded" not in sdxl.log()[log_start:]
    before, _ = xl_trained
    kiln, loaded, base = image(sdxl, xl_continued, "407"), image(sdxl, stock, "507"), image(sdxl, before, "107")
    diff, effect = np.abs(kiln - loaded), np.abs(loaded - base).mean()
    assert diff.mean() < 0.25 and diff.max() <= 2, (diff.mean(), diff.max())
    assert effect > 10 * 0.25, effect


def test_sdxl_chained_train_steps_continue_exactly(sdxl):
    """2 + 2 chained steps give the bit-identical LoRA of one 4-step node (CPU, fp32): the data order (two images,
    batch 1, so the second node starts the second epoch's shuffle), noise, the AdamW moments and the cosine
    schedule over ``schedule_steps`` (learning-rate factors 1, 0.85, 0.5, 0.15) all continue. Both branches start
    from one Inject LoRA node, and all three nodes train (none is served from an earlier run)."""
    folder = sdxl.base / "input" / "xl_pair"
    folder.mkdir(exist_ok=True)
    for f in ("img_00.png", "img_00.txt", "img_01.png", "img_01.txt"):
        shutil.copy(sdxl.base / "input" / "shapes" / f, folder / f)
    graph = train_graph(XL, "xl_chain", steps=4, scheduler="cosine", schedule_steps=4, batch_size=1)
    graph["2"]["inputs"]["folder"] = "xl_pair"
    graph["5"]["inputs"].update(filename="xl_chain_4", dtype="fp32")
    graph["6"] = {"class_type": "KilnTrainSteps", "inputs": {**graph["4"]["inputs"], "steps": 2}}
    graph["7"] = {"class_type": "KilnTrainSteps", "inputs": {**graph["6"]["inputs"], "state": ["6", 0]}}
    graph["8"] = {"class_type": "KilnSaveLoRA", "inputs": {**graph["5"]["inputs"], "state": ["7", 0],
                                                           "filename": "xl_chain_2_2"}}
    result = sdxl.run(graph, timeout=1200)
    assert result.status == "success", result.error
    one, chained = result.history["outputs"]["4"]["kiln_history"], result.history["outputs"]["7"]["kiln_history"]
    live = result.of_type("kiln.train.progress")
    for node, steps in (("4", [1, 2, 3, 4]), ("6", [1, 2]), ("7", [3, 4])):  # each node trained its own steps
        assert sorted(s for d in live if d["node"] == node for s, _, _ in d["points"]) == steps, node
    assert [h[0] for h in chained] == [1, 2, 3, 4]
    assert chained == one  # same losses and learning rates, step by step
    assert len({h[2] for h in one}) == 4  # the learning rate really moves
    four, two_two = lora_tensors(sdxl, "xl_chain_4"), lora_tensors(sdxl, "xl_chain_2_2")
    assert four.keys() == two_two.keys()
    assert all(t.dtype == torch.float32 for t in four.values())
    different = [k for k in four if not torch.equal(four[k], two_two[k])]
    assert different == [], f"{len(different)} tensors differ, e.g. {different[:3]}"
    assert all(t.abs().sum() > 0 for k, t in four.items() if k.endswith("lora_up.weight"))  # it trained
    _, meta = keys_and_metadata(sdxl, "xl_chain_2_2")
    assert meta["ss_steps"] == "4"


def test_sdxl_init_lora_starts_from_the_files_weights(sdxl, xl_continued):
    """Saved untrained, the ``init_lora`` state is the file again, bit for bit, with the file's rank and alpha;
    one AdamW step later no weight has moved more than one step of ``learning_rate`` (AdamW's first step is
    lr * g / |g| plus weight decay), so training started from the file's weights, not from a fresh (seed 1)
    initialisation, and counts its own steps from 0."""
    source, copy, one = (lora_tensors(sdxl, n) for n in ("xl_lora", "xl_init_copy", "xl_init_one"))
    assert copy.keys() == source.keys() == one.keys()
    assert {k.split("_")[1] for k in source} == {"unet", "te1", "te2"}
    assert all(torch.equal(copy[k], source[k]) for k in source)
    _, meta = keys_and_metadata(sdxl, "xl_init_copy")
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4.0"  # the file's, not Inject LoRA's
    assert [h[0] for h in xl_continued.history["outputs"]["4"]["kiln_history"]] == [1]
    _, meta = keys_and_metadata(sdxl, "xl_init_one")
    assert meta["ss_steps"] == "1"
    weights = [k for k in source if not k.endswith(".alpha")]
    moved = torch.stack([(one[k] - source[k].float()).abs().max() for k in weights])
    # every layer trained but CLIP-L's last: SDXL reads CLIP-L's penultimate hidden state, so layer 11 gets no
    # gradient (its adapters are carried, as kohya's are, and keep the file's weights exactly)
    still = {k.split(".")[0] for k, m in zip(weights, moved) if m == 0}
    assert still == {b for b in (k.split(".")[0] for k in weights) if b.startswith("lora_te1_text_model_encoder_layers_11_")}
    assert len(still) == 6
    assert moved.max() <= 5e-3 * 1.05, moved.max()  # learning_rate 5e-3 (both), weight decay 0.01
    assert all(torch.equal(one[k], source[k].float()) for k in source if k.endswith(".alpha"))


def xl_diffusers_unet():
    """nodes/tiny_checkpoint.py's ``sdxl`` UNet in diffusers' layout, which expresses it exactly (same 162 M
    parameters): ComfyUI's input_blocks 1-2 (no transformer), 4-5 (depth 2), 7-8 (depth 10) with downsamplers at
    3 and 6 are down_blocks 0 (DownBlock2D), 1 and 2 (``transformer_layers_per_block`` 2 and 10), two resnets
    each; output_blocks 0-8 with one transformer each are three CrossAttnUpBlock2D of three resnets/attentions
    (``reverse_transformer_layers_per_block`` all 1); ``transformer_depth_middle=-2`` is no middle block
    (``mid_block_type=None``). ``attention_head_dim=5`` is diffusers' spelling of 5 heads of 64 channels."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(320, 320, 320), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D",) * 3, mid_block_type=None, transformer_layers_per_block=(1, 2, 10),
        reverse_transformer_layers_per_block=((1, 1, 1),) * 3, cross_attention_dim=2048, attention_head_dim=5,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816, norm_num_groups=32,
    ).eval()


def xl_text_encoders():
    """CLIP-L and CLIP-G of SDXL's sizes, allocated but not initialised (only their LoRA layers are compared)."""
    import transformers

    def clip(cls, hidden, layers, heads):
        cfg = transformers.CLIPTextConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                                          num_attention_heads=heads, projection_dim=hidden, vocab_size=49408,
                                          max_position_embeddings=77)
        with torch.device("meta"):
            model = cls(cfg)
        return model.to_empty(device="cpu").eval()

    return (clip(transformers.CLIPTextModel, 768, 12, 12),
            clip(transformers.CLIPTextModelWithProjection, 1280, 32, 20))


def xl_forward(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    sample, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 7, 2048, generator=g)
    added = {"text_embeds": torch.randn(1, 1280, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), encoder_hidden_states=context, added_cond_kwargs=added).sample


def kohya_to_diffusers_modules(bases, unet, te1, te2) -> dict[str, tuple[str, str]]:
    """kohya base -> (component, module path), by our own rule (not diffusers' converter): LDM input_blocks.i.1 is
    down_blocks[(i - 1) // 3].attentions[(i - 1) % 3], output_blocks.i.1 is up_blocks[i // 3].attentions[i % 3]
    (two / three layers per level), the rest of the path spelled with '_' for '.'; text encoders: the
    transformers module path (``text_model.`` or, flattened in transformers 5, without it)."""
    import re

    def spelled(model, prefix=""):
        names = [n for n, _ in model.named_modules() if n]
        out = {prefix + n.replace(".", "_"): n for n in names}
        assert len(out) == len(names), "two modules spell the same kohya name"
        return out

    modules = {"unet": spelled(unet),
               **{c: spelled(m, "" if hasattr(m, "text_model") else "text_model_") for c, m in
                  (("text_encoder", te1), ("text_encoder_2", te2))}}
    out = {}
    for base in bases:
        if m := re.fullmatch(r"lora_unet_(input|output)_blocks_(\d+)_1_(.+)", base):
            i = int(m.group(2))
            block, layer = ((i - 1) // 3, (i - 1) % 3) if m.group(1) == "input" else (i // 3, i % 3)
            side = "down" if m.group(1) == "input" else "up"
            out[base] = ("unet", modules["unet"][f"{side}_blocks_{block}_attentions_{layer}_{m.group(3)}"])
        else:
            component = {"lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}[base[:9]]
            out[base] = (component, modules[component][base[9:]])
    return out


def test_diffusers_sdxl_pipeline_loads_every_key_of_the_saved_sdxl_lora(sdxl, xl_trained):
    """diffusers' SDXL kohya path (``StableDiffusionXLPipeline.load_lora_weights``: SGM blocks -> diffusers blocks
    with the UNet's config, kohya -> diffusers -> peft) on the fixture's LoRA (UNet + te1 + te2, fp16): no warning,
    one LoRA layer per file layer on the module our own LDM -> diffusers rule names, the file's tensors at
    alpha / rank, and the UNet's output equal to the base weights merged by hand."""
    diffusers = pytest.importorskip("diffusers")
    from peft.tuners.lora import LoraLayer
    from test_diffusers_compat import ADAPTER, captured_warnings, kohya_layers, merged_by_hand

    path = sdxl.base / "models" / "loras" / "xl_lora.safetensors"
    layers = kohya_layers(path)
    unet_bases = {b for b in layers if b.startswith("lora_unet_")}
    assert unet_bases and len([b for b in layers if b.startswith(("lora_te1_", "lora_te2_"))]) == 72 + 192
    unet = xl_diffusers_unet()
    te1, te2 = xl_text_encoders()
    names = kohya_to_diffusers_modules(layers, unet, te1, te2)

    state_dict, alphas = diffusers.StableDiffusionXLPipeline.lora_state_dict(str(path), unet_config=unet.config)
    assert len(state_dict) == 2 * len(layers) and len(alphas) == len(layers)
    assert sorted({k.split(".")[0] for k in state_dict}) == ["text_encoder", "text_encoder_2", "unet"]

    base_out = xl_forward(unet)
    vae = diffusers.AutoencoderKL(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=32)
    pipe = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=None,
                                               tokenizer_2=None, unet=unet, scheduler=diffusers.EulerDiscreteScheduler(),
                                               add_watermarker=False)
    with captured_warnings() as seen:
        pipe.load_lora_weights(str(path), adapter_name=ADAPTER)
    assert seen == []  # diffusers/peft only warn about keys that name no module, and drop those layers
    pipe.set_adapters([ADAPTER], adapter_weights=[1.0])
    injected = {(c, n): m for c, model in (("unet", unet), ("text_encoder", te1), ("text_encoder_2", te2))
                for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert len([k for k in injected if k[0] == "unet"]) == len(unet_bases)
    assert sorted(injected) == sorted(names.values())
    assert names["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"] == \
        ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    assert names["lora_unet_output_blocks_8_1_proj_out"] == ("unet", "up_blocks.2.attentions.2.proj_out")
    for base, t in layers.items():
        layer, rank = injected[names[base]], t["down"].shape[0]
        assert layer.r[ADAPTER] == rank and layer.scaling[ADAPTER] == pytest.approx(t["alpha"].item() / rank), base
        assert torch.equal(layer.lora_A[ADAPTER].weight.to(t["down"].dtype), t["down"]), base
        assert torch.equal(layer.lora_B[ADAPTER].weight.to(t["up"].dtype), t["up"]), base

    with_lora = xl_forward(unet)
    pipe.disable_lora()  # kohya's rule by hand into the same UNet's base weights, its LoRA layers bypassed now
    merged = xl_forward(merged_by_hand(unet, {b: layers[b] for b in unet_bases}, {b: names[b][1] for b in unet_bases}))
    effect, error = (with_lora - base_out).abs().max(), (with_lora - merged).abs().max()
    assert effect > 1e-4 and error < 0.01 * effect, (effect, error)  # LoRA applied twice or not at all: fails


def cancel_then_requeue(server, graph: dict, name: str, steps: int) -> None:
    """Cancel after the second training step, then queue the same prompt again: the Cancel checkpoint is kept and
    the re-queue resumes from it (issue 15) and ends at the target step."""
    seen: list[int] = []

    def on_message(kind, data):  # Kiln's live event (ComfyUI's own bar may skip steps: v0.33 throttles it)
        if kind == "kiln.train.progress" and data.get("node") == "4" and data["step"] >= 2 and not seen:
            seen.append(data["step"])
            server.interrupt()

    result = server.run(graph, on_message=on_message, timeout=1200)
    assert result.status == "interrupted"
    folder = server.base / "output" / "lora_kiln" / name / "checkpoints"
    cancelled = sorted(p.name for p in folder.glob("*_cancelled.kiln.safetensors"))
    assert len(cancelled) == 1, cancelled
    stopped = int(cancelled[0].split("_step")[1][:6])
    assert 2 <= stopped < steps
    again = server.run(graph, timeout=1200)
    assert again.status == "success", again.error
    text = again.history["outputs"]["4"]["text"][0]
    assert text.startswith(f"resumed from step {stopped}: {steps - stopped} steps"), text
    assert [h[0] for h in again.history["outputs"]["4"]["kiln_history"]] == list(range(1, steps + 1))


def test_sdxl_cancel_keeps_a_checkpoint_and_the_requeue_resumes_from_it(sdxl):
    cancel_then_requeue(sdxl, train_graph(XL, "xl_cancel", steps=8), "xl_cancel", 8)
