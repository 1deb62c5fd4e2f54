"""Progress arithmetic (smoothed loss, seconds per step, ETA) and the callback interface of the trainer."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .adapters import AdapterSet
    from .state import TrainState


@dataclass(frozen=True)
class StepInfo:
    step: int  # global optimizer step just finished (1-based)
    run_step: int  # step within this run (1-based)
    run_steps: int  # steps this run will do
    epoch: int
    loss: float
    smoothed_loss: float
    lr: float
    grad_norm: float
    sec_per_step: float
    samples_per_sec: float
    eta_seconds: float

    def describe(self) -> str:
        """``Epoch 2 | Step 85/250 | Loss 0.1420 | 0.31 s/it | ETA 0:51``."""
        return (
            f"Epoch {self.epoch + 1} | Step {self.run_step}/{self.run_steps} | Loss {self.loss:.4f} "
            f"(avg {self.smoothed_loss:.4f}) | {self.sec_per_step:.2f} s/it | ETA {format_eta(self.eta_seconds)}"
        )


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Smoother:
    """Bias-corrected exponential moving average (like TensorBoard's smoothing)."""

    def __init__(self, beta: float = 0.9) -> None:
        self.beta = beta
        self._avg = 0.0
        self._n = 0

    def update(self, value: float) -> float:
        self._n += 1
        self._avg = self.beta * self._avg + (1 - self.beta) * value
        return self.value

    @property
    def value(self) -> float:
        return self._avg / (1 - self.beta**self._n) if self._n else float("nan")


class TrainCallback:
    """Hooks the trainer calls; override what you need. All run on the training thread."""

    def on_start(self, state: TrainState, run_steps: int) -> None:
        pass

    def on_step(self, info: StepInfo) -> None:
        pass

    def should_stop(self) -> bool:
        return False

    def on_checkpoint(self, state: TrainState) -> None:
        """Called every ``save_every`` steps with a snapshot of the state."""

    def on_preview(self, step: int, adapters: AdapterSet) -> None:
        """Called every ``preview_every`` steps while the adapters are attached and in eval mode."""

    def on_end(self, state: TrainState, stopped_early: bool) -> None:
        pass
