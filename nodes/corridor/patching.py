"""Per-clone adapters on a shared module tree, loading a model for training, and LoraLoader key checks.

``ModelPatcher.clone()`` shares the ``nn.Module`` tree; Kiln's adapters attach by forward hooks for the duration
of one diffusion-model call (an ``APPLY_MODEL`` wrapper registered on the clone), so other clones and the
cache never see them and module names never change (a stacked LoraLoader keeps applying).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import comfy.lora
import comfy.model_management as mm
import comfy.patcher_extension
import torch
from torch import nn

from ...lora_core import AdapterSet, TrainState
from . import compat

logger = logging.getLogger(__name__)

WRAPPER_KEY = "lora_kiln"


def unet_roots(patcher: Any) -> dict[str, nn.Module]:
    return {"unet": patcher.model.diffusion_model}


def checkpoint_blocks(patcher: Any) -> list[nn.Module]:
    """The layers to recompute in backward: ResBlocks and transformers inside each UNet block, a DiT's blocks.

    Not the ``TimestepEmbedSequential`` containers themselves: the UNet iterates over their children
    (``forward_timestep_embed``) and never calls the container's ``forward``.
    """
    unet = patcher.model.diffusion_model
    if getattr(unet, "joint_blocks", None) is not None:  # MMDiT (SD3): one JointBlock at a time
        return list(unet.joint_blocks)
    if getattr(unet, "double_blocks", None) is not None:  # FLUX.1: each double- and single-stream block
        return list(unet.double_blocks) + list(getattr(unet, "single_blocks", []))
    if getattr(unet, "input_blocks", None) is not None:  # the UNets (SD1/SD2/SDXL)
        containers = list(unet.input_blocks) + list(getattr(unet, "output_blocks", []))
        if getattr(unet, "middle_block", None) is not None:
            containers.append(unet.middle_block)
        return [layer for block in containers for layer in block if any(True for _ in layer.parameters())]
    # the transformers (Wan's blocks, Z-Image's layers and refiners, Qwen-Image's transformer_blocks, ...): every
    # top-level list of blocks of one class, one block at a time
    return [block for child in unet.children() if isinstance(child, nn.ModuleList) and len(child) > 0
            and len({type(b) for b in child}) == 1 and any(True for _ in child.parameters()) for block in child]


@contextlib.contextmanager
def norm_inputs_cloned(roots: Iterable[nn.Module]) -> Iterator[None]:
    """Feed every LayerNorm under ``roots`` a copy of its input while gradients are on.

    ComfyUI's CLIP layers and FLUX blocks add residuals in place (``x += attn(norm(x))``, ``txt += ...``), which
    autograd rejects once adapters need gradients: the LayerNorm saved the tensor that the addition then changed.
    With a copy the saved tensor stays intact; inference (no grad) is untouched.
    """
    handles = [m.register_forward_pre_hook(_clone_input) for root in roots for m in root.modules()
               if isinstance(m, nn.LayerNorm)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _clone_input(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    if args and isinstance(args[0], torch.Tensor) and torch.is_grad_enabled():
        return (args[0].clone(), *args[1:])
    return None


def _as_is(weight: torch.Tensor) -> torch.Tensor:
    """A no-op weight function: its presence makes a ComfyUI layer compute with a fresh (dequantized) copy."""
    return weight


def copy_host_weights(patcher: Any) -> int:
    """On ``patcher`` (a clone made for training), have every layer that manages its own parameters (quantized /
    mixed-precision layers, whose weights stay ComfyUI's inference tensors, see :func:`make_autograd_safe`) compute
    with a fresh copy of its weight, so autograd saves the copy, never the inference tensor, and the quantized weight
    is neither changed nor dequantized in place.

    A ComfyUI layer with a ``weight_function`` copies (and dequantizes) its weight before applying the functions, so a
    no-op function is enough. It is registered as a weight wrapper of this clone, which ComfyUI puts back on the
    module at every load of the clone (a load wipes ``weight_function``) and never on other clones. Returns the count.
    """
    count = 0
    for name, module in patcher.model.named_modules():
        if name and _manages_own_parameters(module) and isinstance(getattr(module, "weight_function", None), list):
            key = f"{name}.weight"
            if _as_is not in patcher.weight_wrapper_patches.get(key, []):
                patcher.add_weight_wrapper(key, _as_is)
            count += 1
    return count


def lora_keys_loadable(patcher: Any, keys: list[str], clip: Any = None) -> list[str]:
    """The kohya base keys ComfyUI's LoraLoader would NOT map onto this model/CLIP (empty: all load)."""
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    return [k for k in keys if k not in key_map]


def _manages_own_parameters(module: nn.Module) -> bool:
    """A layer that re-wraps its own parameters when moved (ComfyUI >= 0.3.7x's mixed-precision / quantized layers
    override ``_apply``): it must keep the inference tensors ComfyUI loaded, or moving it inside ComfyUI's
    inference mode fails ("Cannot set version_counter for inference tensor")."""
    return type(module)._apply is not nn.Module._apply


def make_autograd_safe(module: nn.Module) -> int:
    """Swap inference-mode parameters/buffers for equal normal tensors so autograd can save them.

    ComfyUI builds models inside ``torch.inference_mode()``; such tensors cannot be saved for backward.
    The values do not change, so every clone of the model renders exactly as before. Returns the count.
    Layers that manage their own parameters are left as they are: :func:`copy_host_weights` covers them on the
    training clone.
    """
    swapped = 0
    with torch.inference_mode(False), torch.no_grad():
        for sub in module.modules():
            if _manages_own_parameters(sub):
                continue
            for name, p in list(sub._parameters.items()):
                if p is not None and p.is_inference():
                    sub._parameters[name] = nn.Parameter(p.clone(), requires_grad=p.requires_grad)
                    swapped += 1
            for name, b in list(sub._buffers.items()):
                if b is not None and b.is_inference():
                    sub._buffers[name] = b.clone()
                    swapped += 1
    return swapped


def load_for_training(patcher: Any, root: nn.Module | None = None) -> torch.device:
    """Load ``patcher`` (the training clone: :func:`training_clone`) fully on ComfyUI's compute device (GPU when there
    is one) and make ``root`` (default: its diffusion model) trainable.

    ComfyUI loads in inference mode, as it always does: moved outside it, its quantized layers (ComfyUI >= 0.3.7x)
    would re-wrap their weights as normal tensors, which the next move inside inference mode (any sampler) refuses.
    Call it again after anything else may have loaded the same modules (a preview's sampler, VAE, text encoder).
    """
    with torch.inference_mode():
        mm.load_models_gpu([patcher], force_full_load=True)
    swapped = make_autograd_safe(root if root is not None else patcher.model.diffusion_model)
    if swapped:
        logger.debug("made %d base tensors autograd-safe", swapped)
    return patcher.load_device


def training_clone(patcher: Any) -> Any:
    """The clone of a UNet or text-encoder patcher that training loads: per-clone weight wrappers for the layers
    that manage their own parameters (:func:`copy_host_weights`); the user's patcher is never changed."""
    clone = patcher.clone()
    copy_host_weights(clone)
    return clone


def with_adapters(patcher: Any, state: TrainState) -> Any:
    """A clone of ``patcher`` whose UNet runs with ``state``'s adapters (frozen); the original is untouched."""
    adapters = state.build_adapters().eval().requires_grad_(False)
    placed: dict[tuple[torch.device, torch.dtype], AdapterSet] = {}
    fused = fused_int8_layers(patcher.model.diffusion_model)

    def wrapper(executor: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # APPLY_MODEL, not DIFFUSION_MODEL: every BaseModel calls its apply_model wrappers, while only some networks
        # (the SD UNet, Flux, ...; not SD3's MMDiT in ComfyUI 0.3.64) call the diffusion-model ones
        unet = executor.class_obj.diffusion_model
        x = args[0]
        key = (x.device, torch.float32)
        if key not in placed:
            placed.clear()
            placed[key] = adapters.to(x.device)
        # INT8 layers whose input activation ComfyUI fuses into the kernel at inference skip the layer's forward (and
        # the adapter's hook on it) unless ComfyUI's training flag asks for the plain path
        with placed[key].attach({"unet": unet}), compat.training() if fused else contextlib.nullcontext():
            return executor(*args, **kwargs)

    clone = patcher.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, wrapper)
    return clone


def fused_int8_layers(root: nn.Module) -> bool:
    """Whether ``root`` holds INT8 tensorwise-quantized layers, which ComfyUI v0.33 runs at inference through a kernel
    with the input activation fused in (``comfy.ops.linear_input_act``: Wan's and LTX's feed-forward down-projections)
    instead of calling the layer, so a forward hook on it would not run. ComfyUI takes the plain path while its
    training flag is set (:func:`compat.training`)."""
    return any(getattr(getattr(m, "weight", None), "_layout_cls", None) == "TensorWiseINT8Layout" for m in root.modules())


def strip_adapters(patcher: Any) -> Any:
    """The model without any Kiln adapters (what training runs on)."""
    clone = patcher.clone()
    clone.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    return clone


