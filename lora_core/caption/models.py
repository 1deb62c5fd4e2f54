"""Captioning models in Hugging Face folder layout: what each kind needs, validation, fingerprint, loading.

Only plain ``transformers`` classes are used (never ``trust_remote_code``), weights are only read from
``.safetensors`` files (never pickles), and nothing is downloaded: a folder is used as it is on disk.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CaptionError

if TYPE_CHECKING:
    import torch

    from .backends import Captioner

__all__ = ["KINDS", "ModelInfo", "ModelKind", "inspect_model_folder", "load_captioner", "model_fingerprint"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelKind:
    """One supported model family."""

    name: str
    label: str
    model_types: tuple[str, ...]  # config.json "model_type" values
    repos: tuple[str, ...]  # Hugging Face repositories that work, best first
    tokenizer_files: tuple[tuple[str, ...], ...]  # alternatives: any complete tuple will do
    default_prompt: str
    min_transformers: str


KINDS: dict[str, ModelKind] = {
    "blip": ModelKind(
        name="blip",
        label="BLIP",
        model_types=("blip",),
        repos=("Salesforce/blip-image-captioning-large", "Salesforce/blip-image-captioning-base"),
        tokenizer_files=(("tokenizer.json",), ("vocab.txt",)),
        default_prompt="",
        min_transformers="4.26",
    ),
    "florence2": ModelKind(
        name="florence2",
        label="Florence-2",
        model_types=("florence2",),
        repos=(
            "florence-community/Florence-2-base",
            "florence-community/Florence-2-large",
            "florence-community/Florence-2-base-ft",
            "florence-community/Florence-2-large-ft",
        ),
        tokenizer_files=(("tokenizer.json",), ("vocab.json", "merges.txt")),
        default_prompt="<DETAILED_CAPTION>",
        min_transformers="4.56",
    ),
    "wd14": ModelKind(
        name="wd14",
        label="WD14 tagger",
        model_types=(),
        repos=("SmilingWolf/wd-vit-tagger-v3", "SmilingWolf/wd-eva02-large-tagger-v3", "SmilingWolf/wd-swinv2-tagger-v3"),
        tokenizer_files=(),
        default_prompt="",
        min_transformers="",
    ),
}

WD14_FILES = ("model.onnx", "selected_tags.csv")

_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _get_it(folder: Path, kind: ModelKind | None = None) -> str:
    repos = kind.repos[:2] if kind else (KINDS["blip"].repos[1], KINDS["florence2"].repos[0])
    first = repos[0]
    alternatives = " or ".join(repos)
    return (
        f"Download all files of {alternatives} from huggingface.co into {folder} "
        f"(e.g. `hf download {first} --local-dir \"{folder}\"`)"
    )


def _expected(kind: ModelKind | None) -> str:
    if kind is not None and kind.name == "wd14":
        return " and ".join(WD14_FILES)
    tokenizer = " or ".join(" + ".join(t) for t in (kind.tokenizer_files if kind else (("tokenizer.json",),)))
    return f"config.json, model.safetensors, preprocessor_config.json and the tokenizer ({tokenizer})"


@dataclass(frozen=True)
class ModelInfo:
    """A validated captioner folder."""

    folder: Path
    kind: ModelKind
    fingerprint: str

    @property
    def name(self) -> str:
        return self.folder.name


def model_fingerprint(folder: str | os.PathLike[str]) -> str:
    """Hash of (relative path, size, mtime_ns) of every file in the folder: changes when any file is replaced."""
    root = Path(folder)
    digest = hashlib.sha256()
    try:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                path = Path(dirpath) / name
                try:
                    st = path.stat()
                except OSError:
                    continue
                rel = path.relative_to(root).as_posix()
                digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    except OSError as exc:
        digest.update(f"unreadable\0{exc}".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _weights_problem(folder: Path, files: set[str]) -> str | None:
    if "model.safetensors" in files:
        return None
    if "model.safetensors.index.json" in files:
        try:
            index = json.loads((folder / "model.safetensors.index.json").read_text(encoding="utf-8"))
            shards = sorted(set(index["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            return f"model.safetensors.index.json is unreadable ({exc})"
        missing = [s for s in shards if not (folder / s).is_file()]
        return f"weight shard(s) {', '.join(missing)} listed in model.safetensors.index.json" if missing else None
    if any(f.endswith(".safetensors") for f in files):
        return None
    pickles = sorted(f for f in files if f.endswith(_PICKLE_SUFFIXES))
    if pickles:
        return (
            f"model.safetensors (found only {', '.join(pickles)}: pickled weights can run code when loaded, so "
            "LoRA Kiln only reads .safetensors; download the repository's model.safetensors instead)"
        )
    return "model.safetensors"


def inspect_model_folder(folder: str | os.PathLike[str]) -> ModelInfo:
    """Check that ``folder`` holds a complete, supported captioner; raise :class:`CaptionError` saying what is
    missing and where to get it otherwise. Nothing is loaded."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise CaptionError(
            f"captioner folder {folder} {what}. It must be a Hugging Face model folder with {_expected(None)} "
            f"(a WD14 tagger: {_expected(KINDS['wd14'])}). {_get_it(folder)}."
        )
    try:
        files = {p.name for p in folder.iterdir() if p.is_file()}
    except OSError as exc:
        raise CaptionError(f"captioner folder {folder} cannot be listed ({exc}); check its permissions") from exc
    if any(f in files for f in WD14_FILES):
        return _inspect_wd14(folder, files)
    if "config.json" not in files:
        raise CaptionError(
            f"captioner folder {folder} is incomplete: config.json is missing (found: "
            f"{', '.join(sorted(files)) or 'nothing'}). It needs {_expected(None)}. {_get_it(folder)}."
        )
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise CaptionError(
            f"{folder / 'config.json'} is not valid JSON ({exc}); re-download it. {_get_it(folder)}."
        ) from exc
    model_type = str(config.get("model_type", ""))
    kind = next((k for k in KINDS.values() if model_type in k.model_types), None)
    if kind is None:
        supported = ", ".join(f"{k.label} ({k.repos[-1]})" for k in KINDS.values())
        raise CaptionError(
            f"captioner folder {folder} holds a model of type {model_type or '(none)'!r}, which Auto Caption does "
            f"not support. Supported: {supported}. {_get_it(folder)}."
        )
    vision = config.get("vision_config")
    vision_type = vision.get("model_type") if isinstance(vision, dict) else None
    if config.get("auto_map") or (kind.name == "florence2" and vision_type == "davit"):
        raise CaptionError(
            f"captioner folder {folder} holds the original remote-code version of {kind.label} (it needs "
            "trust_remote_code, which LoRA Kiln never enables). Use the transformers-native conversion instead: "
            f"{_get_it(folder, kind)}."
        )
    missing: list[str] = []
    weights = _weights_problem(folder, files)
    if weights:
        missing.append(weights)
    if not any(f in files for f in _PROCESSOR_FILES):
        missing.append("preprocessor_config.json")
    if not any(all(f in files for f in alt) for alt in kind.tokenizer_files):
        missing.append(" or ".join(" + ".join(alt) for alt in kind.tokenizer_files))
    if missing:
        raise CaptionError(
            f"captioner folder {folder} ({kind.label}) is incomplete: missing {'; '.join(missing)}. "
            f"It needs {_expected(kind)}. {_get_it(folder, kind)}."
        )
    return ModelInfo(folder=folder, kind=kind, fingerprint=model_fingerprint(folder))


