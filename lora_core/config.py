"""Typed, validated configuration for adapters and training.

Every dataclass validates itself on construction, so a bad value fails where it is written with a
``ValueError`` that names the field, the value and the allowed range.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ._validate import check_choice, check_int, check_range

# Module-name suffixes per preset. A pattern matches a module whose dotted name equals it or ends with
# "." + pattern. "re:<regex>" entries match by regular expression (re.fullmatch on the dotted name).
# The UNet families' names (to_q ... proj_out), the MMDiT's (SD3: attn.qkv, attn.proj, mlp.fc1 ...) and FLUX.1's
# (img_attn.qkv ... txt_mlp.2; a single-stream block's linear1/linear2 are its fused qkv+MLP-in / out+MLP-out, so they
# count as attention): a model has only one set of names, so one preset serves all. Modulation layers only in "all".
# Z-Image's NextDiT: attention.qkv / attention.out and the SwiGLU feed_forward.w1/w2/w3 (its refiners' too); Qwen-Image
# (diffusers' names): to_q ... to_out.0 and the text stream's add_q_proj ... to_add_out, img_mlp / txt_mlp. FLUX.2
# uses FLUX.1's names. Wan: each block's self_attn / cross_attn q, k, v, o and its ffn.0 / ffn.2 (musubi's and
# ai-toolkit's Wan targets).
ATTN_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "attn.qkv", "attn.proj", "attn2.qkv", "attn2.proj",
                                 "img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj", "linear1", "linear2",
                                 "attention.qkv", "attention.out", "add_q_proj", "add_k_proj", "add_v_proj",
                                 "to_add_out", "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                                 "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o")
FF_TARGETS: tuple[str, ...] = ("ff.net.0.proj", "ff.net.2", r"re:.+\.proj_in", r"re:.+\.proj_out", "mlp.fc1", "mlp.fc2",
                               "img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2", "feed_forward.w1",
                               "feed_forward.w2", "feed_forward.w3", "img_mlp.net.0.proj", "img_mlp.net.2",
                               "txt_mlp.net.0.proj", "txt_mlp.net.2", "ffn.0", "ffn.2")
TEXT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
TARGET_PRESETS: dict[str, tuple[str, ...] | None] = {
    "attn": ATTN_TARGETS,
    "attn+ff": ATTN_TARGETS + FF_TARGETS,  # kohya's default: the transformer blocks' Linear/1x1 layers
    "all": None,  # every Linear and Conv2d
}
ALGORITHMS = ("lora", "locon")
OPTIMIZERS = ("adamw", "adamw8bit", "lion", "prodigy", "sgd")
SCHEDULERS = ("constant", "linear", "cosine", "cosine_with_restarts")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LOSSES = ("mse", "l1", "huber")
AUTO = "auto"  # a setting whose right value depends on the model: resolved by :meth:`TrainConfig.resolved`
AUTO_GAMMA = -1.0  # min_snr_gamma's "auto" (a number field: ComfyUI's Float inputs and kohya configs carry numbers)
TIMESTEP_SAMPLING = (AUTO, "uniform", "logit_normal")
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")  # flow-matching models (diffusers' SD3/Flux trainers)
EXPERTS = ("all", "high_noise", "low_noise")  # two-expert models (Wan 2.2 14B): TrainConfig.expert


@dataclass(frozen=True)
class AdapterConfig:
    """What adapters to put where.

    ``rank``/``alpha`` apply to Linear and 1x1 conv layers; with ``algorithm="locon"`` every k x k conv
    layer also gets an adapter with ``conv_rank``/``conv_alpha`` (default: ``rank``/``alpha``).
    ``unet_targets`` is a preset name (see ``TARGET_PRESETS``) or a tuple of module-name patterns;
    ``text_targets`` likewise for the text encoder (empty: the text encoder is not trained).
    """

    rank: int = 16
    alpha: float = 16.0
    unet_targets: str | tuple[str, ...] = "attn+ff"
    text_targets: str | tuple[str, ...] = ()
    algorithm: str = "lora"
    conv_rank: int | None = None
    conv_alpha: float | None = None
    dropout: float = 0.0
    use_rslora: bool = False

    def __post_init__(self) -> None:
        check_int("rank", self.rank, 1, 1024)
        check_range("alpha", self.alpha, 0.0, 1e6, lo_inclusive=False)
        check_choice("algorithm", self.algorithm, ALGORITHMS)
        if self.conv_rank is not None:
            check_int("conv_rank", self.conv_rank, 1, 1024)
        if self.conv_alpha is not None:
            check_range("conv_alpha", self.conv_alpha, 0.0, 1e6, lo_inclusive=False)
        check_range("dropout", self.dropout, 0.0, 1.0, hi_inclusive=False)
        for name in ("unet_targets", "text_targets"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
                value = tuple(value)
            if isinstance(value, str):
                if value == "text":
                    object.__setattr__(self, name, TEXT_TARGETS)
                elif value != "" and value not in TARGET_PRESETS:
                    raise ValueError(
                        f"{name}={value!r} is not a preset; choose one of: {', '.join(TARGET_PRESETS)}, text, "
                        "or give a list of module-name patterns"
                    )
            elif not all(isinstance(p, str) and p for p in value):
                raise ValueError(f"{name}={value!r} must be a preset name or a list of non-empty patterns")

    @property
    def effective_conv_rank(self) -> int:
        return self.conv_rank if self.conv_rank is not None else self.rank

    @property
    def effective_conv_alpha(self) -> float:
        return self.conv_alpha if self.conv_alpha is not None else self.alpha

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        return _from_dict(cls, data)


@dataclass(frozen=True)
class TrainConfig:
    """How one run of N optimizer steps trains.

    The learning-rate schedule is a pure function of the global step (``schedule_steps`` long, 0 means
    "ends with this run"), so chained runs with the same settings continue the schedule exactly. The seed
    (adapter init, data order, noise) belongs to the run, not to one node: it is ``TrainState.seed``.
    """

    steps: int = 100
    learning_rate: float = 1e-4
    text_encoder_lr: float = 0.0  # 0: same as learning_rate (only used when text-encoder adapters exist)
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    scheduler: str = "constant"
    warmup_steps: int = 0
    schedule_steps: int = 0
    num_cycles: int = 1
    batch_size: int = 1
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    precision: str = "auto"
    gradient_checkpointing: bool = False
    loss: str = "mse"
    huber_delta: float = 0.1
    min_snr_gamma: float = 0.0
    noise_offset: float = 0.0
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    min_timestep: int = 0
    max_timestep: int = 1000
    flow_shift: float = 0.0  # flow models: the time shift of the sigma sampling; 0 = the model's own (SD3: 3.0)
    loss_weighting: str = "none"  # flow models: none | sigma_sqrt | cosmap
    guidance: float = 1.0  # guidance-distilled models (Flux.1-dev): the guidance the network is given while training
    # two-expert flow models (Wan 2.2 14B: a high-noise and a low-noise checkpoint): which expert this LoRA is for; it
    # trains on the noise levels that expert samples (above / below the model's boundary). "all": every level
    expert: str = "all"

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            object.__setattr__(self, "betas", tuple(self.betas))
        check_int("steps", self.steps, 0, 10_000_000)
        check_range("learning_rate", self.learning_rate, 0.0, 10.0, lo_inclusive=False)
        check_range("text_encoder_lr", self.text_encoder_lr, 0.0, 10.0)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_range("weight_decay", self.weight_decay, 0.0, 10.0)
        if len(self.betas) != 2:
            raise ValueError(f"betas={self.betas!r} must be two numbers, e.g. (0.9, 0.999)")
        for i, b in enumerate(self.betas):
            check_range(f"betas[{i}]", b, 0.0, 1.0, hi_inclusive=False)
        check_choice("scheduler", self.scheduler, SCHEDULERS)
        check_int("warmup_steps", self.warmup_steps, 0, 10_000_000)
        check_int("schedule_steps", self.schedule_steps, 0, 10_000_000)
        check_int("num_cycles", self.num_cycles, 1, 1000)
        check_int("batch_size", self.batch_size, 1, 4096)
        check_int("grad_accum", self.grad_accum, 1, 4096)
        check_range("max_grad_norm", self.max_grad_norm, 0.0, 1e6)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("loss", self.loss, LOSSES)
        check_range("huber_delta", self.huber_delta, 0.0, 100.0, lo_inclusive=False)
        if self.min_snr_gamma >= 0:  # negative: auto (-1 as written; the node's slider can land on -0.5)
            check_range("min_snr_gamma (-1 = auto)", self.min_snr_gamma, 0.0, 100.0)
        check_range("noise_offset", self.noise_offset, 0.0, 1.0)
        check_choice("timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLING)
        check_range("logit_mean", self.logit_mean, -10.0, 10.0)
        check_range("logit_std", self.logit_std, 0.0, 10.0, lo_inclusive=False)
        check_int("min_timestep", self.min_timestep, 0, 100_000)
        check_int("max_timestep", self.max_timestep, 1, 100_000)
        check_range("flow_shift", self.flow_shift, 0.0, 100.0)
        check_choice("loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS)
        check_range("guidance", self.guidance, 0.0, 100.0)
        check_choice("expert", self.expert, EXPERTS)
        if self.min_timestep >= self.max_timestep:
            raise ValueError(
                f"min_timestep={self.min_timestep} must be below max_timestep={self.max_timestep}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def auto_fields(self) -> tuple[str, ...]:
        """The settings still at ``auto`` (they must be resolved for a model before it trains)."""
        return tuple(name for name, value in (("min_snr_gamma", self.min_snr_gamma < 0),
                                              ("timestep_sampling", self.timestep_sampling == AUTO)) if value)

    def resolved(self, defaults: AutoDefaults) -> TrainConfig:
        """This config with every ``auto`` setting replaced by the model's default (explicit values stay)."""
        changes: dict[str, Any] = {name: getattr(defaults, name) for name in self.auto_fields}
        return replace(self, **changes) if changes else self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return _from_dict(cls, data)


