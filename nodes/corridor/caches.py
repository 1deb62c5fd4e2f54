"""VAE latents and caption encodings, cached across re-queues (bounded, least recently used first out).

A cache lives as long as the ComfyUI model it belongs to (weak keys): unloading a checkpoint frees its entries.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import nn

LATENT_CACHE_BYTES = 4 << 30  # per VAE: about 16,000 SDXL latents at 1024 px
TEXT_CACHE_BYTES = 1 << 30  # per CLIP: about 1,300 SDXL captions


class BoundedCache:
    """An LRU mapping whose tensors (or tuples of tensors) stay under ``max_bytes`` in total; ``size`` counts the
    bytes of other values."""

    def __init__(self, max_bytes: int, size: Callable[[Any], int] | None = None) -> None:
        self.max_bytes = max_bytes
        self.size = size or _nbytes
        self.nbytes = 0
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> Any | None:
        hit = self._items.get(key)
        if hit is None:
            return None
        self._items.move_to_end(key)
        return hit[0]

    def put(self, key: Hashable, value: Any) -> None:
        size = self.size(value)
        self.drop(key)
        self._items[key] = (value, size)
        self.nbytes += size
        while self.nbytes > self.max_bytes and len(self._items) > 1:
            _, (_, dropped) = self._items.popitem(last=False)
            self.nbytes -= dropped

    def drop(self, key: Hashable) -> None:
        if key in self._items:
            self.nbytes -= self._items.pop(key)[1]


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0


_latents: weakref.WeakKeyDictionary[nn.Module, BoundedCache] = weakref.WeakKeyDictionary()
_texts: weakref.WeakKeyDictionary[nn.Module, BoundedCache] = weakref.WeakKeyDictionary()


def latent_cache(vae: Any) -> BoundedCache:
    return _latents.setdefault(vae.first_stage_model, BoundedCache(LATENT_CACHE_BYTES))


def text_cache(clip: Any) -> BoundedCache:
    return _texts.setdefault(clip.cond_stage_model, BoundedCache(TEXT_CACHE_BYTES))


def encode_image(vae: Any, key: tuple, image: torch.Tensor | Callable[[], torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """Latent [C, h, w] of one IMAGE [H, W, 3] ([C, t, h, w] from a video VAE), or of a clip's frames [F, H, W, 3]
    encoded as one video (VAE Encode of a video's IMAGE batch); cached per VAE by ``key`` (content digest + bucket,
    and for a clip its window). ``image`` may be a function giving it, called only when the cache misses."""
    cache = latent_cache(vae)
    hit = cache.get(key)
    if hit is not None:
        return hit, False
    if callable(image):
        image = image()
    pixels = image if image.ndim == 4 else image[None]
    with torch.no_grad():
        latent = normal_tensor(vae.encode(pixels[..., :3])[0].float().cpu())
    cache.put(key, latent)
    return latent, True


def normal_tensor(t: torch.Tensor) -> torch.Tensor:
    """A copy usable by autograd even when ``t`` was made under ComfyUI's ``inference_mode``."""
    with torch.inference_mode(False):
        return t.clone()
