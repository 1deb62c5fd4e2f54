"""Optimizer and learning-rate schedule factories.

Optional optimizers come from their maintained packages (bitsandbytes, lion-pytorch, prodigyopt); when
one is missing the error names the package to install. Schedules come from ``transformers``'
warmup/decay helpers and are used as pure functions of the global step, so a run split into pieces
follows exactly the same curve as one long run.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterable

import torch

from .config import TrainConfig

_OPTIONAL = {
    "adamw8bit": ("bitsandbytes", "bitsandbytes.optim", "AdamW8bit"),
    "lion": ("lion-pytorch", "lion_pytorch", "Lion"),
    "prodigy": ("prodigyopt", "prodigyopt", "Prodigy"),
}


def param_groups(adapters_by_name: Iterable[tuple[str, torch.nn.Module]], config: TrainConfig) -> list[dict]:
    """One group for the UNet's adapters and one for the text encoder's (its own learning rate)."""
    unet, text = [], []
    for name, module in adapters_by_name:
        (text if name.startswith("te") else unet).extend(module.parameters())
    groups = []
    if unet:
        groups.append({"params": unet, "lr": config.learning_rate, "kiln_base_lr": config.learning_rate})
    if text:
        lr = config.text_encoder_lr or config.learning_rate
        groups.append({"params": text, "lr": lr, "kiln_base_lr": lr})
    return groups


def build_optimizer(params: Iterable[torch.nn.Parameter] | list[dict], config: TrainConfig) -> torch.optim.Optimizer:
    params = list(params)
    name = config.optimizer
    lr = config.learning_rate
    if name == "adamw":
        flat = [p for g in params for p in g["params"]] if params and isinstance(params[0], dict) else params
        kwargs = {"fused": True} if _fused_ok(flat) else {}
        return torch.optim.AdamW(params, lr=lr, betas=config.betas, weight_decay=config.weight_decay, **kwargs)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=config.betas[0], weight_decay=config.weight_decay)
    package, module_name, cls_name = _OPTIONAL[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"optimizer={name!r} needs the package {package!r}, which is not installed: "
            f"run `pip install {package}` in ComfyUI's Python, or choose optimizer='adamw'"
        ) from exc
    cls = getattr(module, cls_name)
    if name == "prodigy":
        return cls(params, lr=lr, betas=config.betas, weight_decay=config.weight_decay)
    return cls(params, lr=lr, betas=config.betas, weight_decay=config.weight_decay)


def _fused_ok(params: list[torch.Tensor]) -> bool:
    """torch's fused AdamW (one kernel per tensor, CPU and CUDA) for float parameters on one device type.

    The for-loop implementation torch picks by default on the CPU spends ~10 small ops per parameter per step;
    with a hundred-odd adapter tensors that was ~12 % of a small model's step (bench/bench_floor.py --profile).
    """
    if not params:
        return False
    kinds = {p.device.type for p in params}
    return len(kinds) == 1 and kinds <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)


def place_fused_state(optimizer: torch.optim.Optimizer) -> None:
    """Put each fused group's ``step`` counters beside their parameters.

    A state written by the for-loop optimizer (or on another device) keeps ``step`` on the CPU; torch only moves
    it when the *saved* groups say fused, and the fused CUDA kernel refuses a CPU counter.
    """
    for group in optimizer.param_groups:
        if not group.get("fused"):
            continue
        for p in group["params"]:
            entry = optimizer.state.get(p)
            step = entry.get("step") if entry else None
            if isinstance(step, torch.Tensor) and (step.device != p.device or step.dtype != torch.float32):
                entry["step"] = step.to(device=p.device, dtype=torch.float32)


@functools.lru_cache(maxsize=64)
def _lr_lambda(name: str, warmup: int, total: int, num_cycles: int) -> Callable[[int], float]:
    from transformers.optimization import get_scheduler

    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    kwargs = {"num_cycles": num_cycles} if name == "cosine_with_restarts" else None
    hf_name = "constant_with_warmup" if name == "constant" else name
    scheduler = get_scheduler(
        hf_name,
        dummy,
        num_warmup_steps=warmup,
        num_training_steps=None if hf_name == "constant_with_warmup" else total,
        scheduler_specific_kwargs=kwargs,
    )
    return scheduler.lr_lambdas[0]


def lr_multiplier(config: TrainConfig, step: int, schedule_steps: int) -> float:
    """LR factor at global ``step`` (0-based) for a schedule ``schedule_steps`` long."""
    if config.scheduler == "constant" and config.warmup_steps == 0:
        return 1.0
    total = max(schedule_steps, config.warmup_steps + 1, 1)
    return float(_lr_lambda(config.scheduler, config.warmup_steps, total, config.num_cycles)(step))


def set_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> None:
    """Every group's own base learning rate times the schedule's factor."""
    for group in optimizer.param_groups:
        group["lr"] = group.get("kiln_base_lr", group["lr"]) * multiplier
