"""What Kiln knows about each model family: the one place that does.

A :class:`Family` entry says how to recognise a model (ComfyUI's ``model_config`` class), which text encoders it
has (each a trainable root with its kohya prefix), how its UNet layers are named in kohya files, whether it takes
per-sample size conditioning, and what to write into a LoRA's metadata. The training objective is read from the
model's own ``model_sampling`` (:func:`objective`), so a v-prediction or zero-terminal-SNR checkpoint trains on the
schedule ComfyUI samples it with. Adding a family is one entry here plus its tests; a model no entry claims is
refused at Inject LoRA by name (:func:`detect`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import comfy.model_sampling
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
    default_resolution: int = 512
    latent_channels: int = 4
    objectives: tuple[str, ...] = ("epsilon", "v_prediction")  # what its model_sampling may be (else refused)
    export_format: str = "kohya"  # "kohya": lora_<prefix>_<path>.lora_down/up + alpha; "diffusers": peft keys
    extra_inputs: tuple[str, ...] = ()  # the extra_conds outputs its network takes besides the context ("y", ...)
    preview_cfg: float = 7.0  # CFG for previews; 1.0 for guidance-distilled models (no negative pass)
    inplace_residuals: bool = False  # its blocks add residuals in place (FLUX): LayerNorm inputs copied while training
    in_channels: int = 0  # the network's own input channels where they differ from the latent's (Chroma: 2x2 packed)
    preview_steps: int = 20  # sampler steps of a preview when Train Steps' preview_steps is 0 (auto)
    auto: AutoDefaults | None = None  # what Train Steps' "auto" settings mean for it; None: by its objective

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
    unet_naming="diffusers", base_model_versions=("sd_v2", "sd_v2_768_v"), default_resolution=768,
)
SDXL = Family(
    name="SDXL", model_configs=("SDXL", "SSD1B", "Segmind_Vega", "KOALA_700M", "KOALA_1B"),
    text_encoders=(TextEncoderRoot("te1", "l", "lora_te1"), TextEncoderRoot("te2", "g", "lora_te2")),
    unet_naming="ldm", base_model_versions=("sdxl_base_v1-0", "sdxl_base_v1-0"),
    size_conditioning=True, default_resolution=1024, extra_inputs=("y",),
)
# SD3 medium / SD3.5 medium and large (ComfyUI loads them all as ``SD3``): a rectified-flow MMDiT. The file is
# diffusers' SD3 LoRA layout (``transformer.<diffusers path>.lora_A/B``, fused qkv written as to_q/to_k/to_v), the
# one layout both ComfyUI's LoraLoader and diffusers' SD3 pipeline load. Text-encoder training is not offered
# (kohya trains none for SD3 by default; the encoders are only used to encode the captions once).
SD3 = Family(
    name="SD3/SD3.5", model_configs=("SD3",), text_encoders=(), unet_naming="mmdit",
    base_model_versions=("sd3", "sd3"),
    default_resolution=1024, latent_channels=16, objectives=("flow",), export_format="diffusers", extra_inputs=("y",),
)
# FLUX.1 dev and schnell (ComfyUI's Flux / FluxSchnell): a rectified-flow DiT of double- and single-stream blocks, fed
# the T5 context, CLIP-L's pooled output (y) and, for dev (guidance-distilled), a guidance value. kohya's FLUX LoRA
# layout: lora_unet_ + the model's own paths (lora_unet_double_blocks_0_img_attn_qkv, ..._single_blocks_0_linear1),
# which ComfyUI's LoraLoader maps directly and diffusers' kohya FLUX converter splits into its q/k/v. Text-encoder
# training is not offered (the captions are encoded once; T5-XXL is released before training).
FLUX = Family(
    name="FLUX.1", model_configs=("Flux", "FluxSchnell"), text_encoders=(), unet_naming="ldm",
    base_model_versions=("flux1", "flux1"), default_resolution=1024, latent_channels=16, objectives=("flow",),
    extra_inputs=("y", "guidance"), preview_cfg=1.0, inplace_residuals=True,
)
# Chroma (ComfyUI's Chroma): FLUX.1-schnell's double/single-stream blocks, de-distilled, with one small network (the
# distilled_guidance_layer) computing every block's modulation instead of per-block modulation layers; T5-XXL alone
# encodes the captions (no pooled CLIP-L, no size or guidance conditioning: ComfyUI feeds it guidance 0), and it
# samples with real CFG. Its LoRA is kohya's FLUX layout (ComfyUI maps it as for FLUX.1: Chroma is a Flux subclass),
# modelspec ``chroma`` as kohya's Chroma trainer writes it.
CHROMA = Family(
    name="Chroma", model_configs=("Chroma",), text_encoders=(), unet_naming="ldm",
    base_model_versions=("flux1", "flux1"), default_resolution=1024, latent_channels=16, objectives=("flow",),
    extra_inputs=("guidance",), preview_cfg=4.0, inplace_residuals=True, in_channels=64,
)
FAMILIES: tuple[Family, ...] = (SD1, SD2, SDXL, SD3, FLUX, CHROMA)
FLUX_BASE_SHIFT = 0.5  # ComfyUI's ModelSamplingFlux node: mu from 0.5 at 256 image tokens to max_shift at 4096
FLUX_PATCH = 2  # FLUX.1 packs 2 x 2 latent pixels into one token
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
        """What Train Steps' ``auto`` settings are for this model (the family's, else its objective's)."""
        return self.family.auto or auto_defaults(self.objective.prediction_type)


