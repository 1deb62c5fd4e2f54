"""Text encoders: captions encoded once and cached, or encoded with gradients while the text encoder trains.

Caption encoding goes through ComfyUI's own ``CLIP.encode_from_tokens`` (all encoders of the family, clip skip,
LoRA patches); the result keeps the cross-attention context and the pooled output (SDXL's ``y`` needs it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import comfy.lora
import comfy.model_management as mm
import torch
from torch import nn

from ...lora_core import TrainState
from ...lora_core.formats.kohya import KohyaNaming, export_tensors
from .caches import normal_tensor, text_cache
from .errors import KilnUserError
from .families import Family, TextEncoderRoot
from .patching import copy_host_weights, make_autograd_safe, norm_inputs_cloned

TOKENS = "tokens."  # cond keys "tokens.l", "tokens.g": token ids per encoder, for text-encoder training
EXTRA = "extra."  # cond keys "extra.attention_mask", "extra.conditioning_llama3", ...: the rest of CLIPTextEncode's


def encode_caption(clip: Any, text: str, cached: bool = True, extras: bool = False) -> tuple[dict[str, torch.Tensor], bool]:
    """``{"context": [tokens, dim], "pooled": [dim]}`` for ``text``; cached per CLIP, its patches and clip skip.

    ``cached=False`` while text-encoder adapters are attached (their output changes every step). ``extras``: also
    every other tensor the encoder returns (what CLIPTextEncode puts into the conditioning beside the context:
    attention masks, HiDream's Llama states, ...) as ``extra.<name>``, for models fed through ``extra_conds``.
    """
    cache = text_cache(clip) if cached else None
    key = (text, clip.patcher.patches_uuid, getattr(clip, "layer_idx", None), extras)
    hit = cache.get(key) if cache is not None else None
    if hit is not None:
        return hit, False
    with torch.no_grad():
        out = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True, return_dict=True)
    # the context in the encoder's dtype (fp16/bf16 on a GPU: half the RAM of fp32 for a cache of FLUX.2's 512-token
    # contexts; the denoiser casts it to its compute dtype), the small pooled vector in fp32 as ComfyUI's adm code mixes it
    cond = {"context": normal_tensor(out["cond"][0].cpu())}
    if out.get("pooled_output") is not None:
        cond["pooled"] = normal_tensor(out["pooled_output"][0].float().cpu())
    if extras:
        for name, value in out.items():
            if name not in ("cond", "pooled_output") and isinstance(value, torch.Tensor) and value.shape[:1] == (1,):
                cond[EXTRA + name] = normal_tensor(value[0].cpu())
    if cache is not None:
        cache.put(key, cond)
    return cond, True


class TextEncoder:
    """Token ids -> (context, pooled) with gradients, mirroring ComfyUI's ``encode_token_weights`` per family.

    SD1.x/SD2.x: the one CLIP's hidden states. SDXL: CLIP-L and CLIP-G hidden states concatenated on the feature
    axis, and CLIP-G's projected pooled output (as ``SDXLClipModel.encode_token_weights`` does).
    """

    def __init__(self, clip: Any, family: Family) -> None:
        self.clip = clip
        self.family = family
        stage = clip.cond_stage_model
        self.encoders: dict[str, nn.Module] = {}
        for t in family.text_encoders:
            encoder = _encoder(stage, t)
            if encoder is None:
                raise KilnUserError(
                    f"this CLIP ({type(stage).__name__}) has no {t.clip_key.upper()} text encoder, which a "
                    f"{family.name} model needs; connect the CLIP of the same checkpoint, or turn train_text_encoder off"
                )
            self.encoders[t.component] = encoder

    @property
    def roots(self) -> dict[str, nn.Module]:
        return {component: encoder.transformer for component, encoder in self.encoders.items()}

    def tokens(self, text: str) -> dict[str, torch.Tensor]:
        chunks = self.clip.tokenize(text)
        out = {}
        for t in self.family.text_encoders:
            ids = [[pair[0] for pair in chunk] for chunk in chunks[t.clip_key]]
            out[TOKENS + t.clip_key] = torch.tensor(ids, dtype=torch.long).flatten()
        return out

    def __call__(self, cond: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        stage = self.clip.cond_stage_model
        stage.reset_clip_options()
        if self.clip.layer_idx is not None:  # clip skip, as set by CLIPSetLastLayer
            stage.set_clip_options({"layer": self.clip.layer_idx})
        outs, pooled = [], None
        for t in self.family.text_encoders:
            ids = cond[TOKENS + t.clip_key]
            batch = ids.shape[0]
            z, p = self.encoders[t.component].encode(ids.reshape(-1, 77).tolist())[:2]
            chunks = z.shape[0] // batch
            outs.append(z.reshape(batch, -1, z.shape[-1]).float())
            if p is not None:
                pooled = p.reshape(batch, chunks, -1)[:, 0].float()  # the first chunk's, as ComfyUI pools
        if len(outs) > 1:
            cut = min(o.shape[1] for o in outs)
            return torch.cat([o[:, :cut] for o in outs], dim=-1), pooled
        return outs[0], pooled

    def trainable(self) -> contextlib.AbstractContextManager[None]:
        """ComfyUI's CLIP layers add residuals in place, which autograd rejects once adapters need gradients:
        while training, each LayerNorm is fed a copy of its input (:func:`.patching.norm_inputs_cloned`)."""
        return norm_inputs_cloned(self.roots.values())


def _encoder(stage: Any, t: TextEncoderRoot) -> nn.Module | None:
    if getattr(stage, "clip_name", None) == t.clip_key and hasattr(stage, "clip"):  # SD1ClipModel & co
        return getattr(stage, stage.clip)
    encoder = getattr(stage, f"clip_{t.clip_key}", None)  # SDXLClipModel: clip_l, clip_g
    return encoder if isinstance(encoder, nn.Module) and hasattr(encoder, "transformer") else None


def text_roots(clip: Any, family: Family) -> dict[str, nn.Module]:
    return TextEncoder(clip, family).roots


def load_text_encoder_for_training(clip: Any, family: Family) -> TextEncoder:
    """The text encoders of a training clone of ``clip`` (its patcher cloned, its modules shared; layers that manage
    their own parameters compute with a copy of their weight: :func:`.patching.copy_host_weights`), loaded as
    ComfyUI loads (inference mode) and made trainable. :func:`reload_text_encoder` after anything else loaded it."""
    trainee = clip.clone()
    copy_host_weights(trainee.patcher)
    encoder = TextEncoder(trainee, family)
    reload_text_encoder(encoder)
    return encoder


def reload_text_encoder(encoder: TextEncoder) -> None:
    with torch.inference_mode():
        mm.load_models_gpu([encoder.clip.patcher], force_full_load=True)
    for root in encoder.roots.values():
        make_autograd_safe(root)


def clip_with_lora(clip: Any, state: TrainState, naming: KohyaNaming) -> Any:
    """A CLIP clone with the state's text-encoder adapters as ComfyUI weight patches (as LoraLoader does)."""
    te_specs = tuple(s for s in state.specs if not s.name.startswith("unet."))
    if not te_specs:
        return clip
    tensors = export_tensors(state.replace(specs=te_specs), naming, "fp32")
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    patches = comfy.lora.load_lora(tensors, key_map)
    new = clip.clone()
    new.add_patches(patches, 1.0)
    return new
