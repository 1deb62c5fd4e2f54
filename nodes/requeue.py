"""Re-queues never retrain what is already trained: finished and interrupted runs, found by their run digest.

Train Steps computes the run digest (:func:`lora_core.digest.run_digest`) before it trains, then :func:`plan`
picks one of three things to do:

- **reuse**: a finished state with this digest is in this process's memory or under
  ``<runs>/<name>/finished/<digest>.kiln.safetensors``: it is loaded, no step runs, and the previews are rendered
  again from the adapter snapshots in ``<runs>/<name>/finished/<digest>.previews/step<N>.safetensors``;
- **resume**: a checkpoint in ``<runs>/<name>/checkpoints/`` (``save_every``, Cancel, a training error) records
  this digest and a step between the start and the target: training continues from the highest such step;
- **train**: anything else, and always with ``retrain``.

A file whose digest, step or adapter shapes do not match exactly is never used. Disk use is bounded: per LoRA name
at most :data:`KEEP_FINISHED` finished runs and :data:`FINISHED_BYTES` (the least recently used go first, the one
just finished stays), per run :data:`SNAPSHOT_BYTES` of snapshots (the earliest go first); memory holds at most
:data:`MEMORY_BYTES` of finished states.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..lora_core import AdapterSet, LatentDataset, TrainCallback, TrainConfig, TrainState
from ..lora_core import digest as digests
from ..lora_core.fileio import atomic_save_safetensors, load_safetensors
from ..lora_core.state import checkpoint_metadata
from .corridor import caches, folders, identity
from .objects import KilnRun

logger = logging.getLogger(__name__)

FINISHED = "finished"
SUFFIX = ".kiln.safetensors"
SNAPSHOTS = ".previews"
DIGEST_KEY = "kiln_digest"  # in finished states, checkpoints and snapshots: the run they belong to
PARTS_KEY = "kiln_digest_parts"  # in checkpoints: what the digest was made of (JSON)
TARGET_KEY = "kiln_target_step"  # in checkpoints: the step that run ends at
STEP_KEY = "kiln_step"

KEEP_FINISHED = 16  # finished runs kept on disk per LoRA name (a chain of Train Steps nodes keeps one per node)
FINISHED_BYTES = 4 << 30  # and at most this much of them (states + snapshots) per LoRA name
SNAPSHOT_BYTES = 1 << 30  # adapter snapshots (fp32, as trained) kept per finished run: the latest ones
MEMORY_BYTES = 1 << 30  # finished states kept in memory by this process (snapshots are read from disk one at a time)


def finished_directory(name: str) -> Path:
    return folders.run_directory(name) / FINISHED


def finished_path(name: str, digest: str) -> Path:
    return finished_directory(name) / f"{digest}{SUFFIX}"


def snapshot_directory(name: str, digest: str) -> Path:
    return finished_directory(name) / f"{digest}{SNAPSHOTS}"


def snapshot_path(name: str, digest: str, step: int) -> Path:
    return snapshot_directory(name, digest) / f"step{step:06d}.safetensors"


def state_nbytes(state: TrainState) -> int:
    n = sum(t.numel() * t.element_size() for t in state.weights.values())
    for entries in ((state.optimizer_state or {}).get("state") or {}).values():
        n += sum(v.numel() * v.element_size() for v in entries.values() if isinstance(v, torch.Tensor))
    return n


MEMORY = caches.BoundedCache(MEMORY_BYTES, size=state_nbytes)  # finished states by digest
_PARTS: dict[str, dict[str, Any]] = {}  # digest -> its parts, for the runs of this process


@dataclass(frozen=True)
class Plan:
    action: str  # "train" | "reuse" | "resume"
    digest: str | None
    found: TrainState | None = None  # reuse: the finished state; resume: the checkpoint's state
    source: Path | None = None  # the file it came from (None: memory, or nothing)
    note: str = ""

    def describe(self, start_step: int, target: int) -> str:
        if self.action == "reuse":
            return f"reused a finished run (step {target}): 0 steps"
        if self.action == "resume":
            return f"resumed from step {self.found.step}: {target - self.found.step} steps"
        return f"trained {target - start_step} steps" + (f" ({self.note})" if self.note else "")


def matches(found: TrainState, start: TrainState) -> bool:
    """Same adapters (names, shapes, dtypes) as the start state: a cheap guard against a mismatched or damaged file."""
    return same_layout(found.weights, start, dtypes=True)


def same_layout(weights: Mapping[str, torch.Tensor], start: TrainState, dtypes: bool = False) -> bool:
    if weights.keys() != start.weights.keys():
        return False
    return all(tuple(weights[k].shape) == tuple(v.shape) and (not dtypes or weights[k].dtype == v.dtype)
               for k, v in start.weights.items())


def plan(name: str, digest: str | None, start: TrainState, steps: int, retrain: bool = False) -> Plan:
    """What Train Steps should do for this run (see the module docstring)."""
    if digest is None or retrain:
        return Plan("train", digest)
    target = start.step + steps
    finished = find_finished(name, digest, start, target)
    if finished is not None:
        return Plan("reuse", digest, *finished)
    checkpoint = find_checkpoint(name, digest, start, target)
    if checkpoint is not None:
        return Plan("resume", digest, *checkpoint)
    return Plan("train", digest, note=other_version_note(name, digest, target))


def other_version_note(name: str, digest: str, target: int) -> str:
    """A checkpoint of this very run written by other training code (another Kiln version) is never resumed
    automatically; say so, since Load Checkpoint can still continue it by hand."""
    parts = _PARTS.get(digest)
    folder = folders.checkpoint_directory(name)
    if parts is None or not folder.is_dir():
        return ""
    steps = []
    for path in folder.glob(f"*{SUFFIX}"):
        meta = checkpoint_metadata(path)
        try:
            theirs = json.loads(meta.get(PARTS_KEY, "null"))
            step = int(meta.get(STEP_KEY, ""))
        except ValueError:
            continue
        if isinstance(theirs, dict) and meta.get(TARGET_KEY) == str(target) and digests.same_but_code(parts, theirs):
            steps.append(step)
    if not steps:
        return ""
    return (f"the checkpoint at step {max(steps)} of this run was written by another version of Kiln's training "
            "code, so it is not resumed automatically; Load Checkpoint continues it")


def find_finished(name: str, digest: str, start: TrainState, target: int) -> tuple[TrainState, Path | None] | None:
    path = finished_path(name, digest)
    state = MEMORY.get(digest)
    if state is not None and state.step == target and matches(state, start):
        _touch(path)
        return state, None
    if not path.is_file() or checkpoint_metadata(path).get(DIGEST_KEY) != digest:
        return None
    try:
        state = TrainState.load(path)
    except Exception as exc:  # noqa: BLE001 - a damaged file is not a match: train instead
        logger.warning("LoRA Kiln: ignoring the finished run %s: %s", path.name, exc)
        return None
    if state.step != target or not matches(state, start):
        logger.warning("LoRA Kiln: ignoring the finished run %s: it does not fit this run", path.name)
        return None
    _touch(path)
    MEMORY.put(digest, state)
    return state, path


def find_checkpoint(name: str, digest: str, start: TrainState, target: int) -> tuple[TrainState, Path] | None:
    """The checkpoint of this run (same digest and target) with the highest step between start and target."""
    folder = folders.checkpoint_directory(name)
    if not folder.is_dir():
        return None
    candidates: list[tuple[int, float, Path]] = []
    for path in folder.glob(f"*{SUFFIX}"):
        meta = checkpoint_metadata(path)
        if meta.get(DIGEST_KEY) != digest or meta.get(TARGET_KEY) != str(target):
            continue
        try:
            step = int(meta.get(STEP_KEY, ""))
            mtime = path.stat().st_mtime
        except (ValueError, OSError):
            continue
        if start.step < step < target:
            candidates.append((step, mtime, path))
    for step, _, path in sorted(candidates, reverse=True):
        try:
            state = TrainState.load(path)
        except Exception as exc:  # noqa: BLE001
            logger.warning("LoRA Kiln: ignoring the checkpoint %s: %s", path.name, exc)
            continue
        if state.step == step and matches(state, start):
            return state, path
    return None


def checkpoint_metadata_for(digest: str | None, target: int, step: int) -> dict[str, str]:
    """What a checkpoint of a run records about it (nothing when the run has no digest)."""
    if digest is None:
        return {}
    meta = {DIGEST_KEY: digest, TARGET_KEY: str(target), STEP_KEY: str(step)}
    if digest in _PARTS:
        meta[PARTS_KEY] = json.dumps(_PARTS[digest], sort_keys=True)
    return meta


# ---- finished states -------------------------------------------------------------------------------------------

def store_finished(name: str, digest: str, state: TrainState) -> Path | None:
    """Keep the finished state (memory and disk, atomically); then drop the least recently used beyond the limit."""
    MEMORY.put(digest, state)
    path = finished_path(name, digest)
    try:
        state.save(path, extra_metadata={"kiln_name": name},
                   plain_metadata={DIGEST_KEY: digest, STEP_KEY: str(state.step)})
    except OSError as exc:
        logger.warning("LoRA Kiln: could not keep the finished run for re-queues: %s", exc)
        return None
    collect(name, keep=digest)
    return path


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


def collect(name: str, keep: str | None = None, limit: int = KEEP_FINISHED, max_bytes: int = FINISHED_BYTES) -> list[str]:
    """Delete the least recently used finished runs of ``name`` (state and snapshots) beyond ``limit`` runs or
    ``max_bytes`` on disk; ``keep`` (the run just finished) always stays."""
    folder = finished_directory(name)
    if not folder.is_dir():
        return []
    used: dict[str, float] = {}
    size: dict[str, int] = {}
    for p in folder.iterdir():
        try:
            if p.name.endswith(SUFFIX) and p.is_file():
                digest, stat = p.name[: -len(SUFFIX)], p.stat()
                n = stat.st_size
            elif p.name.endswith(SNAPSHOTS) and p.is_dir():
                digest, stat = p.name[: -len(SNAPSHOTS)], p.stat()
                n = sum(f.stat().st_size for f in p.iterdir() if f.is_file())
            else:
                continue
        except OSError:
            continue
        used[digest] = max(used.get(digest, 0.0), stat.st_mtime)
        size[digest] = size.get(digest, 0) + n
    order = sorted(used, key=lambda d: (d != keep, -used[d]))  # the kept one first, then the most recent
    dropped, total = [], 0
    for i, digest in enumerate(order):
        total += size[digest]
        if i > 0 and (i >= limit or total > max_bytes):
            dropped.append(digest)
    for digest in dropped:
        with contextlib.suppress(OSError):
            finished_path(name, digest).unlink(missing_ok=True)
        shutil.rmtree(snapshot_directory(name, digest), ignore_errors=True)
        MEMORY.drop(digest)
    return dropped


# ---- adapter snapshots at the preview steps --------------------------------------------------------------------

class SnapshotWriter(TrainCallback):
    """Writes the adapter weights at every preview step (fp32, as trained), so previews can be rendered again."""

    def __init__(self, name: str, digest: str | None, max_bytes: int = SNAPSHOT_BYTES) -> None:
        self.name = name
        self.digest = digest
        self.max_bytes = max_bytes

    def on_preview(self, step: int, adapters: AdapterSet) -> None:
        if self.digest is None:
            return
        weights = {k: v.detach().float().cpu() for k, v in adapters.weights().items()}
        try:
            atomic_save_safetensors(weights, snapshot_path(self.name, self.digest, step),
                                    {DIGEST_KEY: self.digest, STEP_KEY: str(step)})
        except OSError as exc:
            logger.warning("LoRA Kiln: could not keep the adapters of step %d for re-rendering previews: %s", step, exc)
            return
        trim_snapshots(self.name, self.digest, self.max_bytes)


def snapshot_files(name: str, digest: str) -> dict[int, Path]:
    folder = snapshot_directory(name, digest)
    found: dict[int, Path] = {}
    if not folder.is_dir():
        return found
    for p in folder.glob("step*.safetensors"):
        try:
            found[int(p.name[4:-len(".safetensors")])] = p
        except ValueError:
            continue
    return dict(sorted(found.items()))


def trim_snapshots(name: str, digest: str, max_bytes: int = SNAPSHOT_BYTES) -> None:
    """Drop the earliest snapshots while the run's snapshots take more than ``max_bytes`` (the latest one stays)."""
    files = snapshot_files(name, digest)
    sizes = {}
    for step, p in files.items():
        try:
            sizes[step] = p.stat().st_size
        except OSError:
            sizes[step] = 0
    total = sum(sizes.values())
    for step in list(files)[:-1]:
        if total <= max_bytes:
            break
        with contextlib.suppress(OSError):
            files[step].unlink(missing_ok=True)
        total -= sizes[step]


