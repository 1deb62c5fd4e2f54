"""KilnAutoCaption: caption a dataset (or a folder) with a local BLIP / Florence-2 model (or WD14 tagger).

Sits between Load Dataset and Train Steps. Captions are written next to the images (``.txt`` sidecars and/or
``metadata.csv``) and travel on in the dataset: its latents are kept as they are (nothing is re-encoded), and Train
Steps encodes the new captions with CLIP when it needs them.

Trigger words: Auto Caption's own ``trigger_word`` / ``prefix`` / ``suffix`` shape the captions it writes. Load
Dataset's ``trigger_word`` is then applied on top exactly as when Load Dataset reads the files (put first unless
the caption already starts with it), so training now and training after a reload see the same captions. Set the
trigger in one of the two nodes.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from comfy_api.latest import io

from ..lora_core.caption import (
    KINDS,
    POLICIES,
    WRITE_TARGETS,
    WRITTEN,
    CaptionError,
    CaptionEvents,
    CaptionReport,
    CaptionSettings,
    ModelInfo,
    caption_images,
    inspect_model_folder,
    load_captioner,
    model_fingerprint,
)
from ..lora_core.data import DatasetConfig, DatasetError, apply_trigger, dataset_fingerprint, scan_dataset
from .corridor import devices, folders, reporting
from .corridor.errors import KilnUserError
from .dataset import resolve_folder
from .objects import KilnDataset
from .sockets import CATEGORY, KilnDatasetType

logger = logging.getLogger(__name__)

_REPOS = "; ".join(f"{k.label}: {', '.join(k.repos[:2])}" for k in KINDS.values())


def model_info(name: str) -> ModelInfo:
    try:
        return inspect_model_folder(folders.captioner_path(name))
    except CaptionError as exc:
        raise KilnUserError(str(exc)) from None


class _NodeEvents(CaptionEvents):
    def __init__(self, progress: reporting.ItemProgress) -> None:
        self.progress = progress

    def on_start(self, total: int) -> None:
        self.progress.start(total)

    def on_progress(self, done: int, total: int, outcomes: object) -> None:
        self.progress.update(done)

    def should_stop(self) -> bool:
        return self.progress.should_stop()


def _weights_bytes(info: ModelInfo) -> int:
    pattern = "*.onnx" if info.kind.name == "wd14" else "*.safetensors"
    return sum(p.stat().st_size for p in info.folder.glob(pattern))


class KilnAutoCaption(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KilnAutoCaption",
            display_name="Auto Caption (Kiln)",
            category=f"{CATEGORY}/data",
            description=(
                "Captions the images of a dataset with a local BLIP or Florence-2 model (or a WD14 tagger) from "
                "models/captioners, "
                "writes .txt sidecars and/or metadata.csv next to them (images are never touched) and passes the "
                "captioned dataset on to Train Steps. Review the captions shown on the node before training; by "
                "default existing captions are kept, so captions you fixed by hand stay."
            ),
            inputs=[
                KilnDatasetType.Input("dataset", optional=True, tooltip=(
                    "From Load Dataset. Its latents are kept; only the captions change. Leave unconnected to caption "
                    "a folder instead (see 'folder').")),
                io.String.Input("folder", default="", optional=True, tooltip=(
                    "Only used when no dataset is connected: caption the images of this folder (absolute, or "
                    "relative to ComfyUI's input folder). Load Dataset then reads the caption files. When ComfyUI "
                    "listens beyond this computer (--listen), folders outside its input/output/models folders must "
                    "be listed in the environment variable KILN_ALLOWED_FOLDERS.")),
                io.Combo.Input("model", options=folders.captioner_names(), tooltip=(
                    "A model folder in ComfyUI/models/captioners/ (Hugging Face layout: config.json, "
                    "model.safetensors, processor and tokenizer files; a WD14 tagger: model.onnx + "
                    f"selected_tags.csv, needs onnxruntime). Downloads: {_REPOS}.")),
                io.String.Input("prompt", default="", tooltip=(
                    "Florence-2: the task, <DETAILED_CAPTION> when empty (<CAPTION> is shorter, "
                    "<MORE_DETAILED_CAPTION> a paragraph). BLIP: optional start of every caption, e.g. "
                    "'a photography of' (empty: unconditional). WD14 tagger: tag thresholds, e.g. '0.35' or "
                    "'0.35 0.85' (general, character; empty: those).")),
                io.Int.Input("max_tokens", default=75, min=1, max=1024, tooltip=(
                    "Longest caption in tokens (WD14 tagger: most tags). SD1.5's text encoder reads 75 tokens per "
                    "chunk.")),
                io.Int.Input("batch_size", default=4, min=1, max=64, tooltip=(
                    "Images captioned at once. Higher is faster on a GPU; lower it if you run out of memory.")),
                io.Int.Input("beams", default=1, min=1, max=8, tooltip=(
                    "Beam search width (BLIP, Florence-2). 1 = greedy (fastest); 3 gives slightly better captions at "
                    "about 2-3x the time.")),
                io.String.Input("trigger_word", default="", tooltip=(
                    "Put first in every caption this node writes, e.g. 'sks' (never doubled when the caption already "
                    "contains it). Load Dataset's trigger_word is applied on top as usual: set it in one place.")),
                io.String.Input("prefix", default="", tooltip=(
                    "Text before each generated caption, e.g. 'photo of sks' (joined with ', ') or 'a photo of ' "
                    "(ends with a space: joined as written).")),
                io.String.Input("suffix", default="", tooltip=(
                    "Text after each generated caption, e.g. 'studio lighting' (joined with ', ') or '. Studio "
                    "light' (starts with punctuation: joined as written).")),
                io.Combo.Input("existing_captions", options=list(POLICIES), default="keep", tooltip=(
                    "Images that already have a caption: keep it untouched (default; your hand fixes stay), "
                    "overwrite it with a new one, or append the new caption after it.")),
                io.Combo.Input("write_to", options=list(WRITE_TARGETS), default="sidecar", tooltip=(
                    "Where captions are saved: a .txt file next to each image (the dataset's caption extension; an "
                    "existing .caption file is updated in place), the folder's metadata.csv (an existing "
                    "metadata.jsonl is updated instead), or both.")),
            ],
            outputs=[
                KilnDatasetType.Output(display_name="dataset", tooltip=(
                    "The dataset with the new captions, for Train Steps (same latents, nothing re-encoded).")),
                io.String.Output(display_name="captions", tooltip="One line per image: 'file: caption'."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, model: str) -> bool | str:
        try:
            inspect_model_folder(folders.captioner_path(model))
        except CaptionError as exc:
            return str(exc)
        return True

    @classmethod
    def fingerprint_inputs(cls, model: str, folder: str = "", **_: object) -> str:
        """The model folder's files, and (folder mode) the folder's files as the user left them."""
        parts = [model_fingerprint(folders.captioner_path(model))]
        if folder and folder.strip():
            try:
                parts.append(dataset_fingerprint(resolve_folder(folder), stat_view=WRITTEN.view))
            except Exception:  # noqa: BLE001 - execute reports the problem
                parts.append(f"unreadable:{folder}")
        return "|".join(parts)

    @classmethod
    def execute(
        cls, model: str, prompt: str, max_tokens: int, batch_size: int, beams: int, trigger_word: str, prefix: str,
        suffix: str, existing_captions: str, write_to: str, dataset: KilnDataset | None = None, folder: str = "",
    ) -> io.NodeOutput:
        info = model_info(model)
        if dataset is not None:
            root = folders.check_data_folder(dataset.folder)  # Load Dataset checked it; Auto Caption writes there
            paths = list(dict.fromkeys(r.path for r in dataset.records))  # a clip's windows share its caption
            extension, max_pixels = dataset.config.caption_extension, dataset.config.max_image_pixels
        else:
            if not (folder or "").strip():
                raise KilnUserError(
                    "Auto Caption needs images: connect Load Dataset's dataset output, or set 'folder'"
                )
            root = resolve_folder(folder)
            try:
                # clips are listed too (one window each: captioned from their middle frame)
                scan = scan_dataset(DatasetConfig(folder=str(root), frames=5))
            except DatasetError as exc:
                raise KilnUserError(str(exc)) from None
            paths = list(dict.fromkeys(r.path for r in scan.records))
            extension, max_pixels = ".txt", DatasetConfig(folder=str(root)).max_image_pixels
        try:
            settings = CaptionSettings(
                prompt=prompt, max_new_tokens=max_tokens, batch_size=batch_size, num_beams=beams,
                policy=existing_captions, trigger=trigger_word, prefix=prefix, suffix=suffix, write_to=write_to,
                caption_extension=extension, max_image_pixels=max_pixels,
            )
        except ValueError as exc:
            raise KilnUserError(str(exc)) from None

        device = devices.compute_device()
        dtype = devices.inference_dtype(device)

        def load(info: ModelInfo, device: object, dtype: object) -> object:
            devices.make_room(device, int(_weights_bytes(info) * 1.5) + (512 << 20))
            return load_captioner(info, device, dtype)

        progress = reporting.ItemProgress(cls.hidden.unique_id, unit="images")
        try:
            report = caption_images(paths, info, settings, device=device, dtype=dtype, load=load,
                                    events=_NodeEvents(progress))
        except CaptionError as exc:
            raise KilnUserError(str(exc)) from None
        finally:
            devices.release_memory()
        if report.cancelled or progress.cancelled:
            logger.info("Auto Caption: cancelled; %d caption files written are kept", len(report.files_written))
            reporting.raise_if_interrupted()

        text, listing = _describe(report, root, info, device, dataset)
        for line in text.split("\n\n", 1)[0].splitlines():
            logger.info("Auto Caption: %s", line)
        if dataset is None:
            out = reporting.blocked(
                "Auto Caption captioned a folder, so it has no dataset to pass on: connect Load Dataset -> Auto "
                "Caption -> Train Steps, or load the captioned folder with Load Dataset"
            )
        else:
            by_path = {o.path: o for o in report.outcomes}
            trigger = dataset.config.trigger_word
            records = []
            for r in dataset.records:
                o = by_path[r.path]
                caption = apply_trigger(o.caption, trigger) if o.caption is not None else None
                records.append(dataclasses.replace(r, caption=caption, caption_source=o.source))
            out = dataset.replace(records=tuple(records))
        return io.NodeOutput(out, listing, ui={"text": [text]})


def _describe(
    report: CaptionReport, root: Path, info: ModelInfo, device: object, dataset: KilnDataset | None
) -> tuple[str, str]:
    def rel(p: Path) -> str:
        try:
            return p.relative_to(root).as_posix()
        except ValueError:
            return p.name

    counts = [f"{report.count(s)} {s}" for s in ("new", "overwritten", "appended", "kept", "unchanged", "empty")
              if report.count(s)]
    model_line = f"model {info.name} ({info.kind.label})"
    if report.generated:
        rate = report.generated / report.seconds if report.seconds > 0 else float("inf")
        model_line += f" on {device}: {report.generated} images in {report.seconds:.1f} s ({rate:.2f} images/s)"
    else:
        model_line += " not needed"
    if report.reused:
        model_line += f", {report.reused} captions reused from an earlier run"
    head = [
        f"{len(report.outcomes)} images: {', '.join(counts)}; {len(report.files_written)} caption files written",
        model_line,
    ]
    if dataset is not None and dataset.config.trigger_word:
        head.append(f"Load Dataset's trigger word {dataset.config.trigger_word!r} is applied on top for training")
    head += list(report.notes[:10])
    listing = "\n".join(f"{rel(o.path)}: {o.caption or ''}" for o in report.outcomes)
    marks = "\n".join(f"[{o.status}] {rel(o.path)}: {o.caption or ''}" for o in report.outcomes)
    return "\n".join(head) + "\n\n" + marks, listing
