"""Auto Caption's engine: caption images with a local vision-language model (no ComfyUI import).

- :mod:`.models`   supported model kinds, folder validation (names the missing files and where to get them),
                   fingerprint, loading with plain ``transformers`` (local files, safetensors only)
- :mod:`.backends` the :class:`Captioner` protocol; BLIP and Florence-2 backends, WD14 ONNX tagger (optional)
- :mod:`.policy`   keep / overwrite / append, trigger word, prefix, suffix (pure functions)
- :mod:`.store`    existing captions as Load Dataset reads them; atomic sidecar / metadata.csv writes
- :mod:`.ledger`   the files Kiln wrote, so they do not count as user edits in change detection
- :mod:`.run`      :func:`caption_images`, the batched loop with progress, Cancel and a generation memo
- :mod:`.tiny`     tiny random-weight BLIP / Florence-2 folders (and a WD14 tagger) for tests, benchmarks, demos
"""

from .backends import FLORENCE_CAPTION_TASKS, BlipCaptioner, Captioner, Florence2Captioner, Wd14Tagger
from .errors import CaptionError
from .ledger import WRITTEN, WriteLedger
from .models import KINDS, ModelInfo, ModelKind, inspect_model_folder, load_captioner, model_fingerprint
from .policy import POLICIES, caption_policy, ensure_trigger, frame
from .run import MEMO, CaptionEvents, CaptionMemo, CaptionOutcome, CaptionReport, CaptionSettings, caption_images
from .store import WRITE_TARGETS, CaptionStore, Existing

__all__ = [
    "FLORENCE_CAPTION_TASKS",
    "KINDS",
    "MEMO",
    "POLICIES",
    "WRITE_TARGETS",
    "WRITTEN",
    "BlipCaptioner",
    "CaptionError",
    "CaptionEvents",
    "CaptionMemo",
    "CaptionOutcome",
    "CaptionReport",
    "CaptionSettings",
    "CaptionStore",
    "Captioner",
    "Existing",
    "Florence2Captioner",
    "ModelInfo",
    "ModelKind",
    "Wd14Tagger",
    "WriteLedger",
    "caption_images",
    "caption_policy",
    "ensure_trigger",
    "frame",
    "inspect_model_folder",
    "load_captioner",
    "model_fingerprint",
]
