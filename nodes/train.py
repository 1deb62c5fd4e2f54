"""KilnTrainSteps: N optimizer steps on the state; chainable, cancel-safe, with progress and previews."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from comfy_api.latest import io

from ..lora_core import TrainConfig, settings
from ..lora_core.config import (
    AUTO,
    AUTO_GAMMA,
    EXPERTS,
    LOSS_WEIGHTINGS,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULERS,
    TIMESTEP_SAMPLING,
)
from ..lora_core.plot import loss_chart
from .corridor import patching, reporting, text_encoders
from .corridor.errors import KilnUserError
from .objects import KilnDataset, KilnRun
from .sockets import CATEGORY, KilnDatasetType, KilnStateType
from .training_run import PreviewSettings, RunRequest, TrainingRun


def image_from_pil(img: object) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


class KilnTrainSteps(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KilnTrainSteps",
            display_name="Train Steps (Kiln)",
            category=f"{CATEGORY}/train",
            description=(
                "Runs N optimizer steps. Chain several to train, look at a KSampler preview, and train on: step "
                "count, optimizer and schedule continue exactly. Cancel saves a checkpoint of the state reached."
            ),
            inputs=[
                KilnStateType.Input("state", tooltip="From Inject LoRA, another Train Steps or Load Checkpoint."),
                KilnDatasetType.Input("dataset", tooltip="From Load Dataset (or Auto Caption)."),
                io.Int.Input("steps", default=100, min=1, max=1_000_000, tooltip="Optimizer steps to run in this node."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-5, round=False, tooltip=(
                    "Peak learning rate. 1e-4 is a safe start for SD1.5 LoRAs with AdamW; Prodigy wants 1.0.")),
                io.Combo.Input("optimizer", options=list(OPTIMIZERS), default="adamw", tooltip=(
                    "adamw is built in; adamw8bit, lion and prodigy need bitsandbytes, lion-pytorch or prodigyopt.")),
                io.Combo.Input("scheduler", options=list(SCHEDULERS), default="constant", tooltip=(
                    "Learning-rate curve over schedule_steps (after warmup).")),
                io.Int.Input("warmup_steps", default=0, min=0, max=1_000_000, tooltip="Linear warm-up from 0."),
                io.Int.Input("schedule_steps", default=0, min=0, max=10_000_000, tooltip=(
                    "Length of the whole schedule across chained nodes (e.g. 1000 for two nodes of 500). "
                    "0 = the schedule ends with this node.")),
                io.Int.Input("batch_size", default=1, min=1, max=256, tooltip=(
                    "Images per step (per bucket). Lower it if you run out of memory.")),
                io.Int.Input("grad_accum", default=1, min=1, max=256, tooltip=(
                    "Gradient accumulation: effective batch = batch_size x grad_accum.")),
                io.Combo.Input("precision", options=list(PRECISIONS), default="auto", tooltip=(
                    "auto: bf16 on GPUs that support it, fp32 on CPU. fp16 uses loss scaling.")),
                io.Boolean.Input("gradient_checkpointing", default=False, tooltip=(
                    "Recompute activations in the backward pass: much less memory, about 30% slower.")),
                io.Float.Input("min_snr_gamma", default=AUTO_GAMMA, min=AUTO_GAMMA, max=20.0, step=0.5, tooltip=(
                    "Min-SNR-gamma loss weighting of DDPM models (SD1/SD2/SDXL; 5 is common; 0 = off). -1 = auto: "
                    "5 on SD1/SD2/SDXL, off on flow models (SD3, FLUX, Z-Image, ...), which refuse a value above 0.")),
                io.Float.Input("noise_offset", default=0.0, min=0.0, max=0.5, step=0.01, tooltip=(
                    "Offset noise for darker darks / brighter brights (0.05-0.1 typical; 0 = off).")),
                io.Int.Input("save_every", default=0, min=0, max=1_000_000, tooltip=(
                    "Write a resumable checkpoint every N global steps to output/lora_kiln/<name>/checkpoints (0 = off).")),
                io.Int.Input("preview_every", default=0, min=0, max=1_000_000, tooltip=(
                    "Render a preview image with the current LoRA every N steps; shown on this node (0 = off).")),
                io.String.Input("preview_prompt", default="", multiline=True, tooltip=(
                    "Prompt for the previews (empty: the trigger word / first caption).")),
                io.Int.Input("preview_seed", default=0, min=0, max=2**63 - 1, control_after_generate=False,
                             tooltip="Seed for the preview images (same seed = comparable previews)."),
                io.Int.Input("preview_size", default=512, min=64, max=2048, step=64, tooltip="Preview width and height."),
                io.Int.Input("preview_steps", default=0, min=0, max=200, tooltip=(
                    "Sampler steps for each preview. 0 = auto: the model's usual count (20; fewer for step-distilled "
                    "models).")),
                io.Float.Input("text_encoder_lr", default=0.0, min=0.0, max=1.0, step=1e-6, round=False, optional=True, tooltip=(
                    "Learning rate of the text-encoder adapters (when Inject LoRA trains them); 0 = learning_rate. "
                    "kohya's usual choice is half the UNet's, e.g. 5e-5.")),
                io.Float.Input("max_grad_norm", default=1.0, min=0.0, max=1000.0, step=0.1, optional=True, tooltip=(
                    "Clip the gradient norm to this value before each step (0 = no clipping).")),
                io.Boolean.Input("retrain", default=False, optional=True, tooltip=(
                    "Train again from the start state. Off: a run identical to one already finished (same start "
                    "state, data, settings and base model) is reused with 0 steps, and an interrupted one resumes "
                    "from its last checkpoint; preview and save_every changes never retrain.")),
                io.Combo.Input("timestep_sampling", options=list(TIMESTEP_SAMPLING), default=AUTO, optional=True,
                               tooltip=(
                    "How training noise levels are drawn. uniform: evenly. logit_normal: more often in the middle "
                    "(the SD3 paper's choice). auto: uniform on SD1/SD2/SDXL, logit_normal on flow models.")),
                io.Float.Input("flow_shift", default=0.0, min=0.0, max=100.0, step=0.05, optional=True, tooltip=(
                    "Flow-matching models (SD3, FLUX, Z-Image, Qwen-Image, ...) only: the time shift of the noise "
                    "levels; higher trains at noisier levels. 0 = auto: the model's own (SD3: 3.0, or a ModelSampling* "
                    "node's; FLUX.1/FLUX.2 as loaded: per image size). Keep 0 for SD1/SDXL.")),
                io.Combo.Input("loss_weighting", options=list(LOSS_WEIGHTINGS), default="none", optional=True, tooltip=(
                    "Flow-matching models (SD3, FLUX, Z-Image, ...) only: per-noise-level loss weights as in "
                    "diffusers' SD3 trainer (none, sigma_sqrt, cosmap). SD1/SDXL use min_snr_gamma instead.")),
                io.Int.Input("keep_checkpoints", default=0, min=0, max=10_000, optional=True, tooltip=(
                    "Keep only the newest N save_every checkpoints of this run (0 = keep all). The checkpoint "
                    "written on Cancel is always kept; an old one is removed only after the new one is written.")),
                io.Float.Input("preview_cfg", default=0.0, min=0.0, max=30.0, step=0.1, optional=True, tooltip=(
                    "CFG of the previews. 0 = auto: the model's usual value (7 for SD1/SDXL, 1 for guidance- or "
                    "step-distilled models such as FLUX.1-dev and Z-Image Turbo, 4 for Chroma, Qwen-Image and "
                    "others). Z-Image Base wants about 4 with 30 steps.")),
                io.Float.Input("guidance", default=1.0, min=0.0, max=100.0, step=0.1, optional=True, tooltip=(
                    "Guidance-distilled models (FLUX.1-dev, FLUX.2 dev): the guidance value the model is given while "
                    "training. 1.0 is kohya's recommendation for LoRAs; sample them with a FluxGuidance of about "
                    "3.5 as usual. Other models ignore it.")),
                io.Combo.Input("expert", options=list(EXPERTS), default="all", optional=True, tooltip=(
                    "Two-expert video models (Wan 2.2 14B text-to-video: a high-noise and a low-noise checkpoint, one "
                    "LoRA each): high_noise trains the noise levels the high-noise model samples (sigma 0.875 to 1), "
                    "low_noise the rest. Wire one Inject LoRA + Train Steps per expert checkpoint. all: every level "
                    "(every other model).")),
            ],
            outputs=[
                KilnStateType.Output(display_name="state", tooltip="The trained state (the input stays as it was)."),
                io.Model.Output(display_name="model", tooltip="The model with the LoRA as trained so far: wire into a KSampler."),
                io.Image.Output(display_name="loss_graph", tooltip="The loss curve of the whole run so far."),
                io.Image.Output(display_name="previews", tooltip="Preview images rendered during this node (or the loss graph)."),
                io.Clip.Output(display_name="clip", tooltip="The CLIP with the text-encoder LoRA as trained so far "
                                                            "(the CLIP given to Inject LoRA when only the UNet trains)."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, state: KilnRun, dataset: KilnDataset, steps: int, learning_rate: float, optimizer: str,
                scheduler: str, warmup_steps: int, schedule_steps: int, batch_size: int, grad_accum: int,
                precision: str, gradient_checkpointing: bool, min_snr_gamma: float, noise_offset: float,
                save_every: int, preview_every: int, preview_prompt: str, preview_seed: int, preview_size: int,
                preview_steps: int, text_encoder_lr: float = 0.0, max_grad_norm: float = 1.0,
                retrain: bool = False, timestep_sampling: str = AUTO, flow_shift: float = 0.0,
                loss_weighting: str = "none", keep_checkpoints: int = 0, guidance: float = 1.0,
                preview_cfg: float = 0.0, expert: str = "all") -> io.NodeOutput:
        run = state
        # every input the settings table maps to a TrainConfig field (lora_core/settings.py); the seed is the state's
        config = TrainConfig(**settings.engine_kwargs_from_node(TrainConfig, settings.TRAIN_NODE, locals()))
        if not run.detected.guidance:  # only guidance-distilled models read it: changing it elsewhere is no new run
            config = dataclasses.replace(config, guidance=TrainConfig.guidance)
        auto = run.detected.auto_defaults
        resolved = {name: getattr(auto, name) for name in config.auto_fields}
        config = config.resolved(auto)  # the run (and its digest) sees the values, never "auto"
        if config.expert != "all" and not run.detected.objective.expert_boundary:  # before anything loads
            raise KilnUserError(
                f"expert={config.expert!r} is for two-expert models (Wan 2.2 14B: a high-noise and a low-noise "
                f"checkpoint, one LoRA each); this {run.detected.family.name} model is a single one, trained on every "
                "noise level: set expert to all")
        preview_steps = preview_steps or run.detected.family.preview_steps  # 0: auto, the family's
        preview_cfg = preview_cfg or run.detected.family.preview_cfg
        if run.trains_text_encoder and run.clip is None:
            raise KilnUserError("this state trains the text encoder but carries no CLIP; rebuild it with Inject LoRA")
        prompt = preview_prompt.strip() or next((dataset.caption(r) for r in dataset.records), "")
        request = RunRequest(
            run=run, dataset=dataset, config=config, steps=steps, save_every=save_every,
            keep_checkpoints=keep_checkpoints, retrain=retrain, node_id=cls.hidden.unique_id,
            preview=PreviewSettings(prompt, preview_seed, preview_size, preview_steps, preview_every, preview_cfg),
        )
        outcome = TrainingRun(request).execute()
        result_state = outcome.state
        new_run = run.replace(state=result_state, train_settings=config.to_dict())

        chart = image_from_pil(loss_chart(result_state.history))
        preview_images = torch.cat([img for _, img in outcome.previews], dim=0) if outcome.previews else chart
        last = result_state.history[-1] if result_state.history else (0, float("nan"), 0.0)
        text = f"{outcome.did} · step {last[0]} · loss {last[1]:.4f} · lr {last[2]:.3g}"
        if resolved:
            text += f" · auto for {run.detected.family.name}: " + ", ".join(f"{k} {v:g}" if isinstance(v, float)
                                                                         else f"{k} {v}" for k, v in resolved.items())
            text += f" ({auto.source})"
        if missing := outcome.missing_previews:
            text += f" · no snapshot kept for the previews of step {', '.join(map(str, missing))} (retrain renders them)"
        reporting.send_text(cls.hidden.unique_id, outcome.did)
        # For the live view (web/js/kiln_train_view.js), which redraws them after a page reload from the history.
        # Lists only (ComfyUI concatenates ui lists); nothing of this is stored in the workflow.
        history = [list(h) for h in result_state.history[-2000:]]
        ui = {"text": [text], "kiln_history": history, "kiln_previews": outcome.preview_files}
        out_clip = text_encoders.clip_with_lora(run.clip, result_state, run.naming) if run.clip is not None else dataset.clip
        return io.NodeOutput(new_run, patching.with_adapters(run.model, result_state), chart, preview_images, out_clip, ui=ui)
