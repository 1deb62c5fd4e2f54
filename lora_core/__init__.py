"""LoRA Kiln's training engine: plain torch + safetensors, no ComfyUI import.

Read it top-down:

- :mod:`.config`       what to train and how (validated dataclasses)
- :mod:`.data`         folder scanning, captions, image validation, buckets, encoded-sample batches
- :mod:`.adapters`     LoRA/LoCon modules in bypass form, attached by hooks, removable
- :mod:`.diffusion`    the step math: timesteps, noise, targets, losses, min-SNR
- :mod:`.optim`        optimizer and learning-rate schedule factories
- :mod:`.state`        the immutable training state and its pickle-free checkpoint
- :mod:`.trainer`      run N steps with callbacks, NaN guard, cancel
- :mod:`.formats.kohya` kohya/A1111 export and import with ``ss_*`` metadata
- :mod:`.progress`, :mod:`.tb`  progress/ETA arithmetic and TensorBoard event files
"""

from .adapters import (
    AdapterSet,
    AdapterSpec,
    AttachHandle,
    LoRAModule,
    UnadaptableLayerError,
    find_targets,
    layer_kind,
    target_counts,
)
from .config import AdapterConfig, TrainConfig
from .data.latents import LatentDataset, LatentItem
from .diffusion import DiffusionModel, diffusion_loss
from .progress import StepInfo, TrainCallback
from .state import TrainState
from .trainer import NonFiniteLossError, OutOfMemoryTrainingError, Trainer, TrainingError, TrainResult

__all__ = [
    "AdapterConfig",
    "AdapterSet",
    "AdapterSpec",
    "AttachHandle",
    "DiffusionModel",
    "LatentDataset",
    "LatentItem",
    "LoRAModule",
    "NonFiniteLossError",
    "OutOfMemoryTrainingError",
    "StepInfo",
    "TrainCallback",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "Trainer",
    "TrainingError",
    "diffusion_loss",
    "find_targets",
    "layer_kind",
    "target_counts",
    "UnadaptableLayerError",
]
