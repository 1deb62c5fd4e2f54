"""The objects that travel on Kiln's sockets (KILN_DATASET, KILN_STATE). Immutable: ComfyUI caches them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..lora_core import LatentDataset, LatentItem, TrainState
from ..lora_core.data import DatasetConfig, ImageRecord, tag_frequency
from ..lora_core.formats.kohya import KohyaNaming
from ..lora_core.formats.peft import PeftNaming
from .corridor import text_encoders
from .corridor.denoiser import SIZE
from .corridor.families import Detected


@dataclass(frozen=True)
class KilnDataset:
    """Validated records, their latents (encoded once), and the CLIP/VAE that go with them."""

    config: DatasetConfig
    folder: Path
    records: tuple[ImageRecord, ...]
    latents: tuple[torch.Tensor, ...]
    clip: Any
    vae: Any
    warnings: tuple[str, ...] = ()
    # per record: (original h, original w, crop top, crop left, target h, target w), SDXL's size conditioning
    sizes: tuple[tuple[int, int, int, int, int, int], ...] = ()

    def __repr__(self) -> str:  # ComfyUI prints inputs in error reports: keep it short
        return f"KilnDataset({len(self.records)} images from {self.folder})"

    def caption(self, record: ImageRecord) -> str:
        return record.caption if record.caption is not None else self.config.trigger_word

    def replace(self, **changes: Any) -> KilnDataset:
        return dataclasses.replace(self, **changes)

    def encoded(self, text_encoder: text_encoders.TextEncoder | None = None, size_conditioning: bool = False,
                on_progress: Callable[[int], None] | None = None, extras: bool = False) -> tuple[LatentDataset, int]:
        """The engine's dataset; captions go through CLIP once per distinct text (cached). Returns (dataset, new encodes).

        With ``text_encoder`` (text-encoder training) the items carry token ids instead: the text is encoded in
        every step, through the adapters. ``size_conditioning`` (SDXL) adds each image's original size, crop and
        bucket size. ``on_progress(n)`` is called after each record (the caption-encoding phase's progress).
        ``extras``: the encoder's other outputs too (text_encoders.encode_caption), for models fed through extra_conds.
        """
        items = []
        fresh = 0
        for i, (record, latent) in enumerate(zip(self.records, self.latents)):
            text = self.caption(record)
            if text_encoder is not None:
                cond = text_encoder.tokens(text)
            else:
                cond, new = text_encoders.encode_caption(self.clip, text, extras=extras)
                fresh += int(new)
                cond = dict(cond)
            if size_conditioning:
                cond[SIZE] = torch.tensor(self.sizes[i] if self.sizes else self.default_size(record), dtype=torch.long)
            items.append(LatentItem(latent=latent, cond=cond, repeats=record.repeats, caption=text,
                                    key=str(record.path)))
            if on_progress is not None:
                on_progress(i + 1)
        return LatentDataset(tuple(items)), fresh

    @staticmethod
    def default_size(record: ImageRecord) -> tuple[int, int, int, int, int, int]:
        w, h = record.bucket
        return (record.height, record.width, 0, 0, h, w)

    def run_info(self) -> dict[str, Any]:
        """Facts for the LoRA's ``ss_*`` metadata, keyed like kohya (``<repeats>_<folder>``)."""
        by_dir: dict[str, list[ImageRecord]] = {}
        for r in self.records:
            folder = r.path.parent.name if r.path.parent != self.folder else self.folder.name
            by_dir.setdefault(f"{r.repeats}_{folder}" if not folder[:1].isdigit() else folder, []).append(r)
        return {
            "resolution": (self.config.resolution, self.config.resolution),
            "num_train_images": sum(r.repeats for r in self.records),
            "tag_frequency": {k: tag_frequency(self.caption(r) for r in v) for k, v in by_dir.items()},
            "dataset_dirs": {k: {"n_repeats": v[0].repeats, "img_count": len(v)} for k, v in by_dir.items()},
            "trigger_word": self.config.trigger_word,
        }


@dataclass(frozen=True)
class KilnRun:
    """What flows between Inject LoRA, Train Steps and Save LoRA: the engine state plus its ComfyUI context."""

    state: TrainState
    model: Any  # the MODEL training runs on, without Kiln adapters
    name: str
    naming: KohyaNaming | PeftNaming
    detected: Detected  # the model family and its training objective (corridor/families.py)
    base_model_name: str = ""
    train_settings: dict[str, Any] = field(default_factory=dict)
    clip: Any = None  # the CLIP whose text encoder is trained (None: UNet only)

    @property
    def trains_text_encoder(self) -> bool:
        return any(not s.name.startswith("unet.") for s in self.state.specs)

    @property
    def base_model_version(self) -> str:
        return self.detected.base_model_version

    @property
    def prediction_type(self) -> str:
        return self.detected.objective.prediction_type

    def __repr__(self) -> str:
        return f"KilnRun({self.name!r}, step {self.state.step}, {len(self.state.specs)} adapters)"

    def replace(self, **changes: Any) -> KilnRun:
        return dataclasses.replace(self, **changes)
