"""What a training run will need in memory, measured before its first step, and what would make it fit.

The estimate has four parts:

- **weights**: the frozen network as it sits on the device now (fp8 / bf16 / fp16 / fp32 as stored);
- **adapters**: the trainable adapter parameters and their gradients (fp32);
- **optimizer**: its state per trainable parameter (AdamW: two fp32 moments; 8-bit AdamW: two bytes; Lion: one
  moment; Prodigy: four; SGD: its momentum buffer);
- **activations**: what autograd keeps for the backward pass at this batch size and resolution. It is *measured*,
  not guessed: one forward pass of the training loss on the largest bucket with a ``saved_tensors_hooks`` pair that
  counts the bytes of every tensor autograd would keep and keeps none of them (so the measuring pass itself needs
  inference memory plus the checkpointable blocks' inputs, which checkpointing keeps anyway). Blocks that gradient
  checkpointing would recompute are measured one by one, so the checkpointed figure (block inputs + the largest
  block, recomputed one at a time) is known whether or not it is on.

:func:`advice` compares the total with what the device has and names the settings that would make the run fit,
with their effect. No ComfyUI import: the host supplies the device's free memory.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

OPTIMIZER_BYTES_PER_PARAM = {"adamw": 8, "adamw8bit": 2, "lion": 4, "prodigy": 16, "sgd": 4}
GIB = 1024**3


@dataclass(frozen=True)
class ActivationProfile:
    """Bytes autograd saves in one training forward pass."""

    total: int  # everything, without gradient checkpointing
    blocks: tuple[int, ...] = ()  # of that, inside each checkpointable block
    block_inputs: int = 0  # what checkpointing keeps instead: the blocks' floating-point inputs

    @property
    def checkpointed(self) -> int:
        """With gradient checkpointing: outside the blocks, their inputs, and the largest block while recomputed."""
        if not self.blocks:
            return self.total
        return self.total - sum(self.blocks) + self.block_inputs + max(self.blocks)

    def scaled(self, factor: float) -> ActivationProfile:
        return ActivationProfile(int(self.total * factor), tuple(int(b * factor) for b in self.blocks),
                                 int(self.block_inputs * factor))


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    adapters: int
    optimizer: int
    activations: ActivationProfile
    gradient_checkpointing: bool
    batch_size: int
    optimizer_name: str
    trainable_params: int
    grad_accum: int = 1

    @property
    def activation_bytes(self) -> int:
        return self.activations.checkpointed if self.gradient_checkpointing else self.activations.total

    @property
    def training_bytes(self) -> int:
        """What the run adds to the loaded weights."""
        return self.adapters + self.optimizer + self.activation_bytes

    @property
    def total(self) -> int:
        return self.weights + self.training_bytes

    def describe(self) -> str:
        ckpt = "on" if self.gradient_checkpointing else "off"
        return (f"about {gib(self.total)} GiB: weights {gib(self.weights)}, activations {gib(self.activation_bytes)} "
                f"(batch {self.batch_size}, gradient checkpointing {ckpt}), adapters {gib(self.adapters)}, "
                f"{self.optimizer_name} state {gib(self.optimizer)}")


@dataclass(frozen=True)
class MemoryReport:
    """An estimate against what the device has free besides the loaded weights, with what would make it fit."""

    estimate: MemoryEstimate
    free: int | None
    advice: tuple[str, ...] = ()

    @property
    def fits(self) -> bool | None:
        return None if self.free is None else self.estimate.training_bytes <= self.free

    def describe(self) -> str:
        text = f"memory: {self.estimate.describe()}"
        if self.free is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            text += (f"; training adds {gib(self.estimate.training_bytes)} GiB to the loaded weights and the device has "
                     f"{gib(self.free)} GiB free: {verdict}")
        if self.advice:
            text += ". Would help: " + "; ".join(self.advice)
        return text


def gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def optimizer_bytes(name: str, params: int) -> int:
    return OPTIMIZER_BYTES_PER_PARAM.get(name, 8) * params


def _plain(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``t``'s data: ``t`` itself, or the inner tensors of a wrapper subclass (a quantized
    weight: its packed data and scales), found through torch's ``__tensor_flatten__`` protocol."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None or type(t) in (torch.Tensor, nn.Parameter):
        return [t]
    names, _ = flatten()
    return [p for name in names if isinstance(inner := getattr(t, name), torch.Tensor) for p in _plain(inner)]


def _storages(t: torch.Tensor) -> list[torch.UntypedStorage]:
    return [p.untyped_storage() for p in _plain(t) if p.device.type != "meta"]


def module_bytes(roots: Sequence[nn.Module], device: torch.device | None = None) -> int:
    """Parameters and buffers as stored (each storage once; a quantized weight as its packed data and scales); with
    ``device``, only those on it (ComfyUI may keep part of a big model offloaded)."""
    seen: set[int] = set()
    total = 0
    for root in roots:
        for t in list(root.parameters()) + list(root.buffers()):
            if device is not None and t.device.type != device.type:
                continue
            for p in _plain(t):
                key = p.untyped_storage().data_ptr() if p.device.type != "meta" else id(p)
                if key in seen:
                    continue
                seen.add(key)
                total += p.numel() * p.element_size()
    return total


class _Counts:
    """Storages autograd would keep in one pass (a saved view keeps its whole storage), each once, and who saved them
    first: ``OUTSIDE`` or a block. Storages are told apart by identity while alive (weak references): none is kept, so
    a freed storage's address may come back for another one."""

    OUTSIDE = -1

    def __init__(self, n_blocks: int) -> None:
        self.n_blocks = n_blocks
        self.saved: dict[int, tuple[weakref.ref, int, int]] = {}  # id -> (storage, bytes, owner)
        # the blocks' inputs, held until the pass ends (checkpointing keeps them anyway): id -> storage
        self.inputs: dict[int, torch.UntypedStorage] = {}
        self.total = 0
        self.blocks = [0] * n_blocks

    def _fresh(self, table: dict, storage: torch.UntypedStorage) -> bool:
        entry = table.get(id(storage))
        return entry is None or entry[0]() is not storage

    def save(self, storage: torch.UntypedStorage, owner: int) -> None:
        if self._fresh(self.saved, storage):
            size = storage.nbytes()
            self.saved[id(storage)] = (weakref.ref(storage), size, owner)
            self.total += size
            if owner != self.OUTSIDE:
                self.blocks[owner] += size

    def block_input(self, storage: torch.UntypedStorage) -> None:
        self.inputs[id(storage)] = storage

    def profile(self) -> ActivationProfile:
        # checkpointing keeps each input once, unless the pass outside the blocks keeps it anyway
        inputs = sum(storage.nbytes() for storage in self.inputs.values()
                     if self._fresh(self.saved, storage) or self.saved[id(storage)][2] != self.OUTSIDE)
        return ActivationProfile(self.total, tuple(self.blocks), inputs)


