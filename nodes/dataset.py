"""KilnLoadDataset: a folder of images (and video clips) + captions -> validated, bucketed, VAE-encoded training data."""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from comfy_api.latest import io

from ..lora_core.caption.ledger import WRITTEN
from ..lora_core.data import (
    CAPTION_EXTENSIONS,
    FRAME_SAMPLING,
    DatasetConfig,
    DatasetError,
    ImageRecord,
    bucket_range,
    dataset_fingerprint,
    file_digest,
    fit_to_bucket,
    image_to_tensor,
    open_image,
    read_clip_frames,
    scan_dataset,
)
from .corridor import caches, families, folders, reporting
from .corridor.errors import KilnUserError
from .objects import KilnDataset
from .sockets import CATEGORY, KilnDatasetType

logger = logging.getLogger(__name__)


def resolve_folder(folder: str) -> Path:
    text = folder.strip().strip('"')
    if not text:
        raise KilnUserError(
            "folder is empty: give the path of your image folder (absolute, or relative to ComfyUI's input folder)"
        )
    path = Path(text).expanduser()
    path = path if path.is_absolute() else folders.input_directory() / path
    # a server others can reach reads and writes only ComfyUI's folders and those allowed by KILN_ALLOWED_FOLDERS
    return folders.check_data_folder(path)


Size = tuple[int, int, int, int, int, int]  # SDXL's size conditioning: original h, w, crop top, left, target h, w


def encode_records(
    records: Sequence[ImageRecord], config: DatasetConfig, vae: object, progress: reporting.ItemProgress | None = None,
) -> tuple[list[torch.Tensor], list[Size], int]:
    """Resize each image into its bucket and VAE-encode it (cached); returns (latents, sizes, newly encoded).

    ``progress`` shows n/N, images/s and ETA and stops the graph when the user presses Cancel (between images:
    nothing is written anywhere, the latents encoded so far stay in the cache for the next run).
    """
    latents: list[torch.Tensor] = []
    sizes: list[Size] = []  # as kohya computes it: original size, crop top-left, bucket size
    encoded = 0
    digests: dict[Path, str] = {}
    if progress is not None:
        progress.start(len(records))
    for i, record in enumerate(records, 1):
        if record.path not in digests:  # a clip's windows share one read of the file
            digests[record.path] = file_digest(record.path)
        key: tuple = (digests[record.path], record.bucket)
        try:
            if record.is_clip:  # its window's frames at the model's frame rate, each fitted to the bucket like an image
                key += (config.fps, record.start, record.frames)
                left = top = 0  # crop offsets are SDXL's size conditioning: no clip trains an image model
                pixels: Any = functools.partial(_clip_pixels, record, config)  # decoded only when not cached
            else:
                image, (left, top, _, _) = fit_to_bucket(open_image(record.path, config.max_image_pixels),
                                                         record.bucket)
                pixels = image_to_tensor(image)
            latent, new = caches.encode_image(vae, key, pixels)
        except DatasetError as exc:  # changed on disk since the scan
            raise KilnUserError(str(exc)) from None
        if not bool(latent.isfinite().all()):
            raise KilnUserError(
                f"{record.path.name}: the VAE produced NaN/inf latents for this {'clip' if record.is_clip else 'image'}."
                " Use a VAE that runs in fp32 (start ComfyUI with --fp32-vae, or load an fp32 VAE), or check the VAE "
                "file."
            )
        encoded += int(new)
        latents.append(latent)
        sizes.append((record.height, record.width, top, left, record.bucket[1], record.bucket[0]))
        if progress is not None:
            progress.advance(i)
    return latents, sizes, encoded


def _clip_pixels(record: ImageRecord, config: DatasetConfig) -> torch.Tensor:
    """A clip window's frames [F, H, W, 3], each fitted to the record's bucket like an image."""
    frames = read_clip_frames(record.path, config.fps, record.start, record.frames, config.max_image_pixels)
    return torch.stack([image_to_tensor(fit_to_bucket(f, record.bucket)[0]) for f in frames])


class KilnLoadDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KilnLoadDataset",
            display_name="Load Dataset (Kiln)",
            category=f"{CATEGORY}/data",
            description=(
                "Reads a folder of images and video clips with .txt/.caption sidecars or a metadata.csv/.jsonl, "
                "validates every file, sorts them into aspect-ratio (and frame-count) buckets and encodes them once "
                "with the VAE. Clips (.mp4 .webm .mov .mkv .avi .m4v, animated .gif) train video models (a Wan VAE)."
            ),
            inputs=[
                io.String.Input("folder", default="", tooltip=(
                    "Image folder: absolute, or relative to ComfyUI's input folder. Subfolders named like "
                    "'10_mycat' repeat their images 10 times (kohya layout). When ComfyUI listens beyond this "
                    "computer (--listen), folders outside its input/output/models folders must be listed in the "
                    "environment variable KILN_ALLOWED_FOLDERS.")),
                io.Vae.Input("vae", tooltip="The VAE of the model you will train (from Load Checkpoint)."),
                io.Clip.Input("clip", tooltip="The text encoder of the model you will train (from Load Checkpoint)."),
                io.Int.Input("resolution", default=0, min=0, max=4096, step=64, tooltip=(
                    "Training resolution: buckets keep about resolution x resolution pixels. 0 = auto from the "
                    "CLIP: 512 for SD1.x, 768 for SD2.x, 1024 for SDXL and everything newer.")),
                io.Boolean.Input("bucketing", default=True, tooltip=(
                    "Keep each image's aspect ratio (recommended). Off: every image is cropped to a square.")),
                io.String.Input("trigger_word", default="", tooltip=(
                    "Optional word put in front of every caption, e.g. 'sks'. Also used as the caption of images "
                    "without one.")),
                io.Int.Input("repeats", default=1, min=1, max=1000, tooltip=(
                    "How often each image of a flat folder is seen per epoch ('N_name' subfolders set their own).")),
                io.Combo.Input("caption_extension", options=list(CAPTION_EXTENSIONS), default=".txt", tooltip=(
                    "Sidecar caption files next to each image: photo.png + photo.txt.")),
                io.Combo.Input("on_error", options=["error", "skip"], default="error", tooltip=(
                    "What to do with a broken image, clip or caption: stop with a message naming it, or skip it with "
                    "a warning.")),
                io.Int.Input("frames", default=33, min=1, max=257, step=4, optional=True, tooltip=(
                    "Video models (Wan): frames per training clip, 4k+1 as the Wan VAE needs (17, 33, 49, 81). Clips "
                    "(.mp4 .webm .mov .mkv .avi .m4v, animated .gif) train as windows of this many frames; images in "
                    "the same folder train as one-frame clips. With an image model's VAE it is 1: video files are "
                    "left out (named in the output) and animated GIFs train as their first frame.")),
                io.Combo.Input("frame_sampling", options=list(FRAME_SAMPLING), default="head", optional=True,
                               tooltip=(
                    "Which frames of a clip train: head = one window from the start; uniform = 'windows' windows "
                    "spread evenly over the clip (more samples from long clips).")),
                io.Int.Input("windows", default=1, min=1, max=64, optional=True, tooltip=(
                    "With frame_sampling uniform: windows taken from each clip.")),
                io.Float.Input("fps", default=0.0, min=0.0, max=120.0, step=1.0, optional=True, tooltip=(
                    "Frame rate the clips are resampled to (by timestamp, so variable-rate clips stay true to "
                    "time). 0 = auto: the model's, 16 for Wan 2.1 / 2.2 14B, 24 for Wan 2.2 5B (read from the VAE).")),
            ],
            outputs=[KilnDatasetType.Output(display_name="dataset", tooltip="Validated, encoded training data.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, folder: str, **_: object) -> str:
        try:
            # caption files Auto Caption wrote itself are not edits: re-queuing must not re-run the graph
            return dataset_fingerprint(resolve_folder(folder), stat_view=WRITTEN.view)
        except Exception:  # noqa: BLE001 - the error is reported by execute
            return f"unreadable:{folder}"

    @classmethod
    def execute(
        cls, folder: str, vae: object, clip: object, resolution: int, bucketing: bool, trigger_word: str,
        repeats: int, caption_extension: str, on_error: str, frames: int = 33, frame_sampling: str = "head",
        windows: int = 1, fps: float = 0.0,
    ) -> io.NodeOutput:
        path = resolve_folder(folder)
        node_id = cls.hidden.unique_id
        auto = []
        if resolution == 0:
            resolution, source = families.auto_resolution(clip, vae)
            auto.append(f"resolution auto: {resolution} px for {source}")
        video = families.video_vae(vae)
        if video is None:  # an image model: still images only (animated GIFs as their first frame, video files noted)
            frames = 1
        fps_auto = video is not None and not fps
        if fps_auto:
            fps = video[0].video_fps
        reporting.status(node_id, f"Load Dataset: checking the images in {path.name}")
        try:
            config = DatasetConfig(
                folder=str(path), resolution=resolution, bucketing=bucketing, trigger_word=trigger_word.strip(),
                default_repeats=repeats, caption_extension=caption_extension, on_error=on_error,
                min_bucket=bucket_range(resolution)[0], max_bucket=bucket_range(resolution)[1],
                frames=frames, frame_sampling=frame_sampling, windows=windows, fps=fps or 16.0,
            )
            scan = scan_dataset(config)
        except DatasetError as exc:
            raise KilnUserError(str(exc)) from None
        except ValueError as exc:  # a setting out of range (frames not 4k+1, ...)
            raise KilnUserError(f"Load Dataset: {exc}") from None
        clips = scan.num_clips
        if clips and fps_auto:
            auto.append(f"fps auto: {fps:g} for {video[1]}")
        unit = "samples" if clips else "images"
        progress = reporting.ItemProgress(node_id, unit=unit, phase="Load Dataset: encoding latents")
        latents, sizes, encoded = encode_records(scan.records, config, vae, progress)
        dataset = KilnDataset(config=config, folder=path, records=scan.records, latents=tuple(latents), clip=clip,
                              vae=vae, warnings=scan.warnings, sizes=tuple(sizes))
        buckets = Counter((*r.bucket, r.frames) for r in scan.records)
        what = f"{scan.num_images - clips} images" if not clips else \
            f"{len(scan.records)} samples ({clips} clip windows of {config.frames} frames at {config.fps:g} fps, " \
            f"{scan.num_images - clips} images)"
        lines = [
            f"{what} ({scan.num_samples} samples per epoch with repeats) from {folders.display_path(path)}",
            "buckets: " + ", ".join(f"{w}x{h}" + (f"x{f}" if f > 1 else "") + f": {n}"
                                    for (w, h, f), n in sorted(buckets.items())),
            f"latents: {encoded} encoded, {len(scan.records) - encoded} from cache",
        ]
        if scan.uncaptioned:
            lines.append(
                f"{len(scan.uncaptioned)} images have no caption (Auto Caption can write them; until then they "
                f"train with {('the trigger word ' + repr(config.trigger_word)) if config.trigger_word else 'an empty caption'})"
            )
        if scan.skipped:
            lines.append(f"skipped {len(scan.skipped)} files: " + "; ".join(f"{p.name}: {why}" for p, why in scan.skipped[:5]))
        if clips and windows > 1 and frame_sampling == "head":
            lines.append(f"windows={windows} applies to frame_sampling uniform; head takes one window from each clip's start")
        lines += auto
        lines += list(scan.warnings[:10])
        for line in lines:
            logger.info("Load Dataset: %s", line)
        return io.NodeOutput(dataset, ui={"text": ["\n".join(lines)]})
