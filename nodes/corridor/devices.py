"""Compute device, inference dtype and memory, as ComfyUI's model management sees them."""

from __future__ import annotations

import comfy.model_management as mm
import torch


def compute_device() -> torch.device:
    """ComfyUI's compute device: the GPU when it has one (and was not started with --cpu), else the CPU."""
    return mm.get_torch_device()


def inference_dtype(device: torch.device) -> torch.dtype:
    """bf16 (or fp16) on GPUs that handle it well, fp32 on the CPU."""
    if device.type == "cpu":
        return torch.float32
    if mm.should_use_bf16(device):
        return torch.bfloat16
    if mm.should_use_fp16(device):
        return torch.float16
    return torch.float32


def make_room(device: torch.device, nbytes: int) -> None:
    """Ask ComfyUI to unload models until ``nbytes`` fit on ``device`` (no-op on the CPU)."""
    if device.type != "cpu":
        mm.free_memory(nbytes, device)


def free_memory(device: torch.device) -> int | None:
    """What ComfyUI counts as free on ``device`` now (the loaded models excluded): driver-free plus what torch has
    cached but not in use on a GPU, available RAM on the CPU."""
    return int(mm.get_free_memory(device))


def release_memory() -> None:
    mm.soft_empty_cache()
