"""What Kiln knows about each model family: the one place that does.

A :class:`Family` entry says how to recognise a model (ComfyUI's ``model_config`` class), which text encoders it
has (each a trainable root with its kohya prefix), how its UNet layers are named in kohya files, whether it takes
per-sample size conditioning, and what to write into a LoRA's metadata. The training objective is read from the
model's own ``model_sampling`` (:func:`objective`), so a v-prediction or zero-terminal-SNR checkpoint trains on the
schedule ComfyUI samples it with. Adding a family is one entry here plus its tests; a model no entry claims is
refused at Inject LoRA by name (:func:`detect`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import comfy.model_base
import comfy.model_sampling
import comfy.text_encoders.wan
import comfy.utils
import torch

from ...lora_core.config import TARGET_PRESETS, AutoDefaults, auto_defaults
from ...lora_core.formats.kohya import KohyaNaming
from ...lora_core.formats.peft import PeftNaming, Piece
from .errors import KilnUserError


@dataclass(frozen=True)
class TextEncoderRoot:
    """One trainable text encoder: adapter component name, ComfyUI's key for it, kohya prefix."""

    component: str  # "te" | "te1" | "te2": the adapter names start with it ("te1.text_model.encoder...")
    clip_key: str  # ComfyUI's tokenizer/encoder key: "l", "h", "g"
    kohya_prefix: str  # "lora_te", "lora_te1", "lora_te2"


@dataclass(frozen=True)
class Family:
    name: str  # shown to users
    model_configs: tuple[str, ...]  # ComfyUI supported_models class names this entry claims
    text_encoders: tuple[TextEncoderRoot, ...]
    unet_naming: str  # "diffusers": kohya SD1/SD2 files use diffusers paths; "ldm": the model's own paths
    base_model_versions: tuple[str, str]  # kohya ss_base_model_version for (epsilon, v-prediction)
    size_conditioning: bool = False  # SDXL: original size, crop and target size per sample
    latent_channels: int = 4
    objectives: tuple[str, ...] = ("epsilon", "v_prediction")  # what its model_sampling may be (else refused)
    export_format: str = "kohya"  # "kohya": lora_<prefix>_<path>.lora_down/up + alpha; "diffusers": peft keys
    # the extra_conds outputs its network takes besides the context ("y", ...); None: every one ComfyUI's extra_conds
    # gives for a text-to-image conditioning, as ComfyUI's sampler passes them (num_tokens, guidance, ...)
    extra_inputs: tuple[str, ...] | None = ()
    preview_cfg: float = 7.0  # CFG for previews; 1.0 for guidance-distilled models (no negative pass)
    inplace_residuals: bool = False  # its blocks add residuals in place (FLUX): LayerNorm inputs copied while training
    in_channels: int = 0  # the network's own input channels where they differ from the latent's (Chroma: 2x2 packed)
    preview_steps: int = 20  # sampler steps of a preview when Train Steps' preview_steps is 0 (auto)
    # ModelSamplingFlux models as loaded: the shift follows each bucket's size, (base mu, max mu or None = the
    # model's own, latent pixels per token side); None: the shift ComfyUI samples the loaded model with
    size_shift: tuple[float, float | None, int] | None = None
    diffusers_map: str = ""  # export_format "diffusers": the comfy.utils function mapping diffusers keys to its layers
    file_prefix: str = "transformer"  # export_format "diffusers": the key prefix of the file
    generic: bool = False  # built from what ComfyUI knows of the model (no family entry)
    video_fps: float = 0.0  # a video model: the frame rate it was trained at (clips are resampled to it); 0: images
    # two-expert video models (Wan 2.2 14B: a high-noise and a low-noise checkpoint of the same layout): the noise level
    # (sigma, after the shift) where sampling hands over from the high-noise expert to the low-noise one; 0: none
    expert_boundary: float = 0.0
    preview_frames: int = 1  # frames of a preview clip (4k+1 for the Wan VAEs); 1: a still image

    @property
    def video(self) -> bool:
        return self.video_fps > 0

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(t.component for t in self.text_encoders)

    def text_encoder(self, component: str) -> TextEncoderRoot:
        for t in self.text_encoders:
            if t.component == component:
                return t
        raise KeyError(component)

    @property
    def target_presets(self) -> dict[str, tuple[str, ...] | None]:
        return dict(TARGET_PRESETS)  # UNet (to_q ... proj_out), MMDiT (attn.qkv ...) and FLUX (img_attn.qkv ...) names