def clear_snapshots(name: str, digest: str | None, after_step: int = -1) -> None:
    """Remove the run's snapshots after ``after_step`` (all by default): a fresh run writes its own."""
    if digest is None:
        return
    for step, p in snapshot_files(name, digest).items():
        if step > after_step:
            with contextlib.suppress(OSError):
                p.unlink(missing_ok=True)


def load_snapshot(name: str, digest: str, step: int, start: TrainState) -> dict[str, torch.Tensor] | None:
    """The adapter weights of step ``step`` of this run, or None when they were not kept (or do not fit)."""
    path = snapshot_path(name, digest, step)
    if not path.is_file():
        return None
    try:
        weights, meta = load_safetensors(path)
    except Exception as exc:  # noqa: BLE001
        logger.warning("LoRA Kiln: ignoring the snapshot %s: %s", path.name, exc)
        return None
    if meta.get(DIGEST_KEY) != digest or meta.get(STEP_KEY) != str(step):
        return None
    return weights if same_layout(weights, start) else None


# ---- the node's side: the digest of a run, previews rendered again ---------------------------------------------

def run_digest(run: KilnRun, model: Any, data: LatentDataset, config: TrainConfig, device: torch.device | str,
               text_encoder: Any = None) -> str | None:
    """The run digest of a Train Steps node about to train ``model`` (the training clone, loaded and patched: under
    Dynamic VRAM the user's patcher is never loaded, so its weights would not show a LoraLoader upstream). None,
    logged, if anything in it cannot be hashed: then it simply trains, and nothing it writes can be matched later."""
    try:
        base = identity.base_identity(model, run.detected, device,
                                      text_encoder.roots if text_encoder is not None else None, run.clip)
        # run.state: ComfyUI hands the same object to each re-queue (its digest is memoised); ``info`` is not hashed
        parts = digests.run_digest_parts(start=run.state, dataset=data, config=config, base=base,
                                         code=identity.host_source_digest())
        digest = digests.digest_of_parts(parts)
        _PARTS[digest] = parts
        while len(_PARTS) > 64:
            _PARTS.pop(next(iter(_PARTS)))
        return digest
    except Exception:  # noqa: BLE001 - never let bookkeeping stop training
        logger.warning("LoRA Kiln: could not compute the run digest; training without re-queue reuse", exc_info=True)
        return None


previewed_steps = digests.preview_steps


def replay_previews(progress: Any, name: str, digest: str | None, start: TrainState,
                    known: Mapping[int, Mapping[str, torch.Tensor]], steps: list[int],
                    render: Callable[[int, dict[str, torch.Tensor]], Any]) -> list[int]:
    """Render the previews of ``steps`` through ``progress.on_preview``, as the trainer would have, from the adapter
    weights ``known`` by step (the finished state's, a checkpoint's) or else the kept snapshots; returns the steps
    that had neither. Stops on Cancel (``progress.cancelled``)."""
    missing: list[int] = []
    live = progress.preview
    try:
        for step in steps:
            if step in known:
                weights = dict(known[step])
            else:
                weights = load_snapshot(name, digest, step, start) if digest is not None else None
            if weights is None:
                missing.append(step)
                continue
            progress.preview = lambda s, w=weights: render(s, w)
            with torch.no_grad():  # as the trainer renders its previews
                progress.on_preview(step, None)
            if progress.cancelled:
                break
    finally:
        progress.preview = live
    return missing
