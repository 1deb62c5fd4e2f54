"""Write a small, random checkpoint that ComfyUI's stock loader detects as SD1.5, SDXL, SD3, FLUX.1, Chroma, FLUX.2 or Wan.

For tests, benchmarks and the first-run demo; never for real images. ComfyUI's SD1.5 detection checks
only model_channels=320, context_dim=768 (from the first input block's cross-attention), a 1x1 conv
proj_in, no label_emb and 4 input channels, so depth and width of everything else can shrink:

- ``tiny``:  channel_mult [1], one res block, no middle block  (UNet about 19 M parameters)
- ``small``: channel_mult [1, 2], one res block, a middle block (UNet about 107 M parameters)
- ``sd15``:  the full SD1.5 UNet layout (860 M parameters), for GPU benchmarks

SDXL's detection checks model_channels 320, a linear proj_in, the input-side transformer depths
[0, 0, 2, 2, 10, 10], context 2048 and adm 2816, but not channel_mult nor the output/middle depths:

- ``sdxl``:      channel_mult [1, 1, 1], one transformer per output block, no middle block (UNet about 152 M)
- ``sdxl_full``: the full SDXL UNet layout (2.6 B parameters), for GPU benchmarks

SD3's detection reads the MMDiT's depth from the x_embedder width (hidden size = 64 x depth, one 64-wide head
per depth step), in_channels 16, adm from ``y_embedder`` and the context width from ``context_embedder``;
``SD3.unet_config`` matches in_channels 16 only, so depth can shrink:

- ``sd3``: an MMDiT of depth 2 (hidden 128, 2 heads, 2 joint blocks; 1.9 M parameters plus a 0.5 M sin-cos
  ``pos_embed`` buffer of 64x64 patches: latents up to 128x128, images up to 1024 px), pooled input 2048 (CLIP-L
  768 + CLIP-G 1280), context 4096 (CLIP-L/G padded to T5's width: ComfyUI pads when there is no T5). Stored under
  ``model.diffusion_model.``, with CLIP-L/CLIP-G under ``text_encoders.clip_l.transformer.`` /
  ``text_encoders.clip_g.transformer.`` and no T5-XXL; ComfyUI samples it with ModelSamplingDiscreteFlow, shift 3.

FLUX.1's detection fixes hidden size 3072, 24 heads and context 4096 and reads only the block counts and whether
``guidance_in`` exists, so the smallest FLUX is one double- and one single-stream block (545 M parameters). It is
written as a diffusion-model file for ``UNETLoader`` (the keys as in flux1-dev.safetensors, bf16); its text
encoders are loaded separately (DualCLIPLoader; tests build a tiny T5 with ComfyUI's classes) and ``--vae`` writes a
16-channel TAESD file for ``VAELoader``:

- ``flux``: FLUX.1-dev layout (guidance input), 1 + 1 blocks; ``flux_schnell``: the same without guidance
- ``flux_full``: the full FLUX.1-dev layout (19 + 38 blocks, 12 B parameters), for GPU benchmarks

Chroma is detected from its ``distilled_guidance_layer`` (the modulation network, fixed at 5 layers of width 5120);
the block counts are read as for FLUX.1. Its text encoder is T5-XXL alone (CLIPLoader, type chroma); ``--vae`` as
for FLUX.1:

- ``chroma``: 1 + 1 blocks (631 M parameters, 278 M of them the modulation network); ``chroma_full``: 19 + 38
  blocks (8.9 B), for GPU benchmarks

FLUX.2 (ComfyUI v0.33+) is detected from real shapes (hidden size from ``img_in``, 128-wide heads, the context width
from ``txt_in``, block counts, ``guidance_in``), so it can be tiny; its text encoder and VAE are loaded separately:

- ``flux2``: Klein-like (no guidance input), hidden 128 (one head), context 192 (three stacked layers of a 64-wide
  Qwen3: the tests' tiny encoder), 1 + 1 blocks (1 M parameters); ``flux2_dev``: the same with a guidance input
- ``flux2_klein4b_full``: the FLUX.2 Klein 4B layout (hidden 3072, context 7680, 5 + 20 blocks), and
  ``flux2_klein9b_full`` Klein 9B's (hidden 4096, context 12288, 8 + 24 blocks), for GPU benchmarks

Wan 2.1 / 2.2 video models are detected from real shapes too (``model_detection``'s Wan branch: the width from
``head.modulation``, one head per 128 channels, ``ffn_dim`` from the first block's FFN, the block count, ``in_dim``
from ``patch_embedding`` and ``out_dim`` from ``head.head``; out_dim 48 selects Wan 2.2's ``WAN22_T2V``). The context
width is not read: ComfyUI builds ``text_embedding`` for 4096 (UMT5-XXL's width), so the tiny ones keep it (the tests'
tiny UMT5 is 4096 wide, one layer). Written as diffusion-model files for ``UNETLoader``, text encoder (CLIPLoader,
type wan) and VAE loaded separately:

- ``wan21``: a Wan 2.1 T2V (``WAN21_T2V``, ``model_base.WAN21``, 16 latent channels): width 128 (one head), FFN 256,
  2 blocks (1.1 M parameters, 0.5 M of them the 4096-wide text embedding)
- ``wan22_5b``: Wan 2.2 TI2V-5B's kind (``WAN22_T2V``, ``model_base.WAN22``, 48 channels in and out, Wan 2.2's latent
  format), the same tiny width and depth (1.1 M parameters)
- ``wan21_1_3b_full``: the Wan 2.1 T2V 1.3B layout (width 1536, 12 heads, FFN 8960, 30 blocks: 1.4 B parameters), for
  GPU benchmarks

Z-Image is detected only at its real width (3840), so the one size is the whole model: ``zimage_full`` (30 layers and
2 + 2 refiners, 6 B parameters; cap_feat_dim 2560, Qwen3-4B's width), for GPU benchmarks. Tests build tiny ones with
a test-only node instead.

``--vae-kind`` picks the ``--vae`` file: ``taesd16`` (FLUX.1, Chroma, Z-Image), ``taef2`` (FLUX.2's tiny autoencoder:
128 packed channels at 1/16; ``--vae DIR/taef2`` writes ``taef2_encoder`` / ``taef2_decoder`` files for
models/vae_approx, which VAELoader offers as ``taef2``), ``wan21`` (a tiny Wan 2.1 video VAE, dim 8: Qwen-Image's
and Wan 2.1's latent space), ``wan22`` (Wan 2.2's VAE, 48 channels at 1/16 spatially, 1/4 in time; ComfyUI builds it
at its real width whatever the file holds, so this one is full size: 705 M parameters, written bf16, 1.4 GB) or
``taew22`` (a tiny autoencoder of Wan 2.2's latent space, TAEHV with 48 channels, 11 M parameters: what VAELoader
builds for a ``lighttaew2_2`` file; only ComfyUI versions with ``comfy.taesd.taehv`` detect it).

The text encoders are full size (CLIP-L, and CLIP-G for SDXL and SD3: the loader always builds them from fixed
configs) and the VAE is TAESD (ComfyUI builds TAESD when the checkpoint carries ``taesd_encoder``/
``taesd_decoder`` weights; 16 latent channels for SD3), all random.
``--quant scaled_fp8`` stores every 2-D weight of the diffusion model (its Linear layers) as fp8 with a per-layer
``scale_weight`` and the ``scaled_fp8`` marker, as the "fp8 scaled" checkpoints people share do (ComfyUI 0.3.64 runs them
with ``scaled_fp8_ops``; newer versions convert them to their quantized format); ``--quant comfy_quant`` writes the
newer per-layer format directly (``weight_scale`` + a ``comfy_quant`` JSON tensor per layer, ``float8_e4m3fn``), and
``--quant comfy_quant_int8`` the same with ``int8_tensorwise`` weights.
``--vpred`` adds the ``v_pred`` key (ComfyUI then samples the model as v-prediction), ``--ztsnr`` also ``ztsnr``
(zero-terminal SNR), as NoobAI-style v-prediction SDXL checkpoints ship them (not for ``sd3``, a flow model).

Usage (ComfyUI importable, e.g. ``PYTHONPATH=$COMFYUI_PATH``)::

    python nodes/tiny_checkpoint.py OUT.safetensors [--size tiny|small|sd15|sdxl|sdxl_full|sd3] [--vpred] [--ztsnr]
    python nodes/tiny_checkpoint.py models/diffusion_models/F.safetensors --size flux|chroma \
        --vae models/vae/V.safetensors
    python nodes/tiny_checkpoint.py models/diffusion_models/W.safetensors --size wan21|wan22_5b \
        --vae models/vae/V.safetensors --vae-kind wan21|taew22
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

logger = logging.getLogger(__name__)

UNET_CONFIGS = {
    "tiny": {"channel_mult": (1,), "num_res_blocks": [1], "transformer_depth": [1],
             "transformer_depth_output": [1, 1], "transformer_depth_middle": -2},
    "small": {"channel_mult": (1, 2), "num_res_blocks": [1, 1], "transformer_depth": [1, 1],
              "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1},
    # the real SD1.5 UNet layout (860 M parameters), random weights: for GPU benchmarks
    "sd15": {"channel_mult": (1, 2, 4, 4), "num_res_blocks": [2, 2, 2, 2],
             "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
             "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1},
    "sdxl": {"channel_mult": (1, 1, 1), "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
             "transformer_depth_output": [1] * 9, "transformer_depth_middle": -2},
    # the real SDXL UNet layout (2.6 B parameters), random weights: for GPU benchmarks
    "sdxl_full": {"channel_mult": (1, 2, 4), "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
                  "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "transformer_depth_middle": 10},
}
SDXL_SIZES = ("sdxl", "sdxl_full")
# SD3 MMDiTs: depth sets the hidden size (64 x depth) and the head count; pos_embed_max_size is the side, in
# patches, of the stored sin-cos position grid (ComfyUI crops its centre to the latent's size)
MMDIT_CONFIGS = {
    "sd3": {"depth": 2, "pos_embed_max_size": 64, "adm_in_channels": 2048, "context_dim": 4096},
}
# FLUX.1: (double blocks, single blocks, guidance input)
FLUX_CONFIGS = {"flux": (1, 1, True), "flux_schnell": (1, 1, False), "flux_full": (19, 38, True)}
# Chroma: (double blocks, single blocks)
CHROMA_CONFIGS = {"chroma": (1, 1), "chroma_full": (19, 38)}
# FLUX.2: (hidden size, context width, double blocks, single blocks, guidance input)
FLUX2_CONFIGS = {"flux2": (128, 192, 1, 1, False), "flux2_dev": (128, 192, 1, 1, True),
                 "flux2_klein4b_full": (3072, 7680, 5, 20, False), "flux2_klein9b_full": (4096, 12288, 8, 24, False)}
# Z-Image: (main layers) of the real width (3840: ComfyUI detects Z-Image only there), 2 + 2 refiners; GPU benchmarks
ZIMAGE_CONFIGS = {"zimage_full": 30}
# Wan T2V: (width, FFN width, blocks, latent channels in and out: 16 Wan 2.1, 48 Wan 2.2 TI2V-5B); heads = width / 128
WAN_CONFIGS = {"wan21": (128, 256, 2, 16), "wan22_5b": (128, 256, 2, 48), "wan21_1_3b_full": (1536, 8960, 30, 16)}
SIZES = (*UNET_CONFIGS, *MMDIT_CONFIGS, *FLUX_CONFIGS, *CHROMA_CONFIGS, *FLUX2_CONFIGS, *ZIMAGE_CONFIGS, *WAN_CONFIGS)
# diffusion-model files for UNETLoader (bf16), flow models
DIT_FILES = (*FLUX_CONFIGS, *CHROMA_CONFIGS, *FLUX2_CONFIGS, *ZIMAGE_CONFIGS, *WAN_CONFIGS)
VAE_KINDS = ("taesd16", "taef2", "wan21", "wan22", "taew22")


def build_state_dict(size: str = "tiny", seed: int = 0, vpred: bool = False, ztsnr: bool = False) -> dict:
    import comfy.ops
    import torch
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.taesd.taesd import TAESD

    torch.manual_seed(seed)
    if size in DIT_FILES:
        if vpred or ztsnr:
            raise ValueError(f"{size} is a flow-matching model: --vpred/--ztsnr do not apply")
        model = build_dit(size)
        return {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    if size in MMDIT_CONFIGS:
        if vpred or ztsnr:
            raise ValueError(f"{size} is a flow-matching model: --vpred/--ztsnr do not apply")
        return _sd3_state_dict(size)
    cfg = UNET_CONFIGS[size]
    xl = size in SDXL_SIZES
    family = {"context_dim": 2048, "use_linear_in_transformer": True, "adm_in_channels": 2816,
              "num_classes": "sequential", "num_head_channels": 64} if xl else \
             {"context_dim": 768, "use_linear_in_transformer": False, "num_heads": 8}
    unet = UNetModel(
        image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=cfg["num_res_blocks"],
        channel_mult=cfg["channel_mult"], use_spatial_transformer=True, transformer_depth=cfg["transformer_depth"],
        transformer_depth_output=cfg["transformer_depth_output"],
        transformer_depth_middle=cfg["transformer_depth_middle"], legacy=False, operations=comfy.ops.manual_cast,
        **family,
    )
    _init_(unet)
    sd = {f"model.diffusion_model.{k}": v.half() for k, v in unet.state_dict().items()}
    del unet

    if xl:  # CLIP-L and CLIP-G (HF layout, as SDXL.process_clip_state_dict reads them)
        sd.update(_clip("conditioner.embedders.0.transformer.", "l"))
        sd.update(_clip("conditioner.embedders.1.model.transformer.", "g"))
    else:
        sd.update(_clip("cond_stage_model.transformer.", "l"))

    taesd = TAESD(latent_channels=4)
    _init_(taesd)
    sd.update({f"first_stage_model.{k}": v.float() for k, v in taesd.state_dict().items()})
    if vpred or ztsnr:
        sd["v_pred"] = torch.tensor([])
    if ztsnr:
        sd["ztsnr"] = torch.tensor([])
    return sd


def build_mmdit(size: str = "sd3"):
    """ComfyUI's own SD3 MMDiT class with the ``size`` layout, randomly initialised (fp32)."""
    import comfy.ops
    import torch
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT, get_2d_sincos_pos_embed

    cfg = MMDIT_CONFIGS[size]
    grid = cfg["pos_embed_max_size"]
    mmdit = MMDiT(
        input_size=None, patch_size=2, in_channels=16, out_channels=16, depth=cfg["depth"],
        adm_in_channels=cfg["adm_in_channels"],
        context_embedder_config={"target": "torch.nn.Linear",
                                 "params": {"in_features": cfg["context_dim"], "out_features": 64 * cfg["depth"]}},
        pos_embed_max_size=grid, num_patches=grid * grid, pos_embed_scaling_factor=None,
        operations=comfy.ops.manual_cast,
    )
    _init_(mmdit)
    with torch.no_grad():  # the fixed sin-cos grid real SD3 checkpoints carry, not noise
        mmdit.pos_embed.copy_(torch.from_numpy(get_2d_sincos_pos_embed(mmdit.hidden_size, grid)).unsqueeze(0))
    return mmdit


