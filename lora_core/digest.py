"""Digests of what determines a training run's result: "the same training" as a SHA-256, stable across processes.

A Train Steps node that is about to train computes :func:`run_digest` over

- the start state's content (:func:`state_digest`): adapter weights, step, epoch/batch cursor, optimizer state,
  loss scaler, RNG states, seed, history, adapter specs and config; not ``info`` (export metadata only);
- the data as the trainer gets it (:func:`dataset_digest`): each item's latent bytes (bucket = its shape), its
  conditioning tensors (the caption encodings, hence the CLIP, its LoRA patches and clip skip; token ids when the
  text encoder trains; SDXL size conditioning), repeats and caption text, in order;
- every training setting (:func:`config_digest`, the whole :class:`~.config.TrainConfig`);
- the base model's identity as the host loaded it (a JSON-able mapping; tensors are fingerprinted with
  :func:`tensors_fingerprint`, a strided sample of every tensor's values with its name, shape and dtype);
- the training code: :data:`TRAINING_CODE_VERSION` and a hash of the source files that do the training math
  (:func:`source_digest`), so a changed trainer never reuses an older result, even if nobody bumped the constant.

What only changes what is shown or written (the preview inputs, ``save_every``, ``retrain``: see
:data:`PRESENTATION_INPUTS`) is not part of it. No ComfyUI import: the host hands plain tensors and data over.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig
from .data.latents import LatentDataset
from .state import TRAINED_FIELDS, TrainState

# Bump when the training math changes in a way the source hash below would not see (a dependency's behaviour the
# code relies on, say). Finished runs and checkpoints of another version are then never reused or resumed.
TRAINING_CODE_VERSION = 1
DIGEST_FORMAT = "lora-kiln.run-digest/1"

# Train Steps inputs that only change what is shown or written: never part of the digest (unit-tested against the
# node's inputs: every other input must reach TrainConfig through the settings table).
PRESENTATION_INPUTS = frozenset({"save_every", "preview_every", "preview_prompt", "preview_seed", "preview_size",
                                 "preview_steps", "preview_cfg", "retrain", "keep_checkpoints"})

SAMPLES_PER_TENSOR = 1024  # values sampled from each tensor of a base model (all of a smaller tensor)

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def sha256_hex(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def _raw(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat integer tensor of the same element size (works for bf16 and fp8 too)."""
    flat = t.detach().reshape(-1)
    if flat.dtype.is_complex or flat.element_size() not in _INT_VIEW:
        return flat.contiguous().view(torch.uint8)
    return flat.contiguous().view(_INT_VIEW[flat.element_size()])


def tensor_bytes_digest(t: torch.Tensor) -> str:
    """SHA-256 over dtype, shape and every byte of ``t``."""
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(_raw(t).cpu().view(torch.uint8).numpy())  # the buffer itself, no copy
    return h.hexdigest()


def canonical(obj: Any) -> Any:
    """A JSON-able, order-independent form of ``obj``: tensors become their byte digests, tuples lists, dict keys
    strings in sorted order, floats their exact repr. Equal content gives equal JSON, whatever the container types
    (a state loaded from a checkpoint hashes like the one that was saved; an integral float as the int)."""
    if isinstance(obj, torch.Tensor):
        return {"tensor": tensor_bytes_digest(obj)}
    if isinstance(obj, Mapping):
        return {"map": [[str(k), canonical(v)] for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))]}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        if not math.isfinite(obj):
            return {"float": repr(obj)}
        return int(obj) if obj.is_integer() else obj  # 4.0 and 4 are the same alpha (JSON may give either back)
    if isinstance(obj, (torch.dtype, torch.device)):
        return str(obj)
    # anything else: its type and repr (an object whose repr carries an address never matches: trains afresh)
    return {"object": f"{type(obj).__module__}.{type(obj).__qualname__}", "repr": repr(obj)}


def json_digest(obj: Any) -> str:
    return sha256_hex(json.dumps(canonical(obj), sort_keys=True, separators=(",", ":"), allow_nan=False))


# ---- the parts -------------------------------------------------------------------------------------------------

_memo: dict[int, str] = {}


def _memoised(obj: Any, compute: Any) -> str:
    """``compute()`` once per live object (states are immutable; ComfyUI hands the same one to each re-queue)."""
    key = id(obj)
    hit = _memo.get(key)
    if hit is not None:
        return hit
    value = compute()
    try:
        weakref.finalize(obj, _memo.pop, key, None)
    except TypeError:  # not weak-referenceable: no memo
        return value
    _memo[key] = value
    return value


def state_digest(state: TrainState) -> str:
    """Everything of a :class:`TrainState` that training reads or passes on, except ``info`` (export metadata)."""

    def compute() -> str:
        return json_digest({
            "adapter_config": state.adapter_config.to_dict(),
            "specs": [s.to_dict() for s in state.specs],
            "seed": state.seed,
            **{name: getattr(state, name) for name in TRAINED_FIELDS},
        })

    return _memoised(state, compute)


def dataset_digest(dataset: LatentDataset) -> str:
    """Each item in order: latent bytes and shape (its bucket), conditioning tensors, repeats, caption text."""
    h = hashlib.sha256(b"lora-kiln.dataset/1")
    for item in dataset.items:
        h.update(json.dumps({
            "latent": tensor_bytes_digest(item.latent),
            "cond": {k: tensor_bytes_digest(v) for k, v in sorted(item.cond.items())},
            "repeats": item.repeats,
            "caption": item.caption,
        }, sort_keys=True).encode())
    return h.hexdigest()


