"""Every training setting in one table: its config key, the node input it becomes, the engine field it sets.

``SETTINGS`` is the only place that maps the three spellings of a setting onto each other:

- the headless config key (kohya / lora-scripts spelling, see :mod:`.runconfig`) and its aliases;
- the node inputs of the graph (``"KilnTrainSteps.learning_rate"``); the first one is read back when a graph is
  exported as a config, the others are written too (``output_name`` names both the LoRA and the saved file);
- the engine field (``"TrainConfig.learning_rate"``) that the config and the node both feed.

Conversions, where the spellings differ in value too, are plain functions on the row. A row without a config key
is a graph-only input: kiln.py's graphs give it ``fixed`` (or leave the node's default when there is none).
Adding a setting is one row here (plus the RunConfig field and the node input it names); the unit tests fail
when a node input or an engine field has no row.

This module never imports ComfyUI: node names are plain strings.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .config import AUTO, AUTO_GAMMA, AdapterConfig, TrainConfig
from .data.config import DatasetConfig

CHECKPOINT_LOADER = "CheckpointLoaderSimple"
# a model in separate files (FLUX.1: kohya's pretrained_model_name_or_path + clip_l + t5xxl + ae): ComfyUI's loaders
UNET_LOADER = "UNETLoader"
CLIP_LOADER = "DualCLIPLoader"
T5_LOADER = "CLIPLoader"  # Chroma: T5-XXL alone (kohya's Chroma options: no clip_l)
VAE_LOADER = "VAELoader"
DATASET_NODE = "KilnLoadDataset"
INJECT_NODE = "KilnInjectLoRA"
TRAIN_NODE = "KilnTrainSteps"
SAVE_NODE = "KilnSaveLoRA"
LOADERS: tuple[str, ...] = (CHECKPOINT_LOADER, UNET_LOADER, CLIP_LOADER, T5_LOADER, VAE_LOADER)
NODES: tuple[str, ...] = (*LOADERS, DATASET_NODE, INJECT_NODE, TRAIN_NODE, SAVE_NODE)
ENGINES: dict[str, type] = {cls.__name__: cls for cls in (AdapterConfig, TrainConfig, DatasetConfig)}


class _NotFixed:
    def __repr__(self) -> str:
        return "NOT_FIXED"


NOT_FIXED: Any = _NotFixed()  # a graph-only input kiln.py leaves at the node's default


def _same(value: Any) -> Any:
    return value


def _absolute_path(value: str) -> str:
    return str(Path(value).expanduser().resolve())


def _first_prompt(prompts: Any) -> str:
    return prompts[0] if prompts else ""


def _prompt_list(prompt: str) -> list[str]:
    return [prompt] if prompt else []


def _zero_is_none(value: int) -> int | None:
    return value or None


def _gamma_to_number(value: float | str) -> float:
    return AUTO_GAMMA if value == AUTO else float(value)


def _gamma_from_number(value: float) -> float | str:
    return AUTO if value < 0 else value  # any negative value is auto (TrainConfig)


def _weight_dtype(fp8_base: bool) -> str:
    return "fp8_e4m3fn" if fp8_base else "default"


def _is_fp8(weight_dtype: str) -> bool:
    return str(weight_dtype).startswith("fp8")


def _fps(value: float) -> float:
    return float(value) or 16.0  # auto (0) is resolved by Load Dataset from the VAE; 16 stands in for validation


def _text_targets(train_text_encoder: bool) -> str | tuple[str, ...]:
    return "text" if train_text_encoder else ()


_NAME = re.compile(r"[A-Za-z_]\w*")


@dataclass(frozen=True)
class Setting:
    """One setting: ``key`` (None: graph only), ``inputs`` ``"Node.input"``, ``engine`` ``"Class.field"``.

    ``to_node``/``from_node`` convert between the config value and the node value, ``to_engine`` from the config
    value to the engine field. ``summed``: chained nodes each run a part, the config value is their sum.
    ``set_names``: the short names ``kiln.py run --set`` accepts for the first input.
    """

    key: str | None
    inputs: tuple[str, ...] = ()
    engine: str | None = None
    aliases: tuple[str, ...] = ()
    set_names: tuple[str, ...] = ()
    to_node: Callable[[Any], Any] = _same
    from_node: Callable[[Any], Any] = _same
    to_engine: Callable[[Any], Any] = _same
    fixed: Any = NOT_FIXED
    summed: bool = False

    def __post_init__(self) -> None:
        label = self.key or (self.inputs[0] if self.inputs else "?")
        if self.key is not None and not _NAME.fullmatch(self.key):
            raise ValueError(f"setting key={self.key!r} must be an identifier")
        for name in (*self.aliases, *self.set_names):
            if not _NAME.fullmatch(name):
                raise ValueError(f"setting {label}: alias {name!r} must be an identifier")
        for spec in self.inputs:
            node, _, name = spec.partition(".")
            if node not in NODES or not _NAME.fullmatch(name):
                raise ValueError(f"setting {label}: input {spec!r} must be Node.input with Node one of {', '.join(NODES)}")
        if self.engine is not None:
            cls_name, _, field = self.engine.partition(".")
            cls = ENGINES.get(cls_name)
            if cls is None or field not in {f.name for f in fields(cls)}:
                raise ValueError(f"setting {label}: engine={self.engine!r} is not a field of {', '.join(ENGINES)}")
        if self.key is None:
            if not self.inputs or self.aliases or self.set_names:
                raise ValueError(f"setting {label}: a graph-only setting needs inputs and takes no aliases")
        elif self.fixed is not NOT_FIXED:
            raise ValueError(f"setting {label}: only graph-only settings (key=None) have a fixed value")
        if (self.set_names or self.summed) and not self.inputs:
            raise ValueError(f"setting {label}: set_names and summed need a node input")

    @property
    def node_inputs(self) -> tuple[tuple[str, str], ...]:
        return tuple((node, name) for node, _, name in (spec.partition(".") for spec in self.inputs))

    def input_on(self, node: str) -> str | None:
        """This setting's input name on ``node`` (None: the node has none)."""
        return next((name for n, name in self.node_inputs if n == node), None)

    @property
    def engine_class(self) -> type | None:
        return ENGINES[self.engine.split(".", 1)[0]] if self.engine else None

    @property
    def engine_field(self) -> str | None:
        return self.engine.split(".", 1)[1] if self.engine else None


