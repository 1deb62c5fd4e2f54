"""kohya-ss / A1111 LoRA files: names, export, import and ``ss_*`` / ``modelspec.*`` metadata.

A kohya key is ``<prefix>_<module path with "." replaced by "_">`` followed by ``.lora_down.weight``,
``.lora_up.weight`` or ``.alpha``. Which module path a layer has is the host's business: SD1.5 files use
diffusers paths (``lora_unet_down_blocks_0_attentions_0_...``), SDXL files use the original LDM paths
(``lora_unet_input_blocks_4_1_...``). The host derives a ``module path -> file path`` map from the model
itself (ComfyUI: ``comfy.utils.unet_to_diffusers``) and passes it in; nothing here is typed per model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import nn

from ..adapters import AdapterSpec, module_spec
from ..config import AdapterConfig
from ..fileio import atomic_save_safetensors, load_safetensors
from ..state import TrainState

SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
# Prefixes per component; SDXL uses "te1"/"te2" components for its two text encoders.
DEFAULT_PREFIXES = {"unet": "lora_unet", "te": "lora_te", "te1": "lora_te1", "te2": "lora_te2"}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class KohyaNaming:
    """Turns adapter names (``"unet.input_blocks.1.1.proj_in"``) into kohya names and back.

    ``path_maps[component]`` maps a module path of the live model to the path the file format uses;
    a component without a map keeps its paths.
    """

    path_maps: Mapping[str, Mapping[str, str]]
    prefixes: Mapping[str, str] = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.prefixes is None:
            object.__setattr__(self, "prefixes", dict(DEFAULT_PREFIXES))

    def kohya_name(self, adapter_name: str) -> str:
        component, _, path = adapter_name.partition(".")
        if component not in self.prefixes:
            raise ValueError(f"no kohya prefix for component {component!r} (adapter {adapter_name})")
        mapping = self.path_maps.get(component)
        if mapping is not None:
            if path not in mapping:
                raise ValueError(
                    f"layer {path!r} of the {component} has no name in the kohya format; "
                    "choose targets that exist in the standard model layout"
                )
            path = mapping[path]
        return f"{self.prefixes[component]}_{path.replace('.', '_')}"

    def names(self, adapter_names: Iterable[str]) -> dict[str, str]:
        out = {n: self.kohya_name(n) for n in adapter_names}
        seen: dict[str, str] = {}
        for adapter, kohya in out.items():
            if kohya in seen:
                raise ValueError(f"two layers map to the same kohya name {kohya}: {seen[kohya]} and {adapter}")
            seen[kohya] = adapter
        return out

    def export(self, state: TrainState, dtype: str = "fp16") -> dict[str, torch.Tensor]:
        return export_tensors(state, self, dtype)

    def all_names(self, roots: Mapping[str, nn.Module]) -> dict[str, str]:
        """kohya name -> adapter name for every Linear/Conv2d in ``roots`` that has a kohya name."""
        out: dict[str, str] = {}
        for component, root in roots.items():
            for path, module in root.named_modules():
                if not path or not isinstance(module, (nn.Linear, nn.Conv2d)):
                    continue
                try:
                    out[self.kohya_name(f"{component}.{path}")] = f"{component}.{path}"
                except ValueError:
                    continue
        return out


def _alpha_for_file(spec: AdapterSpec, use_rslora: bool) -> float:
    # Loaders compute scale = alpha / rank. rsLoRA trains with alpha / sqrt(rank): store the alpha that
    # gives the same scale under the standard rule.
    return spec.alpha * math.sqrt(spec.rank) if use_rslora else spec.alpha


def export_tensors(state: TrainState, naming: KohyaNaming, dtype: str = "fp16") -> dict[str, torch.Tensor]:
    """kohya tensors; every layer gets the same ``.alpha`` (the most common one).

    A layer whose alpha differs has the ratio folded into its ``lora_up`` weight, so the scale alpha/rank every
    loader applies gives the same result; diffusers' kohya converter, for one, mis-files per-layer alphas of
    attention projections (diffusers 0.42), so uniform alphas are the portable form.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not allowed; choose one of: {', '.join(DTYPES)}")
    out: dict[str, torch.Tensor] = {}
    names = naming.names(s.name for s in state.specs)
    alphas = [_alpha_for_file(spec, state.adapter_config.use_rslora) for spec in state.specs]
    common = Counter(alphas).most_common(1)[0][0] if alphas else 1.0
    for spec, alpha in zip(state.specs, alphas):
        key = names[spec.name]
        up = state.weights[f"{spec.name}.lora_up.weight"].float()
        if alpha != common:
            up = up * (alpha / common)
        out[f"{key}.lora_down.weight"] = state.weights[f"{spec.name}.lora_down.weight"].to(DTYPES[dtype]).contiguous()
        out[f"{key}.lora_up.weight"] = up.to(DTYPES[dtype]).contiguous()
        out[f"{key}.alpha"] = torch.tensor(common, dtype=torch.float32)
    return out