def model_type_name(patcher: Any) -> str:
    return type(patcher.model.model_config).__name__


def detect(patcher: Any) -> Detected:
    """The family and objective of a MODEL, or a :class:`KilnUserError` naming the model and what is supported."""
    base = patcher.model
    config_name = model_type_name(patcher)
    family = next((f for f in FAMILIES if config_name in f.model_configs), None)
    if family is None:
        raise KilnUserError(
            f"LoRA Kiln cannot train {config_name} models yet (model class {type(base).__name__}); it trains "
            f"{SUPPORTED}. Load a checkpoint of one of those."
        )
    if getattr(base, "concat_keys", ()) or _in_channels(base) != (family.in_channels or family.latent_channels):
        raise KilnUserError(
            f"this {family.name} checkpoint is an inpainting/depth/instruct variant ({_in_channels(base)} input "
            f"channels, extra inputs {list(getattr(base, 'concat_keys', ()))}); LoRA Kiln trains the plain "
            f"text-to-image {family.name} model. Load the base checkpoint."
        )
    found = objective(patcher)
    if found.prediction_type not in family.objectives:
        raise KilnUserError(
            f"this {family.name} model samples as {found.prediction_type}, but {family.name} trains as "
            f"{' / '.join(family.objectives)}: remove the sampling patch (ModelSampling* node) between the loader and "
            "Inject LoRA"
        )
    unet_config = base.model_config.unet_config
    if family is SD3:
        return Detected(family, found, sd3_variant(unet_config))
    if family is FLUX:
        guidance = bool(unet_config.get("guidance_embed"))
        return Detected(family, found, "flux1", model_spec="flux1-dev" if guidance else "flux1-schnell",
                        guidance=guidance)
    if family is CHROMA:
        return Detected(family, found, "flux1", model_spec="chroma")
    return Detected(family, found, family.base_model_versions[found.prediction_type == "v_prediction"])


def _in_channels(base: Any) -> int:
    return int(base.model_config.unet_config.get("in_channels", 4))


def objective(patcher: Any) -> Objective:
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
                         timestep_multiplier=float(sampling.multiplier))
    if schedule is ms.ModelSamplingFlux and parametrisation is ms.CONST:
        # FLUX.1-dev: sigma = e^mu / (e^mu + 1/t - 1), the network's timestep is sigma itself. As loaded, mu is the
        # 1024 px value and ComfyUI's ModelSamplingFlux node would set it per image size: trained the same way,
        # per batch; a ModelSamplingFlux node before Inject LoRA fixes it (its shift is then trained with)
        mu = float(sampling.shift)
        patched = "model_sampling" in getattr(patcher, "object_patches", {})
        by_size = None if patched else (FLUX_BASE_SHIFT, mu, FLUX_PATCH)
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
            "ModelSamplingDiscrete node set to eps or v_prediction is fine) and the rectified flow of SD3, FLUX.1 and "
            "Chroma (ModelSamplingDiscreteFlow, ModelSamplingFlux). Remove LCM/x0/EDM sampling patches from the MODEL "
            "you connect to Inject LoRA, or load a checkpoint Kiln supports."
        )
    sigmas = sigmas.detach().float().cpu()
    return Objective(kinds[parametrisation], 1.0 / (sigmas**2 + 1.0), bool(getattr(sampling, "zsnr", False)))


def lora_naming(patcher: Any, family: Family | None = None) -> KohyaNaming | PeftNaming:
    """The file names of a family's layers: kohya names with diffusers paths for SD1/SD2 UNets (ComfyUI's own LDM ->
    diffusers map), kohya names with LDM paths for SDXL, diffusers' SD3 layout for the MMDiT (ComfyUI's own MMDiT ->
    diffusers map: fused qkv -> to_q/to_k/to_v rows, adaLN outputs in diffusers' order)."""
    family = family or detect(patcher).family
    if family.export_format == "diffusers":
        return _mmdit_naming(patcher)
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


def _mmdit_naming(patcher: Any) -> PeftNaming:
    inner = "diffusion_model."
    mapping = comfy.utils.mmdit_to_diffusers(patcher.model.model_config.unet_config, output_prefix=inner)
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
    return PeftNaming({name: tuple(sorted(p, key=lambda x: x.rows or (0, 0))) for name, p in pieces.items()})


def sd3_variant(unet_config: dict[str, Any]) -> str:
    """kohya's SD3 ``model_type``: ``5-medium`` (MMDiT-X: attn2 layers and qk-norm), ``5-large`` (qk-norm), else
    ``medium`` (SD3 medium)."""
    if unet_config.get("qk_norm"):
        return "5-medium" if unet_config.get("x_block_self_attn_layers") else "5-large"
    return "medium"
