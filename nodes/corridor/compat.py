"""Where the supported ComfyUI versions differ (v0.3.64 to v0.33), each difference found by probing a capability.

The one place that knows them. Nothing here compares version strings: each function asks ComfyUI whether it has the
thing (a signature, an attribute, a value's type) and adapts. This module imports no other module of the package and
imports ComfyUI only inside functions, so ``kiln.py`` can load it by path before the package is loaded.

===============================  ==============================  ================================================
what                             v0.3.64                         v0.33 (and how Kiln adapts)
===============================  ==============================  ================================================
the prompt executor              ``PromptExecutor(server,        ``cache_args`` is required: ``execute`` reads
                                 cache_type)``                   ``cache_args["ram"]`` / ``["ram_inactive"]``
                                                                 (:func:`prompt_executor` passes main.py's
                                                                 defaults when the signature has it)
Cancel inside a step             raised only by progress hooks   every comfy op's ``forward`` raises
                                                                 ``InterruptProcessingException``, now a
                                                                 ``BaseException``: the trainer is given
                                                                 :func:`interrupts` and ends at the last whole
                                                                 step; previews catch it by type
quantized weights                ``scaled_fp8_ops.Linear``, an   ``mixed_precision_ops`` Linear, not an
(scaled fp8, comfy_quant)        ``nn.Linear`` subclass          ``nn.Linear``, weights ``QuantizedTensor``:
                                                                 adapters find layers by structure
                                                                 (``lora_core.layer_kind``), never by class;
                                                                 such layers re-wrap their parameters when
                                                                 moved (they override ``_apply``): models load
                                                                 and sample in inference mode, and these layers
                                                                 train on a copy of their weight
                                                                 (``patching.copy_host_weights``)
``--verbose``                    one level name                  a list of level names (:func:`log_level`;
                                                                 :func:`verbose_levels` for kiln.py's parser)
``--cuda-device``                an int                          a string: ``"0,1"``, or ``"all"`` (no
                                                                 restriction; :func:`visible_devices`)
Dynamic VRAM (comfy-aimdo)       absent                          ``ModelPatcherDynamic`` on NVIDIA unless
                                                                 ``--disable-dynamic-vram``: weights stream per
                                                                 layer and are not Kiln's to keep for backward.
                                                                 Training (and its live previews) run on a
                                                                 non-dynamic clone (:func:`training_patcher`);
                                                                 the output MODEL keeps the user's patcher.
                                                                 Not yet checked on a GPU (bench/
                                                                 gpu_dynamic_vram.sh); text-encoder training is
                                                                 refused under it (:func:`is_dynamic`)
``ModelPatcher.clone``           ``clone()``                     ``clone(disable_dynamic=, force_deepcopy=)``
fused kernels without backward  none                            ``comfy_kitchen`` kernels (FLUX's rope, LTX's)
                                                                unless ``model_management.in_training`` is set
                                                                (:func:`training`)
===============================  ==============================  ================================================
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)


def interrupts() -> tuple[type[BaseException], ...]:
    """The exceptions ComfyUI raises for Cancel (an ``Exception`` in v0.3.64, a ``BaseException`` since)."""
    import comfy.model_management as mm

    return (mm.InterruptProcessingException,)


@contextlib.contextmanager
def training() -> Iterator[None]:
    """ComfyUI's "a trainer is running" flag (v0.33's ``model_management.in_training``), set for the duration: models
    then take their differentiable code paths (FLUX's rope is a fused ``comfy_kitchen`` kernel without a backward
    otherwise). Nothing to do where ComfyUI has no such flag."""
    import comfy.model_management as mm

    if not hasattr(mm, "in_training"):
        yield
        return
    previous = mm.in_training
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = previous


# ---- the headless runner ----------------------------------------------------------------------------------------


def prompt_executor(execution: Any, server: Any) -> Any:
    """ComfyUI's ``PromptExecutor`` with a classic cache, given the cache settings its version asks for."""
    kwargs: dict[str, Any] = {"cache_type": execution.CacheType.CLASSIC}
    if "cache_args" in inspect.signature(execution.PromptExecutor).parameters:
        # main.py's defaults: no LRU, the RAM-pressure thresholds of its --cache-ram default (unused by CLASSIC)
        kwargs["cache_args"] = {"lru": 0, "ram": 0.0, "ram_inactive": 0.0}
    return execution.PromptExecutor(server, **kwargs)