SD1 = Family(
    name="SD1.x", model_configs=("SD15",), text_encoders=(TextEncoderRoot("te", "l", "lora_te"),),
    unet_naming="diffusers", base_model_versions=("sd_v1", "sd_v1"),
)
SD2 = Family(
    name="SD2.x", model_configs=("SD20",), text_encoders=(TextEncoderRoot("te", "h", "lora_te"),),
    unet_naming="diffusers", base_model_versions=("sd_v2", "sd_v2_768_v"),
)
SDXL = Family(
    name="SDXL", model_configs=("SDXL", "SSD1B", "Segmind_Vega", "KOALA_700M", "KOALA_1B"),
    text_encoders=(TextEncoderRoot("te1", "l", "lora_te1"), TextEncoderRoot("te2", "g", "lora_te2")),
    unet_naming="ldm", base_model_versions=("sdxl_base_v1-0", "sdxl_base_v1-0"),
    size_conditioning=True, extra_inputs=("y",),
)
# SD3 medium / SD3.5 medium and large (ComfyUI loads them all as ``SD3``): a rectified-flow MMDiT. The file is
# diffusers' SD3 LoRA layout (``transformer.<diffusers path>.lora_A/B``, fused qkv written as to_q/to_k/to_v), the
# one layout both ComfyUI's LoraLoader and diffusers' SD3 pipeline load. Text-encoder training is not offered
# (kohya trains none for SD3 by default; the encoders are only used to encode the captions once).
SD3 = Family(
    name="SD3/SD3.5", model_configs=("SD3",), text_encoders=(), unet_naming="mmdit",
    base_model_versions=("sd3", "sd3"),
    latent_channels=16, objectives=("flow",), export_format="diffusers", extra_inputs=("y",),
    diffusers_map="mmdit_to_diffusers",
)
# FLUX.1 dev and schnell (ComfyUI's Flux / FluxSchnell): a rectified-flow DiT of double- and single-stream blocks, fed
# the T5 context, CLIP-L's pooled output (y) and, for dev (guidance-distilled), a guidance value. kohya's FLUX LoRA
# layout: lora_unet_ + the model's own paths (lora_unet_double_blocks_0_img_attn_qkv, ..._single_blocks_0_linear1),
# which ComfyUI's LoraLoader maps directly and diffusers' kohya FLUX converter splits into its q/k/v. Text-encoder
# training is not offered (the captions are encoded once; T5-XXL is released before training).
FLUX = Family(
    name="FLUX.1", model_configs=("Flux", "FluxSchnell"), text_encoders=(), unet_naming="ldm",
    base_model_versions=("flux1", "flux1"), latent_channels=16, objectives=("flow",),
    extra_inputs=("y", "guidance"), preview_cfg=1.0, inplace_residuals=True, size_shift=(0.5, None, 2),
)
# Chroma (ComfyUI's Chroma): FLUX.1-schnell's double/single-stream blocks, de-distilled, with one small network (the
# distilled_guidance_layer) computing every block's modulation instead of per-block modulation layers; T5-XXL alone
# encodes the captions (no pooled CLIP-L, no size or guidance conditioning: ComfyUI feeds it guidance 0), and it
# samples with real CFG. Its LoRA is kohya's FLUX layout (ComfyUI maps it as for FLUX.1: Chroma is a Flux subclass),
# modelspec ``chroma`` as kohya's Chroma trainer writes it.
CHROMA = Family(
    name="Chroma", model_configs=("Chroma",), text_encoders=(), unet_naming="ldm",
    base_model_versions=("flux1", "flux1"), latent_channels=16, objectives=("flow",),
    extra_inputs=("guidance",), preview_cfg=4.0, inplace_residuals=True, in_channels=64, size_shift=(0.5, None, 2),
)
# Z-Image Turbo and Base (ComfyUI's ZImage: a Lumina 2 NextDiT at width 3840, 30 layers + 2 + 2 refiners), Qwen3-4B as
# its text encoder (CLIPLoader type lumina2), FLUX.1's 16-channel VAE, rectified flow with shift 3 (timestep = sigma;
# the network reverses time and negates its output itself). The file is the layout ai-toolkit writes and diffusers'
# ZImageLoraLoaderMixin reads: diffusion_model.<diffusers path>.lora_A/B, the fused qkv written as to_q/to_k/to_v rows
# (ComfyUI maps them back through comfy.utils.z_image_to_diffusers). Previews as Turbo samples (8 steps, cfg 1).
ZIMAGE = Family(
    name="Z-Image", model_configs=("ZImage",), text_encoders=(), unet_naming="ldm",
    base_model_versions=("zimage", "zimage"), latent_channels=16, objectives=("flow",),
    export_format="diffusers", diffusers_map="z_image_to_diffusers", file_prefix="diffusion_model",
    extra_inputs=None, preview_cfg=1.0, preview_steps=8,
)
# FLUX.2 dev (Mistral-3 24B text encoder, guidance-distilled) and Klein 4B / 9B (Qwen3 4B / 8B, CLIPLoader type flux2;
# no guidance input): FLUX.1's double/single-stream blocks with global modulation, 128-channel latents (the VAE's 32
# channels packed 2 x 2: one token per latent pixel), residuals added in place. Trained with musubi-tuner's flux2_shift
# (mu from 0.5 at 256 tokens to 1.15 at 4096, per bucket); the file is kohya's FLUX layout (lora_unet_double_blocks_0_
# img_attn_qkv ...), as musubi writes it: ComfyUI maps it directly, diffusers' Flux2LoraLoaderMixin converts it.
FLUX2 = Family(
    name="FLUX.2", model_configs=("Flux2",), text_encoders=(), unet_naming="ldm",
    base_model_versions=("flux2", "flux2"), latent_channels=128, objectives=("flow",),
    extra_inputs=None, preview_cfg=1.0, inplace_residuals=True, size_shift=(0.5, 1.15, 1),
)
# Qwen-Image (ComfyUI's QwenImage: a 20 B MMDiT with diffusers' own module names, Qwen2.5-VL 7B via CLIPLoader type
# qwen_image, the Wan 2.1 VAE: latents [16, 1, h, w]), rectified flow at the shift ComfyUI samples it with. kohya
# file layout (lora_unet_transformer_blocks_0_attn_to_q ...) as musubi-tuner writes it; ComfyUI and diffusers'
# QwenImageLoraLoaderMixin load it. Qwen-Image-Edit-2511 and Qwen-Image-Layered are refused (detect: their reference
# inputs); the older Edit checkpoints look exactly like Qwen-Image to ComfyUI's detection and cannot be told apart.
QWEN_IMAGE = Family(
    name="Qwen-Image", model_configs=("QwenImage",), text_encoders=(), unet_naming="ldm",
    base_model_versions=("qwen_image", "qwen_image"), latent_channels=16,
    objectives=("flow",), extra_inputs=None, preview_cfg=4.0, in_channels=64,
)
# Wan 2.1 text-to-video (1.3 B, 14 B) and Wan 2.2's 14 B high-noise / low-noise experts, which ComfyUI loads as the same
# WAN21_T2V class (one checkpoint each): a rectified-flow DiT over 5-D video latents [16, 1 + (F - 1) / 4, h, w] of the
# Wan 2.1 VAE, UMT5-XXL captions (CLIPLoader type wan), trained at 16 fps with the shift ComfyUI samples it with. The
# file is the layout ai-toolkit writes and diffusers' WanLoraLoaderMixin converts: diffusion_model.<the model's own
# path>.lora_A / lora_B (ComfyUI's LoraLoader maps it directly). A 2.2 expert is trained on its own range of noise
# levels (Train Steps' expert: above or below the boundary 0.875 where ComfyUI's Wan 2.2 workflows switch models).
WAN21 = Family(
    name="Wan 2.1 / 2.2 14B", model_configs=("WAN21_T2V",), text_encoders=(), unet_naming="ldm",
    base_model_versions=("wan21_t2v", "wan21_t2v"), latent_channels=16, objectives=("flow",),
    export_format="diffusers", file_prefix="diffusion_model", extra_inputs=None, preview_cfg=5.0, preview_steps=20,
    video_fps=16.0, expert_boundary=0.875, preview_frames=9,
)
# Wan 2.2 TI2V 5 B (ComfyUI's WAN22_T2V): Wan's DiT over the Wan 2.2 VAE's 48-channel latents (16 x 16 pixels, 4 frames
# per latent frame), trained at 24 fps; text-to-video here (its first-frame image conditioning is not trained). Same
# file layout as Wan 2.1.
WAN22_5B = Family(
    name="Wan 2.2 5B", model_configs=("WAN22_T2V",), text_encoders=(), unet_naming="ldm",
    base_model_versions=("wan22_ti2v_5b", "wan22_ti2v_5b"), latent_channels=48, objectives=("flow",),
    export_format="diffusers", file_prefix="diffusion_model", extra_inputs=None, preview_cfg=5.0, preview_steps=20,
    video_fps=24.0, preview_frames=9,
)
FAMILIES: tuple[Family, ...] = (SD1, SD2, SDXL, SD3, FLUX, CHROMA, ZIMAGE, FLUX2, QWEN_IMAGE, WAN21, WAN22_5B)
SUPPORTED = ", ".join(f.name for f in FAMILIES)


