"""Test-only ComfyUI custom nodes: the FLUX.1 text encoder (CLIP-L + a one-layer T5) and Chroma's (the one-layer T5
alone), built with ComfyUI's own classes.

ComfyUI's stock loaders build T5-XXL from a fixed config (24 layers, 4.7 B parameters: about 25 s per caption on two
CPU cores), so no test can load a tiny one through DualCLIPLoader. This node builds the same ``comfy.sd.CLIP`` a
``DualCLIPLoader(clip_l, t5xxl, "flux")`` gives, with ComfyUI's FluxTokenizer, its CLIP-L (full size) and its T5
class in a one-layer configuration of the real width (4096, what FLUX.1's txt_in reads), seeded random weights.
``t5_min_length`` pads each caption's T5 tokens to that many (ComfyUI's FLUX default, 256, is the node's default;
the tests use 32: 48 instead of 272 tokens per 64 px image, five times faster steps on a CPU).
``TestTinyChromaCLIP`` is what ``CLIPLoader(t5xxl, "chroma")`` gives: ComfyUI's PixArt tokenizer and T5 model classes
(unpadded captions, all-pad negatives), with the same one-layer T5.
Real users load their encoders with DualCLIPLoader / CLIPLoader (README, "FLUX.1", "Chroma"). Never shipped: the
integration harness links this folder into the test server's custom_nodes only.
"""

from __future__ import annotations

import comfy.sd
import comfy.sd1_clip
import comfy.supported_models_base
import comfy.text_encoders.flux
import comfy.text_encoders.pixart_t5
import comfy.text_encoders.t5
import torch

T5_CONFIG = {"d_ff": 256, "d_kv": 64, "d_model": 4096, "num_heads": 2, "num_layers": 1, "vocab_size": 32128,
             "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True, "model_type": "t5"}


class TinyT5(comfy.sd1_clip.SDClipModel):
    """ComfyUI's T5XXLModel with a one-layer config (same special tokens, same T5 class, same model name)."""

    def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006 (ComfyUI's signature)
        super().__init__(device=device, layer="last", textmodel_json_config=dict(T5_CONFIG), dtype=dtype,
                         special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5,
                         model_options={**model_options, "model_name": "t5xxl"})


class TinyFluxClip(comfy.text_encoders.flux.FluxClipModel):
    """FluxClipModel (its encode_token_weights: T5 context + CLIP-L pooled) with the tiny T5."""

    def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006
        torch.nn.Module.__init__(self)
        self.clip_l = comfy.sd1_clip.SDClipModel(device=device, dtype=dtype, return_projected_pooled=False,
                                                 model_options=model_options)
        self.t5xxl = TinyT5(device=device, dtype=dtype, model_options=model_options)
        self.dtypes = {dtype}


class TinyPixArtT5(comfy.text_encoders.pixart_t5.T5XXLModel):
    """ComfyUI's PixArt/Chroma T5XXLModel (its all-pad empty tokens) with the one-layer config."""

    def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006
        comfy.sd1_clip.SDClipModel.__init__(
            self, device=device, layer="last", textmodel_json_config=dict(T5_CONFIG), dtype=dtype,
            special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5,
            model_options={**model_options, "model_name": "t5xxl"})


class TinyChromaClip(comfy.sd1_clip.SD1ClipModel):
    """PixArtT5XXL (what CLIPLoader type chroma builds) with the tiny T5."""

    def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006
        super().__init__(device=device, dtype=dtype, name="t5xxl", clip_model=TinyPixArtT5,
                         model_options=model_options)


def _init_(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                value = torch.randn(p.shape, generator=generator) * (1.0 / p.shape[-1]) ** 0.5
            elif name.endswith("weight"):
                value = torch.ones(p.shape)
            else:
                value = torch.zeros(p.shape)
            p.copy_(value.to(p.dtype))


class TestTinyFluxCLIP:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                             "t5_min_length": ("INT", {"default": 256, "min": 1, "max": 4096})}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "build"
    CATEGORY = "testing"

    def build(self, seed: int, t5_min_length: int = 256):
        target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.flux.FluxTokenizer, TinyFluxClip)
        clip = comfy.sd.CLIP(target=target, parameters=0, tokenizer_data={"t5xxl_min_length": t5_min_length})
        _init_(clip.cond_stage_model, seed)
        return (clip,)


class TestTinyChromaCLIP:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "build"
    CATEGORY = "testing"

    def build(self, seed: int):
        target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.pixart_t5.PixArtTokenizer, TinyChromaClip)
        clip = comfy.sd.CLIP(target=target, parameters=0)
        _init_(clip.cond_stage_model, seed)
        return (clip,)


NODE_CLASS_MAPPINGS = {"TestTinyFluxCLIP": TestTinyFluxCLIP, "TestTinyChromaCLIP": TestTinyChromaCLIP}
