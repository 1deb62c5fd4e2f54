"""The headless run configuration: the keys a kohya / lora-scripts user already knows.

``RunConfig.from_mapping`` validates every key on load: an unknown key or a bad value is a ``ValueError``
naming the key and the allowed values (with a did-you-mean for typos). Common kohya spellings
(``network_dim``, ``max_train_steps`` ...) are accepted as aliases. What each key becomes (node input,
engine field) is the table in :mod:`.settings`; :func:`training_graph` and :func:`config_from_graph` use it to
turn a config into the graph a user would wire and back.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from . import settings
from ._validate import check_choice, check_int, check_range
from .config import ALGORITHMS, TARGET_PRESETS, AdapterConfig, TrainConfig
from .settings import ALIASES

__all__ = ["ALIASES", "RunConfig", "config_from_graph", "training_graph"]


SPLIT_FILES = ("clip_l", "t5xxl", "ae")  # FLUX.1 in separate files, kohya's flux trainer's options
CHROMA_FILES = ("t5xxl", "ae")  # Chroma in separate files: the same without CLIP-L (kohya's --model_type chroma)
TEXT_ENCODER_TYPES = ("chroma", "wan")  # CLIPLoader types of a one-text-encoder model in separate files (Chroma, Wan)


@dataclass(frozen=True)
class RunConfig:
    base_model: str
    train_data_dir: str
    output_name: str = "my_lora"
    output_dir: str = "output"
    # FLUX.1 in separate files (kohya's flux trainer): base_model is then the diffusion model (models/diffusion_models);
    # Chroma: the same without clip_l; Wan (musubi's --dit / --t5 / --vae): the same with text_encoder_type wan
    clip_l: str = ""  # CLIP-L (models/text_encoders)
    t5xxl: str = ""  # T5-XXL (models/text_encoders); Wan: UMT5-XXL
    ae: str = ""  # the autoencoder (models/vae)
    text_encoder_type: str = "chroma"  # without clip_l: CLIPLoader's type, chroma (T5-XXL) or wan (UMT5-XXL)
    fp8_base: bool = False  # keep the diffusion model's weights in fp8 (UNETLoader weight_dtype fp8_e4m3fn)
    caption_extension: str = ".txt"
    trigger_word: str = ""
    repeats: int = 1
    resolution: int = 512
    enable_bucket: bool = True
    # video clips (Wan; musubi's dataset keys): frames per window (4k+1), head / uniform, windows per clip, frame rate
    target_frames: int = 33
    frame_extraction: str = "head"
    frame_sample: int = 1
    fps: float = 0.0  # 0: the model's (16 for Wan 2.1 / 2.2 14B, 24 for Wan 2.2 5B)
    lora_rank: int = 16
    lora_alpha: float = 16.0
    targets: str = "attn+ff"
    algorithm: str = "lora"
    conv_rank: int = 0
    dropout: float = 0.0
    train_text_encoder: bool = False
    text_encoder_lr: float = 0.0  # 0: same as learning_rate
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    epochs: int = 0
    max_steps: int = 0
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    optimizer: str = "adamw"
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    min_snr_gamma: float | str = "auto"  # "auto": 5 on DDPM (SD1/SD2/SDXL) models, 0 on flow models; or a number
    noise_offset: float = 0.0
    max_grad_norm: float = 1.0
    timestep_sampling: str = "auto"  # auto (the family's) | uniform | logit_normal
    discrete_flow_shift: float = 0.0  # flow models (SD3, Flux): 0 = the model's own shift
    weighting_scheme: str = "none"  # flow models: none | sigma_sqrt | cosmap
    guidance_scale: float = 1.0  # guidance-distilled models (Flux.1-dev): the guidance while training
    expert: str = "all"  # Wan 2.2 14B: high_noise / low_noise, the expert checkpoint this LoRA is for
    save_steps: int = 0
    keep_checkpoints: int = 0  # keep the newest N save_steps checkpoints (0 = all)
    save_precision: str = "fp16"
    seed: int = 0
    resume_from_checkpoint: str = ""
    sample_prompts: tuple[str, ...] = field(default_factory=tuple)
    sample_every: int = 0
    sample_size: int = 512
    sample_steps: int = 0  # 0: the family's usual count (auto)
    sample_cfg: float = 0.0  # 0: the family's usual CFG (auto)

    def __post_init__(self) -> None:
        if isinstance(self.sample_prompts, str):
            object.__setattr__(self, "sample_prompts", (self.sample_prompts,) if self.sample_prompts else ())
        elif isinstance(self.sample_prompts, list):
            object.__setattr__(self, "sample_prompts", tuple(self.sample_prompts))
        for name in ("base_model", "train_data_dir", "output_name"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ValueError(f"{name} is required (got {getattr(self, name)!r})")
        if not re.fullmatch(r"[\w\-. ]+", self.output_name):
            raise ValueError(
                f"output_name={self.output_name!r} may only use letters, digits, '-', '_', '.' and spaces"
            )
        check_choice("caption_extension", self.caption_extension, (".txt", ".caption"))
        check_choice("text_encoder_type", self.text_encoder_type, TEXT_ENCODER_TYPES)
        if self.min_snr_gamma != "auto" and not isinstance(self.min_snr_gamma, (int, float)):
            raise ValueError(f"min_snr_gamma={self.min_snr_gamma!r} must be a number (0 = off) or \"auto\"")
        check_int("repeats", self.repeats, 1, 1000)
        if self.resolution == 0:
            raise ValueError("resolution=0 is Load Dataset's auto (it reads the CLIP), which a config cannot carry: "
                             "set Load Dataset's resolution in the workflow (1024 for SDXL and newer models, 768 for "
                             "SD2.x, 512 for SD1.x) and export again, or put resolution into the config")
        check_int("resolution", self.resolution, 64, 4096)
        if self.resolution % 64:
            raise ValueError(f"resolution={self.resolution} must be a multiple of 64 (e.g. 512, 768, 1024)")
        check_choice("targets", self.targets, TARGET_PRESETS)
        check_choice("algorithm", self.algorithm, ALGORITHMS)
        check_int("conv_rank", self.conv_rank, 0, 1024)
        check_int("epochs", self.epochs, 0, 100_000)
        check_int("max_steps", self.max_steps, 0, 10_000_000)
        if (self.epochs > 0) == (self.max_steps > 0):
            raise ValueError(
                f"set exactly one of epochs (now {self.epochs}) or max_steps (now {self.max_steps}): "
                "how long to train"
            )
        given = [k for k in SPLIT_FILES if getattr(self, k)]
        if given and given != list(SPLIT_FILES) and given != list(CHROMA_FILES):
            missing = [k for k in (SPLIT_FILES if self.clip_l else CHROMA_FILES) if k not in given]
            raise ValueError(
                f"{', '.join(given)} given without {', '.join(missing)}: a model in separate files needs t5xxl "
                "(T5-XXL) and ae (the autoencoder), with base_model the diffusion model, and clip_l (CLIP-L) for "
                "FLUX.1 (Chroma has none)"
            )
        if self.fp8_base and not given:
            raise ValueError(
                "fp8_base applies to a diffusion model in separate files (with t5xxl and ae); for a checkpoint "
                "start ComfyUI with --fp8_e4m3fn-unet instead (kiln.py passes ComfyUI flags on)"
            )
        check_int("save_steps", self.save_steps, 0, 10_000_000)
        check_int("keep_checkpoints", self.keep_checkpoints, 0, 10_000)
        check_choice("save_precision", self.save_precision, ("fp16", "bf16", "fp32"))
        check_int("sample_every", self.sample_every, 0, 10_000_000)
        check_int("sample_size", self.sample_size, 64, 2048)
        check_int("sample_steps", self.sample_steps, 0, 200)
        check_range("sample_cfg", self.sample_cfg, 0.0, 30.0)
        check_range("dropout", self.dropout, 0.0, 0.9)
        if self.sample_every and not self.sample_prompts:
            raise ValueError("sample_every is set but sample_prompts is empty: give at least one prompt")
        try:
            self.adapter_config()
            self.train_config(max(self.max_steps, 1))
        except ValueError as exc:
            raise ValueError(_rename(str(exc))) from None

    def adapter_config(self) -> AdapterConfig:
        return AdapterConfig(**settings.engine_kwargs(AdapterConfig, self.to_dict()))

    def train_config(self, steps: int) -> TrainConfig:
        """The TrainConfig of one run of ``steps`` steps (``max_steps`` is the whole run's)."""
        return TrainConfig(**{**settings.engine_kwargs(TrainConfig, self.to_dict()), "steps": steps})

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["sample_prompts"] = list(self.sample_prompts)
        return data

    def replace(self, **changes: Any) -> RunConfig:
        return RunConfig.from_mapping({**self.to_dict(), **changes})

    def steps_per_epoch(self) -> int:
        """Optimizer steps of one epoch of ``train_data_dir`` as the trainer draws it: samples of one latent shape
        (bucket and frame count) batch together (``LatentDataset.epoch_batches``). A ValueError names a bad file or
        a missing setting."""
        from .data import DatasetConfig, bucket_range, scan_dataset

        kwargs = settings.engine_kwargs(DatasetConfig, self.to_dict())
        if not self.fps:  # auto: Load Dataset reads the model's rate from the VAE; the highest (24) refuses no clip
            kwargs["fps"] = 24.0
        low, high = bucket_range(self.resolution)
        scan = scan_dataset(DatasetConfig(**kwargs, min_bucket=low, max_bucket=high))
        if scan.num_clips and not self.fps and self.epochs:
            raise ValueError(
                "epochs with video clips needs the frame rate to count the clips' windows: set fps (16 for Wan 2.1 "
                "and Wan 2.2 14B, 24 for Wan 2.2 5B), or give max_steps instead of epochs")
        per_shape: dict[tuple, int] = {}
        for record in scan.records:
            key = (record.bucket, record.frames)
            per_shape[key] = per_shape.get(key, 0) + record.repeats
        batches = sum(-(-n // self.batch_size) for n in per_shape.values())
        return max(1, -(-batches // self.gradient_accumulation_steps))

    @property
    def split_model(self) -> bool:
        """The model comes in separate files (FLUX.1: diffusion model, CLIP-L + T5-XXL, autoencoder; Chroma: the same
        without CLIP-L)."""
        return bool(self.t5xxl)

    @property
    def split_files(self) -> tuple[str, ...]:
        """The config keys of the files besides ``base_model`` (empty for a checkpoint)."""
        if not self.split_model:
            return ()
        return SPLIT_FILES if self.clip_l else CHROMA_FILES

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> RunConfig:
        if not isinstance(data, dict):
            raise ValueError(f"the config must be a mapping of key: value, got {type(data).__name__}")
        known = set(cls.keys())
        clean: dict[str, Any] = {}
        for key, value in data.items():
            name = ALIASES.get(key, key)
            if name not in known:
                close = difflib.get_close_matches(str(key), sorted(known | set(ALIASES)), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown config key {key!r}{hint}; allowed keys: {', '.join(sorted(known))}")
            if name in clean:
                raise ValueError(f"config key {name!r} is given twice (as {key!r} and another spelling)")
            clean[name] = value
        for f in fields(cls):
            if f.name in clean and f.type in ("int", "float", "bool") and clean[f.name] is not None:
                clean[f.name] = _coerce(f.name, f.type, clean[f.name])
        missing = [k for k in ("base_model", "train_data_dir") if k not in clean]
        if missing:
            raise ValueError(f"missing required config key(s): {', '.join(missing)}")
        return cls(**clean)

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML ({exc})") from None
        try:
            return cls.from_mapping(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def _coerce(name: str, kind: str, value: Any) -> Any:
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name}={value!r} must be true or false")
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ValueError(f"{name}={value!r} must be a whole number")
        return int(value)
    if isinstance(value, str):  # YAML reads 1e-4 as a string
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{name}={value!r} must be a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r} must be a number")
    return float(value)


def _rename(message: str) -> str:
    for engine, key in settings.ENGINE_NAMES.items():
        if message.startswith(f"{engine}="):
            return key + message[len(engine):]
    return message


# ---- config <-> graph (no ComfyUI needed: node types and inputs are plain names) ---------------------------

# node id -> (type, links); the same graph a user wires (example_workflows/train_sd15_lora.json)
_GRAPH: dict[str, tuple[str, dict[str, list[Any]]]] = {
    "1": (settings.CHECKPOINT_LOADER, {}),
    "2": (settings.DATASET_NODE, {"vae": ["1", 2], "clip": ["1", 1]}),
    "3": (settings.INJECT_NODE, {"model": ["1", 0], "clip": ["1", 1]}),
    "4": (settings.TRAIN_NODE, {"state": ["3", 0], "dataset": ["2", 0]}),
    "5": (settings.SAVE_NODE, {"state": ["4", 0]}),
}
# a model in separate files (example_workflows/train_flux_lora.json): ComfyUI's three loaders, no text-encoder link
_SPLIT_GRAPH: dict[str, tuple[str, dict[str, list[Any]]]] = {
    "1": (settings.UNET_LOADER, {}),
    "6": (settings.CLIP_LOADER, {}),
    "7": (settings.VAE_LOADER, {}),
    "2": (settings.DATASET_NODE, {"vae": ["7", 0], "clip": ["6", 0]}),
    "3": (settings.INJECT_NODE, {"model": ["1", 0]}),
    "4": (settings.TRAIN_NODE, {"state": ["3", 0], "dataset": ["2", 0]}),
    "5": (settings.SAVE_NODE, {"state": ["4", 0]}),
}
# Chroma in separate files (example_workflows/train_chroma_lora.json): the T5-only CLIPLoader in DualCLIPLoader's place
_CHROMA_GRAPH: dict[str, tuple[str, dict[str, list[Any]]]] = {**_SPLIT_GRAPH, "6": (settings.T5_LOADER, {})}
RESUME_NODE = "KilnLoadCheckpoint"


def training_graph(cfg: RunConfig, steps: int, resume: str | None, ckpt_name: str,
                   names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The API graph that trains ``cfg`` for ``steps`` steps.

    ``ckpt_name``: ``base_model`` as its loader names it (CheckpointLoaderSimple, or UNETLoader for a model in
    separate files); ``names``: the other files as their loaders name them (``clip_l``, ``t5xxl``, ``ae``);
    ``resume``: a checkpoint name for Load Checkpoint (Kiln), which then replaces Inject LoRA.
    """
    inputs = settings.node_inputs(cfg.to_dict(), {**(names or {}), "max_steps": steps, "base_model": ckpt_name})
    graph: dict[str, Any] = {}
    layout = _GRAPH if not cfg.split_model else _SPLIT_GRAPH if cfg.clip_l else _CHROMA_GRAPH
    for node_id, (node, links) in layout.items():
        if node == settings.INJECT_NODE and resume:
            graph[node_id] = {"class_type": RESUME_NODE, "inputs": {**links, "checkpoint": resume}}
        else:
            graph[node_id] = {"class_type": node, "inputs": {**inputs[node], **links}}
    return graph


# the text-encoder loaders a config can rebuild, and the type each must have
_CONFIG_CLIP_TYPES = {settings.CLIP_LOADER: ("flux",), settings.T5_LOADER: TEXT_ENCODER_TYPES}


def _check_exportable(api: Mapping[str, Any]) -> None:
    """Refuse a graph whose Load Dataset reads its VAE or CLIP from a loader a config cannot express: a VAELoader or
    CLIP loader beside Load Checkpoint (the config would train with the checkpoint's own), or a CLIP loader type other
    than FLUX.1's / Chroma's (the config would rebuild it as one of those)."""
    dataset = next((n["inputs"] for n in api.values() if n.get("class_type") == settings.DATASET_NODE), {})
    checkpoint = any(n.get("class_type") == settings.CHECKPOINT_LOADER for n in api.values())

    def source(name: str) -> Mapping[str, Any]:
        link = dataset.get(name)
        node = api.get(str(link[0])) if isinstance(link, (list, tuple)) and len(link) == 2 else None
        return node or {}

    run_instead = "run the graph itself headless instead (kiln.py run WORKFLOW)"
    vae, clip = source("vae"), source("clip")
    if checkpoint and vae.get("class_type") == settings.VAE_LOADER:
        raise ValueError(
            f"Load Dataset's VAE comes from a VAELoader ({vae['inputs'].get('vae_name')!r}) beside Load Checkpoint; a "
            "config trains with the checkpoint's own VAE: connect Load Checkpoint's VAE to export it, or "
            f"{run_instead}")
    kind = clip.get("class_type")
    if kind in _CONFIG_CLIP_TYPES:
        clip_type = clip["inputs"].get("type")
        if checkpoint or clip_type not in _CONFIG_CLIP_TYPES[kind]:
            raise ValueError(
                f"Load Dataset's CLIP comes from a {kind} of type {clip_type!r}"
                f"{' beside Load Checkpoint' if checkpoint else ''}; a config knows a checkpoint's own text encoders, "
                f"FLUX.1's (DualCLIPLoader type flux), Chroma's and Wan's (CLIPLoader type chroma / wan): {run_instead}")


def config_from_graph(api: Mapping[str, Any]) -> RunConfig:
    """The settings of a Kiln training graph (API format) as a config: the inverse of :func:`training_graph`.

    Steps of chained Train Steps nodes add up; settings of other nodes are read from the first node of their type.
    """
    nodes: dict[str, list[Mapping[str, Any]]] = {}
    for node in api.values():
        nodes.setdefault(node["class_type"], []).append(node["inputs"])
    need = {settings.DATASET_NODE, settings.TRAIN_NODE}
    if not need <= set(nodes):
        raise ValueError(f"the workflow has no {' / '.join(sorted(need - set(nodes)))} node to export")
    values = settings.config_values(nodes)
    _check_exportable(api)
    if settings.CHECKPOINT_LOADER in nodes:  # the model is a checkpoint: a VAELoader / CLIPLoader beside it that
        for key in (*SPLIT_FILES, "fp8_base", "text_encoder_type"):  # trains nothing (checked above) is not a model in separate files
            values.pop(key, None)
    values.setdefault("base_model", "")  # no Load Checkpoint: from_mapping names the missing value
    if not values.get("sample_prompts"):
        values["sample_every"] = 0  # previews without a prompt use the captions; a config needs a prompt
    return RunConfig.from_mapping(values)
