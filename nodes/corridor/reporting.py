"""Progress bars, progress text, websocket events and Cancel: the engine's events as ComfyUI's."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import comfy.model_management as mm
import comfy.utils
import torch

from ...lora_core import AdapterSet, StepInfo, TrainCallback
from ...lora_core.memory import MemoryReport
from ...lora_core.progress import ItemRate, status_text

logger = logging.getLogger(__name__)

PROGRESS_EVENT = "kiln.train.progress"
PREVIEW_EVENT = "kiln.train.preview"

def interrupted() -> bool:
    return mm.processing_interrupted()


def raise_if_interrupted() -> None:
    mm.throw_exception_if_processing_interrupted()


class NodeProgress(TrainCallback):
    """ComfyUI progress bar + progress text + live websocket events + Cancel for one Train Steps node."""

    def __init__(
        self, node_id: str | None, total: int, preview: Callable[[int], Any] | None = None,
        samples_dir: Path | None = None,
        fps: float = 16.0,
    ) -> None:
        self.node_id = node_id
        self.samples_dir = samples_dir
        self.fps = fps  # a video model's preview clips play at its frame rate
        self.total = total
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)
        self.preview = preview
        self.cancelled = False
        self.previews: list[tuple[int, torch.Tensor]] = []
        self._last_sent = 0.0
        self._value = 0
        self._unsent: list[list[float | None]] = []  # [step, loss, lr] since the last live event (for the chart)

    def _server(self) -> Any:
        try:
            from server import PromptServer

            return PromptServer.instance
        except Exception:  # noqa: BLE001 - headless runner has no server
            return None

    def _update(self, value: int, preview: Any = None) -> None:
        """Progress bar (and preview image) on the node; Cancel is recorded, never raised mid-step."""
        if self.cancelled or interrupted():
            self.cancelled = True
            return
        try:
            self.bar.update_absolute(value, self.total, preview)
        except mm.InterruptProcessingException:
            self.cancelled = True  # the node saves a checkpoint, then re-raises
            mm.interrupt_current_processing(True)

    def on_memory(self, report: MemoryReport) -> None:
        """The estimate on the node until the first step's progress replaces it (the console keeps it)."""
        send_text(self.node_id, f"Train Steps: {report.describe()}")

    def on_step(self, info: StepInfo) -> None:
        self._value = info.run_step
        self._update(info.run_step)
        if self.cancelled:
            return
        self._unsent = self._unsent[-999:] + [[info.step, _finite(info.loss), _finite(info.lr)]]
        now = time.monotonic()
        if now - self._last_sent >= 0.25 or info.run_step == info.run_steps:
            self._last_sent = now
            points, self._unsent = self._unsent, []
            server = self._server()
            if server is not None and self.node_id is not None:
                text = (
                    f"step {info.step} ({info.run_step}/{info.run_steps}) · loss {info.loss:.4f} "
                    f"(avg {info.smoothed_loss:.4f}) · {info.sec_per_step:.2f} s/it · ETA {_eta(info.eta_seconds)}"
                )
                server.send_progress_text(text, self.node_id, server.client_id)
                server.send_sync(
                    PROGRESS_EVENT,
                    {
                        "node": self.node_id,
                        "step": info.step,
                        "run_step": info.run_step,
                        "run_steps": info.run_steps,
                        "epoch": info.epoch,
                        "loss": _finite(info.loss),
                        "smoothed_loss": _finite(info.smoothed_loss),
                        "lr": _finite(info.lr),
                        "sec_per_step": _finite(info.sec_per_step),
                        "samples_per_sec": _finite(info.samples_per_sec),
                        "eta_seconds": _finite(info.eta_seconds),
                        "points": points,
                    },
                    server.client_id,
                )

    def should_stop(self) -> bool:
        return self.cancelled or interrupted()

    def on_preview(self, step: int, adapters: AdapterSet) -> None:
        if self.preview is None:
            return
        if self.cancelled or interrupted():
            self.cancelled = True
            return
        try:
            image = self.preview(step)  # IMAGE [1, H, W, 3]; a video model's clip [F, H, W, 3]
        except mm.InterruptProcessingException:
            self.cancelled = True
            mm.interrupt_current_processing(True)
            return
        self.previews.append((step, image))
        from . import previews

        if self.samples_dir is not None:  # a still as PNG, a video model's clip as an animated WEBP
            from ...lora_core.fileio import atomic_write_bytes

            data, ext = previews.encode_preview(image, self.fps)
            atomic_write_bytes(self.samples_dir / f"step{step:06d}.{ext}", data)
        self._update(self._value, ("JPEG", previews.to_pil(image[:1])[0], 512))  # the progress bar: its first frame


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _eta(seconds: float) -> str:
    from ...lora_core.progress import format_eta

    return format_eta(seconds)