def log_level(verbose: Any) -> str:
    """The console logging level ``--verbose`` asks for: one level name (v0.3.64), or a list of (level, file) pairs
    read by ComfyUI's own ``get_console_log_level`` (v0.33). A level Python's logging does not know (v0.33's
    ``DETAIL``) counts as DEBUG."""
    import comfy.cli_args as cli

    console = getattr(cli, "get_console_log_level", None)
    level = console(verbose) if console is not None and isinstance(verbose, list) else str(verbose)
    return level if isinstance(logging.getLevelName(level), int) else "DEBUG"


def verbose_levels(parser: Any) -> tuple[str, ...] | None:
    """The level names ``--verbose`` takes when it takes a list of values (v0.33: ``[LEVEL [FILE]]``, repeatable), so
    kiln.py knows where its values end (only level names; a log FILE goes after ``--``); ``None`` when argparse's
    own choices say it (v0.3.64)."""
    action = parser._option_string_actions.get("--verbose")
    if action is None or action.choices is not None or action.nargs not in ("*", "+"):
        return None
    import comfy.cli_args as cli

    return tuple(getattr(cli, "LOG_LEVELS", ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")))


def visible_devices(cuda_device: Any) -> str | None:
    """What ``--cuda-device`` puts into ``CUDA_VISIBLE_DEVICES``: the value (an int, or ``"0,1"``), or nothing for
    ``"all"`` (v0.33: every device stays visible). v0.33 takes any string; one that is no list of device ids is a
    ValueError here, before torch would fail on it."""
    if cuda_device is None or str(cuda_device).strip().lower() == "all":
        return None
    value = str(cuda_device).strip()
    if not all(part.strip().isdigit() for part in value.split(",")):
        raise ValueError(f"argument --cuda-device: {value!r} is not a device id: give one (0), several (0,1) or all")
    return value


# ---- models -------------------------------------------------------------------------------------------------------


def is_dynamic(patcher: Any) -> bool:
    """Whether ComfyUI loads this model through Dynamic VRAM (weights streamed per layer by comfy-aimdo)."""
    probe = getattr(patcher, "is_dynamic", None)
    return bool(probe()) if callable(probe) else False


def can_clone_non_dynamic(patcher: Any) -> bool:
    return "disable_dynamic" in inspect.signature(patcher.clone).parameters


def training_patcher(patcher: Any) -> Any:
    """The patcher Kiln trains on: a clone of ``patcher`` (sharing its modules), or a non-dynamic clone of a Dynamic
    VRAM one.

    Dynamic VRAM streams each weight into a buffer that is reused by the next layer, so a weight autograd saved for
    backward may be overwritten before backward reads it, and ``load_models_gpu(force_full_load=True)`` loads nothing.
    A non-dynamic clone (ComfyUI reloads the model from its file, with the same patches) is an ordinary model: loaded
    whole, with the weights training saves staying put. It costs one more load of the model while training runs.
    """
    if not is_dynamic(patcher):
        return patcher.clone()
    if not can_clone_non_dynamic(patcher):  # pragma: no cover - a dynamic patcher always has it
        raise RuntimeError("this ComfyUI loads the model with Dynamic VRAM but cannot clone it without")
    try:
        clone = patcher.clone(disable_dynamic=True)
    except RuntimeError as exc:
        raise DynamicVramUnsupported(str(exc)) from exc
    logger.info("LoRA Kiln: training on a non-dynamic copy of the model (Dynamic VRAM streams weights per layer)")
    return clone


class DynamicVramUnsupported(RuntimeError):
    """A Dynamic VRAM model that ComfyUI cannot reload as an ordinary one (a custom loader without a reload hook)."""