S = Setting
_D, _I, _T, _S = DATASET_NODE, INJECT_NODE, TRAIN_NODE, SAVE_NODE

SETTINGS: tuple[Setting, ...] = (
    # the model and the data
    S("base_model", (f"{CHECKPOINT_LOADER}.ckpt_name", f"{UNET_LOADER}.unet_name"),
      aliases=("pretrained_model_name_or_path", "dit"), set_names=("base_model", "checkpoint")),  # musubi: --dit
    # FLUX.1 / Chroma in separate files, as kohya's flux trainer takes them (then base_model is the diffusion model);
    # without clip_l it is Chroma (T5-XXL alone, CLIPLoader)
    S("clip_l", (f"{CLIP_LOADER}.clip_name1",)),
    S("t5xxl", (f"{CLIP_LOADER}.clip_name2", f"{T5_LOADER}.clip_name"), aliases=("t5",)),  # musubi's Wan: --t5
    S("ae", (f"{VAE_LOADER}.vae_name",), aliases=("vae",)),
    S("fp8_base", (f"{UNET_LOADER}.weight_dtype",), to_node=_weight_dtype, from_node=_is_fp8),
    S(None, (f"{CLIP_LOADER}.type",), fixed="flux"),
    # the single text encoder of a model in separate files: CLIPLoader's type, chroma (T5-XXL) or wan (UMT5-XXL)
    S("text_encoder_type", (f"{T5_LOADER}.type",)),
    S("train_data_dir", (f"{_D}.folder",), "DatasetConfig.folder", set_names=("dataset", "folder"),
      to_node=_absolute_path),
    S("caption_extension", (f"{_D}.caption_extension",), "DatasetConfig.caption_extension"),
    S("trigger_word", (f"{_D}.trigger_word",), "DatasetConfig.trigger_word"),
    S("repeats", (f"{_D}.repeats",), "DatasetConfig.default_repeats"),
    S("resolution", (f"{_D}.resolution",), "DatasetConfig.resolution", set_names=("resolution",)),
    S("enable_bucket", (f"{_D}.bucketing",), "DatasetConfig.bucketing"),
    S(None, (f"{_D}.on_error",), "DatasetConfig.on_error", fixed="error"),
    # video clips (Wan), as musubi-tuner's dataset config names them: frames per window, head / uniform, windows per clip
    S("target_frames", (f"{_D}.frames",), "DatasetConfig.frames", aliases=("frames",)),
    S("frame_extraction", (f"{_D}.frame_sampling",), "DatasetConfig.frame_sampling"),
    S("frame_sample", (f"{_D}.windows",), "DatasetConfig.windows"),
    S("fps", (f"{_D}.fps",), "DatasetConfig.fps", to_engine=_fps),  # 0: the model's (auto, read from the VAE)
    # the adapters
    S("output_name", (f"{_I}.name", f"{_S}.filename"), set_names=("name",)),
    S("lora_rank", (f"{_I}.rank",), "AdapterConfig.rank", aliases=("network_dim",), set_names=("rank",)),
    S("lora_alpha", (f"{_I}.alpha",), "AdapterConfig.alpha", aliases=("network_alpha",)),
    S("targets", (f"{_I}.targets",), "AdapterConfig.unet_targets"),
    S("algorithm", (f"{_I}.algorithm",), "AdapterConfig.algorithm"),
    S("conv_rank", (f"{_I}.conv_rank",), "AdapterConfig.conv_rank", to_engine=_zero_is_none),
    S("dropout", (f"{_I}.dropout",), "AdapterConfig.dropout"),
    S("train_text_encoder", (f"{_I}.train_text_encoder",), "AdapterConfig.text_targets", from_node=bool,
      to_engine=_text_targets),
    S("seed", (f"{_I}.seed", f"{_T}.preview_seed")),  # the TrainState's seed: init, data order, noise
    S(None, (f"{_I}.init_lora",), fixed="none"),
    # training
    S("max_steps", (f"{_T}.steps",), "TrainConfig.steps", aliases=("max_train_steps",), set_names=("steps",),
      summed=True),
    S("epochs", aliases=("max_train_epochs",)),
    S("learning_rate", (f"{_T}.learning_rate",), "TrainConfig.learning_rate", set_names=("lr", "learning_rate")),
    S("text_encoder_lr", (f"{_T}.text_encoder_lr",), "TrainConfig.text_encoder_lr"),
    S("optimizer", (f"{_T}.optimizer",), "TrainConfig.optimizer", aliases=("optimizer_type",)),
    S("lr_scheduler", (f"{_T}.scheduler",), "TrainConfig.scheduler"),
    S("lr_warmup_steps", (f"{_T}.warmup_steps",), "TrainConfig.warmup_steps", aliases=("lr_warmup",)),
    S(None, (f"{_T}.schedule_steps",), "TrainConfig.schedule_steps", fixed=0),  # headless: one node, one run
    S("batch_size", (f"{_T}.batch_size",), "TrainConfig.batch_size", aliases=("train_batch_size",)),
    S("gradient_accumulation_steps", (f"{_T}.grad_accum",), "TrainConfig.grad_accum"),
    S("mixed_precision", (f"{_T}.precision",), "TrainConfig.precision"),
    S("gradient_checkpointing", (f"{_T}.gradient_checkpointing",), "TrainConfig.gradient_checkpointing"),
    S("min_snr_gamma", (f"{_T}.min_snr_gamma",), "TrainConfig.min_snr_gamma", to_node=_gamma_to_number,
      from_node=_gamma_from_number, to_engine=_gamma_to_number),  # config "auto" <-> node/engine -1
    S("noise_offset", (f"{_T}.noise_offset",), "TrainConfig.noise_offset"),
    S("max_grad_norm", (f"{_T}.max_grad_norm",), "TrainConfig.max_grad_norm"),
    S("timestep_sampling", (f"{_T}.timestep_sampling",), "TrainConfig.timestep_sampling"),
    S("discrete_flow_shift", (f"{_T}.flow_shift",), "TrainConfig.flow_shift"),
    S("weighting_scheme", (f"{_T}.loss_weighting",), "TrainConfig.loss_weighting"),
    S("guidance_scale", (f"{_T}.guidance",), "TrainConfig.guidance"),  # Flux.1-dev (kohya's --guidance_scale)
    # Wan 2.2 14B: which expert checkpoint this LoRA is for (musubi trains each with its own min/max timestep)
    S("expert", (f"{_T}.expert",), "TrainConfig.expert"),
    # checkpoints, previews, output
    S("save_steps", (f"{_T}.save_every",), aliases=("save_every_n_steps",)),
    S("keep_checkpoints", (f"{_T}.keep_checkpoints",)),  # the newest N save_every checkpoints stay (0: all)
    S("resume_from_checkpoint"),  # kiln.py puts it on a Load Checkpoint node in place of Inject LoRA
    S("sample_prompts", (f"{_T}.preview_prompt",), to_node=_first_prompt, from_node=_prompt_list),
    S("sample_every", (f"{_T}.preview_every",)),
    S("sample_size", (f"{_T}.preview_size",)),
    S("sample_steps", (f"{_T}.preview_steps",)),
    S("sample_cfg", (f"{_T}.preview_cfg",)),  # kohya's per-prompt --l; 0: the family's (auto)
    S(None, (f"{_T}.retrain",)),  # graph only: a finished run with the same digest is reused unless this is on
    S("save_precision", (f"{_S}.dtype",)),
    S(None, (f"{_S}.save_checkpoint",), fixed=True),
    S(None, (f"{_S}.embed_workflow",)),
    S("output_dir"),
)
del S, _D, _I, _T, _S