# settings added after runs were first digested: left out at their default, so adding a setting alone does not change
# the digest (a release that changes the engine or host sources changes it anyway: ENGINE_SOURCES / HOST_SOURCES)
_LATER_DEFAULTS: dict[str, object] = {"expert": "all"}


def config_digest(config: TrainConfig) -> str:
    data = json.loads(json.dumps(config.to_dict()))
    for name, default in _LATER_DEFAULTS.items():
        if data.get(name) == default:
            del data[name]
    return json_digest(data)


def _sample_indices(n: int, k: int) -> torch.Tensor:
    if n <= k:
        return torch.arange(n)
    # k indices from the first to the last element, spaced (n - 1) / (k - 1) apart: not aligned with rows
    return torch.arange(k, dtype=torch.int64) * (n - 1) // (k - 1)


def tensors_fingerprint(named: Iterable[tuple[str, torch.Tensor]], samples: int = SAMPLES_PER_TENSOR) -> str:
    """A cheap fingerprint of a set of named tensors (a model's weights as loaded): every name, shape and dtype, and
    ``samples`` values of each, evenly spaced from the first to the last (all of a smaller tensor), bit for bit.

    Tensors may live on any device: the samples are gathered there and copied once per device and dtype. Cost for
    SDXL's UNet (2,600 tensors): about 2.6 M sampled values, well under a second.
    """
    entries: list[tuple[str, str, tuple[int, ...]]] = []
    groups: dict[tuple[torch.device, torch.dtype], list[tuple[int, torch.Tensor]]] = {}
    indices: dict[tuple[int, torch.device], torch.Tensor] = {}
    for i, (name, t) in enumerate(sorted(named, key=lambda nt: nt[0])):
        entries.append((name, str(t.dtype), tuple(t.shape)))
        if t.numel() == 0:
            continue
        raw = _raw(t)
        key = (raw.numel(), raw.device)
        if key not in indices:
            indices[key] = _sample_indices(raw.numel(), samples).to(raw.device)
        picked = raw.index_select(0, indices[key])
        groups.setdefault((picked.device, picked.dtype), []).append((i, picked))
    values: dict[int, bytes] = {}
    for items in groups.values():
        joined = torch.cat([p for _, p in items]).cpu()
        offset = 0
        for i, p in items:
            values[i] = joined[offset:offset + p.numel()].view(torch.uint8).numpy().tobytes()
            offset += p.numel()
    h = hashlib.sha256(f"lora-kiln.tensors/1|{samples}".encode())
    for i, (name, dtype, shape) in enumerate(entries):
        h.update(json.dumps([name, dtype, list(shape)]).encode())
        h.update(values.get(i, b""))
    return h.hexdigest()


def source_digest(paths: Iterable[str | Path]) -> str:
    """SHA-256 over the named source files (name and bytes, in the given order); a missing file counts as empty."""
    h = hashlib.sha256(b"lora-kiln.sources/1")
    for p in paths:
        p = Path(p)
        try:
            data = p.read_bytes()
        except OSError:
            data = b""
        h.update(f"{p.name}|{len(data)}|".encode())
        h.update(data)
    return h.hexdigest()


ENGINE_SOURCES = tuple(Path(__file__).parent / rel for rel in (
    "adapters.py", "config.py", "diffusion.py", "optim.py", "state.py", "trainer.py", "data/latents.py", "digest.py"))


CODE_PARTS = ("training_code_version", "engine_sources", "host_sources")  # the parts that name the code


def run_digest_parts(*, start: TrainState, dataset: LatentDataset, config: TrainConfig, base: Mapping[str, Any],
                     code: str) -> dict[str, Any]:
    """The parts :func:`run_digest` hashes, each a digest or plain value (kept in checkpoints, so a run that differs
    only in its code version can be named as such)."""
    return {
        "format": DIGEST_FORMAT,
        "training_code_version": TRAINING_CODE_VERSION,
        "engine_sources": engine_source_digest(),
        "host_sources": code,
        "start": state_digest(start),
        "dataset": dataset_digest(dataset),
        "config": config_digest(config),
        "base": json_digest(base),
    }


def run_digest(*, start: TrainState, dataset: LatentDataset, config: TrainConfig, base: Mapping[str, Any],
               code: str) -> str:
    """The digest of one run: equal exactly when the run would produce the same state (see the module docstring).

    ``base``: the host's description of the base model as loaded (JSON-able; fingerprints as hex strings);
    ``code``: :func:`source_digest` of the host's training code (the engine's own sources are always included).
    """
    return digest_of_parts(run_digest_parts(start=start, dataset=dataset, config=config, base=base, code=code))


def digest_of_parts(parts: Mapping[str, Any]) -> str:
    return json_digest(dict(parts))


def same_but_code(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """The same run except for the training code (another Kiln version): never reused, but worth saying."""
    rest = set(a) | set(b)
    return all(a.get(k) == b.get(k) for k in rest - set(CODE_PARTS)) and any(a.get(k) != b.get(k) for k in CODE_PARTS)


@functools.cache
def engine_source_digest() -> str:
    """:func:`source_digest` of the engine's training files, read once per process (the code that is running)."""
    return source_digest(ENGINE_SOURCES)


def preview_steps(start_step: int, end_step: int, every: int) -> list[int]:
    """The global steps a run from ``start_step`` to ``end_step`` renders previews at (as the trainer does)."""
    if every <= 0:
        return []
    first = (start_step // every + 1) * every
    return list(range(first, end_step + 1, every))
