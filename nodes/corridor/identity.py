"""What identifies the base model a run trains on, as ComfyUI loaded it: the ``base`` part of a run digest.

Read after the model is loaded for training (``patching.load_for_training``), so a LoraLoader or any other weight
patch upstream is in the weights that are fingerprinted. The checkpoint's file name plays no part: a renamed
file is the same model, a re-saved or merged one is not. The text encoders' weights count only when they train
(then also the clip skip): for UNet-only training their output is in the run digest already, as the caption
encodings in the dataset part.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from ...lora_core import digest
from .families import Detected

# The host code whose behaviour shapes a training step; hashed with the engine's sources into the run digest.
HOST_SOURCES = tuple(Path(__file__).parent / name for name in (
    "denoiser.py", "families.py", "patching.py", "text_encoders.py", "identity.py"))

@functools.cache
def host_source_digest() -> str:
    """:func:`~lora_core.digest.source_digest` of the host's training code, read once per process."""
    return digest.source_digest(HOST_SOURCES)


def base_identity(patcher: Any, detected: Detected, device: torch.device | str,
                  text_roots: dict[str, torch.nn.Module] | None = None, clip: Any = None) -> dict[str, Any]:
    """The base model's identity as plain data: family, objective, latent format, where and in which dtypes it
    computes, and a fingerprint of its UNet (and trained text encoders) as loaded now."""
    base = patcher.model
    device = torch.device(device)
    latent = base.latent_format
    objective = detected.objective
    identity: dict[str, Any] = {
        "family": detected.family.name,
        "model": type(base).__name__,
        "model_config": type(getattr(base, "model_config", None)).__name__,
        "objective": {
            "prediction_type": objective.prediction_type,
            "zero_terminal_snr": objective.zero_terminal_snr,
            "alphas_cumprod": digest.tensor_bytes_digest(objective.alphas_cumprod.float().cpu()),
            "flow_shift": objective.flow_shift,
            "timestep_multiplier": objective.timestep_multiplier,
            "flow_shift_by_size": list(objective.flow_shift_by_size or ()),
        },
        "latent_format": {
            "class": type(latent).__name__,
            "scale_factor": float(getattr(latent, "scale_factor", 1.0)),
            "shift_factor": float(getattr(latent, "shift_factor", 0.0) or 0.0),
            "channels": int(getattr(latent, "latent_channels", 4)),
        },
        "adm_channels": int(getattr(base, "adm_channels", 0) or 0),
        # what resolve_precision reads ("auto" differs between CPU and GPU), and the device kind itself
        "device": device.type,
        "weight_dtype": str(base.get_dtype()),
        "manual_cast_dtype": str(base.manual_cast_dtype),
        "bf16_supported": bool(device.type == "cuda" and torch.cuda.is_bf16_supported()),
        "unet": digest.tensors_fingerprint(base.diffusion_model.state_dict().items()),
    }
    if text_roots:
        identity["text_encoders"] = {name: digest.tensors_fingerprint(root.state_dict().items())
                                     for name, root in sorted(text_roots.items())}
        identity["clip_skip"] = getattr(clip, "layer_idx", None)
    return identity