@dataclass(frozen=True)
class Objective:
    """The training target as plain data for the engine (no ComfyUI objects)."""

    prediction_type: str  # "epsilon" | "v_prediction" | "flow"
    alphas_cumprod: torch.Tensor  # [T] float32, from ComfyUI's sigmas: 1 / (sigma^2 + 1); empty for flow
    zero_terminal_snr: bool = False
    flow_shift: float = 1.0  # flow: the time shift ComfyUI samples with (SD3: 3.0; a ModelSamplingSD3 node's)
    timestep_multiplier: float = 1000.0  # flow: the network's timestep = sigma * this (ComfyUI's model_sampling)
    # flow, FLUX.1-dev as loaded: the shift grows with the image size, (base_shift, max_shift, patch size) as
    # ComfyUI's ModelSamplingFlux node computes it (lora_core.diffusion.resolution_shift); None: flow_shift is fixed
    flow_shift_by_size: tuple[float, float, int] | None = None
    expert_boundary: float = 0.0  # two-expert models (Wan 2.2 14B): the sigma where sampling switches experts


@dataclass(frozen=True)
class Detected:
    family: Family
    objective: Objective
    base_model_version: str  # kohya's ss_base_model_version (SD3: its model_type medium / 5-medium / 5-large)
    model_spec: str = ""  # the modelspec architecture key where the version does not tell it (flux1-dev / -schnell)
    guidance: bool = False  # guidance-distilled (FLUX.1-dev): the network takes a guidance value

    @property
    def v_prediction(self) -> bool:
        return self.objective.prediction_type == "v_prediction"

    @property
    def auto_defaults(self) -> AutoDefaults:
        """What Train Steps' ``auto`` settings are for this model: its objective's (DDPM or flow)."""
        return auto_defaults(self.objective.prediction_type)


