"""Run N optimizer steps on a :class:`TrainState` and return a new one.

The host hands over the denoiser (:class:`~lora_core.diffusion.DiffusionModel`), the module trees the
adapters hook into (``{"unet": ..., "te": ...}``) and, optionally, the blocks to checkpoint. The trainer
attaches the adapters for the duration of the run, trains, and removes them again, whatever happens.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import nn

from .adapters import AdapterSet
from .config import TrainConfig, auto_defaults
from .data.latents import LatentDataset
from .diffusion import DiffusionModel, check_objective, diffusion_loss
from .memory import (
    MemoryEstimate,
    MemoryReport,
    advice,
    device_free_bytes,
    measure_activations,
    module_bytes,
    optimizer_bytes,
)
from .optim import build_optimizer, lr_multiplier, param_groups, place_fused_state, set_lr
from .progress import Smoother, StepInfo, TrainCallback
from .state import TrainState

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training stopped; ``last_good_state`` is the state after the last completed step."""

    def __init__(self, message: str, last_good_state: TrainState) -> None:
        super().__init__(message)
        self.last_good_state = last_good_state


class NonFiniteLossError(TrainingError):
    pass


class OutOfMemoryTrainingError(TrainingError):
    pass


@dataclass(frozen=True)
class TrainResult:
    state: TrainState
    stopped_early: bool = False


_REQUESTED = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_FLOATS = frozenset({torch.float32, torch.float16, torch.bfloat16})


def resolve_precision(
    precision: str, device_type: str, stored_dtype: torch.dtype | None, bf16_supported: bool
) -> torch.dtype:
    """The dtype the network computes in, from the requested precision and the dtype its frozen weights are stored in.

    ``fp32``/``bf16``/``fp16`` are taken as asked. ``auto``: fp32 on the CPU (its bf16 GEMMs are slower than fp32);
    on a GPU bf16 where CUDA supports it, else fp16 when the weights are stored in fp16 (with loss scaling: every
    fp16 run has it), else fp32. ``bf16_supported`` only counts on ``device_type == "cuda"``.
    """
    if precision in _REQUESTED:
        return _REQUESTED[precision]
    if precision != "auto":
        raise ValueError(f"precision={precision!r} is not supported; allowed: auto, {', '.join(_REQUESTED)}")
    if device_type == "cpu":
        return torch.float32
    if device_type == "cuda" and bf16_supported:
        return torch.bfloat16
    if stored_dtype == torch.float16:
        return torch.float16
    return torch.float32


@dataclass(frozen=True)
class PrecisionPlan:
    """How one run computes: ``compute`` dtype, under autocast or not, and which frozen weights get copies.

    ``cast_from``: frozen parameters stored in these dtypes get ``compute`` copies once per run (``FrozenWeightCast``);
    ``matmul_only``: only Linear/Conv2d weight and bias (autocast handles the rest), else every frozen parameter
    (fp32 runs without autocast, where a norm's fp16 weight next to an fp32 input fails).
    """

    compute: torch.dtype
    autocast: bool
    cast_from: frozenset[torch.dtype] = frozenset()
    matmul_only: bool = True

    @property
    def loss_scaling(self) -> bool:
        """fp16 compute always trains with a GradScaler, whatever precision was requested."""
        return self.compute == torch.float16


def plan_precision(
    precision: str,
    device_type: str,
    stored_dtype: torch.dtype | None,
    bf16_supported: bool,
    manual_cast_dtype: torch.dtype | None = None,
) -> PrecisionPlan:
    """The :class:`PrecisionPlan` of a run (a pure function: the table is tested case by case).

    With ``manual_cast_dtype`` the host's layers cast their stored weights (fp8, say) to their input's dtype per layer;
    those weights are never copied, ``fp32`` computes in the manual-cast dtype as the host itself does, and ``auto``
    resolves as if the weights were stored in it. Otherwise ``fp32`` is really fp32 (copies of fp16/bf16 weights, any
    device); bf16/fp16 run under autocast, with copies of Linear/Conv2d weights stored in the other half type, and on
    the CPU of fp32 ones too (there the per-step re-cast is memory-bound; on a GPU it is ~1 % of a step and fp32 ->
    half copies would cost VRAM).
    """
    if manual_cast_dtype is not None:
        if precision == "fp32":
            return PrecisionPlan(manual_cast_dtype, autocast=False)
        compute = resolve_precision(precision, device_type, manual_cast_dtype, bf16_supported)
        return PrecisionPlan(compute, autocast=compute != torch.float32)
    compute = resolve_precision(precision, device_type, stored_dtype, bf16_supported)
    if compute == torch.float32:
        return PrecisionPlan(compute, autocast=False, cast_from=_FLOATS - {compute}, matmul_only=False)
    sources = _FLOATS if device_type == "cpu" else _FLOATS - {torch.float32}
    return PrecisionPlan(compute, autocast=True, cast_from=sources - {compute}, matmul_only=True)