@contextlib.contextmanager
def _counting(blocks: Sequence[nn.Module], exclude: Iterable[torch.Tensor]) -> Iterator[_Counts]:
    """Count the bytes autograd would save (and save nothing); per block too, and the blocks' inputs. Tensors that
    share storage with ``exclude`` (the weights, counted on their own) are not activations."""
    counts = _Counts(len(blocks))
    weights = [s for t in exclude for s in _storages(t)]  # alive throughout: ids are stable
    weight_ids = {id(w) for w in weights}
    active: list[int] = []

    def pack(t: torch.Tensor) -> object:
        for storage in _storages(t):
            if id(storage) not in weight_ids:
                counts.save(storage, active[-1] if active else counts.OUTSIDE)
        return None  # nothing is kept: the pass needs no memory for backward

    def unpack(_: object) -> torch.Tensor:  # pragma: no cover - the measuring pass never runs backward
        raise RuntimeError("a memory-measuring forward pass has no backward")

    handles = []
    for i, block in enumerate(blocks):
        def pre(_m: nn.Module, args: tuple, kwargs: dict, _i: int = i) -> None:
            if not active:  # a block inside a block counts for the outer one
                for a in (*args, *kwargs.values()):
                    if isinstance(a, torch.Tensor) and a.is_floating_point():
                        for storage in _storages(a):
                            counts.block_input(storage)
            active.append(_i)

        def post(_m: nn.Module, _args: tuple, _kwargs: dict, _out: object) -> None:
            active.pop()

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield counts
    finally:
        for h in handles:
            h.remove()


def measure_activations(forward: Callable[[], torch.Tensor], blocks: Sequence[nn.Module] = (),
                        exclude: Iterable[torch.Tensor] = ()) -> ActivationProfile:
    """Run ``forward`` (a training loss, gradients on) once and return what autograd would save for backward,
    not counting tensors that are ``exclude``'s storage (the model's weights).

    Gradient checkpointing must not be active while measuring (its own hooks would hide the blocks' tensors): the
    profile gives both figures."""
    with _counting(blocks, exclude) as counts, torch.enable_grad():
        loss = forward()
        del loss
    return counts.profile()


def device_free_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` now (CUDA: the driver's figure; CPU: MemAvailable on Linux), or None."""
    if device.type == "cuda":  # the driver's free memory plus what torch has cached but not in use
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0]) + int(cached)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def advice(estimate: MemoryEstimate, free: int | None, stored_bytes_per_weight: float = 2.0) -> list[str]:
    """Settings that would make the run fit in ``free`` bytes (what the device has besides the loaded weights), each
    with the memory it would need then; empty when it fits or ``free`` is unknown."""
    if free is None or estimate.training_bytes <= free:
        return []
    out: list[str] = []

    def would(label: str, changed: MemoryEstimate) -> None:
        if changed.training_bytes < estimate.training_bytes:
            fits = "fits" if changed.training_bytes <= free else "still short"
            out.append(f"{label}: {gib(changed.training_bytes)} GiB ({fits})")

    if not estimate.gradient_checkpointing and estimate.activations.blocks:
        would("gradient_checkpointing on", replace(estimate, gradient_checkpointing=True))
    if estimate.batch_size > 1:
        would(f"batch_size 1 with grad_accum {estimate.batch_size * estimate.grad_accum}",
              replace(estimate, activations=estimate.activations.scaled(1 / estimate.batch_size), batch_size=1))
    would("half the resolution in Load Dataset (a quarter of the pixels)",
          replace(estimate, activations=estimate.activations.scaled(0.25)))
    if estimate.optimizer_name in ("adamw", "prodigy"):
        eight_bit = optimizer_bytes("adamw8bit", estimate.trainable_params)
        would("optimizer adamw8bit", replace(estimate, optimizer=eight_bit, optimizer_name="adamw8bit"))
    if stored_bytes_per_weight > 1:
        out.append("fp8 weights (Load Diffusion Model weight_dtype fp8_e4m3fn, or ComfyUI's --fp8_e4m3fn-unet): "
                   f"frees about {gib(estimate.weights * (1 - 1 / stored_bytes_per_weight))} GiB of weights")
    return out