def _inspect_wd14(folder: Path, files: set[str]) -> ModelInfo:
    kind = KINDS["wd14"]
    missing = [f for f in WD14_FILES if f not in files]
    if missing:
        raise CaptionError(
            f"captioner folder {folder} ({kind.label}) is incomplete: missing {', '.join(missing)}. It needs "
            f"{_expected(kind)}. {_get_it(folder, kind)}."
        )
    if importlib.util.find_spec("onnxruntime") is None:
        raise CaptionError(
            f"captioner folder {folder} holds a {kind.label} (ONNX), which needs the optional package onnxruntime: "
            "install it with ComfyUI's Python (pip install onnxruntime, or onnxruntime-gpu for NVIDIA GPUs) and "
            "restart ComfyUI"
        )
    return ModelInfo(folder=folder, kind=kind, fingerprint=model_fingerprint(folder))


def load_captioner(info: ModelInfo, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Captioner:
    """Load the model and its processor from the folder (local files only, safetensors only) onto ``device``.

    A WD14 tagger runs in onnxruntime (its CUDA provider when ``device`` is a GPU and onnxruntime-gpu is installed).
    """
    import torch

    if info.kind.name == "wd14":
        from .backends import Wd14Tagger

        return Wd14Tagger.load(info, device)

    import transformers

    from .backends import BlipCaptioner, Florence2Captioner

    backend = {"blip": BlipCaptioner, "florence2": Florence2Captioner}[info.kind.name]
    try:
        model_cls = getattr(transformers, backend.model_class)
        processor_cls = getattr(transformers, backend.processor_class)
    except AttributeError:
        raise CaptionError(
            f"{info.kind.label} needs transformers >= {info.kind.min_transformers}; this ComfyUI has "
            f"transformers {transformers.__version__}. Update it (pip install -U transformers) with ComfyUI's Python"
        ) from None
    dtype = dtype or torch.float32
    try:
        processor = processor_cls.from_pretrained(str(info.folder), local_files_only=True)
        model = model_cls.from_pretrained(str(info.folder), local_files_only=True, use_safetensors=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for broken files
        raise CaptionError(
            f"could not load the {info.kind.label} captioner from {info.folder}: {type(exc).__name__}: {exc}. "
            f"The files may be incomplete or from another model. {_get_it(info.folder, info.kind)}."
        ) from exc
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    logger.info("Auto Caption: loaded %s (%s) on %s as %s", info.folder, info.kind.label, device, dtype)
    return backend(model, processor, info)
