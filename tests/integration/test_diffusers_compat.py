"""diffusers loads the kohya LoRA that Save LoRA writes: every key, at the file's alpha/rank scale.

Two LoRAs are trained by the real server (the shipped workflow, a few steps): the default ``attn+ff`` one and a
LoCon on every layer (``targets="all"``, 3x3 convs at ``conv_rank``). Each goes through the path a diffusers
user takes, ``StableDiffusionPipeline.load_lora_weights(file)`` (kohya keys -> diffusers -> peft), into a diffusers
``UNet2DConditionModel`` built with the tiny checkpoint's architecture. The test fails when diffusers renames a
key it cannot place, warns about unexpected/missing keys, injects fewer LoRA layers than the file has, scales a
layer differently from kohya's ``alpha / rank``, or when the UNet's output with the LoRA differs from the base
weights merged by hand (``W + alpha / rank * up @ down``) -- so a silently dropped key cannot pass.

diffusers' kohya converter (``_convert_non_diffusers_lora_to_diffusers``, 0.42) handles LoCon's conv layers
(``conv_in``/``conv_out``, resnet ``conv1``/``conv2``/``conv_shortcut``), ``time_emb_proj`` and
``time_embedding.linear_N``; peft builds a Conv2d LoRA from a 4-D ``lora_down`` of any kernel size, and per-layer
ranks (8 on Linear/1x1, ``conv_rank`` on 3x3) arrive as peft's ``rank_pattern``.

A diffusers limitation (0.42.1) our files do not hit: when a file's alphas differ between layers, diffusers uses the
most common one and lists the others in peft's ``alpha_pattern``, but for the attention projections
(``to_q``/``to_k``/``to_v``/``to_out.0``) it spells the pattern key ``...attn1.processor.to_q_lora.down.weight``,
which matches no module, so peft warns and those layers keep the majority alpha. Kiln writes one ``alpha`` for every
Linear/1x1 layer (the attention projections are always in the majority) and ``conv_alpha`` for k x k convs, which
diffusers places correctly. A LoRA continued from a third-party file with mixed per-layer alphas (``init_lora``)
could hit it; the warning check below would then fail.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings

import pytest
import torch
import transformers
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file

from comfy_harness import tiny_train_workflow

diffusers = pytest.importorskip("diffusers", reason="diffusers is a dev requirement (requirements-dev.txt)")

ADAPTER = "kiln"
NO_TEXT_ENCODER_KEYS = "No LoRA keys associated to CLIPTextModel"  # the files have no lora_te_ keys: expected


def lora_file(server, name: str):
    return server.base / "models" / "loras" / f"{name}.safetensors"


@pytest.fixture(scope="module")
def lora_paths(server) -> dict[str, object]:
    """``attn+ff`` (alpha 4 at rank 8: scale 0.5, so a loader that ignores alpha is caught) and LoCon on all."""
    wf = tiny_train_workflow("dfx", steps=3)
    wf["3"]["inputs"].update(alpha=4.0)
    locon = tiny_train_workflow("dfx_locon", steps=3)
    locon["3"]["inputs"].update(targets="all", algorithm="locon", conv_rank=4)  # convs: alpha 8 at rank 4
    paths = {}
    for key, graph in (("attn+ff", wf), ("locon", locon)):
        result = server.run(graph, timeout=300)
        assert result.status == "success", result.error
        paths[key] = lora_file(server, graph["5"]["inputs"]["filename"])
        assert paths[key].is_file()
    return paths


def tiny_unet() -> diffusers.UNet2DConditionModel:
    """nodes/tiny_checkpoint.py's ``tiny`` UNet in diffusers' layout.

    ComfyUI: input_blocks 0 (conv_in) and 1 (ResBlock + SpatialTransformer), no middle block, output_blocks 0-1
    (num_res_blocks + 1 = 2, each ResBlock + SpatialTransformer), no down/upsampler (one level). diffusers:
    down_blocks.0 with 1 resnet/attention, no mid_block, up_blocks.0 with layers_per_block + 1 = 2
    resnets/attentions. ``attention_head_dim=8`` is diffusers' SD1.x spelling of 8 heads; 1x1 conv proj_in/out.
    """
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",), mid_block_type=None,
        block_out_channels=(320,), layers_per_block=1, cross_attention_dim=768, attention_head_dim=8,
        use_linear_projection=False, norm_num_groups=32,
    ).eval()


def tiny_pipeline(unet) -> diffusers.StableDiffusionPipeline:
    """A StableDiffusionPipeline around ``unet`` with tiny random other parts (the LoRA has no text-encoder keys)."""
    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=768, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1, vocab_size=100,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    vae = diffusers.AutoencoderKL(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=32)
    scheduler = diffusers.DDIMScheduler(steps_offset=1, clip_sample=False)
    return diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


@contextlib.contextmanager
def captured_warnings():
    """Every WARNING+ record of diffusers'/peft's loggers and every ``warnings.warn``, as text."""
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(f"{record.name}: {record.getMessage()}")

    handler = Collect(logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.WARNING)  # whatever verbosity someone set, warnings must reach the handler
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield seen
        seen.extend(f"warning: {w.message}" for w in caught)
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)


def kohya_layers(path) -> dict[str, dict[str, torch.Tensor]]:
    """kohya base name -> {"down", "up", "alpha"} from the file."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(path)).items():
        base, _, kind = key.partition(".")
        out.setdefault(base, {})[{"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[kind]] = tensor
    return out


def module_names(layers) -> dict[str, str]:
    """kohya base name -> the module of the diffusers UNet whose path, with '.' -> '_', spells it.

    A KeyError names a layer the UNet does not have (a naming mismatch between ComfyUI's map and diffusers).
    """
    paths = [name for name, _ in tiny_unet().named_modules() if name]
    spelled = {name.replace(".", "_"): name for name in paths}
    assert len(spelled) == len(paths), "two UNet modules spell the same kohya name"
    return {base: spelled[base.removeprefix("lora_unet_")] for base in layers}


def forward(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 7, 768, generator=g)
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), encoder_hidden_states=context).sample


