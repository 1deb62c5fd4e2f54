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
        frames = (latent_frames(vae, family.preview_frames),) if vae.latent_dim == 3 else ()
        latent = torch.zeros(1, vae.latent_channels, *frames, height // down, width // down)
        noise = comfy.sample.prepare_noise(latent, seed)
        samples = comfy.sample.sample(
            patcher, noise, steps, cfg, "euler", "normal", conditioning(prompt), conditioning(""), latent, seed=seed,
            disable_pbar=True,
        )
        image = vae.decode(samples)
    # an inference tensor: fine for the IMAGE output and the temp file, never fed back into training; a video model's
    # preview is its frames (IMAGE [F, H, W, 3], as VAE Decode gives a video)
    return image.reshape(-1, *image.shape[-3:])[: max(1, family.preview_frames)].float().cpu()


def latent_frames(vae: Any, frames: int) -> int:
    """Latent frames of a ``frames``-frame clip in this VAE's space (Wan: the first frame alone, then 4 per latent
    frame), as ComfyUI's empty video latents count them."""
    if frames <= 1:
        return 1
    ratio = vae.temporal_compression_decode() or 1
    return (frames - 1) // int(ratio) + 1


def save_temp_preview(image: torch.Tensor, prefix: str = "lora_kiln/preview", fps: float = 16.0) -> dict[str, Any]:
    """Write IMAGE [1, H, W, 3] as a PNG into ComfyUI's temp folder (emptied at start-up, like PreviewImage); a clip
    (IMAGE [F, H, W, 3], F > 1) as an animated WEBP at ``fps``, which the browser plays wherever it shows an image
    (the node's preview strip, the live view), as ComfyUI's own SaveAnimatedWEBP output does.

    Returns the reference the frontend's ``/view`` route takes: ``{"filename", "subfolder", "type": "temp"}`` (and
    ``"animated": True`` for a clip).
    """
    import random
    import string

    suffix = "".join(random.choice(string.ascii_lowercase) for _ in range(5))
    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
        f"{prefix}_{suffix}", folder_paths.get_temp_directory(), image.shape[2], image.shape[1]
    )
    os.makedirs(folder, exist_ok=True)
    data, ext = encode_preview(image, fps)
    name = f"{filename}_{counter:05}_.{ext}"
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)
    ref: dict[str, Any] = {"filename": name, "subfolder": subfolder, "type": "temp"}
    return {**ref, "animated": True} if ext == "webp" else ref


def to_pil(image: torch.Tensor) -> list[Any]:
    """IMAGE [F, H, W, 3] -> F PIL images."""
    from PIL import Image

    return [Image.fromarray(a) for a in (image.clamp(0, 1) * 255).byte().cpu().numpy()]


def encode_preview(image: torch.Tensor, fps: float = 16.0) -> tuple[bytes, str]:
    """A preview's file: (bytes, extension). One frame: a PNG; a clip: an animated WEBP that loops at ``fps``."""
    import io

    frames = to_pil(image)
    buf = io.BytesIO()
    if len(frames) == 1:
        frames[0].save(buf, format="PNG", compress_level=1)
        return buf.getvalue(), "png"
    frames[0].save(buf, format="WEBP", save_all=True, append_images=frames[1:], loop=0, quality=80, method=0,
                   duration=round(1000 / fps))
    return buf.getvalue(), "webp"


