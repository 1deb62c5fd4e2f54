"""Write a tiny, randomly initialised SD1.5-shaped checkpoint that ComfyUI's stock loader detects as SD1.5.

For tests, benchmarks and the first-run demo; never for real images. ComfyUI's SD1.5 detection checks
only model_channels=320, context_dim=768 (from the first input block's cross-attention), a 1x1 conv
proj_in, no label_emb and 4 input channels, so depth and width of everything else can shrink:

- ``tiny``:  channel_mult [1], one res block, no middle block  (UNet about 19 M parameters)
- ``small``: channel_mult [1, 2], one res block, a middle block (UNet about 107 M parameters)
- ``sd15``:  the full SD1.5 UNet layout (860 M parameters), for GPU benchmarks

The text encoder is the full CLIP-L (the loader always builds it) and the VAE is TAESD (ComfyUI builds
TAESD when the checkpoint carries ``taesd_encoder``/``taesd_decoder`` weights), both random.

Usage (ComfyUI importable, e.g. ``PYTHONPATH=$COMFYUI_PATH``)::

    python nodes/tiny_checkpoint.py OUT.safetensors [--size tiny|small] [--seed 0]
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
}


def build_state_dict(size: str = "tiny", seed: int = 0) -> dict:
    import comfy.ops
    import torch
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.taesd.taesd import TAESD
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = UNET_CONFIGS[size]
    unet = UNetModel(
        image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=cfg["num_res_blocks"],
        channel_mult=cfg["channel_mult"], num_heads=8, use_spatial_transformer=True,
        transformer_depth=cfg["transformer_depth"], transformer_depth_output=cfg["transformer_depth_output"],
        transformer_depth_middle=cfg["transformer_depth_middle"], context_dim=768, use_linear_in_transformer=False,
        legacy=False, operations=comfy.ops.manual_cast,
    )
    _init_(unet)
    sd = {f"model.diffusion_model.{k}": v.half() for k, v in unet.state_dict().items()}

    clip_cfg = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                              max_position_embeddings=77, vocab_size=49408, projection_dim=768)
    clip = CLIPTextModel(clip_cfg)
    sd.update({f"cond_stage_model.transformer.{k}": v.half() for k, v in clip.state_dict().items()
               if not k.endswith("position_ids")})

    taesd = TAESD(latent_channels=4)
    _init_(taesd)
    sd.update({f"first_stage_model.{k}": v.float() for k, v in taesd.state_dict().items()})
    return sd


def _init_(module) -> None:
    """ComfyUI's ops skip weight init; give every layer a sane random init (scale 1, shift 0 for TAESD)."""
    import torch

    with torch.no_grad():
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if name.endswith("vae_scale"):
                p.fill_(1.0)
            elif name.endswith("vae_shift"):
                p.fill_(0.0)
            elif p.ndim >= 2:
                p.normal_(0.0, (1.0 / p[0].numel()) ** 0.5)
            elif name.endswith("weight"):
                p.fill_(1.0)
            elif p.is_floating_point():
                p.zero_()


def write_checkpoint(path: str, size: str = "tiny", seed: int = 0) -> str:
    from safetensors.torch import save_file

    sd = build_state_dict(size, seed)
    tmp = f"{path}.tmp"
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp)
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--size", choices=sorted(UNET_CONFIGS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    comfy_path = os.environ.get("COMFYUI_PATH") or os.path.expanduser("~/comfy/ComfyUI")
    if comfy_path not in sys.path:
        sys.path.insert(0, comfy_path)
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    write_checkpoint(args.out, args.size, args.seed)
    logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