# (modelspec.architecture, modelspec.implementation) per ss_base_model_version. The implementation says which
# code reads the file as it is: a kohya LoRA is read by kohya-style loaders (ComfyUI's LoraLoader, A1111/Forge, and
# diffusers only through its kohya converter), so SD1/SD2 files name sd-scripts rather than "diffusers" (kohya's
# sai_model_spec writes "diffusers" there because the module paths inside the keys are diffusers paths; the file is
# still not a diffusers/peft LoRA). SDXL files keep Stability's generative-models, as kohya writes them.
KOHYA_IMPLEMENTATION = "https://github.com/kohya-ss/sd-scripts"
BFL_IMPLEMENTATION = "https://github.com/black-forest-labs/flux"
CHROMA_IMPLEMENTATION = "https://huggingface.co/lodestones/Chroma"  # kohya's modelspec for Chroma
ARCHITECTURES = {
    "sd_v1": ("stable-diffusion-v1", KOHYA_IMPLEMENTATION),
    "sd_v2": ("stable-diffusion-v2-512", KOHYA_IMPLEMENTATION),
    "sd_v2_768_v": ("stable-diffusion-v2-768-v", KOHYA_IMPLEMENTATION),
    "sdxl_base_v1-0": ("stable-diffusion-xl-v1-base", "https://github.com/Stability-AI/generative-models"),
    # SD3 as kohya's sd3 trainer names them (its ss_base_model_version is the MMDiT variant); the file is diffusers'
    # SD3 LoRA layout (formats/peft.py), read by diffusers and ComfyUI
    "medium": ("stable-diffusion-3-medium", "diffusers"),
    "5-medium": ("stable-diffusion-3-5-medium", "diffusers"),
    "5-large": ("stable-diffusion-3-5-large", "diffusers"),
    # FLUX.1 as kohya's flux trainer names them (ss_base_model_version "flux1" for both; modelspec tells them apart)
    "flux1": ("flux-1", BFL_IMPLEMENTATION),
    "flux1-dev": ("flux-1-dev", BFL_IMPLEMENTATION),
    "flux1-schnell": ("flux-1-schnell", BFL_IMPLEMENTATION),
    "chroma": ("chroma", CHROMA_IMPLEMENTATION),  # kohya: ss_base_model_version flux1, modelspec chroma
    # the 2026 families: ss_base_model_version as ai-toolkit writes it, modelspec as musubi-tuner's sai_model_spec
    "zimage": ("Z-Image", "https://github.com/Tongyi-MAI/Z-Image"),
    "flux2": ("Flux.2-dev", "https://github.com/black-forest-labs/flux2"),
    "flux2_klein_4b": ("Flux.2-klein-4b", "https://github.com/black-forest-labs/flux2"),
    "flux2_klein_9b": ("Flux.2-klein-9b", "https://github.com/black-forest-labs/flux2"),
    "qwen_image": ("Qwen-Image", "https://github.com/QwenLM/Qwen-Image"),
    # Wan (issue 23): ss_base_model_version per ComfyUI class, modelspec naming the checkpoint as Wan's releases do
    "wan21_t2v": ("Wan2.1-T2V", "https://github.com/Wan-Video/Wan2.1"),
    "wan21_t2v_1.3b": ("Wan2.1-T2V-1.3B", "https://github.com/Wan-Video/Wan2.1"),
    "wan21_t2v_14b": ("Wan2.1-T2V-14B", "https://github.com/Wan-Video/Wan2.1"),
    "wan22_ti2v_5b": ("Wan2.2-TI2V-5B", "https://github.com/Wan-Video/Wan2.2"),
}


