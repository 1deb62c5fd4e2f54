"""ComfyUI glue: thin V3 nodes over the engine. Only this package imports ComfyUI."""

from .caption import KilnAutoCaption
from .dataset import KilnLoadDataset
from .inject import KilnInjectLoRA
from .save import KilnLoadCheckpoint, KilnSaveLoRA
from .train import KilnTrainSteps

NODES = [KilnLoadDataset, KilnAutoCaption, KilnInjectLoRA, KilnTrainSteps, KilnSaveLoRA, KilnLoadCheckpoint]
