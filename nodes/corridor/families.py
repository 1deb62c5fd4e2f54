"""What Kiln knows about each model family: the one place that does.

A :class:`Family` entry says how to recognise a model (ComfyUI's ``model_config`` class), which text encoders it
has (each a trainable root with its kohya prefix), how its UNet layers are named in kohya files, whether it takes
per-sample size conditioning, and what to write into a LoRA's metadata. The training objective is read from the
model's own ``model_sampling`` (:func:`objective`), so a v-prediction or zero-terminal-SNR checkpoint trains on the
schedule ComfyUI samples it with. Adding a family is one entry here plus its tests; a model no entry claims is
refused at Inject LoRA by name (:func:`detect`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import comfy.model_sampling
import comfy.utils
import torch

from ...lora_core.config import TARGET_PRESETS
from ...lora_core.formats.kohya import KohyaNaming
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
    modelspec_architectures: tuple[str, str]  # modelspec.architecture stem for (epsilon, v-prediction)
    size_conditioning: bool = False  # SDXL: original size, crop and target size per sample
    default_resolution: int = 512
    latent_channels: int = 4

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
        return dict(TARGET_PRESETS)  # the UNet families share module names (to_q ... proj_out)


SD1 = Family(
    name="SD1.x", model_configs=("SD15",), text_encoders=(TextEncoderRoot("te", "l", "lora_te"),),
    unet_naming="diffusers", base_model_versions=("sd_v1", "sd_v1"),
    modelspec_architectures=("stable-diffusion-v1", "stable-diffusion-v1"),
)
SD2 = Family(
    name="SD2.x", model_configs=("SD20",), text_encoders=(TextEncoderRoot("te", "h", "lora_te"),),
    unet_naming="diffusers", base_model_versions=("sd_v2", "sd_v2_768_v"),
    modelspec_architectures=("stable-diffusion-v2-512", "stable-diffusion-v2-768-v"), default_resolution=768,
)
SDXL = Family(
    name="SDXL", model_configs=("SDXL", "SSD1B", "Segmind_Vega", "KOALA_700M", "KOALA_1B"),
    text_encoders=(TextEncoderRoot("te1", "l", "lora_te1"), TextEncoderRoot("te2", "g", "lora_te2")),
    unet_naming="ldm", base_model_versions=("sdxl_base_v1-0", "sdxl_base_v1-0"),
    modelspec_architectures=("stable-diffusion-xl-v1-base", "stable-diffusion-xl-v1-base"),
    size_conditioning=True, default_resolution=1024,
)
FAMILIES: tuple[Family, ...] = (SD1, SD2, SDXL)
SUPPORTED = ", ".join(f.name for f in FAMILIES)


@dataclass(frozen=True)
class Objective:
    """The training target as plain data for the engine (no ComfyUI objects)."""

    prediction_type: str  # "epsilon" | "v_prediction"
    alphas_cumprod: torch.Tensor  # [T] float32, from ComfyUI's sigmas: 1 / (sigma^2 + 1)
    zero_terminal_snr: bool = False


@dataclass(frozen=True)
class Detected:
    family: Family
    objective: Objective

    @property
    def v_prediction(self) -> bool:
        return self.objective.prediction_type == "v_prediction"

    @property
    def base_model_version(self) -> str:
        return self.family.base_model_versions[int(self.v_prediction)]

    @property
    def modelspec_architecture(self) -> str:
        return self.family.modelspec_architectures[int(self.v_prediction)]


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
    if getattr(base, "concat_keys", ()) or _in_channels(base) != family.latent_channels:
        raise KilnUserError(
            f"this {family.name} checkpoint is an inpainting/depth/instruct variant ({_in_channels(base)} input "
            f"channels, extra inputs {list(getattr(base, 'concat_keys', ()))}); LoRA Kiln trains the plain "
            f"text-to-image {family.name} model. Load the base checkpoint."
        )
    return Detected(family, objective(patcher))


def _in_channels(base: Any) -> int:
    return int(base.model_config.unet_config.get("in_channels", 4))


def objective(patcher: Any) -> Objective:
    """The parametrisation and noise schedule ComfyUI samples this model with, or a refusal naming it.

    Only ComfyUI's discrete 1000-step schedule with an exactly epsilon or v parametrisation is accepted; ComfyUI's
    X0 / LCM / IMG_TO_IMG / EDM / flow / cascade samplings (also when a ModelSamplingDiscrete node patches them
    onto the model) would be trained with the wrong target; its eps / v_prediction (+ zsnr) settings are honoured.
    """
    sampling = patcher.get_model_object("model_sampling")
    bases = type(sampling).__bases__
    schedule = next((b for b in bases if issubclass(b, torch.nn.Module)), type(sampling))
    parametrisation = next((b for b in bases if not issubclass(b, torch.nn.Module)), None)
    kinds = {comfy.model_sampling.EPS: "epsilon", comfy.model_sampling.V_PREDICTION: "v_prediction"}
    sigmas = getattr(sampling, "sigmas", None)
    if (schedule is not comfy.model_sampling.ModelSamplingDiscrete or parametrisation not in kinds
            or sigmas is None or sigmas.shape[0] != 1000):
        steps = f", {sigmas.shape[0]} sigmas" if sigmas is not None else ""
        raise KilnUserError(
            f"this model samples with {schedule.__name__} + {getattr(parametrisation, '__name__', '?')}{steps}; "
            "LoRA Kiln trains the discrete 1000-step epsilon or v-prediction schedule of SD1.x/SD2.x/SDXL (a "
            "ModelSamplingDiscrete node set to eps or v_prediction is fine). Remove LCM/x0/EDM sampling patches from "
            "the MODEL you connect to Inject LoRA, or load a checkpoint Kiln supports."
        )
    sigmas = sigmas.detach().float().cpu()
    return Objective(kinds[parametrisation], 1.0 / (sigmas**2 + 1.0), bool(getattr(sampling, "zsnr", False)))


def kohya_naming(patcher: Any, family: Family | None = None) -> KohyaNaming:
    """kohya names: diffusers paths for SD1/SD2 UNets (ComfyUI's own LDM -> diffusers map), LDM paths for SDXL."""
    family = family or detect(patcher).family
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