def model_type_name(patcher: Any) -> str:
    return type(patcher.model.model_config).__name__


# Models no family entry claims and the generic path must not train: ComfyUI's class name -> why (shown to the user).
# Everything else ComfyUI loads trains through the generic path when its sampling is one Kiln trains (:func:`objective`).
_PIXELS = "works in pixel space (no VAE latents); LoRA Kiln trains latent diffusion models"
_VIDEO = ("is a video model LoRA Kiln does not train yet (it trains Wan 2.1 text-to-video, Wan 2.2 14B text-to-video and "
          "Wan 2.2 TI2V 5B)")
_AUDIO = "is an audio model; LoRA Kiln trains image models"
_THREE_D = "generates 3D assets or views; LoRA Kiln trains text-to-image models"
_NOT_DIFFUSION = "is not a diffusion model (detection / segmentation / depth); there is nothing to train a LoRA for"
_NEEDS_IMAGE = "needs an input image per sample (edit / inpaint / image-conditioned), which a text-to-image dataset lacks"
REFUSED: dict[str, str] = {
    **dict.fromkeys(("ChromaRadiance", "ZImagePixelSpace", "PixelDiTT2I", "PiD", "HiDreamO1"), _PIXELS),
    **dict.fromkeys(("SVD_img2vid", "GenmoMochi", "LTXV", "LTXAV", "MiniMaxH3", "HunyuanVideo", "HunyuanVideoI2V",
                     "HunyuanVideoSkyreelsI2V", "HunyuanVideo15", "HunyuanVideo15_SR_Distilled", "CosmosT2V",
                     "CosmosI2V", "CosmosI2VPredict2", "Kandinsky5", "CogVideoX_T2V", "CogVideoX_I2V",
                     "CogVideoX_Inpaint", "SeedVR2"), _VIDEO),
    **dict.fromkeys(("StableAudio", "StableAudio3", "ACEStep", "ACEStep15", "MiniMaxMusic3"), _AUDIO),
    **dict.fromkeys(("Stable_Zero123", "SV3D_u", "SV3D_p", "Hunyuan3Dv2", "Hunyuan3Dv2_1", "Hunyuan3Dv2mini",
                     "Trellis2", "TripoSplat"), _THREE_D),
    **dict.fromkeys(("RT_DETR_v4", "DepthAnything3", "SAM3", "SAM31", "LotusD"), _NOT_DIFFUSION),
    **dict.fromkeys(("SD15_instructpix2pix", "SDXL_instructpix2pix", "FluxInpaint", "SD21UnclipL", "SD21UnclipH",
                     "SD_X4Upscaler"), _NEEDS_IMAGE),
    "SDXLRefiner": "is the SDXL refiner (aesthetic-score conditioning, applied after the base): train the SDXL base",
    "HunyuanImage21Refiner": "is HunyuanImage 2.1's refiner, applied after the base: train the base model",
    "Stable_Cascade_C": "is Stable Cascade's two-stage Wuerstchen prior, whose sampling LoRA Kiln does not train",
    "Stable_Cascade_B": "is Stable Cascade's two-stage Wuerstchen decoder, whose sampling LoRA Kiln does not train",
    "CosmosT2IPredict2": "samples with Cosmos' EDM-style rectified-flow schedule (ModelSamplingCosmosRFlow), which "
                         "LoRA Kiln does not train; use a trainer made for Cosmos Predict2",
    # their networks call comfy_kitchen rope kernels that have no backward pass (ComfyUI's in_training switch does not
    # reach these call sites), so no gradient can flow through them: the first step would fail
    **dict.fromkeys(("JoyImage", "Anima", "ErnieImage"),
                    "calls rope kernels that have no backward pass in this ComfyUI (comfy_kitchen), so it cannot be "
                    "trained through ComfyUI's own network; use a trainer with its own implementation of the model, "
                    "or a ComfyUI version whose kernels have a backward pass"),
}