def build_metadata(
    state: TrainState,
    *,
    title: str,
    base_model_version: str = "sd_v1",
    base_model_name: str = "",
    prediction_type: str = "epsilon",
    zero_terminal_snr: bool = False,
    train: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    model_spec: str = "",
    guidance: bool = False,
    model_flow_shift: float | None = None,
) -> dict[str, str]:
    """kohya ``ss_*`` and Stability ``modelspec.*`` metadata; every value is a string.

    ``train`` holds the last run's settings (learning_rate, optimizer, scheduler, ...). ``state.info``
    supplies the dataset facts (resolution, tag frequency, image count, start time). ``model_spec`` picks the
    modelspec architecture where the base model version does not (FLUX.1 dev / schnell are both ``flux1``);
    ``guidance``: the model is guidance-distilled, so the training guidance is recorded (``ss_guidance_scale``).
    ``model_flow_shift``: the flow model's own shift, recorded when the run used it (``flow_shift`` 0); None when it
    depends on the image size (FLUX.1 as loaded), and then no shift is recorded.
    """
    cfg: AdapterConfig = state.adapter_config
    info = dict(state.info)
    train = dict(train or {})
    now = time.time()
    started = float(info.get("training_started_at", now))
    resolution = tuple(info.get("resolution", (512, 512)))
    spec = model_spec or base_model_version
    arch, impl = ARCHITECTURES.get(spec, (spec, KOHYA_IMPLEMENTATION))
    flow = prediction_type == "flow"
    network_args: dict[str, str] = {}
    # k x k convs carry adapters with LoCon, and with the "all" targets under either algorithm: kohya-style readers
    # learn that (and their rank) from conv_dim / conv_alpha, so write what was trained, not what was asked
    kxk = [s for s in state.specs if s.kind == "conv" and tuple(s.kernel_size) != (1, 1)]
    if kxk:
        network_args = {"conv_dim": str(kxk[0].rank), "conv_alpha": str(kxk[0].alpha)}
    if cfg.use_rslora:
        network_args["rslora"] = "True"
    meta: dict[str, Any] = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": cfg.rank,
        "ss_network_alpha": cfg.alpha,
        "ss_network_dropout": cfg.dropout,
        "ss_network_args": json.dumps(network_args) if network_args else None,
        "ss_base_model_version": base_model_version,
        "ss_v2": base_model_version.startswith("sd_v2"),
        "ss_sd_model_name": base_model_name,
        "ss_output_name": title,
        "ss_resolution": f"({resolution[0]}, {resolution[1]})",
        "ss_steps": state.step,
        "ss_max_train_steps": state.step,
        "ss_epoch": state.epoch + (1 if state.batch_index else 0),
        "ss_num_train_images": info.get("num_train_images", 0),
        "ss_num_reg_images": 0,
        "ss_seed": state.seed,
        "ss_learning_rate": train.get("learning_rate"),
        "ss_unet_lr": train.get("learning_rate"),
        # 0 on the node means "the same as the UNet's": readers take the number literally, so write the effective one
        "ss_text_encoder_lr": train.get("text_encoder_lr") or train.get("learning_rate"),
        "ss_optimizer": train.get("optimizer"),
        "ss_lr_scheduler": train.get("scheduler"),
        "ss_lr_warmup_steps": train.get("warmup_steps"),
        "ss_batch_size_per_device": train.get("batch_size"),
        "ss_gradient_accumulation_steps": train.get("grad_accum"),
        "ss_max_grad_norm": train.get("max_grad_norm"),
        "ss_mixed_precision": train.get("precision"),
        "ss_gradient_checkpointing": train.get("gradient_checkpointing"),
        "ss_min_snr_gamma": train.get("min_snr_gamma"),
        "ss_noise_offset": train.get("noise_offset"),
        "ss_cache_latents": True,
        "ss_tag_frequency": json.dumps(info.get("tag_frequency", {}), ensure_ascii=False),
        "ss_dataset_dirs": json.dumps(info.get("dataset_dirs", {}), ensure_ascii=False),
        "ss_training_started_at": started,
        "ss_training_finished_at": now,
        "ss_training_comment": info.get("training_comment", "trained with LoRA Kiln"),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": impl,
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.date": datetime.fromtimestamp(now, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        # modelspec names epsilon and v only; a flow model's objective is in ss_timestep_sampling & co
        "modelspec.prediction_type": None if flow else "v" if prediction_type == "v_prediction" else "epsilon",
        # kohya's keys for v-prediction models (its --v_parameterization and --zero_terminal_snr flags)
        "ss_v_parameterization": prediction_type == "v_prediction",
        "ss_zero_terminal_snr": zero_terminal_snr,
        # flow models, as kohya's SD3/FLUX trainers record them (0 flow shift: the model's own)
        "ss_timestep_sampling": train.get("timestep_sampling") if flow else None,
        "ss_discrete_flow_shift": (train.get("flow_shift") or model_flow_shift) if flow else None,
        "ss_weighting_scheme": train.get("loss_weighting") if flow else None,
        "ss_guidance_scale": train.get("guidance") if guidance else None,
    }
    if info.get("trigger_word"):
        meta["modelspec.trigger_phrase"] = info["trigger_word"]
    meta.update(extra or {})
    return {k: (v if isinstance(v, str) else json.dumps(v) if isinstance(v, (dict, list)) else str(v))
            for k, v in meta.items() if v is not None}


LEGACY_HASH_OFFSET, LEGACY_HASH_LENGTH = 0x100000, 0x10000


