"""One Train Steps run, from loading the model to its result: the lifecycle the node hands its inputs to.

    load the model for training -> encode the captions -> plan by digest (reuse / resume / train) -> train, with
    progress, previews and checkpoints -> replay the previews of steps not trained now -> the outcome

Cancel and crashes keep what is done: a ``save_every`` checkpoint, a ``_cancelled`` checkpoint of the last whole
step, or a ``_lastgood`` one after a failed step; the finished state is stored under its digest, so a re-queue never
trains it again (:mod:`.requeue`). The node (:mod:`.train`) only turns inputs into a :class:`RunRequest` and the
:class:`RunOutcome` into outputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..lora_core import TrainCallback, TrainConfig, Trainer, TrainingError, TrainResult, TrainState
from ..lora_core.fileio import NotEnoughSpace
from ..lora_core.tb import TensorBoardCallback
from . import requeue
from .corridor import compat, denoiser, devices, folders, patching, previews, reporting, text_encoders
from .corridor.errors import KilnUserError
from .objects import KilnDataset, KilnRun

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


@dataclass(frozen=True)
class PreviewSettings:
    prompt: str
    seed: int
    size: int
    steps: int
    every: int
    cfg: float


@dataclass(frozen=True)
class RunRequest:
    """What one Train Steps node asks for: ``steps`` more steps of ``run`` on ``dataset`` with ``config``."""

    run: KilnRun
    dataset: KilnDataset
    config: TrainConfig
    steps: int
    preview: PreviewSettings
    save_every: int = 0
    keep_checkpoints: int = 0
    retrain: bool = False
    node_id: str | None = None


@dataclass
class RunOutcome:
    state: TrainState
    did: str  # "trained 100 steps", "reused a finished run (step 500): 0 steps", ...
    previews: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (step, IMAGE), in step order
    preview_files: list[dict[str, Any]] = field(default_factory=list)  # temp PNGs for the live view, in step order
    missing_previews: list[int] = field(default_factory=list)  # steps whose adapter snapshot was not kept


class TrainingRun:
    """The lifecycle of one request; :meth:`execute` runs it inside autograd-enabled, non-inference mode."""

    def __init__(self, request: RunRequest) -> None:
        self.request = request
        self.run = request.run
        self.node_id = request.node_id
        self.family = self.run.detected.family
        self.clip = self.run.clip if self.run.clip is not None else request.dataset.clip
        self.model: Any = None  # the training clone of the user's MODEL (_load)
        self.start: TrainState = self.run.state  # the run's start state, with this dataset's facts (_execute)
        self.text_encoder: text_encoders.TextEncoder | None = None
        self.preview_files: list[dict[str, Any]] = []
        self.preview_fps = self.family.video_fps or 16.0  # a video model's preview clips play at its frame rate

    def execute(self) -> RunOutcome:
        with torch.inference_mode(False), torch.enable_grad():
            return self._execute()

    # ---- phases ---------------------------------------------------------------------------------------------------

    def _execute(self) -> RunOutcome:
        request, run = self.request, self.run
        config = request.config
        clip = next((r for r in request.dataset.records if r.frames > 1), None)
        if clip is not None and not self.family.video:
            raise KilnUserError(
                f"the dataset has video clips ({clip.path.name}: {clip.frames} frames), but {self.family.name} is an "
                "image model. Train clips with a video model (Wan 2.1 / 2.2), or move them out of the dataset folder.")
        start = self.start = run.state.replace(info={**run.state.info, **request.dataset.run_info()})
        device = self._load()
        latent_data = self._encode()
        network = denoiser.ComfyDiffusion(self.model, self.text_encoder, run.detected, guidance=config.guidance)
        roots = patching.unet_roots(self.model)
        if self.text_encoder is not None:
            roots.update(self.text_encoder.roots)
        # estimate_memory: one measuring forward pass before the first step, reported (and quoted on an OOM)
        trainer = Trainer(network, roots, device, checkpoint_modules=patching.checkpoint_blocks(self.model),
                          estimate_memory=True, free_memory=devices.free_memory, interrupts=compat.interrupts())
        # the same training done before? reuse it, or resume it from its last checkpoint (nodes/requeue.py)
        target = start.step + request.steps
        digest = requeue.run_digest(run, self.model, latent_data, config, device, self.text_encoder)
        plan = requeue.plan(run.name, digest, start, request.steps, request.retrain)
        did = plan.describe(start.step, target)
        begin = start.with_training_of(plan.found) if plan.found is not None else start
        preview_every = request.preview.every
        progress = reporting.NodeProgress(self.node_id, max(1, target - begin.step),
                                          self._preview if preview_every else None,
                                          samples_dir=folders.samples_directory(run.name),
                                          fps=self.preview_fps)
        if plan.action == "reuse":
            result = TrainResult(begin)
        else:
            if plan.action == "resume":
                reporting.status(self.node_id, f"Train Steps: resuming from step {begin.step} "
                                               f"({folders.display_path(plan.source)})")
            requeue.clear_snapshots(run.name, digest, after_step=begin.step if plan.found is not None else -1)
            result = self._train(trainer, network, begin, latent_data, dataclasses.replace(config, steps=target - begin.step),
                                 progress, digest, target)
        # previews of the steps not trained now (a reused run; a resumed run's first part), rendered from the
        # adapter snapshots kept at those steps, with the current preview settings
        replay = [] if plan.action == "train" or result.stopped_early else requeue.previewed_steps(
            start.step, target if plan.action == "reuse" else begin.step, preview_every)
        known = {begin.step: begin.weights, result.state.step: result.state.weights}
        missing = requeue.replay_previews(progress, run.name, digest, start, known, replay, self._preview)
        if replay and progress.cancelled:
            reporting.stop()
        if result.stopped_early:  # Cancel (or Ctrl-C headless): keep the last whole step, then stop the graph
            path = save_checkpoint(run, result.state, "_cancelled", digest, target)
            logger.info("LoRA Kiln: cancelled at step %d; checkpoint %s", result.state.step, path)
            reporting.status(self.node_id, f"Train Steps: cancelled at step {result.state.step}; checkpoint "
                                           f"{folders.display_path(path)}")
            reporting.stop()
        return RunOutcome(result.state, did, sorted(progress.previews, key=lambda p: p[0]),
                          sorted(self.preview_files, key=lambda ref: ref["step"]), missing)

    def _load(self) -> torch.device:
        """The training clones, loaded: the user's MODEL (or a non-dynamic copy of a Dynamic VRAM one:
        corridor.compat) and, when it trains, the text encoder; both with per-clone weight wrappers for quantized
        layers (patching.copy_host_weights), so the user's patchers are never changed."""
        reporting.status(self.node_id, "Train Steps: loading the model for training")
        try:
            self.model = compat.training_patcher(self.run.model)
        except compat.DynamicVramUnsupported as exc:
            raise KilnUserError(
                f"this model is loaded with ComfyUI's Dynamic VRAM and its loader cannot give Kiln an ordinary copy to "
                f"train ({exc}); start ComfyUI with --disable-dynamic-vram") from None
        patching.copy_host_weights(self.model)
        device = patching.load_for_training(self.model)
        if self.run.trains_text_encoder:
            self.text_encoder = text_encoders.load_text_encoder_for_training(self.run.clip, self.family)
        return device

    def _reload(self) -> None:
        """After a preview (its sampler, VAE and text encoder may have displaced or re-patched the training clones)."""
        if self.text_encoder is not None:
            text_encoders.reload_text_encoder(self.text_encoder)
        patching.load_for_training(self.model)

    def _encode(self) -> Any:
        dataset = self.request.dataset
        encoding = reporting.ItemProgress(self.node_id, unit="captions", phase="Train Steps: encoding captions")
        encoding.start(len(dataset.records))
        latent_data, _ = dataset.encoded(self.text_encoder, size_conditioning=self.family.size_conditioning,
                                         on_progress=encoding.advance, extras=self.family.extra_inputs is None)
        return latent_data

    def _train(self, trainer: Trainer, network: denoiser.ComfyDiffusion, begin: TrainState, latent_data: Any,
               config: TrainConfig, progress: reporting.NodeProgress, digest: str | None, target: int) -> TrainResult:
        run, request = self.run, self.request
        tb = TensorBoardCallback(folders.logs_directory(run.name))
        callbacks = [requeue.SnapshotWriter(run.name, digest), progress,
                     _Checkpoints(run, digest, target, request.keep_checkpoints), tb]
        inplace_safe = patching.norm_inputs_cloned([network.unet]) if self.family.inplace_residuals else \
            contextlib.nullcontext()
        try:
            with inplace_safe, compat.training(), \
                    self.text_encoder.trainable() if self.text_encoder is not None else contextlib.nullcontext():
                result = trainer.run(begin, latent_data, config, callbacks, save_every=request.save_every,
                                     preview_every=request.preview.every)
        except TrainingError as exc:
            path = save_checkpoint(run, exc.last_good_state, "_lastgood", digest, target)
            raise KilnUserError(f"{exc}\nCheckpoint of the last good state: {folders.display_path(path)}") from None
        finally:
            tb.close()
        if not result.stopped_early and digest is not None:
            requeue.store_finished(run.name, digest, result.state)
        return result

    def _preview(self, step: int, weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The model as training left it (adapters attached), or with a snapshot's adapter ``weights``."""
        run, settings = self.run, self.request.preview
        # live: the training clones, adapters attached by the trainer (the text encoder's clone shares its modules)
        model, text_clip = self.model, self.text_encoder.clip if self.text_encoder is not None else self.clip
        if weights is not None:
            snapshot = self.start.replace(weights=weights)
            model = patching.with_adapters(run.model, snapshot)
            if self.text_encoder is not None:
                text_clip = text_encoders.clip_with_lora(run.clip, snapshot, run.naming)
        image = previews.sample_preview(model, text_clip, self.request.dataset.vae, settings.prompt, settings.seed,
                                        settings.size, settings.size, settings.steps, settings.cfg,
                                        self.family, text_adapters=self.text_encoder is not None)
        self._reload()
        try:
            ref = {**previews.save_temp_preview(image, fps=self.preview_fps), "step": step}
        except OSError as exc:  # a full temp disk must not stop training
            logger.warning("LoRA Kiln: could not save the preview of step %d: %s", step, exc)
        else:
            self.preview_files.append(ref)
            reporting.send_event(reporting.PREVIEW_EVENT, {"node": self.node_id, **ref})
        return image
