"""TensorBoard event files through the ``tensorboard`` package (via torch's SummaryWriter)."""

from __future__ import annotations

import logging
import os

from .progress import StepInfo, TrainCallback

logger = logging.getLogger(__name__)


class TensorBoardCallback(TrainCallback):
    """Writes loss, smoothed loss, lr, grad norm, s/step and samples/s under ``log_dir``."""

    def __init__(self, log_dir: str | os.PathLike[str], flush_secs: int = 10) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # pragma: no cover - tensorboard is in requirements.txt
            raise ValueError("TensorBoard logging needs the package 'tensorboard': pip install tensorboard") from exc
        self.log_dir = str(log_dir)
        self._writer = SummaryWriter(log_dir=self.log_dir, flush_secs=flush_secs)

    def on_step(self, info: StepInfo) -> None:
        w = self._writer
        w.add_scalar("loss/raw", info.loss, info.step)
        w.add_scalar("loss/smoothed", info.smoothed_loss, info.step)
        w.add_scalar("lr", info.lr, info.step)
        w.add_scalar("grad_norm", info.grad_norm, info.step)
        w.add_scalar("speed/sec_per_step", info.sec_per_step, info.step)
        w.add_scalar("speed/samples_per_sec", info.samples_per_sec, info.step)

    def on_end(self, state: object, stopped_early: bool) -> None:
        self.close()

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()
