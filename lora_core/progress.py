"""Progress arithmetic (smoothed loss, seconds per step, ETA) and the callback interface of the trainer."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .adapters import AdapterSet
    from .memory import MemoryReport
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

    def on_memory(self, report: MemoryReport) -> None:
        """Called once before the first step when the trainer estimates memory (:mod:`.memory`)."""

    def should_stop(self) -> bool:
        return False

    def on_checkpoint(self, state: TrainState) -> None:
        """Called every ``save_every`` steps with a snapshot of the state."""

    def on_preview(self, step: int, adapters: AdapterSet) -> None:
        """Called every ``preview_every`` steps while the adapters are attached and in eval mode."""

    def on_end(self, state: TrainState, stopped_early: bool) -> None:
        pass


# ---- loops over items (Load Dataset, Auto Caption, caption encoding): n/N, items/s, ETA ------------------------

TEXT_INTERVAL = 0.25  # at most 4 progress texts a second (the first and the last always go)
_PHASE_TEXT = re.compile(
    r"^(?:(?P<label>.+?) )?(?P<done>\d+)/(?P<total>\d+) (?P<unit>\S+) · (?P<rate>\S+) (?P=unit)/s · ETA (?P<eta>\S+)$"
)
STATUS_END = "…"


class ItemRate:
    """Counts items against a total, gives items/s and ETA, and says when a progress text is due (throttled).

    ``text(done)`` is ``"<label> 120/1000 images · 8.1 images/s · ETA 1:48"`` (no label: it starts at the count).
    """

    def __init__(self, unit: str = "images", label: str = "", interval: float = TEXT_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.unit = unit
        self.label = label
        self.interval = interval
        self.clock = clock
        self.total = 0
        self.started = clock()
        self._last_text: float | None = None

    def start(self, total: int) -> None:
        self.total = total
        self.started = self.clock()
        self._last_text = None

    def rate(self, done: int) -> float:
        elapsed = self.clock() - self.started
        return done / elapsed if done > 0 and elapsed > 0 else math.nan

    def eta(self, done: int) -> float:
        rate = self.rate(done)
        return max(self.total - done, 0) / rate if rate > 0 else math.nan

    def due(self, done: int) -> bool:
        """True for the first and the last count and then at most once per ``interval``; marks the text sent."""
        now = self.clock()
        if self._last_text is None or done >= self.total or now - self._last_text >= self.interval:
            self._last_text = now
            return True
        return False

    def text(self, done: int) -> str:
        head = f"{self.label} " if self.label else ""
        return (f"{head}{done}/{self.total} {self.unit} · {format_rate(self.rate(done))} {self.unit}/s · "
                f"ETA {format_eta(self.eta(done))}")


def format_rate(rate: float) -> str:
    if not math.isfinite(rate):
        return "?"
    return f"{rate:.2f}" if rate < 1 else f"{rate:.1f}" if rate < 100 else f"{rate:.0f}"


def status_text(label: str) -> str:
    """A phase without a count yet, e.g. ``"Train Steps: loading the model…"``."""
    return label if label.endswith(STATUS_END) else label + STATUS_END


@dataclass(frozen=True)
class PhaseText:
    """A progress text of :class:`ItemRate` (``done``/``total`` set) or :func:`status_text` (both ``None``)."""

    text: str
    label: str
    done: int | None = None
    total: int | None = None


def parse_phase_text(text: str) -> PhaseText | None:
    """The phase in a progress text Kiln's item loops send; ``None`` for any other text (Train Steps' step line)."""
    m = _PHASE_TEXT.match(text)
    if m:
        return PhaseText(text, m["label"] or "", int(m["done"]), int(m["total"]))
    if text.endswith(STATUS_END) and "\n" not in text:
        return PhaseText(text, text[: -len(STATUS_END)])
    return None