def send_event(event: str, data: dict[str, Any]) -> None:
    """A custom websocket event to the client that queued the prompt (nothing without a web server)."""
    try:
        from server import PromptServer

        server = PromptServer.instance
    except Exception:  # noqa: BLE001 - headless runner has no server
        return
    if server is not None:
        server.send_sync(event, data, server.client_id)


def blocked(message: str) -> Any:
    """An output value that stops downstream nodes with ``message`` (for outputs that make no sense here)."""
    from comfy_execution.graph_utils import ExecutionBlocker

    return ExecutionBlocker(message)


class ItemProgress:
    """Progress bar + ``[phase] done/total · items/s · ETA`` text on a node, for loops over items; records Cancel.

    The bar moves for every item; the text goes at most 4 times a second (and for the first and the last item).
    ``phase`` names what the node is doing (``"Load Dataset: encoding latents"``); ``kiln.py``'s terminal prints
    these texts as a progress line. :meth:`update` records Cancel (Auto Caption keeps what is done, then re-raises);
    :meth:`advance` raises ComfyUI's interrupt at once, for loops that have nothing to keep.
    """

    def __init__(self, node_id: str | None, unit: str = "images", phase: str = "") -> None:
        self.node_id = node_id
        self.unit = unit
        self.phase = phase
        self.cancelled = False
        self.bar: Any = None
        self.total = 0
        self.counter = ItemRate(unit=unit, label=phase)
        self.started = self.counter.started

    def start(self, total: int) -> None:
        self.total = total
        self.counter.start(total)
        self.started = self.counter.started
        if total > 0:
            self.bar = comfy.utils.ProgressBar(total, node_id=self.node_id)
            if self.phase:
                send_text(self.node_id, self.counter.text(0))

    def update(self, done: int) -> None:
        if self.bar is None or self.cancelled:
            return
        try:
            self.bar.update_absolute(done, self.total)
        except mm.InterruptProcessingException:
            self.cancelled = True
            mm.interrupt_current_processing(True)  # the node re-raises after keeping what is done
            return
        if self.counter.due(done):
            send_text(self.node_id, self.counter.text(done))

    def advance(self, done: int) -> None:
        """:meth:`update`, then ComfyUI's interrupt if the user pressed Cancel (the graph stops cleanly)."""
        self.update(done)
        if self.should_stop():
            stop()

    def should_stop(self) -> bool:
        if interrupted():
            self.cancelled = True
        return self.cancelled


def stop() -> None:
    """Raise ComfyUI's interrupt (the executor reports the prompt as interrupted, not failed)."""
    mm.throw_exception_if_processing_interrupted()  # clears the flag as ComfyUI does
    raise mm.InterruptProcessingException()


def send_text(node_id: str | None, text: str) -> None:
    """Progress text under the node (the terminal's progress line headless); nothing without a server."""
    if node_id is None:
        return
    try:
        from server import PromptServer

        server = PromptServer.instance
        if server is not None:
            server.send_progress_text(text, node_id, server.client_id)
    except Exception:  # noqa: BLE001 - headless runner has no server
        pass


def status(node_id: str | None, label: str) -> None:
    """A phase without a count, e.g. ``status(node, "Train Steps: loading the model")`` shows ``…loading the model…``."""
    logger.debug("%s", status_text(label))
    send_text(node_id, status_text(label))
