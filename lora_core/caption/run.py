"""The caption loop: existing captions -> which images need the model -> batches -> policy -> files.

Engine only (no ComfyUI). The node and the benchmark both call :func:`caption_images`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .._validate import check_choice, check_int
from ..data import DatasetError, file_digest, open_picture
from .backends import Captioner
from .errors import CaptionError
from .ledger import WRITTEN, WriteLedger
from .models import ModelInfo, load_captioner
from .policy import POLICIES, caption_policy
from .store import WRITE_TARGETS, CaptionStore

__all__ = ["MEMO", "CaptionEvents", "CaptionMemo", "CaptionOutcome", "CaptionReport", "CaptionSettings", "caption_images"]

logger = logging.getLogger(__name__)

STATUSES = ("new", "overwritten", "appended", "kept", "unchanged", "empty")


@dataclass(frozen=True)
class CaptionSettings:
    """What to generate and how to store it. Validated on construction (errors name the value and the range)."""

    prompt: str = ""
    max_new_tokens: int = 75
    batch_size: int = 4
    num_beams: int = 1
    policy: str = "keep"
    trigger: str = ""
    prefix: str = ""
    suffix: str = ""
    write_to: str = "sidecar"
    caption_extension: str = ".txt"
    max_image_pixels: int = 178_956_970

    def __post_init__(self) -> None:
        check_int("max_new_tokens", self.max_new_tokens, 1, 1024)
        check_int("batch_size", self.batch_size, 1, 256)
        check_int("num_beams", self.num_beams, 1, 16)
        check_choice("policy", self.policy, POLICIES)
        check_choice("write_to", self.write_to, WRITE_TARGETS)
        for name in ("prompt", "trigger", "prefix", "suffix"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a string")


@dataclass(frozen=True)
class CaptionOutcome:
    """One image: its caption now (on disk), what happened, and where Load Dataset will read it."""

    path: Path
    caption: str | None
    status: str  # one of STATUSES
    generated: str | None  # the model's raw text (None when the model was not needed)
    source: str | None  # "txt", "caption", "metadata.csv", "metadata.jsonl" or None (no caption)
    written: tuple[Path, ...] = ()


@dataclass(frozen=True)
class CaptionReport:
    outcomes: tuple[CaptionOutcome, ...]
    cancelled: bool
    generated: int  # images run through the model
    reused: int  # generated captions taken from the memo (same image, model and settings)
    seconds: float
    notes: tuple[str, ...] = ()
    metadata_files: tuple[Path, ...] = ()  # metadata.csv / .jsonl files (re)written


    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def files_written(self) -> tuple[Path, ...]:
        return tuple(dict.fromkeys([*(p for o in self.outcomes for p in o.written), *self.metadata_files]))


class CaptionEvents:
    """Callbacks of the caption loop (all optional): start, progress after each batch, and Cancel."""

    def on_start(self, total: int) -> None:
        """``total`` images need the model (the model is loaded, if any is needed); the clock for an ETA starts."""

    def on_progress(self, done: int, total: int, outcomes: Sequence[CaptionOutcome]) -> None:
        """``done`` of ``total`` images that needed the model are captioned; ``outcomes`` are the new ones."""

    def should_stop(self) -> bool:
        return False


class CaptionMemo:
    """Generated texts keyed by (model fingerprint, image content, generation settings, device/dtype).

    So changing only the trigger word, prefix, suffix, policy or where captions are written never runs the model
    again, and neither does re-running after ComfyUI dropped its cache.
    """

    def __init__(self, limit: int = 50_000) -> None:
        self._items: OrderedDict[tuple, str] = OrderedDict()
        self._lock = threading.Lock()
        self._limit = limit

    def get(self, key: tuple) -> str | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: tuple, value: str) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._limit:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


MEMO = CaptionMemo()


def _status(existing: str | None, final: str, policy: str) -> str:
    if not (existing or "").strip():
        return "new" if final else "empty"
    if policy == "keep":
        return "kept"
    if final == existing:
        return "unchanged"
    return "overwritten" if policy == "overwrite" else "appended"


def caption_images(
    images: Sequence[str | Path],
    model: ModelInfo,
    settings: CaptionSettings,
    *,
    captioner: Captioner | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    load: Callable[[ModelInfo, torch.device | str, torch.dtype | None], Captioner] = load_captioner,
    events: CaptionEvents | None = None,
    memo: CaptionMemo | None = MEMO,
    ledger: WriteLedger = WRITTEN,
) -> CaptionReport:
    """Caption ``images`` with ``model`` according to ``settings``, writing caption files as it goes.

    The model is loaded (with ``load``, onto ``device``) only if some image needs it and ``captioner`` is not
    given; a captioner loaded here is closed before returning. Cancel (``events.should_stop()``) is checked
    between batches: the captions written so far stay, and the report says ``cancelled``. A broken image raises
    :class:`CaptionError` naming it; captions written before it stay too.
    """
    events = events or CaptionEvents()
    start = time.perf_counter()
    store = CaptionStore(settings.write_to, settings.caption_extension, ledger)
    paths = [Path(p) for p in images]
    outcomes: dict[int, CaptionOutcome] = {}
    existing = {}
    todo: list[int] = []  # images whose caption comes from the model
    for i, path in enumerate(paths):
        found = store.existing(path)
        existing[i] = found
        if settings.policy == "keep" and (found.text or "").strip():
            outcomes[i] = CaptionOutcome(path, found.text, "kept", None, found.source)
        else:
            todo.append(i)

    own_captioner = captioner is None
    if captioner is not None:
        device, dtype = captioner.device, captioner.dtype
    gen_key = (model.fingerprint, settings.prompt.strip(), settings.max_new_tokens, settings.num_beams,
               torch.device(device).type, str(dtype or torch.float32))

    def finish(i: int, generated: str) -> CaptionOutcome:
        found = existing[i]
        final = caption_policy(found.text, generated, settings.policy, settings.trigger, settings.prefix,
                               settings.suffix)
        status = _status(found.text, final, settings.policy)
        if status in ("unchanged", "empty"):
            return CaptionOutcome(paths[i], found.text or None, status, generated, found.source)
        source, written = store.write(paths[i], final)
        return CaptionOutcome(paths[i], final, status, generated, source, tuple(written))

    digests: dict[int, str] = {}
    flushed: list[Path] = []
    pending: list[int] = []
    reused = 0
    try:
        for i in todo:
            try:
                digests[i] = file_digest(paths[i])
            except DatasetError as exc:
                raise CaptionError(f"{exc} (captions written so far are kept)") from None
            cached = memo.get((*gen_key, digests[i])) if memo is not None else None
            if cached is None:
                pending.append(i)
            else:
                reused += 1
                outcomes[i] = finish(i, cached)
        flushed.extend(store.flush())

        total = len(pending)
        done = 0
        cancelled = False
        if pending and captioner is None:
            captioner = load(model, device, dtype)
        events.on_start(total)
        try:
            for b in range(0, total, settings.batch_size):
                if events.should_stop():
                    cancelled = True
                    break
                batch = pending[b : b + settings.batch_size]
                pictures = []
                for i in batch:
                    try:
                        pictures.append(open_picture(paths[i], settings.max_image_pixels))  # a clip: its middle frame
                    except DatasetError as exc:
                        raise CaptionError(f"{exc} (captions written so far are kept)") from None
                texts = captioner.caption(pictures, settings.prompt, settings.max_new_tokens, settings.num_beams)
                for picture in pictures:
                    picture.close()
                fresh = []
                for i, text in zip(batch, texts):
                    if memo is not None:
                        memo.put((*gen_key, digests[i]), text)
                    outcomes[i] = finish(i, text)
                    fresh.append(outcomes[i])
                flushed.extend(store.flush())
                done += len(batch)
                events.on_progress(done, total, fresh)
        finally:
            if own_captioner and captioner is not None:
                captioner.close()
    finally:
        flushed.extend(store.flush())

    ordered = tuple(outcomes[i] for i in sorted(outcomes))
    return CaptionReport(ordered, cancelled, done, reused, time.perf_counter() - start, tuple(store.notes),
                         tuple(dict.fromkeys(flushed)))
