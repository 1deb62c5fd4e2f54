"""KilnInjectLoRA: rank-r adapters on ComfyUI's already-loaded model, per clone (the base is never mutated)."""

from __future__ import annotations

import dataclasses
import logging
import time

from comfy_api.latest import io

from ..lora_core import AdapterConfig, AdapterSet, AdapterSpec, TrainState, UnadaptableLayerError, target_counts
from ..lora_core.adapters import structural_targets
from ..lora_core.config import ALGORITHMS, TARGET_PRESETS
from ..lora_core.formats.kohya import load_lora_as_state
from .corridor import compat, families, folders, patching, text_encoders
from .corridor.errors import KilnUserError
from .file_names import check_run_name
from .model_source import model_file_name
from .objects import KilnRun
from .sockets import CATEGORY, KilnStateType

NO_LORA = "none"
logger = logging.getLogger(__name__)


def adapted_per_target(specs: tuple[AdapterSpec, ...] | list[AdapterSpec], config: AdapterConfig) -> str:
    """``unet: to_q 16, to_k 16, …; te: q_proj 12, …``: how many layers each target matched in this model (the
    presets name every family's layers; only the ones found here are listed), LoCon's k x k convs on their own."""
    parts = []
    for component, targets in (("unet", config.unet_targets), ("te", config.text_targets)):
        mine = [s for s in specs if (s.name.startswith("unet.") if component == "unet" else not s.name.startswith("unet."))]
        if not mine:
            continue
        counts = {k: v for k, v in target_counts(mine, targets).items() if v}
        if config.algorithm == "locon" and isinstance(targets, str) and targets != "all":
            counts["k x k conv (locon)"] = sum(1 for s in mine if s.kind == "conv" and s.kernel_size != (1, 1))
        parts.append(f"{component}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return "; ".join(parts)


class KilnInjectLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KilnInjectLoRA",
            display_name="Inject LoRA (Kiln)",
            category=f"{CATEGORY}/train",
            description=(
                "Puts trainable LoRA adapters on the model. The input MODEL stays untouched: the adapters live on "
                "a copy, so other branches of the graph render exactly as before."
            ),
            inputs=[
                io.Model.Input("model", tooltip=(
                    "The model to train a LoRA for: SD1.x, SD2.x, SDXL (Pony, Illustrious, NoobAI, ...), SD3.5, FLUX.1, "
                    "Chroma, Z-Image, FLUX.2, Qwen-Image, and other image models ComfyUI loads (generically).")),
                io.String.Input("name", default="my_lora", tooltip=(
                    "Name of this LoRA: used for checkpoints, logs and the default file name.")),
                io.Int.Input("rank", default=16, min=1, max=1024, tooltip=(
                    "Adapter rank (network_dim): capacity of the LoRA. 8-32 is typical for a character or style.")),
                io.Float.Input("alpha", default=16.0, min=0.01, max=1024.0, step=0.01, tooltip=(
                    "network_alpha: the update is scaled by alpha/rank. alpha = rank means scale 1.")),
                io.Combo.Input("targets", options=list(TARGET_PRESETS), default="attn+ff", tooltip=(
                    "Which layers get adapters: attn (attention only), attn+ff (kohya's default: attention, "
                    "feed-forward and projections), all (every Linear/Conv). On a model without a family entry the "
                    "attention and MLP layers are found by structure.")),
                io.Combo.Input("algorithm", options=list(ALGORITHMS), default="lora", tooltip=(
                    "lora: Linear and 1x1 layers. locon: also every 3x3 conv (LyCORIS LoCon, more capacity).")),
                io.Int.Input("conv_rank", default=0, min=0, max=1024, tooltip=(
                    "Rank of the 3x3 conv adapters with locon; 0 uses the same rank.")),
                io.Float.Input("dropout", default=0.0, min=0.0, max=0.9, step=0.01, tooltip=(
                    "Dropout on the adapter input during training (0 = off).")),
                io.Combo.Input("init_lora", options=[NO_LORA, *folders.lora_names()], default=NO_LORA, tooltip=(
                    "Start from an existing kohya LoRA in models/loras (its layers, rank and alpha win).")),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=False, tooltip=(
                    "Seed for the adapter initialisation and for all training randomness (batch order, noise).")),
                io.Boolean.Input("train_text_encoder", default=False, optional=True, tooltip=(
                    "Also put adapters on the text encoder (q/k/v/out, fc1, fc2 of CLIP). Needs the clip input. "
                    "Learns trigger words faster; set a lower text_encoder_lr in Train Steps.")),
                io.Clip.Input("clip", optional=True, tooltip=(
                    "The CLIP of the same checkpoint: needed for train_text_encoder (and to continue a LoRA that "
                    "has text-encoder weights).")),
            ],
            outputs=[
                KilnStateType.Output(display_name="state", tooltip="The training state; wire into Train Steps."),
                io.Model.Output(display_name="model", tooltip="A copy of the model with the (untrained) adapters."),
                io.Clip.Output(display_name="clip", tooltip="A copy of the CLIP with the text-encoder adapters "
                                                            "(the input CLIP when the text encoder is not trained)."),
            ],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],  # to name the checkpoint file (ss_sd_model_name)
        )

    @classmethod
    def execute(
        cls, model: object, name: str, rank: int, alpha: float, targets: str, algorithm: str, conv_rank: int,
        dropout: float, init_lora: str, seed: int, train_text_encoder: bool = False, clip: object = None,
    ) -> io.NodeOutput:
        if not name.strip():
            raise KilnUserError("name is empty: give the LoRA a name, e.g. 'my_lora'")
        try:
            check_run_name(folders.runs_directory(), name)
        except ValueError as exc:
            raise KilnUserError(str(exc)) from None
        if train_text_encoder and clip is None:
            raise KilnUserError(
                "train_text_encoder is on but no CLIP is connected: wire Load Checkpoint's CLIP into Inject LoRA"
            )
        if train_text_encoder and compat.is_dynamic(clip.patcher):
            raise KilnUserError(
                "train_text_encoder is not offered while ComfyUI loads the text encoder with Dynamic VRAM (its weights "
                "stream per layer and cannot be kept for backward): start ComfyUI with --disable-dynamic-vram, or "
                "turn train_text_encoder off (the UNet LoRA trains either way)"
            )
        config = AdapterConfig(rank=rank, alpha=alpha, unet_targets=targets, algorithm=algorithm,
                               conv_rank=conv_rank or None, dropout=dropout,
                               text_targets="text" if train_text_encoder else ())
        base = patching.strip_adapters(model)
        detected = families.detect(base)  # refuses what Kiln cannot train, naming the model and what is supported
        family = detected.family
        if train_text_encoder and not family.text_encoders:
            raise KilnUserError(
                f"train_text_encoder is not offered for {family.name}: turn it off (the UNet/transformer LoRA is what "
                f"{family.name} LoRAs train; the text encoders encode the captions once)"
            )
        if init_lora != NO_LORA and family.export_format != "kohya":
            raise KilnUserError(
                f"init_lora is not supported for {family.name} yet: set it to none, or continue a Kiln run from its "
                "checkpoint with Load Checkpoint (Kiln)"
            )
        roots = patching.unet_roots(base)
        if family.generic and targets != "all":  # names no preset knows: attention / MLP layers found by structure
            found = structural_targets(roots["unet"])[targets]
            if not found:
                raise KilnUserError(
                    f"{family.name}: no attention or MLP layers were found in this model's structure for targets "
                    f"{targets!r}; use targets all (every Linear layer)")
            config = dataclasses.replace(config, unet_targets=found)
        if clip is not None and (train_text_encoder or init_lora != NO_LORA):
            roots.update(text_encoders.text_roots(clip, family))
        naming = families.lora_naming(base, family)
        if init_lora != NO_LORA:
            try:
                state = load_lora_as_state(folders.lora_path(init_lora), roots, naming, config, seed=seed)
            except ValueError as exc:
                if "lora_te" in str(exc) and not set(family.components) & set(roots):
                    raise KilnUserError(
                        f"{init_lora} has text-encoder weights: connect the CLIP to Inject LoRA to continue it"
                    ) from None
                raise
        else:
            try:
                state = TrainState.from_adapters(AdapterSet.create(roots, config, seed=seed), seed=seed)
            except UnadaptableLayerError as exc:
                raise KilnUserError(f"{family.name}: {exc}") from None
        naming.names(s.name for s in state.specs)  # every adapter must have a kohya name: fail now, not at save
        state = state.replace(info={**state.info, "training_started_at": time.time()})
        run = KilnRun(state=state, model=base, name=name.strip(), naming=naming, detected=detected, clip=clip,
                      base_model_name=model_file_name(cls.hidden.prompt, cls.hidden.unique_id))
        n_params = sum(w.numel() for w in state.weights.values())
        te = sum(1 for s in state.specs if not s.name.startswith("unet."))
        text = f"{len(state.specs)} adapters ({te} on the text encoder), {n_params / 1e6:.2f} M trainable parameters"
        report = adapted_per_target(state.specs, config)
        logger.info("LoRA Kiln: %s; adapted layers per target: %s", text, report)
        text += f"\nadapted layers per target: {report}"
        out_clip = text_encoders.clip_with_lora(clip, state, naming) if clip is not None else None
        return io.NodeOutput(run, patching.with_adapters(base, state), out_clip, ui={"text": [text]})