def merged_by_hand(unet, layers, names) -> diffusers.UNet2DConditionModel:
    """kohya's rule on plain weights, in place: W += alpha / rank * up @ down (convs: 1x1 up over k x k down)."""
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for base, t in layers.items():
            down, up = t["down"].float(), t["up"].float()
            scale = t["alpha"].item() / down.shape[0]
            weight = modules[names[base]].weight
            if down.ndim == 4:
                delta = torch.einsum("or,rikl->oikl", up.flatten(1), down)
            else:
                delta = up @ down
            weight += scale * delta.reshape(weight.shape)
    return unet


@pytest.mark.parametrize("kind", ["attn+ff", "locon"])
def test_diffusers_loads_every_key_of_the_saved_lora_and_applies_alpha_over_rank(lora_paths, kind):
    path = lora_paths[kind]
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    layers = kohya_layers(path)
    assert layers and all(base.startswith("lora_unet_") for base in layers)
    assert all(set(t) == {"down", "up", "alpha"} for t in layers.values()), "every layer has down, up and alpha"
    assert all(t["alpha"].ndim == 0 for t in layers.values())  # kohya writes a scalar alpha

    # diffusers' kohya converter, as `lora_state_dict` applies it (it raises on a key it cannot rename)
    state_dict, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(str(path))
    assert len(state_dict) == 2 * len(layers) and all(k.startswith("unet.") for k in state_dict)
    assert len(alphas) == len(layers)

    unet = tiny_unet()
    base_out = forward(unet)
    pipe = tiny_pipeline(unet)
    with captured_warnings() as seen:
        pipe.load_lora_weights(str(path), adapter_name=ADAPTER)
    # diffusers only *warns* about a key naming no module of the UNet ("unexpected keys") and drops that layer
    assert [w for w in seen if NO_TEXT_ENCODER_KEYS not in w] == []
    pipe.set_adapters([ADAPTER], adapter_weights=[1.0])
    injected = {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer)}
    assert len(injected) == len(layers), "diffusers injected fewer/more LoRA layers than the file has"

    # the names line up (down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q, ...) and so do the shapes
    names = module_names(layers)
    assert sorted(injected) == sorted(names.values())
    for base, t in layers.items():
        weight = injected[names[base]].get_base_layer().weight
        assert t["up"].shape[0] == weight.shape[0] and t["down"].shape[1] == weight.shape[1], base
        assert t["down"].shape[2:] == weight.shape[2:], base
    if kind == "locon":
        # every Linear/Conv2d of the UNet carries a layer: ComfyUI's tiny UNet and this one match one to one
        every = {n for n, m in tiny_unet().named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
        assert set(names.values()) == every
        assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "8.0"}  # convs: scale 2
        assert any(t["down"].shape[2:] == (3, 3) for t in layers.values())
    else:
        assert names["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"] == \
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
        assert names["lora_unet_up_blocks_0_attentions_1_proj_out"] == "up_blocks.0.attentions.1.proj_out"

    # each layer holds the file's tensors at kohya's scale alpha / rank
    for base, t in layers.items():
        layer, rank = injected[names[base]], t["down"].shape[0]
        assert layer.r[ADAPTER] == rank, base
        assert layer.scaling[ADAPTER] == pytest.approx(t["alpha"].item() / rank), base
        assert torch.equal(layer.lora_A[ADAPTER].weight.to(t["down"].dtype), t["down"]), base
        assert torch.equal(layer.lora_B[ADAPTER].weight.to(t["up"].dtype).reshape(t["up"].shape), t["up"]), base

    with_lora = forward(unet)
    assert (with_lora - base_out).abs().max() > 1e-6, "the LoRA did not change the UNet's output"
    torch.testing.assert_close(with_lora, forward(merged_by_hand(tiny_unet(), layers, names)), rtol=1e-3, atol=1e-4)
    pipe.disable_lora()
    torch.testing.assert_close(forward(unet), base_out, rtol=0, atol=0)