def _is_video(config_name: str) -> bool:
    return config_name.startswith(("WAN", "Wan", "CogVideo", "HunyuanVideo")) or "2V" in config_name


def refusal(config_name: str) -> str | None:
    """Why ``config_name`` (a ComfyUI supported_models class) is refused, or None when Kiln trains it."""
    if any(config_name in f.model_configs for f in FAMILIES):
        return None
    if config_name in REFUSED:
        return REFUSED[config_name]
    return _VIDEO if _is_video(config_name) else None


def generic_family(patcher: Any) -> Family:
    """A :class:`Family` built from what ComfyUI knows of a model no entry claims: its latent format, every extra
    input its own ``extra_conds`` gives (as ComfyUI's sampler passes them), the kohya layout of its own module paths
    (``lora_unet_<path>``, which ComfyUI's LoraLoader maps for every model), LayerNorm inputs copied while training
    (a block may add residuals in place). The objective is still read from its ``model_sampling``."""
    base = patcher.model
    name = model_type_name(patcher)
    latent = base.latent_format
    return Family(
        name=name, model_configs=(name,), text_encoders=(), unet_naming="ldm",
        base_model_versions=(name.lower(), name.lower()),
        latent_channels=int(latent.latent_channels), objectives=("epsilon", "v_prediction", "flow"),
        extra_inputs=None, preview_cfg=4.0, inplace_residuals=True, generic=True,
    )


