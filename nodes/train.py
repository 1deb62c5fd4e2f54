"""KilnTrainSteps: N optimizer steps on the state; chainable, cancel-safe, with progress and previews."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch
from comfy_api.latest import io

from ..lora_core import TrainCallback, TrainConfig, Trainer, TrainingError, TrainResult, TrainState, settings
from ..lora_core.config import LOSS_WEIGHTINGS, OPTIMIZERS, PRECISIONS, SCHEDULERS, TIMESTEP_SAMPLING
from ..lora_core.fileio import NotEnoughSpace
from ..lora_core.plot import loss_chart
from ..lora_core.tb import TensorBoardCallback
from . import requeue
from .corridor import denoiser, devices, folders, patching, previews, reporting, text_encoders
from .corridor.errors import KilnUserError
from .objects import KilnDataset, KilnRun
from .sockets import CATEGORY, KilnDatasetType, KilnStateType

logger = logging.getLogger(__name__)


def checkpoint_path(run: KilnRun, state: TrainState, tag: str) -> Path:
    folder = folders.checkpoint_directory(run.name)
    return folder / f"{folder.parent.name}_step{state.step:06d}{tag}.kiln.safetensors"


def save_checkpoint(run: KilnRun, state: TrainState, tag: str = "", digest: str | None = None,
                    target: int = 0) -> Path:
    """A resumable checkpoint; with the run's ``digest`` (and ``target`` step) a re-queue of it resumes from here.
    Too little free space is refused before writing, with the folder as the user sees it."""
    try:
        path = state.save(checkpoint_path(run, state, tag), extra_metadata={"kiln_name": run.name},
                          plain_metadata=requeue.checkpoint_metadata_for(digest, target, state.step))
    except NotEnoughSpace as exc:
        raise KilnUserError(f"{exc.describe(folders.display_path(exc.folder))}. Checkpoints take less room with "
                            "keep_checkpoints (the newest N only) or a larger save_every") from None
    logger.info("LoRA Kiln: checkpoint written to %s", path)
    return path


class _Checkpoints(TrainCallback):
    """Writes the ``save_every`` checkpoints; with ``keep`` > 0 only the newest ``keep`` of those this run wrote stay
    (kohya's save_last_n_*: older ones are removed after the new one is safely written; Cancel's and Save LoRA's
    checkpoints are never removed, nor anything another run wrote)."""

    def __init__(self, run: KilnRun, digest: str | None = None, target: int = 0, keep: int = 0) -> None:
        self.run = run
        self.digest = digest
        self.target = target
        self.keep = keep
        self.paths: list[Path] = []

    def on_checkpoint(self, state: TrainState) -> None:
        path = save_checkpoint(self.run, state, digest=self.digest, target=self.target)
        self.paths = [p for p in self.paths if p != path] + [path]
        if self.keep > 0:
            for old in self.paths[: -self.keep]:
                try:
                    old.unlink(missing_ok=True)
                except OSError as exc:
                    logger.warning("LoRA Kiln: could not remove the old checkpoint %s: %s", old, exc)
            self.paths = self.paths[-self.keep :]


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
                io.Float.Input("min_snr_gamma", default=5.0, min=0.0, max=20.0, step=0.5, tooltip=(
                    "Min-SNR-gamma loss weighting (5 is common; 0 = off).")),
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
                io.Int.Input("preview_steps", default=20, min=1, max=200, tooltip="Sampler steps for each preview."),
                io.Float.Input("text_encoder_lr", default=0.0, min=0.0, max=1.0, step=1e-6, round=False, optional=True, tooltip=(
                    "Learning rate of the text-encoder adapters (when Inject LoRA trains them); 0 = learning_rate. "
                    "kohya's usual choice is half the UNet's, e.g. 5e-5.")),
                io.Float.Input("max_grad_norm", default=1.0, min=0.0, max=1000.0, step=0.1, optional=True, tooltip=(
                    "Clip the gradient norm to this value before each step (0 = no clipping).")),
                io.Boolean.Input("retrain", default=False, optional=True, tooltip=(
                    "Train again from the start state. Off: a run identical to one already finished (same start "
                    "state, data, settings and base model) is reused with 0 steps, and an interrupted one resumes "
                    "from its last checkpoint; preview and save_every changes never retrain.")),
                io.Combo.Input("timestep_sampling", options=list(TIMESTEP_SAMPLING), default="uniform", optional=True,
                               tooltip=(
                    "How training noise levels are drawn. uniform: evenly. logit_normal: more often in the middle "
                    "(the SD3 paper's choice; recommended for SD3/Flux).")),
                io.Float.Input("flow_shift", default=0.0, min=0.0, max=100.0, step=0.05, optional=True, tooltip=(
                    "Flow-matching models (SD3, Flux) only: the time shift of the noise levels; higher trains at "
                    "noisier levels. 0 = the model's own (SD3: 3.0, or a ModelSamplingSD3 node's). Keep 0 for SD1/SDXL.")),
                io.Combo.Input("loss_weighting", options=list(LOSS_WEIGHTINGS), default="none", optional=True, tooltip=(
                    "Flow-matching models (SD3, Flux) only: per-noise-level loss weights as in diffusers' SD3 "
                    "trainer (none, sigma_sqrt, cosmap). SD1/SDXL use min_snr_gamma instead (set it to 0 for flow "
                    "models).")),
                io.Int.Input("keep_checkpoints", default=0, min=0, max=10_000, optional=True, tooltip=(
                    "Keep only the newest N save_every checkpoints of this run (0 = keep all). The checkpoint "
                    "written on Cancel is always kept; an old one is removed only after the new one is written.")),
                io.Float.Input("guidance", default=1.0, min=0.0, max=100.0, step=0.1, optional=True, tooltip=(
                    "Flux.1-dev only (a guidance-distilled model): the guidance value the model is given while "
                    "training. 1.0 is kohya's recommendation for LoRAs; sample them with a FluxGuidance of about "
                    "3.5 as usual. Other models ignore it.")),
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
                retrain: bool = False, timestep_sampling: str = "uniform", flow_shift: float = 0.0,
                loss_weighting: str = "none", keep_checkpoints: int = 0, guidance: float = 1.0) -> io.NodeOutput:
        run = state
        node_id = cls.hidden.unique_id
        # every input the settings table maps to a TrainConfig field (lora_core/settings.py); the seed is the state's
        config = TrainConfig(**settings.engine_kwargs_from_node(TrainConfig, settings.TRAIN_NODE, locals()))
        if not run.detected.guidance:  # only guidance-distilled models read it: changing it elsewhere is no new run
            config = dataclasses.replace(config, guidance=TrainConfig.guidance)
        if run.trains_text_encoder and run.clip is None:
            raise KilnUserError("this state trains the text encoder but carries no CLIP; rebuild it with Inject LoRA")
        clip = run.clip if run.clip is not None else dataset.clip
        start = run.state.replace(info={**run.state.info, **dataset.run_info()})
        prompt = preview_prompt.strip() or next((dataset.caption(r) for r in dataset.records), "")

        with torch.inference_mode(False), torch.enable_grad():
            reporting.status(node_id, "Train Steps: loading the model for training")
            device = patching.load_for_training(run.model)
            roots = patching.unet_roots(run.model)
            family = run.detected.family
            text_encoder = None
            if run.trains_text_encoder:
                text_encoder = text_encoders.load_text_encoder_for_training(run.clip, family)
                roots.update(text_encoder.roots)
            encoding = reporting.ItemProgress(node_id, unit="captions", phase="Train Steps: encoding captions")
            encoding.start(len(dataset.records))
            latent_data, _ = dataset.encoded(text_encoder, size_conditioning=family.size_conditioning,
                                             on_progress=encoding.advance)
            network = denoiser.ComfyDiffusion(run.model, text_encoder, run.detected, guidance=config.guidance)
            # estimate_memory: one measuring forward pass before the first step, reported (and quoted on an OOM)
            trainer = Trainer(network, roots, device, checkpoint_modules=patching.checkpoint_blocks(run.model),
                              estimate_memory=True, free_memory=devices.free_memory)
            # the same training done before? reuse it, or resume it from its last checkpoint (nodes/requeue.py)
            target = start.step + steps
            digest = requeue.run_digest(run, latent_data, config, device, text_encoder)
            plan = requeue.plan(run.name, digest, start, steps, retrain)
            did = plan.describe(start.step, target)

            preview_files: list[dict] = []  # temp PNGs of the previews, for the node's live view (web/js)

            def preview(step: int, weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
                """The model as training left it (adapters attached), or with a snapshot's adapter ``weights``."""
                model, text_clip = run.model, clip
                if weights is not None:
                    snapshot = start.replace(weights=weights)
                    model = patching.with_adapters(run.model, snapshot)
                    if text_encoder is not None:
                        text_clip = text_encoders.clip_with_lora(run.clip, snapshot, run.naming)
                image = previews.sample_preview(model, text_clip, dataset.vae, prompt, preview_seed,
                                                preview_size, preview_size, preview_steps, family.preview_cfg, family,
                                                text_adapters=text_encoder is not None)
                patching.load_for_training(run.model)  # the VAE may have displaced the UNet
                try:
                    ref = {**previews.save_temp_preview(image), "step": step}
                except OSError as exc:  # a full temp disk must not stop training
                    logger.warning("LoRA Kiln: could not save the preview of step %d: %s", step, exc)
                else:
                    preview_files.append(ref)
                    reporting.send_event(reporting.PREVIEW_EVENT, {"node": node_id, **ref})
                return image

            begin = start.with_training_of(plan.found) if plan.found is not None else start
            progress = reporting.NodeProgress(node_id, max(1, target - begin.step), preview if preview_every else None,
                                              samples_dir=folders.samples_directory(run.name))
            if plan.action == "reuse":
                result = TrainResult(begin)
            else:
                if plan.action == "resume":
                    reporting.status(node_id, f"Train Steps: resuming from step {begin.step} "
                                              f"({folders.display_path(plan.source)})")
                requeue.clear_snapshots(run.name, digest, after_step=begin.step if plan.found is not None else -1)
                checkpoints = _Checkpoints(run, digest, target, keep_checkpoints)
                tb = TensorBoardCallback(folders.logs_directory(run.name))
                callbacks = [requeue.SnapshotWriter(run.name, digest), progress, checkpoints, tb]
                inplace_safe = patching.norm_inputs_cloned([network.unet]) if family.inplace_residuals else \
                    contextlib.nullcontext()
                try:
                    with inplace_safe, text_encoder.trainable() if text_encoder is not None else contextlib.nullcontext():
                        result = trainer.run(begin, latent_data, dataclasses.replace(config, steps=target - begin.step),
                                             callbacks, save_every=save_every, preview_every=preview_every)
                except KilnUserError:  # a checkpoint that does not fit on the disk
                    tb.close()
                    raise
                except TrainingError as exc:
                    tb.close()
                    path = save_checkpoint(run, exc.last_good_state, "_lastgood", digest, target)
                    raise KilnUserError(
                        f"{exc}\nCheckpoint of the last good state: {folders.display_path(path)}") from None
                if not result.stopped_early and digest is not None:
                    requeue.store_finished(run.name, digest, result.state)
            # previews of the steps not trained now (a reused run; a resumed run's first part), rendered from the
            # adapter snapshots kept at those steps, with the current preview settings
            replay = [] if plan.action == "train" or result.stopped_early else requeue.previewed_steps(
                start.step, target if plan.action == "reuse" else begin.step, preview_every)
            known = {begin.step: begin.weights, result.state.step: result.state.weights}
            missing = requeue.replay_previews(progress, run.name, digest, start, known, replay, preview)
            if replay and progress.cancelled:
                reporting.raise_if_interrupted()

        new_run = run.replace(state=result.state, train_settings=config.to_dict())
        if result.stopped_early:
            path = save_checkpoint(run, result.state, "_cancelled", digest, target)
            logger.info("LoRA Kiln: cancelled at step %d; checkpoint %s", result.state.step, path)
            reporting.raise_if_interrupted()
            raise KilnUserError(
                f"training was cancelled at step {result.state.step}; checkpoint: {folders.display_path(path)}")

        chart = image_from_pil(loss_chart(result.state.history))
        progress.previews.sort(key=lambda p: p[0])
        preview_files.sort(key=lambda ref: ref["step"])
        preview_images = torch.cat([img for _, img in progress.previews], dim=0) if progress.previews else chart
        last = result.state.history[-1] if result.state.history else (0, float("nan"), 0.0)
        text = f"{did} · step {last[0]} · loss {last[1]:.4f} · lr {last[2]:.3g}"
        if missing:
            text += f" · no snapshot kept for the previews of step {', '.join(map(str, missing))} (retrain renders them)"
        reporting.send_text(node_id, did)
        # For the live view (web/js/kiln_train_view.js), which redraws them after a page reload from the history.
        # Lists only (ComfyUI concatenates ui lists); nothing of this is stored in the workflow.
        history = [list(h) for h in result.state.history[-2000:]]
        ui = {"text": [text], "kiln_history": history, "kiln_previews": preview_files}
        out_clip = text_encoders.clip_with_lora(run.clip, result.state, run.naming) if run.clip is not None else dataset.clip
        return io.NodeOutput(new_run, patching.with_adapters(run.model, result.state), chart, preview_images, out_clip, ui=ui)