def _check_table(settings: tuple[Setting, ...]) -> None:
    seen: dict[str, str] = {}
    for s in settings:
        label = s.key or s.inputs[0]
        for spelling in (x for x in (s.key, *s.aliases) if x):
            if spelling in seen:
                raise ValueError(f"config key {spelling!r} is claimed by {seen[spelling]!r} and {label!r}")
            seen[spelling] = label
    for what, values in (("node input", [i for s in settings for i in s.inputs]),
                         ("engine field", [s.engine for s in settings if s.engine]),
                         ("--set name", [n for s in settings for n in s.set_names])):
        doubled = sorted({v for v in values if values.count(v) > 1})
        if doubled:
            raise ValueError(f"{what} {', '.join(doubled)} has more than one row in SETTINGS")


_check_table(SETTINGS)

BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS if s.key is not None}
ALIASES: dict[str, str] = {alias: s.key for s in SETTINGS if s.key for alias in s.aliases}
# engine field -> config key, so engine errors speak the config's language
ENGINE_NAMES: dict[str, str] = {
    s.engine_field: s.key for s in SETTINGS if s.key and s.engine_field and s.engine_field != s.key
}
# kiln.py run --set NAME=value -> (node type, input)
SET_NAMES: dict[str, tuple[str, str]] = {name: s.node_inputs[0] for s in SETTINGS for name in s.set_names}
# the same, every input of the row (base_model: the checkpoint loader's, else the diffusion model loader's)
SET_TARGETS: dict[str, tuple[tuple[str, str], ...]] = {name: s.node_inputs for s in SETTINGS for name in s.set_names}