def detect(patcher: Any) -> Detected:
    """The family and objective of a MODEL, or a :class:`KilnUserError` naming the model and why it is refused."""
    base = patcher.model
    config_name = model_type_name(patcher)
    family = next((f for f in FAMILIES if config_name in f.model_configs), None)
    why = refusal(config_name)
    if why is not None:
        raise KilnUserError(
            f"LoRA Kiln cannot train {config_name} models (model class {type(base).__name__}): it {why}. Kiln trains "
            f"{SUPPORTED} with their own entries and other image models ComfyUI loads generically (README, Model "
            "families)."
        )
    if family is None:
        if type(base)._apply_model is not comfy.model_base.BaseModel._apply_model:
            raise KilnUserError(
                f"LoRA Kiln cannot train {config_name} models (model class {type(base).__name__}): ComfyUI prepares "
                "part of its input outside the network (its own _apply_model, e.g. position offsets), which training "
                "the network directly would leave out; the generic path would train it with the wrong inputs. Use a "
                "trainer made for this model.")
        family = generic_family(patcher)
    # a family entry knows its network's input channels; a generic model may pack latent patches into more (its own
    # extra_conds then says whether it wants a concatenated image: refused at the first step)
    wrong_channels = not family.generic and _in_channels(base, family) != (family.in_channels or family.latent_channels)
    if getattr(base, "concat_keys", ()) or wrong_channels:
        raise KilnUserError(
            f"this {family.name} checkpoint is an inpainting/depth/instruct variant ({_in_channels(base, family)} input "
            f"channels, extra inputs {list(getattr(base, 'concat_keys', ()))}); LoRA Kiln trains the plain "
            f"text-to-image {family.name} model. Load the base checkpoint."
        )
    unet_config = base.model_config.unet_config
    if family is QWEN_IMAGE and (unet_config.get("default_ref_method") or unet_config.get("use_additional_t_cond")):
        raise KilnUserError(
            "this Qwen-Image checkpoint is an edit / layered variant (Qwen-Image-Edit-2511, Qwen-Image-Layered): it "
            "needs a reference image per sample, which Load Dataset does not carry yet. Train the Qwen-Image base model."
        )
    found = objective(patcher, family)
    if found.prediction_type not in family.objectives:
        raise KilnUserError(
            f"this {family.name} model samples as {found.prediction_type}, but {family.name} trains as "
            f"{' / '.join(family.objectives)}: remove the sampling patch (ModelSampling* node) between the loader and "
            "Inject LoRA"
        )
    if family is SD3:
        return Detected(family, found, sd3_variant(unet_config))
    if family is FLUX:
        guidance = bool(unet_config.get("guidance_embed"))
        return Detected(family, found, "flux1", model_spec="flux1-dev" if guidance else "flux1-schnell",
                        guidance=guidance)
    if family is CHROMA:
        return Detected(family, found, "flux1", model_spec="chroma")
    if family is FLUX2:
        guidance = bool(unet_config.get("guidance_embed"))
        return Detected(family, found, flux2_variant(unet_config), guidance=guidance)
    if family is WAN21:  # one class for 1.3 B (width 1536) and 14 B (5120; Wan 2.2's experts too)
        dim = int(unet_config.get("dim", 0))
        spec = "wan21_t2v_14b" if dim >= 5120 else "wan21_t2v_1.3b"
        if dim == 1536:  # Wan 2.1 1.3B: a single model, no Wan 2.2 expert of this size
            found = dataclasses.replace(found, expert_boundary=0.0)
        return Detected(family, found, "wan21_t2v", model_spec=spec)
    return Detected(family, found, family.base_model_versions[found.prediction_type == "v_prediction"])


def flux2_variant(unet_config: dict[str, Any]) -> str:
    """ai-toolkit's ss_base_model_version for a FLUX.2 model, told apart by the width of its text input: Klein 4B
    (Qwen3 4B: 3 x 2560), Klein 9B (Qwen3 8B: 3 x 4096), else dev (Mistral-3 24B)."""
    return {7680: "flux2_klein_4b", 12288: "flux2_klein_9b"}.get(int(unet_config.get("context_in_dim", 0)), "flux2")


def _in_channels(base: Any, family: Family) -> int:
    return int(base.model_config.unet_config.get("in_channels") or family.in_channels or family.latent_channels)