@contextlib.contextmanager
def gradient_checkpointing(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Recompute each module's activations in backward; the modules are restored on exit.

    Inside the checkpointed region each module works on copies of its tensor arguments: a block that adds to its
    input in place (FLUX's ``txt += ...``, ``x += ...``) would otherwise change the very tensor its recomputation
    starts from. The copies are recomputed like any activation; only the originals are kept.
    """
    patched: list[tuple[nn.Module, bool, object]] = []
    try:
        for module in modules:
            had_own = "forward" in module.__dict__
            original = module.forward

            def checkpointed(*args: object, _f: object = original, **kwargs: object) -> object:
                if not torch.is_grad_enabled():
                    return _f(*args, **kwargs)  # type: ignore[operator]
                return torch.utils.checkpoint.checkpoint(_on_copies, _f, *args, use_reentrant=False, **kwargs)  # type: ignore[arg-type]

            module.forward = checkpointed  # type: ignore[method-assign]
            patched.append((module, had_own, module.__dict__.get("forward") if had_own else None))
        yield
    finally:
        for module, had_own, _ in patched:
            del module.forward
            if had_own:  # pragma: no cover - modules with an instance-level forward are rare
                logger.warning("gradient checkpointing replaced an instance-level forward on %s", type(module).__name__)


def _on_copies(f: Callable[..., object], *args: object, **kwargs: object) -> object:
    def copy(v: object) -> object:
        return v.clone() if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    return f(*(copy(a) for a in args), **{k: copy(v) for k, v in kwargs.items()})


@contextlib.contextmanager
def frozen(roots: Mapping[str, nn.Module]) -> Iterator[None]:
    """Base weights need no gradients; put back exactly what was there before."""
    changed = [p for root in roots.values() for p in root.parameters() if p.requires_grad]
    for p in changed:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in changed:
            p.requires_grad_(True)


class FrozenWeightCast:
    """Copies of the frozen weights in the compute dtype, made once per run and swapped in while it trains.

    Under autocast every matmul and convolution casts its stored weight to bf16/fp16 again on each forward (torch
    caches casts only for weights that require grad). On a CPU that re-cast is memory-bound: making the copies
    once per run saved 4-6 % of a bf16 step (BENCHMARKS.md, *Profile*). They round exactly as autocast would, so
    the run is bit-identical. An fp32 run over weights stored in fp16/bf16 gets fp32 copies of every frozen parameter
    (without them it would compute in half precision). The originals go back on exit and around previews (a sampler
    runs the model outside autocast, on its own weights). Only parameters that need no gradient and are stored in one
    of ``sources`` (a dtype other than ``dtype``) are touched; ``matmul_only``: those of Linear/Conv2d layers only;
    with no roots it does nothing. ``copies`` counts the casts made.
    """

    def __init__(
        self,
        roots: Mapping[str, nn.Module],
        dtype: torch.dtype,
        sources: frozenset[torch.dtype] = frozenset({torch.float32}),
        matmul_only: bool = True,
    ) -> None:
        self.dtype = dtype
        self.sources = frozenset(sources) - {dtype}
        self.copies = 0
        self._swaps: list[list] = []  # [module, name, original, copy]
        made: dict[int, nn.Parameter] = {}  # a parameter shared by two modules gets one copy
        for root in roots.values():
            for module in root.modules():
                if matmul_only and not isinstance(module, (nn.Linear, nn.Conv2d)):
                    continue
                for name in ("weight", "bias") if matmul_only else list(module._parameters):
                    p = module._parameters.get(name)
                    if self._wanted(p):
                        if id(p) not in made:
                            made[id(p)] = self._copy(p)
                        self._swaps.append([module, name, p, made[id(p)]])
        self.applied = False

    def _wanted(self, p: torch.Tensor | None) -> bool:
        return p is not None and not p.requires_grad and p.dtype in self.sources

    def _copy(self, p: nn.Parameter) -> nn.Parameter:
        self.copies += 1
        with torch.no_grad():
            return nn.Parameter(p.detach().to(self.dtype), requires_grad=False)

    def apply(self) -> None:
        for swap in self._swaps:
            module, name, original, low = swap
            current = module._parameters.get(name)
            if current is not original and current is not low:
                # the host put another tensor there meanwhile (ComfyUI re-patches a model it reloads during a preview)
                if not self._wanted(current):
                    continue
                swap[2], swap[3] = current, self._copy(current)
            module._parameters[name] = swap[3]
        self.applied = True

    def restore(self) -> None:
        for module, name, original, low in self._swaps:
            if module._parameters.get(name) is low:
                module._parameters[name] = original
        self.applied = False

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """The stored originals for the duration of the block (previews), then the copies again."""
        was = self.applied
        if was:
            self.restore()
        try:
            yield
        finally:
            if was:
                self.apply()


def _clone_tree(obj: object) -> object:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _clone_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone_tree(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_clone_tree(v) for v in obj)
    return obj


class Trainer:
    def __init__(
        self,
        model: DiffusionModel,
        roots: Mapping[str, nn.Module],
        device: torch.device | str = "cpu",
        checkpoint_modules: Sequence[nn.Module] = (),
        estimate_memory: bool = False,
        free_memory: Callable[[torch.device], int | None] = device_free_bytes,
        interrupts: tuple[type[BaseException], ...] = (),
    ) -> None:
        self.model = model
        # what the host raises inside the network's forward when the user cancels (ComfyUI's ops check for Cancel in
        # every layer): the step it interrupts is discarded and the run ends with the state of the last whole step
        self.interrupts = interrupts
        self.roots = dict(roots)
        self.device = torch.device(device)
        self.checkpoint_modules = list(checkpoint_modules)
        self.estimate_memory = estimate_memory  # measure and report the run's memory before its first step
        self.free_memory = free_memory

    def run(
        self,
        state: TrainState,
        dataset: LatentDataset,
        config: TrainConfig,
        callbacks: Sequence[TrainCallback] = (),
        save_every: int = 0,
        preview_every: int = 0,
    ) -> TrainResult:
        # "auto" settings the host left unresolved: the objective's defaults (Train Steps resolves them first)
        config = config.resolved(auto_defaults(self.model.prediction_type))
        check_objective(config, self.model.prediction_type)  # min-SNR on a flow model etc.: refused, named
        device = self.device
        plan = self.precision_plan(config.precision)
        adapters = state.build_adapters().to(device)
        adapters.train()
        params = list(adapters.parameters())
        for p in params:
            p.requires_grad_(True)
        optimizer = build_optimizer(param_groups(adapters.items(), config), config)
        if state.optimizer_state is not None:
            if state.optimizer_name == config.optimizer:
                fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
                optimizer.load_state_dict(_clone_tree(state.optimizer_state))  # never share tensors with the input
                for group, settings in zip(optimizer.param_groups, fresh):
                    group.update(settings)  # this run's lr / betas / weight decay apply from here on
                place_fused_state(optimizer)
            else:
                logger.warning(
                    "optimizer changed from %s to %s at step %d: starting a fresh optimizer state",
                    state.optimizer_name,
                    config.optimizer,
                    state.step,
                )
        scaler = torch.amp.GradScaler(device.type, enabled=plan.loss_scaling)
        if scaler.is_enabled() and state.scaler_state is not None:
            scaler.load_state_dict(dict(state.scaler_state))  # fp16 resumes with the loss scale it had reached
        cuda_devices = [device] if device.type == "cuda" else []

        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=cuda_devices))
            cast = stack.enter_context(self._attached(adapters, config, plan))
            # measured before checkpointing is on (the profile knows both figures), before any RNG is set up
            report = self._safe_memory_report(state, dataset, config, plan, adapters) if self.estimate_memory else None
            if config.gradient_checkpointing and self.checkpoint_modules:
                stack.enter_context(gradient_checkpointing(self.checkpoint_modules))
            noise_gen = torch.Generator()
            if state.rng is not None:
                noise_gen.set_state(state.rng["noise"])
                torch.set_rng_state(state.rng["torch"])
                if "cuda" in state.rng and cuda_devices:
                    torch.cuda.set_rng_state(state.rng["cuda"], device)
            else:
                noise_gen.manual_seed(state.seed)
                torch.manual_seed(state.seed)
            run = _Run(self, state, dataset, config, adapters, optimizer, scaler, noise_gen, plan, cast)
            run.memory_report = report
            for cb in callbacks:
                cb.on_start(state, config.steps)
                if report is not None:
                    cb.on_memory(report)
            stopped = run.loop(callbacks, save_every, preview_every)
            final = run.snapshot(at_mark=run.interrupted)
        for cb in callbacks:
            cb.on_end(final, stopped)
        return TrainResult(final, stopped)

    def stored_dtype(self) -> torch.dtype:
        """The dtype the frozen network's weights are stored in: the model's ``weight_dtype``, else its first weight's."""
        declared = getattr(self.model, "weight_dtype", None)
        if declared is not None:
            return declared
        root = self.roots["unet"] if "unet" in self.roots else next(iter(self.roots.values()), None)
        first = next((p for p in root.parameters() if p.is_floating_point()), None) if root is not None else None
        return first.dtype if first is not None else torch.float32

    def precision_plan(self, precision: str) -> PrecisionPlan:
        device = self.device
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        manual = getattr(self.model, "manual_cast_dtype", None)
        stored = self.stored_dtype()
        plan = plan_precision(precision, device.type, stored, bf16, manual)
        scaled = " with loss scaling" if plan.loss_scaling else ""
        if manual is not None and precision == "fp32" and plan.compute != torch.float32:
            msg = "precision fp32: the host casts this model's %s weights to %s per layer; training computes in it%s"
            logger.warning(msg, stored, manual, scaled)
        else:
            logger.info("precision %s: computing in %s over %s weights%s", precision, plan.compute, stored, scaled)
        return plan

    @contextlib.contextmanager
    def _attached(self, adapters: AdapterSet, config: TrainConfig, plan: PrecisionPlan) -> Iterator[FrozenWeightCast]:
        with contextlib.ExitStack() as stack:
            stack.enter_context(frozen(self.roots))
            stack.enter_context(adapters.attach(self.roots))
            # the denoising network only: a text encoder casts its own inputs (ComfyUI's CLIP manual-casts per layer)
            roots = {"unet": self.roots["unet"]} if plan.cast_from and "unet" in self.roots else {}
            cast = FrozenWeightCast(roots, plan.compute, plan.cast_from, plan.matmul_only)
            cast.apply()
            stack.callback(cast.restore)
            if hasattr(self.model, "compute_dtype"):  # the host feeds its network inputs of this dtype (no autocast)
                previous = self.model.compute_dtype
                self.model.compute_dtype = plan.compute
                stack.callback(setattr, self.model, "compute_dtype", previous)
            yield cast

    def _safe_memory_report(self, state: TrainState, dataset: LatentDataset, config: TrainConfig,
                            plan: PrecisionPlan, adapters: AdapterSet) -> MemoryReport | None:
        """The estimate, or None when measuring fails for another reason than memory (it is advice, not a step)."""
        try:
            return self._memory_report(dataset, config, plan, adapters)
        except torch.OutOfMemoryError as exc:
            raise OutOfMemoryTrainingError(
                f"out of memory before the first step, in one forward pass at batch_size {config.batch_size} on the "
                "largest bucket: try gradient_checkpointing=True, a smaller batch_size or a lower resolution (Load "
                "Dataset), fp8 weights, or a smaller rank. Nothing was trained; the start state is kept.", state,
            ) from exc
        except Exception as exc:  # noqa: BLE001 - a failed estimate must not stop a run that could train
            logger.warning("could not estimate the run's memory (%s: %s); training anyway", type(exc).__name__, exc)
            return None

    def _memory_report(self, dataset: LatentDataset, config: TrainConfig, plan: PrecisionPlan,
                       adapters: AdapterSet) -> MemoryReport:
        """One forward pass of the loss on the largest bucket at the run's batch size, its saved tensors counted and
        none kept (:mod:`.memory`), with its own noise generator: the run's RNG streams are untouched."""
        largest = max(range(len(dataset.items)), key=lambda i: dataset.items[i].latent.numel())
        shape = dataset.items[largest].shape_key
        same = [i for i, item in enumerate(dataset.items) if item.shape_key == shape]
        indices = [same[k % len(same)] for k in range(config.batch_size)]
        latents, cond = dataset.collate(indices)
        latents = self.model.scale_latents(latents.to(self.device))
        cond = {k: v.to(self.device) for k, v in cond.items()}
        generator = torch.Generator().manual_seed(0)

        def forward() -> torch.Tensor:
            with torch.autocast(self.device.type, dtype=plan.compute, enabled=plan.autocast):
                return diffusion_loss(self.model, latents, cond, config, generator)

        weights = [t for root in self.roots.values() for t in (*root.parameters(), *root.buffers())]
        profile = measure_activations(forward, self.checkpoint_modules, exclude=weights)
        trainable = sum(p.numel() for p in adapters.parameters())
        estimate = MemoryEstimate(
            weights=module_bytes(list(self.roots.values()), self.device), adapters=trainable * 4 * 2,
            optimizer=optimizer_bytes(config.optimizer, trainable), activations=profile,
            gradient_checkpointing=bool(config.gradient_checkpointing and self.checkpoint_modules),
            batch_size=config.batch_size, optimizer_name=config.optimizer, trainable_params=trainable,
            grad_accum=config.grad_accum)
        free = self.free_memory(self.device)
        if free is not None:
            free += trainable * 4  # the adapters are already on the device: the estimate counts them itself
        stored = self.stored_dtype()
        tips = advice(estimate, free, stored_bytes_per_weight=torch.empty(0, dtype=stored).element_size())
        report = MemoryReport(estimate, free, tuple(tips))
        (logger.warning if tips else logger.info)("%s", report.describe())
        return report


class _Run:
    """The mutable bookkeeping of one :meth:`Trainer.run`."""

    def __init__(
        self,
        trainer: Trainer,
        state: TrainState,
        dataset: LatentDataset,
        config: TrainConfig,
        adapters: AdapterSet,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        noise_gen: torch.Generator,
        plan: PrecisionPlan,
        cast: FrozenWeightCast,
    ) -> None:
        self.t = trainer
        self.start = state
        self.dataset = dataset
        self.config = config
        self.adapters = adapters
        self.params = list(adapters.parameters())
        self.optimizer = optimizer
        self.scaler = scaler
        self.noise_gen = noise_gen
        self.plan = plan
        self.dtype = plan.compute
        self.cast = cast
        self.step = state.step
        self.epoch = state.epoch
        self.batch_index = state.batch_index
        self.history = list(state.history)
        self._batches = dataset.epoch_batches(self.epoch, config.batch_size, state.seed)
        self._rng_mark = self._rng_state()
        self._scaler_mark = self._scaler_state()
        self._mark = (self.step, self.epoch, self.batch_index)
        self.memory_report: MemoryReport | None = None  # the estimate made before the first step, if any
        self.interrupted = False  # a step was cut short by the host's interrupt: the state is the one before it

    def _scaler_state(self) -> dict[str, float | int] | None:
        return dict(self.scaler.state_dict()) if self.scaler.is_enabled() else self.start.scaler_state

    def _rng_state(self) -> dict[str, torch.Tensor]:
        rng = {"noise": self.noise_gen.get_state(), "torch": torch.get_rng_state()}
        if self.t.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.t.device)
        return rng

    def snapshot(self, at_mark: bool = False) -> TrainState:
        """The state now, or (``at_mark``) as it was when the current step began."""
        step, epoch, batch_index = self._mark if at_mark else (self.step, self.epoch, self.batch_index)
        return self.start.replace(
            weights={k: v.float().cpu().clone() for k, v in self.adapters.weights().items()},
            step=step,
            epoch=epoch,
            batch_index=batch_index,
            optimizer_name=self.config.optimizer,
            optimizer_state=_clone_tree(self.optimizer.state_dict()),
            rng=self._rng_mark if at_mark else self._rng_state(),
            scaler_state=self._scaler_mark if at_mark else self._scaler_state(),
            history=tuple(h for h in self.history if h[0] <= step),
        )

    def _next_indices(self) -> list[int]:
        if self.batch_index >= len(self._batches):
            self.epoch += 1
            self.batch_index = 0
            self._batches = self.dataset.epoch_batches(self.epoch, self.config.batch_size, self.start.seed)
        indices = self._batches[self.batch_index]
        self.batch_index += 1
        return indices

    def _micro_step(self, indices: list[int], weight: float) -> float:
        """Forward and backward of one micro-batch; its mean loss counts ``weight`` of the optimizer step."""
        model = self.t.model
        device = self.t.device
        latents, cond = self.dataset.collate(indices)
        latents = model.scale_latents(latents.to(device))
        cond = {k: v.to(device) for k, v in cond.items()}
        with torch.autocast(device.type, dtype=self.dtype, enabled=self.plan.autocast):
            loss = diffusion_loss(model, latents, cond, self.config, self.noise_gen)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"the loss became {value} at step {self.step + 1}. Usual causes: a learning rate too high "
                f"(now {self.config.learning_rate:g}), fp16 overflow (use bf16 or fp32 precision), or a VAE "
                "that produces NaN latents in half precision (encode with an fp32 VAE). Training stopped; "
                f"the last good state (step {self._mark[0]}) is kept.",
                self.snapshot(at_mark=True),
            )
        self.scaler.scale(loss * weight).backward()
        return value

    def _accumulated_step(self) -> tuple[float, int]:
        """One optimizer step's gradients over ``grad_accum`` micro-batches; returns (mean loss, samples).

        Bucket remainders make micro-batches of unequal size; each is weighted by its share of the step's samples,
        so every sample counts the same (as one big batch would), and the reported loss is the per-sample mean.
        """
        micro = [self._next_indices() for _ in range(self.config.grad_accum)]
        total = sum(len(m) for m in micro)
        loss = sum(self._micro_step(m, len(m) / total) * len(m) for m in micro) / total
        return loss, total

    def loop(self, callbacks: Sequence[TrainCallback], save_every: int, preview_every: int) -> bool:
        config = self.config
        schedule_steps = config.schedule_steps or (self.start.step + config.steps)
        smooth_loss = Smoother(0.9)
        smooth_time = Smoother(0.8)
        for i in range(config.steps):
            t0 = time.perf_counter()
            self._mark = (self.step, self.epoch, self.batch_index)
            self._rng_mark = self._rng_state()
            self._scaler_mark = self._scaler_state()
            factor = lr_multiplier(config, self.step, schedule_steps)
            set_lr(self.optimizer, factor)
            lr = config.learning_rate * factor
            try:
                loss, samples = self._accumulated_step()
                self.scaler.unscale_(self.optimizer)
                max_norm = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
                self.scaler.step(self.optimizer)
                self.scaler.update()
            except self.t.interrupts:
                # raised by the host inside a forward (or a checkpoint's recomputation in backward): nothing of this
                # step reached the weights; its gradients go, and the run ends as it was when the step began
                self.optimizer.zero_grad(set_to_none=True)
                self.interrupted = True
                logger.info("training interrupted during step %d: the state of step %d is kept", self.step + 1,
                            self._mark[0])
                return True
            except torch.OutOfMemoryError as exc:
                self.optimizer.zero_grad(set_to_none=True)
                measured = f" Before the first step, {self.memory_report.describe()}." if self.memory_report else ""
                raise OutOfMemoryTrainingError(
                    f"out of memory at step {self.step + 1}: try a smaller batch_size (now {config.batch_size}), a lower resolution, "
                    "gradient_checkpointing=True, bf16 precision, or a smaller rank. The last good state "
                    f"(step {self._mark[0]}) is kept.{measured}",
                    self.snapshot(at_mark=True),
                ) from exc
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.history.append((self.step, loss, lr))
            dt = time.perf_counter() - t0
            sec = smooth_time.update(dt) if i > 0 or config.steps == 1 else dt  # first step includes warm-up
            info = StepInfo(
                step=self.step,
                run_step=i + 1,
                run_steps=config.steps,
                epoch=self.epoch,
                loss=loss,
                smoothed_loss=smooth_loss.update(loss),
                lr=lr,
                grad_norm=grad_norm,
                sec_per_step=sec,
                samples_per_sec=samples / sec if sec > 0 else float("inf"),
                eta_seconds=sec * (config.steps - i - 1),
            )
            for cb in callbacks:
                cb.on_step(info)
            last = i + 1 == config.steps
            if save_every and self.step % save_every == 0:
                snap = self.snapshot()
                for cb in callbacks:
                    cb.on_checkpoint(snap)
            if preview_every and self.step % preview_every == 0:
                self._preview(callbacks)
            if not last and any(cb.should_stop() for cb in callbacks):
                logger.info("training stopped at step %d on request", self.step)
                return True
        return False

    def _preview(self, callbacks: Sequence[TrainCallback]) -> None:
        rng = torch.get_rng_state()  # a sampler may reseed the global RNG; training must not notice
        self.adapters.eval()
        try:
            with torch.no_grad(), self.cast.suspended():
                for cb in callbacks:
                    cb.on_preview(self.step, self.adapters)
        finally:
            self.adapters.train()
            torch.set_rng_state(rng)