def addnet_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` exactly as kohya sd-scripts precalculates them.

    Both hash the file as sd-scripts would write it with only its ``ss_*`` metadata (the training facts; anything
    a user adds later must not change the hash): the model hash is the SHA-256 of everything after the header
    (the tensor bytes), the legacy hash the first 8 hex digits of the SHA-256 of the 64 KiB at offset 1 MiB (the old
    A1111 ``model_hash``; a file shorter than that hashes the empty string, as in kohya).
    """
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=ss_only)
    header = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header:]).hexdigest()
    legacy = hashlib.sha256(data[LEGACY_HASH_OFFSET:LEGACY_HASH_OFFSET + LEGACY_HASH_LENGTH]).hexdigest()[:8]
    return model_hash, legacy


def with_addnet_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """``metadata`` plus ``sshs_model_hash`` / ``sshs_legacy_hash`` for these tensors: call it last."""
    model_hash, legacy = addnet_hashes(tensors, metadata)
    return {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy}


def save_lora(
    state: TrainState,
    path: str | os.PathLike[str],
    naming: KohyaNaming,
    *,
    dtype: str = "fp16",
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a kohya-format ``.safetensors`` atomically (temp file + rename), with kohya's two model hashes."""
    tensors = export_tensors(state, naming, dtype)
    return atomic_save_safetensors(tensors, path, with_addnet_hashes(tensors, metadata or {}))


def group_kohya_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{"lora_unet_x": {"down": ..., "up": ..., "alpha": ...}}``; other adapter kinds are refused by name."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unsupported = []
    for key, value in tensors.items():
        for suffix, part in zip(SUFFIXES, ("down", "up", "alpha")):
            if key.endswith(suffix):
                groups.setdefault(key[: -len(suffix)], {})[part] = value
                break
        else:
            unsupported.append(key)
    if unsupported:
        raise ValueError(
            f"unsupported keys in the LoRA file (LoHa/LoKr/DoRA or non-LoRA data?): {', '.join(sorted(unsupported)[:5])}"
            "; only plain LoRA/LoCon (lora_down/lora_up/alpha) can be trained further"
        )
    for base, parts in groups.items():
        missing = {"down", "up"} - set(parts)
        if missing:
            raise ValueError(f"{base}: the file has no {' / '.join(sorted(missing))} weight for this layer")
    return groups


def load_lora_as_state(
    path: str | os.PathLike[str],
    roots: Mapping[str, nn.Module],
    naming: KohyaNaming,
    config: AdapterConfig,
    seed: int = 0,
) -> TrainState:
    """Start training from an existing kohya LoRA: its layers, ranks, alphas and weights are kept.

    Every key must name a layer of ``roots`` with matching shapes; the error names the first that does not.
    """
    tensors, metadata = load_safetensors(path)
    groups = group_kohya_tensors(tensors)
    if not groups:
        raise ValueError(f"{Path(path).name}: no LoRA weights found in the file")
    known = naming.all_names(roots)
    unknown = sorted(set(groups) - set(known))
    if unknown:
        raise ValueError(
            f"{Path(path).name}: {len(unknown)} key(s) match no layer of this model, e.g. {unknown[0]} "
            "(is the LoRA made for another base model, e.g. SDXL vs SD1.5?)"
        )
    specs: list[AdapterSpec] = []
    weights: dict[str, torch.Tensor] = {}
    for base in sorted(groups, key=lambda b: known[b]):
        parts = groups[base]
        adapter_name = known[base]
        component, _, module_path = adapter_name.partition(".")
        module = roots[component].get_submodule(module_path)
        down, up = parts["down"].float(), parts["up"].float()
        rank = down.shape[0]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
        spec = module_spec(module, adapter_name, config, rank=rank, alpha=alpha)
        if spec is None:
            raise ValueError(f"{base}: layer {module_path} cannot carry an adapter")
        for part, tensor, want in (("lora_down", down, spec.down_shape), ("lora_up", up, spec.up_shape)):
            if tuple(tensor.shape) != tuple(want):
                raise ValueError(
                    f"{base}.{part}.weight has shape {tuple(tensor.shape)} but this model's {module_path} "
                    f"needs {tuple(want)}: the LoRA was made for a different model"
                )
            weights[f"{adapter_name}.{part}.weight"] = tensor.clone()
        specs.append(spec)
    # Adopt the file's rank/alpha in the config where they are uniform, so metadata stays truthful.
    ranks = {s.rank for s in specs}
    alphas = {s.alpha for s in specs}
    file_config = AdapterConfig.from_dict(
        {**config.to_dict(), "rank": ranks.pop() if len(ranks) == 1 else config.rank,
         "alpha": alphas.pop() if len(alphas) == 1 else config.alpha, "use_rslora": False}
    )
    info = {"imported_from": Path(path).name}
    if "ss_steps" in metadata:
        info["imported_steps"] = metadata["ss_steps"]
    return TrainState(adapter_config=file_config, specs=tuple(specs), weights=weights, seed=seed, info=info)
