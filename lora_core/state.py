"""Training state: adapters, optimizer, step/epoch, every RNG. Immutable; checkpoints without pickle.

ComfyUI caches node outputs and may hand the same state to several downstream nodes, so a
:class:`TrainState` is never mutated: training produces a new one with fresh tensors. A checkpoint is a
single ``.safetensors`` file: tensors as tensors, everything else as JSON in the header metadata.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .adapters import AdapterSet, AdapterSpec
from .config import AdapterConfig
from .fileio import atomic_save_safetensors, dumps, load_safetensors
from .formats.privacy import Redactor

CHECKPOINT_FORMAT = "lora-kiln.checkpoint/1"
# The fields training changes; the rest of a state (adapter config, specs, seed, info) is the start state's.
TRAINED_FIELDS = ("weights", "step", "epoch", "batch_index", "optimizer_name", "optimizer_state", "rng",
                  "scaler_state", "history")


@dataclass(frozen=True)
class TrainState:
    adapter_config: AdapterConfig
    specs: tuple[AdapterSpec, ...]
    weights: Mapping[str, torch.Tensor]  # "<adapter>.lora_down.weight" etc., float32 on the CPU
    seed: int = 0
    step: int = 0
    epoch: int = 0
    batch_index: int = 0  # next micro-batch of the current epoch
    optimizer_name: str | None = None
    optimizer_state: Mapping[str, Any] | None = None  # torch optimizer state_dict, CPU tensors
    rng: Mapping[str, torch.Tensor] | None = None  # None: seeded from ``seed`` on first use
    scaler_state: Mapping[str, Any] | None = None  # fp16 GradScaler (loss scale, growth tracker); JSON-able
    history: tuple[tuple[int, float, float], ...] = ()  # (step, loss, lr) per optimizer step
    info: Mapping[str, Any] = field(default_factory=dict)  # run facts for export metadata

    @classmethod
    def from_adapters(cls, adapters: AdapterSet, seed: int = 0, info: Mapping[str, Any] | None = None) -> TrainState:
        return cls(
            adapter_config=adapters.config,
            specs=tuple(adapters.specs.values()),
            weights={k: v.detach().float().cpu().clone() for k, v in adapters.weights().items()},
            seed=seed,
            info=dict(info or {}),
        )

    def replace(self, **changes: Any) -> TrainState:
        return dataclasses.replace(self, **changes)

    def build_adapters(self) -> AdapterSet:
        """A fresh trainable :class:`AdapterSet` holding copies of this state's weights."""
        adapters = AdapterSet(list(self.specs), self.adapter_config)
        adapters.load_weights(self.weights)
        return adapters

    @property
    def last_loss(self) -> float | None:
        return self.history[-1][1] if self.history else None

    # ---- checkpoints -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str], extra_metadata: Mapping[str, str] | None = None,
             redact: bool = True, plain_metadata: Mapping[str, str] | None = None) -> Path:
        """Write the checkpoint. With ``redact`` (the default) the run facts in ``info`` and ``extra_metadata`` are
        redacted like a shared LoRA's metadata (no absolute path, home, user or host name: see
        :mod:`.formats.privacy`); the resume data (weights, optimizer, RNG, step) is never touched, nor is
        ``plain_metadata`` (machine values such as a run digest, which a user or host name must not alter).
        """
        tensors: dict[str, torch.Tensor] = {f"weights/{k}": v for k, v in self.weights.items()}
        optim_json: dict[str, Any] | None = None
        if self.optimizer_state is not None:
            per_param: dict[str, dict[str, Any]] = {}
            for idx, entries in self.optimizer_state["state"].items():
                scalars = {}
                for name, value in entries.items():
                    if isinstance(value, torch.Tensor):
                        tensors[f"optim/{idx}/{name}"] = value
                    else:
                        scalars[name] = value
                per_param[str(idx)] = scalars
            optim_json = {"param_groups": self.optimizer_state["param_groups"], "scalars": per_param}
        for name, value in (self.rng or {}).items():
            tensors[f"rng/{name}"] = value
        meta = {
            "adapter_config": self.adapter_config.to_dict(),
            "specs": [s.to_dict() for s in self.specs],
            "seed": self.seed,
            "step": self.step,
            "epoch": self.epoch,
            "batch_index": self.batch_index,
            "optimizer_name": self.optimizer_name,
            "optimizer": optim_json,
            "scaler": dict(self.scaler_state) if self.scaler_state is not None else None,
            "history": [list(h) for h in self.history],
            "info": dict(self.info),
        }
        extra = dict(extra_metadata or {})
        if redact:
            redactor = Redactor()
            meta["info"] = redactor.value(meta["info"])
            extra = redactor.metadata(extra)
        metadata = {"format": CHECKPOINT_FORMAT, "kiln_state": dumps(meta)}
        metadata.update(extra)
        metadata.update(plain_metadata or {})
        return atomic_save_safetensors(tensors, path, metadata)

    def with_training_of(self, other: TrainState) -> TrainState:
        """This state with what training changed taken from ``other`` (weights, step, cursor, optimizer, RNG, loss
        scaler, history): what :meth:`Trainer.run` returns for a start state, rebuilt from a finished state or a
        checkpoint of the same run. Adapter config, specs, seed and ``info`` stay this state's."""
        return self.replace(**{name: getattr(other, name) for name in TRAINED_FIELDS})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TrainState:
        tensors, metadata = load_safetensors(path)
        if metadata.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"{Path(path).name} is not a LoRA Kiln training checkpoint (format={metadata.get('format')!r}); "
                "to continue from a finished LoRA file use it as the starting LoRA instead"
            )
        meta = json.loads(metadata["kiln_state"])
        weights = {k[len("weights/"):]: v for k, v in tensors.items() if k.startswith("weights/")}
        rng = {k[len("rng/"):]: v for k, v in tensors.items() if k.startswith("rng/")} or None
        optimizer_state = None
        if meta["optimizer"] is not None:
            state: dict[int, dict[str, Any]] = {}
            for idx, scalars in meta["optimizer"]["scalars"].items():
                entry = dict(scalars)
                prefix = f"optim/{idx}/"
                entry.update({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
                state[int(idx)] = entry
            groups = []
            for g in meta["optimizer"]["param_groups"]:
                g = dict(g)
                if isinstance(g.get("betas"), list):
                    g["betas"] = tuple(g["betas"])
                groups.append(g)
            optimizer_state = {"state": state, "param_groups": groups}
        return cls(
            adapter_config=AdapterConfig.from_dict(meta["adapter_config"]),
            specs=tuple(AdapterSpec.from_dict(s) for s in meta["specs"]),
            weights=weights,
            seed=meta["seed"],
            step=meta["step"],
            epoch=meta["epoch"],
            batch_index=meta["batch_index"],
            optimizer_name=meta["optimizer_name"],
            optimizer_state=optimizer_state,
            rng=rng,
            scaler_state=meta.get("scaler"),  # absent in checkpoints written before it was kept
            history=tuple((int(s), float(lo), float(lr)) for s, lo, lr in meta["history"]),
            info=meta["info"],
        )


def checkpoint_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The header metadata of a checkpoint file, without reading its tensors ({} for anything unreadable)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - a truncated or foreign file is simply not a match
        return {}