def build_flux(size: str = "flux", dtype=None):
    """ComfyUI's own FLUX.1 class in the ``size`` layout (the dimensions its detection fixes), randomly initialised
    (fp32, or ``dtype``: the GPU benchmark builds the 12 B layout in bf16 directly, half the memory and time)."""
    import comfy.ops
    from comfy.ldm.flux.model import Flux, FluxParams

    depth, single, guidance = FLUX_CONFIGS[size]
    flux = Flux(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=depth, depth_single_blocks=single,
                axes_dim=[16, 56, 56], theta=10000, qkv_bias=True, guidance_embed=guidance, patch_size=2,
                dtype=dtype, operations=comfy.ops.manual_cast,
                **_newer_params(FluxParams, txt_ids_dims=[]))
    _init_(flux)
    return flux


def build_chroma(size: str = "chroma", dtype=None):
    """ComfyUI's own Chroma class in the ``size`` layout (what its detection fixes), randomly initialised (fp32, or
    ``dtype``)."""
    import comfy.ops
    from comfy.ldm.chroma.model import Chroma, ChromaParams

    depth, single = CHROMA_CONFIGS[size]
    chroma = Chroma(image_model="chroma", in_channels=64, out_channels=64, context_in_dim=4096, hidden_size=3072,
                    mlp_ratio=4.0, num_heads=24, depth=depth, depth_single_blocks=single, axes_dim=[16, 56, 56],
                    theta=10000, patch_size=2, qkv_bias=True, in_dim=64, out_dim=3072, hidden_dim=5120, n_layers=5,
                    dtype=dtype, operations=comfy.ops.manual_cast,
                    **_newer_params(ChromaParams, txt_ids_dims=[], vec_in_dim=None))
    _init_(chroma)
    return chroma