@dataclass(frozen=True)
class AutoDefaults:
    """What ``auto`` means for one model: the settings whose right value depends on its objective and family.

    ``source`` says where the values come from (shown to the user next to them).
    """

    min_snr_gamma: float
    timestep_sampling: str
    source: str = ""

    def __post_init__(self) -> None:
        check_range("min_snr_gamma", self.min_snr_gamma, 0.0, 100.0)
        check_choice("timestep_sampling", self.timestep_sampling, tuple(s for s in TIMESTEP_SAMPLING if s != AUTO))


# Min-SNR-gamma 5 (Hang et al. 2023, kohya's recommended value) is a weighting of DDPM objectives; flow models train
# unweighted with logit-normal noise levels (the SD3 paper; diffusers' SD3 trainer, kohya's "sigmoid"/"shift" and
# ai-toolkit's "sigmoid" timestep sampling are all logit-normal, shifted as the model samples)
DDPM_DEFAULTS = AutoDefaults(5.0, "uniform", "min-SNR 5 (Hang et al. 2023, kohya)")
FLOW_DEFAULTS = AutoDefaults(0.0, "logit_normal", "logit-normal noise levels, no min-SNR (SD3 paper, kohya, ai-toolkit)")


def auto_defaults(prediction_type: str) -> AutoDefaults:
    """The engine's ``auto`` for an objective: flow models one way, DDPM (epsilon / v) the other."""
    return FLOW_DEFAULTS if prediction_type == "flow" else DDPM_DEFAULTS


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
    return cls(**data)

