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

The 2026 families (ComfyUI v0.33+):

- ``TestTinyQwenCLIP`` is what ``CLIPLoader(<Qwen file>, type)`` gives for Z-Image (``lumina2``: Qwen3-4B, the
  second-to-last layer), FLUX.2 Klein (``flux2``: Qwen3-4B, layers 9/18/27 stacked, padded to 512 tokens) and
  Qwen-Image (``qwen_image``: Qwen2.5-VL 7B's last layer, the system prompt cut off): ComfyUI's own tokenizers and
  encoder classes, in a 64-wide configuration (``<model>_model_config``, which ComfyUI's SDClipModel merges into the
  config; Qwen-Image's vision tower is shrunk the same way). CLIPLoader cannot load a tiny one: its type detection
  reads the 2560 / 3584 widths of the real files.
- ``TestTinyDiffusionModel`` loads a tiny Z-Image or Qwen-Image through ComfyUI's own
  ``load_diffusion_model_state_dict`` (dtype choice, model patcher, fp8 weights as UNETLoader gives them) with the
  detection step answered for it: ComfyUI detects Z-Image only at its real width 3840 (909 M parameters for one
  layer) and Qwen-Image at fixed widths (380 M for one block), too big for CPU tests. FLUX.2 needs no fixture: its
  detection reads real shapes, so ``nodes/tiny_checkpoint.py --size flux2`` writes a file UNETLoader loads.
- ``TestTinyWanCLIP`` is what ``CLIPLoader(umt5_xxl, "wan")`` gives for Wan 2.1 / 2.2: ComfyUI's WanT5Tokenizer and
  Wan text-encoder classes (UMT5: per-layer relative attention, masked tokens zeroed, captions padded to 512 tokens)
  with a one-layer UMT5 of the real width (4096, what Wan's ``text_embedding`` is built for: ComfyUI does not read it
  from the file). ComfyUI ships no UMT5 tokenizer (CLIPLoader takes the sentencepiece model from the encoder file's
  ``spiece_model`` tensor), so the node trains a small byte-fallback one with UMT5's special ids (pad 0, eos 1,
  unk 2) and sizes the embedding to it. The Wan diffusion models need no fixture:
  ``nodes/tiny_checkpoint.py --size wan21|wan22_5b`` writes files UNETLoader detects.
"""

from __future__ import annotations

import functools

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


TINY_QWEN = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}
# CLIPLoader type -> (te factory, tokenizer, model name, layers): Z-Image reads layer -2 (3+), Klein layer 27 (28+)
QWEN_KINDS = ("lumina2", "flux2", "qwen_image")


def _qwen_target(kind: str):
    import comfy.text_encoders.flux
    import comfy.text_encoders.qwen_image
    import comfy.text_encoders.z_image

    if kind == "lumina2":
        return comfy.text_encoders.z_image.te(), comfy.text_encoders.z_image.ZImageTokenizer, "qwen3_4b", 3
    if kind == "flux2":
        return (comfy.text_encoders.flux.klein_te(model_type="qwen3_4b"), comfy.text_encoders.flux.KleinTokenizer,
                "qwen3_4b", 28)
    return comfy.text_encoders.qwen_image.te(), comfy.text_encoders.qwen_image.QwenImageTokenizer, "qwen25_7b", 2


class TestTinyQwenCLIP:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"type": (list(QWEN_KINDS),), "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "build"
    CATEGORY = "testing"

    def build(self, type: str, seed: int):  # noqa: A002 (CLIPLoader's input name)
        import comfy.text_encoders.qwen_vl

        te, tokenizer, model_name, layers = _qwen_target(type)
        cpu = torch.device("cpu")
        options = {f"{model_name}_model_config": {**TINY_QWEN, "num_hidden_layers": layers}, "dtype": torch.float32,
                   "load_device": cpu, "offload_device": cpu, "initial_device": cpu}
        vision = comfy.text_encoders.qwen_vl.Qwen2VLVisionTransformer
        if type == "qwen_image":  # Qwen2.5-VL always builds its 0.67 B vision tower: a 32-wide one-layer one here
            def tiny_vision(**kw):
                return vision(**{**kw, "hidden_size": 32, "intermediate_size": 32, "num_heads": 2, "num_layers": 1})
            comfy.text_encoders.qwen_vl.Qwen2VLVisionTransformer = tiny_vision
        try:
            clip = comfy.sd.CLIP(target=comfy.supported_models_base.ClipTarget(tokenizer, te), model_options=options)
        finally:
            comfy.text_encoders.qwen_vl.Qwen2VLVisionTransformer = vision
        _init_(clip.cond_stage_model, seed)
        return (clip,)


# ComfyUI supported_models class -> the tiny unet_config its model is built with (context width 64: the tiny Qwen)
TINY_DIFFUSION = {
    "ZImage": {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 384, "cap_feat_dim": 64,
               "n_layers": 1, "n_refiner_layers": 1, "qk_norm": True, "n_heads": 3, "n_kv_heads": 3,
               "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512], "rope_theta": 256.0,
               "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True, "time_scale": 1000.0,
               "pad_tokens_multiple": 32},
    # a model without a Kiln family entry (the generic path), conditioned by the tiny Z-Image encoder's 64-wide context
    "Lumina2": {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "cap_feat_dim": 64,
                "n_layers": 1, "n_refiner_layers": 1, "qk_norm": True, "n_heads": 2, "n_kv_heads": 1,
                "axes_dims": [8, 12, 12], "axes_lens": [300, 512, 512], "rope_theta": 10000.0,
                "ffn_dim_multiplier": 4.0, "multiple_of": 32},
    "QwenImage": {"image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "num_layers": 1,
                  "num_attention_heads": 2, "attention_head_dim": 64, "axes_dims_rope": (8, 28, 28),
                  "joint_attention_dim": 64},
}


def load_tiny_diffusion_model(model: str, seed: int, weight_dtype: str = "default", disable_dynamic: bool = False):
    """The tiny ``model`` through ComfyUI's ``load_diffusion_model_state_dict`` (detection answered for it); the
    patcher can rebuild itself (``cached_patcher_init``, as ComfyUI's file loaders register), which ComfyUI's own
    trainer needs for its non-dynamic copy."""
    from unittest import mock

    import comfy.model_detection
    import comfy.supported_models

    config_class = getattr(comfy.supported_models, model)
    builder = config_class(dict(TINY_DIFFUSION[model]))
    builder.set_inference_dtype(torch.float32, None)
    network = builder.get_model({}).diffusion_model
    _init_(network, seed)
    sd = {k: v.to(torch.bfloat16) for k, v in network.state_dict().items()}  # as files ship: bf16
    options = {"dtype": torch.float8_e4m3fn} if weight_dtype == "fp8_e4m3fn" else {}
    detected = config_class(dict(TINY_DIFFUSION[model]))
    with mock.patch.object(comfy.model_detection, "model_config_from_unet", lambda *a, **k: detected):
        patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options=options, disable_dynamic=disable_dynamic)
    patcher.cached_patcher_init = (load_tiny_diffusion_model, (model, seed, weight_dtype))
    return patcher


class TestTinyDiffusionModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": (list(TINY_DIFFUSION),), "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                             "weight_dtype": (["default", "fp8_e4m3fn"],)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, model: str, seed: int, weight_dtype: str = "default"):
        return (load_tiny_diffusion_model(model, seed, weight_dtype),)


# a one-layer UMT5 of the real width (Wan's text_embedding reads 4096); vocab_size is set to the tiny tokenizer's
TINY_UMT5 = {"d_ff": 256, "d_kv": 64, "d_model": 4096, "num_heads": 2, "num_layers": 1}
# the tiny sentencepiece model's training text and size (byte fallback: any caption tokenizes)
SPIECE_CORPUS = ("a cat walking on a street", "a dog running through a park in the rain",
                 "a red car driving along a coast road at night", "portrait photo of a woman smiling",
                 "a man riding a bicycle past old houses", "waves breaking under a blue sky, slow motion video")
SPIECE_VOCAB = 320


@functools.lru_cache(maxsize=1)
def tiny_spiece_model() -> bytes:
    """A small sentencepiece model with UMT5's special ids (pad 0, eos 1, unk 2, no bos), trained here (the same
    bytes every time): ComfyUI ships no UMT5 tokenizer, CLIPLoader reads it from the encoder file."""
    import io

    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SPIECE_CORPUS), model_writer=model, vocab_size=SPIECE_VOCAB, model_type="bpe",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, byte_fallback=True, hard_vocab_limit=False, num_threads=1,
        minloglevel=2)
    return model.getvalue()


class TestTinyWanCLIP:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                             "min_length": ("INT", {"default": 512, "min": 1, "max": 4096})}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "build"
    CATEGORY = "testing"

    def build(self, seed: int, min_length: int = 512):
        """ComfyUI's Wan text encoder (``wan.te()`` + WanT5Tokenizer, what CLIPLoader type wan builds) with the
        one-layer UMT5; ``min_length`` pads captions to that many tokens (ComfyUI's UMT5 default, 512, is the
        node's default)."""
        import comfy.text_encoders.wan

        spiece = tiny_spiece_model()
        cpu = torch.device("cpu")
        options = {"umt5xxl_model_config": {**TINY_UMT5, "vocab_size": SPIECE_VOCAB}, "dtype": torch.float32,
                   "load_device": cpu, "offload_device": cpu, "initial_device": cpu}
        target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.wan.WanT5Tokenizer,
                                                        comfy.text_encoders.wan.te())
        tokenizer_data = {"spiece_model": torch.frombuffer(bytearray(spiece), dtype=torch.uint8),
                          "umt5xxl_min_length": min_length}
        clip = comfy.sd.CLIP(target=target, tokenizer_data=tokenizer_data, model_options=options)
        _init_(clip.cond_stage_model, seed)
        return (clip,)


NODE_CLASS_MAPPINGS = {"TestTinyFluxCLIP": TestTinyFluxCLIP, "TestTinyChromaCLIP": TestTinyChromaCLIP,
                       "TestTinyQwenCLIP": TestTinyQwenCLIP, "TestTinyDiffusionModel": TestTinyDiffusionModel,
                       "TestTinyWanCLIP": TestTinyWanCLIP}