def build_dit(size: str, dtype=None):
    """The diffusion-model network of a DIT_FILES size (ComfyUI's own class, randomly initialised)."""
    if size in FLUX_CONFIGS:
        return build_flux(size, dtype)
    if size in FLUX2_CONFIGS:
        return build_flux2(size, dtype)
    if size in ZIMAGE_CONFIGS:
        return build_zimage(size, dtype)
    if size in WAN_CONFIGS:
        return build_wan(size, dtype)
    return build_chroma(size, dtype)


def build_zimage(size: str = "zimage_full", dtype=None):
    """ComfyUI's own Z-Image network (``supported_models.ZImage``'s, as its detection configures the real model),
    randomly initialised. ComfyUI v0.33+ only."""
    import torch
    from comfy import supported_models

    config = supported_models.ZImage({
        "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 3840, "cap_feat_dim": 2560,
        "n_layers": ZIMAGE_CONFIGS[size], "qk_norm": True, "n_heads": 30, "n_kv_heads": 30, "axes_dims": [32, 48, 48],
        "axes_lens": [1536, 512, 512], "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0,
        "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32})
    config.set_inference_dtype(dtype or torch.float32, None)
    model = config.get_model({}).diffusion_model
    _init_(model)
    return model


def build_flux2(size: str = "flux2", dtype=None):
    """ComfyUI's own FLUX.2 network (``supported_models.Flux2``'s model, as its detection configures it for these
    shapes), randomly initialised. ComfyUI v0.33+ only."""
    import torch
    from comfy import supported_models

    hidden, context, depth, single, guidance = FLUX2_CONFIGS[size]
    config = supported_models.Flux2({
        "image_model": "flux2", "axes_dim": [32, 32, 32, 32], "num_heads": hidden // 128, "mlp_ratio": 3.0,
        "theta": 2000, "out_channels": 128, "global_modulation": True, "mlp_silu_act": True, "qkv_bias": False,
        "ops_bias": False, "default_ref_method": "index", "ref_index_scale": 10.0, "txt_ids_dims": [3],
        "patch_size": 1, "in_channels": 128, "hidden_size": hidden, "context_in_dim": context, "vec_in_dim": None,
        "depth": depth, "depth_single_blocks": single, "guidance_embed": guidance, "yak_mlp": False, "txt_norm": False})
    config.set_inference_dtype(dtype or torch.float32, None)
    model = config.get_model({}).diffusion_model
    _init_(model)
    return model


def build_wan(size: str = "wan21", dtype=None):
    """ComfyUI's own Wan T2V network (``supported_models.WAN21_T2V``'s, or ``WAN22_T2V``'s for 48 channels, as its
    detection configures it for these shapes), randomly initialised (fp32, or ``dtype``)."""
    import torch
    from comfy import supported_models

    dim, ffn_dim, layers, channels = WAN_CONFIGS[size]
    config_class = supported_models.WAN22_T2V if channels == 48 else supported_models.WAN21_T2V
    config = config_class({
        "image_model": "wan2.1", "model_type": "t2v", "dim": dim, "out_dim": channels, "num_heads": dim // 128,
        "ffn_dim": ffn_dim, "num_layers": layers, "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1),
        "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6, "in_dim": channels})
    config.set_inference_dtype(dtype or torch.float32, None)
    model = config.get_model({}).diffusion_model
    _init_(model)
    return model


def wan21_vae_state_dict(seed: int = 0, dim: int = 8) -> dict:
    """A random Wan 2.1 VAE (what VAELoader builds for ``decoder.middle.0.residual.0.gamma`` & co) of width ``dim``:
    16 latent channels at 1/8, images as one-frame videos (Qwen-Image's latent space)."""
    import torch
    from comfy.ldm.wan.vae import WanVAE

    torch.manual_seed(seed)
    vae = WanVAE(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[False, True, True], dropout=0.0)
    _init_(vae)
    return {k: v.float() for k, v in vae.state_dict().items()}


def wan22_vae_state_dict(seed: int = 0) -> dict:
    """A random Wan 2.2 VAE (what VAELoader builds for ``decoder.upsamples.0.upsamples.0.residual.2.weight`` & co):
    48 latent channels at 1/16 spatially, 1/4 in time. ComfyUI builds it at width 160 whatever the file holds, so this
    is the real layout (705 M parameters), bf16 as the released file."""
    import torch
    from comfy.ldm.wan.vae2_2 import WanVAE

    torch.manual_seed(seed)
    with torch.device("meta"):  # no time spent on an initialisation that _init_ overwrites
        vae = WanVAE(dim=160, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                     temperal_downsample=[False, True, True], dropout=0.0)
    vae = vae.to_empty(device="cpu")
    _init_(vae)
    return {k: v.to(torch.bfloat16) for k, v in vae.state_dict().items()}


def taehv_state_dict(latent_channels: int = 48, seed: int = 0) -> dict:
    """A random TAEHV (what VAELoader builds for a file with ``decoder.22.bias``; 48 channels: Wan 2.2's tiny
    autoencoder, lighttaew2_2), fp32. ComfyUI versions with ``comfy.taesd.taehv`` only."""
    import torch
    from comfy.taesd.taehv import TAEHV

    torch.manual_seed(seed)
    taehv = TAEHV(latent_channels=latent_channels)
    _init_(taehv)
    return {k: v.float() for k, v in taehv.state_dict().items()}


def vae_state_dict(kind: str = "taesd16", seed: int = 0) -> dict:
    if kind == "wan21":
        return wan21_vae_state_dict(seed)
    if kind == "wan22":
        return wan22_vae_state_dict(seed)
    if kind == "taew22":
        return taehv_state_dict(48, seed)
    return taesd_state_dict(128 if kind == "taef2" else 16, seed)


def write_vae(path: str, kind: str = "taesd16", seed: int = 0) -> None:
    sd = vae_state_dict(kind, seed)
    if kind != "taef2":
        _write(path, sd)
        return
    for half in ("encoder", "decoder"):  # VAELoader's load_taesd: <name>_encoder / <name>_decoder in vae_approx
        prefix = f"taesd_{half}."
        _write(f"{path}_{half}.safetensors", {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})


def _newer_params(params_class, **values) -> dict:
    """The parameters newer ComfyUI versions added to a model's params dataclass (what their detection sets for
    this layout), only where the class has them: FluxParams/ChromaParams grew ``txt_ids_dims`` and ``vec_in_dim``."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(params_class)}
    return {k: v for k, v in values.items() if k in names}


def taesd_state_dict(latent_channels: int = 16, seed: int = 0) -> dict:
    """A random TAESD (what VAELoader builds for a file of ``taesd_encoder``/``taesd_decoder`` keys), fp32."""
    import torch
    from comfy.taesd.taesd import TAESD

    torch.manual_seed(seed)
    taesd = TAESD(latent_channels=latent_channels)
    _init_(taesd)
    return {k: v.float() for k, v in taesd.state_dict().items()}


def _sd3_state_dict(size: str) -> dict:
    from comfy.taesd.taesd import TAESD

    mmdit = build_mmdit(size)
    sd = {f"model.diffusion_model.{k}": v.half() for k, v in mmdit.state_dict().items()}
    del mmdit
    # CLIP-L and CLIP-G in HF layout where SD3.clip_target and SD3ClipModel.load_sd look for them; no T5-XXL
    sd.update(_clip("text_encoders.clip_l.transformer.", "l"))
    sd.update(_clip("text_encoders.clip_g.transformer.", "g"))
    taesd = TAESD(latent_channels=16)
    _init_(taesd)
    sd.update({f"first_stage_model.{k}": v.float() for k, v in taesd.state_dict().items()})
    return sd


def _clip(prefix: str, which: str) -> dict:
    """A random CLIP text model under ``prefix`` (fp16): ComfyUI's own CLIP class from the fixed config its loader
    builds (``l``: CLIP-L, sd1_clip_config.json; ``g``: CLIP-G, clip_config_bigg.json), whose keys are Hugging Face's
    layout (text_model.*, text_projection.weight), which is how checkpoints store them. CLIP-L has no projection in
    checkpoints (ComfyUI leaves its projection unloaded: SD1/SD3 use CLIP-L's unprojected pooled output, SDXL CLIP-G's).

    Built on the meta device and filled in fp16 by :func:`_init_` (no time spent on an initialisation that would be
    overwritten; no transformers import).
    """
    import json

    import comfy.clip_model
    import comfy.ops
    import torch

    name = {"l": "sd1_clip_config.json", "g": "clip_config_bigg.json"}[which]
    with open(os.path.join(os.path.dirname(comfy.clip_model.__file__), name), encoding="utf-8") as f:
        config = json.load(f)
    with torch.device("meta"):
        model = comfy.clip_model.CLIPTextModel(config, torch.float16, "meta", comfy.ops.manual_cast)
    model = model.to_empty(device="cpu")
    _init_(model)
    return {f"{prefix}{key}": value for key, value in model.state_dict().items()
            if which == "g" or key != "text_projection.weight"}


def _init_(module) -> None:
    """ComfyUI's ops skip weight init; give every layer a sane random init (scale 1, shift 0 for TAESD)."""
    import torch

    with torch.no_grad():
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if not p.is_floating_point():
                continue  # index buffers are not weights
            if name.endswith("vae_scale"):
                p.fill_(1.0)
            elif name.endswith("vae_shift"):
                p.fill_(0.0)
            elif p.ndim >= 2:
                p.normal_(0.0, (1.0 / p[0].numel()) ** 0.5)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


QUANT_FORMATS = ("scaled_fp8", "comfy_quant", "comfy_quant_int8")


def quantize_state_dict(sd: dict, prefix: str, quant: str) -> dict:
    """Every 2-D weight under ``prefix`` (the diffusion model's Linear layers) quantized with a per-tensor scale:
    ``scaled_fp8`` (legacy fp8 e4m3: ``<layer>.scale_weight`` + a ``<prefix>scaled_fp8`` marker), ``comfy_quant``
    (fp8 e4m3: ``<layer>.weight_scale`` + ``<layer>.comfy_quant``, the JSON of the layer's format as uint8) or
    ``comfy_quant_int8`` (the same with int8 weights, format ``int8_tensorwise``)."""
    import json

    import torch

    if quant not in QUANT_FORMATS:
        raise ValueError(f"quant={quant!r}: choose one of {', '.join(QUANT_FORMATS)}")
    int8 = quant == "comfy_quant_int8"
    storage, top = (torch.int8, 127.0) if int8 else (torch.float8_e4m3fn, 448.0)
    conf = torch.tensor(list(json.dumps({"format": "int8_tensorwise" if int8 else "float8_e4m3fn"}).encode()),
                        dtype=torch.uint8)
    out = dict(sd)
    for key, value in sd.items():
        if not (key.startswith(prefix) and key.endswith(".weight") and value.ndim == 2 and value.is_floating_point()):
            continue
        layer = key[: -len(".weight")]
        w = value.float()
        scale = (w.abs().amax() / top).clamp(min=1e-12)
        q = w / scale
        out[key] = (q.round().clamp(-127, 127) if int8 else q).to(storage)
        if quant == "scaled_fp8":
            out[f"{layer}.scale_weight"] = scale.reshape(())
        else:
            out[f"{layer}.weight_scale"] = scale.reshape(())
            out[f"{layer}.comfy_quant"] = conf.clone()
    if quant == "scaled_fp8":
        out[f"{prefix}scaled_fp8"] = torch.empty((0,), dtype=torch.float8_e4m3fn)
    return out


def write_checkpoint(path: str, size: str = "tiny", seed: int = 0, vpred: bool = False, ztsnr: bool = False,
                     quant: str | None = None) -> str:
    sd = build_state_dict(size, seed, vpred=vpred, ztsnr=ztsnr)
    if quant:
        sd = quantize_state_dict(sd, "" if size in DIT_FILES else "model.diffusion_model.", quant)
    return _write(path, sd)


def _write(path: str, sd: dict) -> str:
    from safetensors.torch import save_file

    tmp = f"{path}.tmp"
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp)
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vpred", action="store_true", help="mark it v-prediction (the v_pred key)")
    parser.add_argument("--ztsnr", action="store_true", help="v-prediction with zero-terminal SNR (v_pred + ztsnr)")
    parser.add_argument("--vae", help="also write a VAE file here (for VAELoader; --vae-kind picks which)")
    parser.add_argument("--vae-kind", choices=VAE_KINDS, default="taesd16",
                        help="taesd16 (FLUX.1, Chroma, Z-Image), taef2 (FLUX.2; --vae DIR/taef2), wan21 (Qwen-Image, "
                             "Wan 2.1), wan22 (Wan 2.2 5B; full size, 1.4 GB), taew22 (Wan 2.2 5B's tiny TAEHV)")
    parser.add_argument("--quant", choices=QUANT_FORMATS,
                        help="store the diffusion model's Linear weights quantized (legacy scaled_fp8, comfy_quant fp8 or int8)")
    args = parser.parse_args(argv)
    if args.size in (*MMDIT_CONFIGS, *DIT_FILES) and (args.vpred or args.ztsnr):
        parser.error(f"--size {args.size} is a flow-matching model: --vpred/--ztsnr do not apply")
    comfy_path = os.environ.get("COMFYUI_PATH") or os.path.expanduser("~/comfy/ComfyUI")
    if comfy_path not in sys.path:
        sys.path.insert(0, comfy_path)
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    write_checkpoint(args.out, args.size, args.seed, vpred=args.vpred, ztsnr=args.ztsnr, quant=args.quant)
    logger.info("wrote %s", args.out)
    if args.vae:
        write_vae(args.vae, args.vae_kind, args.seed)
        logger.info("wrote %s", args.vae)
    return 0


if __name__ == "__main__":
    sys.exit(main())