def objective(patcher: Any, family: Family | None = None) -> Objective:
    """The parametrisation and noise schedule ComfyUI samples this model with, or a refusal naming it.

    Accepted: ComfyUI's discrete 1000-step schedule with an exactly epsilon or v parametrisation (SD1/SD2/SDXL, its
    eps / v_prediction (+ zsnr) settings honoured), and the rectified-flow schedule ``ModelSamplingDiscreteFlow``
    with ``CONST`` (SD3, AuraFlow; its shift and timestep multiplier, as a ModelSamplingSD3 node may set them).
    FLUX.1-dev's and Chroma's ``ModelSamplingFlux`` + ``CONST`` (its exponential shift; size-dependent unless a
    ModelSamplingFlux node fixed it). ComfyUI's X0 / LCM / IMG_TO_IMG / EDM / cascade samplings (also when a node
    patches them onto the model) would be trained with the wrong target and are refused.
    """
    sampling = patcher.get_model_object("model_sampling")
    bases = type(sampling).__bases__
    schedule = next((b for b in bases if issubclass(b, torch.nn.Module)), type(sampling))
    parametrisation = next((b for b in bases if not issubclass(b, torch.nn.Module)), None)
    ms = comfy.model_sampling
    if schedule is ms.ModelSamplingDiscreteFlow and parametrisation is ms.CONST:
        return Objective("flow", torch.empty(0), flow_shift=float(sampling.shift),
                         timestep_multiplier=float(sampling.multiplier),
                         expert_boundary=family.expert_boundary if family is not None else 0.0)
    if schedule is ms.ModelSamplingFlux and parametrisation is ms.CONST:
        # FLUX.1-dev: sigma = e^mu / (e^mu + 1/t - 1), the network's timestep is sigma itself. As loaded, mu is the
        # 1024 px value and ComfyUI's ModelSamplingFlux node would set it per image size: trained the same way,
        # per batch (the family's size_shift); a ModelSamplingFlux node before Inject LoRA fixes it (its shift is
        # then trained with). Families without a size_shift train at the shift the loaded model samples with.
        mu = float(sampling.shift)
        patched = "model_sampling" in getattr(patcher, "object_patches", {})
        size_shift = family.size_shift if family is not None else None
        by_size = None if patched or size_shift is None else (size_shift[0], size_shift[1] or mu, size_shift[2])
        return Objective("flow", torch.empty(0), flow_shift=math.exp(mu), timestep_multiplier=1.0,
                         flow_shift_by_size=by_size)
    kinds = {ms.EPS: "epsilon", ms.V_PREDICTION: "v_prediction"}
    sigmas = getattr(sampling, "sigmas", None)
    if (schedule is not ms.ModelSamplingDiscrete or parametrisation not in kinds
            or sigmas is None or sigmas.shape[0] != 1000):
        steps = f", {sigmas.shape[0]} sigmas" if sigmas is not None else ""
        raise KilnUserError(
            f"this model samples with {schedule.__name__} + {getattr(parametrisation, '__name__', '?')}{steps}; "
            "LoRA Kiln trains the discrete 1000-step epsilon or v-prediction schedule of SD1.x/SD2.x/SDXL (a "
            "ModelSamplingDiscrete node set to eps or v_prediction is fine) and rectified flow (ModelSamplingDiscreteFlow, "
            "ModelSamplingFlux: SD3, FLUX, Z-Image, Qwen-Image, ...). Remove LCM/x0/EDM sampling patches from the MODEL "
            "you connect to Inject LoRA, or load a checkpoint Kiln supports."
        )
    sigmas = sigmas.detach().float().cpu()
    return Objective(kinds[parametrisation], 1.0 / (sigmas**2 + 1.0), bool(getattr(sampling, "zsnr", False)))


def lora_naming(patcher: Any, family: Family | None = None) -> KohyaNaming | PeftNaming:
    """The file names of a family's layers: kohya names with diffusers paths for SD1/SD2 UNets (ComfyUI's own LDM ->
    diffusers map), kohya names with the model's own paths for SDXL, FLUX, Qwen-Image and every generic model,
    diffusers' layout for SD3 and Z-Image (ComfyUI's own diffusers maps: fused qkv -> to_q/to_k/to_v rows), and
    ``diffusion_model.<own path>.lora_A/B`` for Wan (what diffusers' Wan loader converts)."""
    family = family or detect(patcher).family
    if family.export_format == "diffusers":
        return _diffusers_naming(patcher, family)
    prefixes = {"unet": "lora_unet", **{t.component: t.kohya_prefix for t in family.text_encoders}}
    if family.unet_naming == "ldm":
        return KohyaNaming(path_maps={}, prefixes=prefixes)
    mapping = comfy.utils.unet_to_diffusers(patcher.model.model_config.unet_config)
    ldm_to_diffusers = {
        ldm[: -len(".weight")]: diff[: -len(".weight")]
        for diff, ldm in mapping.items()
        if ldm.endswith(".weight") and diff.endswith(".weight")
    }
    return KohyaNaming(path_maps={"unet": ldm_to_diffusers}, prefixes=prefixes)