def engine_kwargs(engine: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of ``engine`` (AdapterConfig, TrainConfig, DatasetConfig) from config values."""
    return {s.engine_field: s.to_engine(values[s.key]) for s in SETTINGS
            if s.engine_class is engine and s.key is not None and s.key in values}


def engine_kwargs_from_node(engine: type, node: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of ``engine`` from a node's input values (every input a row names must be there)."""
    kwargs: dict[str, Any] = {}
    for s in SETTINGS:
        name = s.input_on(node)
        if s.engine_class is not engine or name is None:
            continue
        if name not in inputs:
            raise ValueError(f"{node} input {name!r} is missing (it sets {s.engine})")
        kwargs[s.engine_field] = s.to_engine(s.from_node(inputs[name]))
    return kwargs


def node_inputs(values: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Node type -> {input: value} for config ``values``; ``overrides`` (config key -> value) win."""
    overrides = overrides or {}
    unknown = sorted(set(overrides) - set(BY_KEY))
    if unknown:
        raise ValueError(f"unknown config key(s) to override: {', '.join(unknown)}")
    out: dict[str, dict[str, Any]] = {node: {} for node in NODES}
    for s in SETTINGS:
        if s.key is None:
            if s.fixed is NOT_FIXED:
                continue
            value = s.fixed
        elif s.inputs:
            value = s.to_node(overrides[s.key] if s.key in overrides else values[s.key])
        else:
            continue
        for node, name in s.node_inputs:
            out[node][name] = value
    return out


def config_values(nodes: Mapping[str, list[Mapping[str, Any]]]) -> dict[str, Any]:
    """Config key -> value from the inputs of a graph's nodes (node type -> inputs of each node of that type).

    A setting is read from its first input, on the first node of that type (``summed`` ones: all of them; a loader
    setting from the first loader the graph has); a missing node or input leaves the key out, so the config's
    default applies.
    """
    values: dict[str, Any] = {}
    for s in SETTINGS:
        if s.key is None or not s.inputs:
            continue
        node, name = s.node_inputs[0]
        if node in LOADERS:  # base_model: the checkpoint loader's, else the diffusion model loader's (t5xxl: alike)
            node, name = next(((n, i) for n, i in s.node_inputs if n in nodes), (node, name))
        of_type = nodes.get(node, [])[: None if s.summed else 1]
        present = [inputs[name] for inputs in of_type if name in inputs]
        if present:
            values[s.key] = sum(present) if s.summed else s.from_node(present[0])
    return values
