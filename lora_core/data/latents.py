"""Encoded training samples and the deterministic order they are drawn in.

A :class:`LatentDataset` holds what the VAE and text encoder produced once per file. The order of an
epoch is a pure function of ``(seed, epoch)``, so training resumed from ``(epoch, batch_index)`` draws
exactly the batches an uninterrupted run would have drawn.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class LatentItem:
    latent: torch.Tensor  # [C, h, w] as the VAE produced it (the host scales it for its model)
    cond: Mapping[str, torch.Tensor]  # e.g. {"context": [77, 768]}; no batch dimension
    repeats: int = 1
    caption: str = ""
    key: str = ""  # where it came from (a file path), for messages

    @property
    def shape_key(self) -> tuple:
        return (tuple(self.latent.shape), tuple(sorted((k, tuple(v.shape)) for k, v in self.cond.items())))


@dataclass(frozen=True)
class LatentDataset:
    items: tuple[LatentItem, ...]
    info: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.items:
            raise ValueError("the dataset is empty: add images to the folder (or fix the errors reported for them)")

    @property
    def num_samples(self) -> int:
        return sum(i.repeats for i in self.items)

    def epoch_batches(self, epoch: int, batch_size: int, seed: int) -> list[list[int]]:
        """Batches of item indices for one epoch: repeats expanded, same-shape items together, shuffled."""
        generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
        groups: dict[tuple, list[int]] = {}
        for idx, item in enumerate(self.items):
            groups.setdefault(item.shape_key, []).extend([idx] * item.repeats)
        batches: list[list[int]] = []
        for key in sorted(groups, key=repr):
            members = groups[key]
            order = torch.randperm(len(members), generator=generator).tolist()
            shuffled = [members[i] for i in order]
            batches += [shuffled[i : i + batch_size] for i in range(0, len(shuffled), batch_size)]
        order = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in order]

    def collate(self, indices: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        items = [self.items[i] for i in indices]
        latents = torch.stack([i.latent for i in items])
        cond = {k: torch.stack([i.cond[k] for i in items]) for k in items[0].cond}
        return latents, cond
