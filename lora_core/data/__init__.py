"""Framework-independent dataset layer: find, validate, caption and bucket training images and video clips.

Nothing here imports ComfyUI; only the standard library, numpy, PIL, torch and PyAV (video clips).
"""

from .buckets import assign_bucket, bucket_range, buckets_for_config, fit_to_bucket, make_buckets
from .captions import (
    apply_trigger,
    decode_text,
    normalize_caption,
    read_caption_file,
    read_metadata_csv,
    read_metadata_jsonl,
    split_tags,
    tag_frequency,
)
from .config import CAPTION_EXTENSIONS, FRAME_SAMPLING, MAX_FRAMES, ON_ERROR_CHOICES, DatasetConfig
from .errors import DatasetError
from .images import IMAGE_EXTENSIONS, MIN_IMAGE_SIDE, image_to_tensor, open_image
from .scan import ImageRecord, ScanResult, dataset_fingerprint, file_digest, scan_dataset
from .video import (
    VIDEO_EXTENSIONS,
    ClipInfo,
    available_frames,
    clip_still,
    is_clip_file,
    open_picture,
    probe_clip,
    read_clip_frames,
    window_starts,
)

__all__ = [
    "bucket_range",
    "CAPTION_EXTENSIONS",
    "FRAME_SAMPLING",
    "IMAGE_EXTENSIONS",
    "MAX_FRAMES",
    "MIN_IMAGE_SIDE",
    "ON_ERROR_CHOICES",
    "VIDEO_EXTENSIONS",
    "ClipInfo",
    "clip_still",
    "open_picture",
    "DatasetConfig",
    "DatasetError",
    "ImageRecord",
    "ScanResult",
    "apply_trigger",
    "assign_bucket",
    "available_frames",
    "buckets_for_config",
    "dataset_fingerprint",
    "decode_text",
    "file_digest",
    "fit_to_bucket",
    "image_to_tensor",
    "is_clip_file",
    "make_buckets",
    "normalize_caption",
    "open_image",
    "probe_clip",
    "read_clip_frames",
    "read_caption_file",
    "read_metadata_csv",
    "read_metadata_jsonl",
    "scan_dataset",
    "split_tags",
    "tag_frequency",
    "window_starts",
]