def _diffusers_naming(patcher: Any, family: Family) -> PeftNaming:
    """The family's diffusers layout from ComfyUI's own diffusers -> model key map (the one its LoraLoader uses):
    a fused layer written as its row pieces (qkv -> to_q/to_k/to_v), adaLN outputs in diffusers' order."""
    inner = "diffusion_model."
    if not family.diffusers_map:  # the model's own paths (Wan): every layer is its own file module
        layers = {name for name, module in patcher.model.diffusion_model.named_modules()
                  if isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.ndim == 2}
        return PeftNaming({f"unet.{path}": (Piece(path),) for path in sorted(layers)}, prefix=family.file_prefix)
    to_diffusers = getattr(comfy.utils, family.diffusers_map)
    mapping = to_diffusers(patcher.model.model_config.unet_config, output_prefix=inner)
    present = set(patcher.model.diffusion_model.state_dict())
    pieces: dict[str, list[Piece]] = {}
    for diffusers_key, target in mapping.items():
        if not diffusers_key.endswith(".weight"):
            continue
        rows, swap = None, False
        if isinstance(target, tuple):
            target, offset, *fn = target
            if offset is not None:
                dim, start, length = offset
                if dim != 0:
                    continue  # a column slice: not a layer of its own
                rows = (int(start), int(length))
            swap = bool(fn) and fn[0] is comfy.utils.swap_scale_shift
            if fn and not swap:
                continue  # another transformation of the weight: not expressible as rows of up
        path = target[len(inner):]
        if path not in present:
            continue  # a layer this variant has not got (attn2, qk-norm, ...)
        pieces.setdefault(f"unet.{path[: -len('.weight')]}", []).append(
            Piece(diffusers_key[: -len(".weight")], rows, swap))
    return PeftNaming({name: tuple(sorted(p, key=lambda x: x.rows or (0, 0))) for name, p in pieces.items()},
                      prefix=family.file_prefix)


def sd3_variant(unet_config: dict[str, Any]) -> str:
    """kohya's SD3 ``model_type``: ``5-medium`` (MMDiT-X: attn2 layers and qk-norm), ``5-large`` (qk-norm), else
    ``medium`` (SD3 medium)."""
    if unet_config.get("qk_norm"):
        return "5-medium" if unet_config.get("x_block_self_attn_layers") else "5-large"
    return "medium"


# the text encoders that tell the family's usual training resolution before the model is known (Load Dataset has the
# CLIP and the VAE, not the MODEL): ComfyUI's SD1.x / SD2.x CLIP classes -> 512 / 768; everything newer trains at 1024
_CLIP_RESOLUTIONS = {"SD1ClipModel": (512, "SD1.x"), "SD2ClipModel": (768, "SD2.x")}


def auto_resolution(clip: Any, vae: Any = None) -> tuple[int, str]:
    """Load Dataset's ``auto`` resolution from the CLIP (and VAE) it is given: (pixels, what it was read from). Wan
    (UMT5 captions): 640 (480p-class clips, 832 x 480 holds about 640^2 pixels), 960 for Wan 2.2 5B (its 48-channel
    VAE; a 720p model)."""
    model = getattr(clip, "cond_stage_model", None)
    name = type(model).__name__
    if isinstance(model, comfy.text_encoders.wan.WanT5Model):
        if (video_vae(vae) or (None,))[0] is WAN22_5B:
            return 960, "Wan 2.2 5B (720p clips)"
        return 640, "Wan (480p clips)"
    return _CLIP_RESOLUTIONS.get(name, (1024, f"{name} (SDXL and newer)"))


def video_vae(vae: Any) -> tuple[Family, str] | None:
    """(family, what was read) for a video model's VAE: clips are resampled to the family's ``video_fps``, the rate the
    model was trained at. The Wan 2.2 VAE (48 channels) is Wan 2.2 5B's; other video VAEs (Wan 2.1's: Wan 2.1 and
    Wan 2.2 14B) Wan 2.1's. None: an image VAE (a Wan 2.1 VAE encodes Qwen-Image's one-frame latents too; its clips
    would be refused at Train Steps by the model)."""
    if vae is None or int(getattr(vae, "latent_dim", 2)) != 3:
        return None
    if int(vae.latent_channels) == WAN22_5B.latent_channels:
        return WAN22_5B, "Wan 2.2 5B (Wan 2.2 VAE)"
    return WAN21, "Wan 2.1 / 2.2 14B (Wan 2.1 VAE)"
