"""Preview images mid-run, rendered with ComfyUI's own sampler on the model as it is now."""

from __future__ import annotations

import os
from typing import Any

import comfy.sample
import folder_paths
import torch

from .families import Family
from .text_encoders import EXTRA, encode_caption


def sample_preview(
    patcher: Any, clip: Any, vae: Any, prompt: str, seed: int, width: int, height: int, steps: int, cfg: float,
    family: Family, text_adapters: bool = False,
) -> torch.Tensor:
    """Render one image with ComfyUI's own sampler on ``patcher`` as it is now (adapters attached).

    The conditioning is what CLIPTextEncode gives (context + pooled output); for SDXL-class models the size
    conditioning says width x height, uncropped, like a plain text-to-image graph.
    """

    def conditioning(text: str) -> list:
        cond, _ = encode_caption(clip, text, cached=not text_adapters, extras=family.extra_inputs is None)
        # as CLIPTextEncode gives it: None for a T5-only encoder (Chroma); the encoder's other outputs as they were
        extra: dict[str, Any] = {"pooled_output": cond["pooled"][None] if "pooled" in cond else None}
        extra.update({k[len(EXTRA):]: v[None] for k, v in cond.items() if k.startswith(EXTRA)})
        if family.size_conditioning:
            extra.update(width=width, height=height, target_width=width, target_height=height, crop_w=0, crop_h=0)
        return [[cond["context"][None], extra]]

    # in inference mode, as every ComfyUI sampler runs (a preview mid-training included): ComfyUI's own loading and
    # moving of models expects it (quantized layers re-wrap their weights otherwise)
    with torch.inference_mode():
        # the empty latent ComfyUI's own Empty*LatentImage node gives this VAE (FLUX.2: 128 channels at 1/16; Qwen-Image:
        # a one-frame video latent)
        down = int(vae.spacial_compression_encode())
        frames = (1,) if vae.latent_dim == 3 else ()
        latent = torch.zeros(1, vae.latent_channels, *frames, height // down, width // down)
        noise = comfy.sample.prepare_noise(latent, seed)
        samples = comfy.sample.sample(
            patcher, noise, steps, cfg, "euler", "normal", conditioning(prompt), conditioning(""), latent, seed=seed,
            disable_pbar=True,
        )
        image = vae.decode(samples)
    # an inference tensor: fine for the IMAGE output and the temp file, never fed back into training
    return image.reshape(-1, *image.shape[-3:])[:1].float().cpu()


def save_temp_preview(image: torch.Tensor, prefix: str = "lora_kiln/preview") -> dict[str, str]:
    """Write IMAGE [1, H, W, 3] as a PNG into ComfyUI's temp folder (emptied at start-up, like PreviewImage).

    Returns the reference the frontend's ``/view`` route takes: ``{"filename", "subfolder", "type": "temp"}``.
    """
    import random
    import string

    from PIL import Image

    arr = (image[0].clamp(0, 1) * 255).byte().cpu().numpy()
    suffix = "".join(random.choice(string.ascii_lowercase) for _ in range(5))
    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
        f"{prefix}_{suffix}", folder_paths.get_temp_directory(), arr.shape[1], arr.shape[0]
    )
    name = f"{filename}_{counter:05}_.png"
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(arr).save(os.path.join(folder, name), compress_level=1)
    return {"filename": name, "subfolder": subfolder, "type": "temp"}


