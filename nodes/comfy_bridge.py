"""The corridor: the only module that touches ComfyUI internals.

It turns ComfyUI objects into the engine's interfaces (a :class:`~lora_core.diffusion.DiffusionModel`,
module roots, a kohya name map) and the engine's events into ComfyUI's (progress bar, preview image,
progress text, websocket events, Cancel). Nodes call this module; they never reach into ``comfy``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import comfy.model_base
import comfy.model_management as mm
import comfy.model_sampling
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
import torch
from torch import nn

from ..lora_core import AdapterSet, StepInfo, TrainCallback, TrainState
from ..lora_core.formats.kohya import KohyaNaming

logger = logging.getLogger(__name__)

WRAPPER_KEY = "lora_kiln"
PROGRESS_EVENT = "kiln.train.progress"


class KilnUserError(ValueError):
    """A problem the user can fix; the message says how."""


# ---- the denoiser the engine trains ------------------------------------------------------------


class ComfyDiffusion:
    """:class:`lora_core.DiffusionModel` over a ComfyUI ModelPatcher (SD1.x / SD2.x UNets)."""

    def __init__(self, patcher: Any, text_encoder: TextEncoder | None = None) -> None:
        base = patcher.model
        self.text_encoder = text_encoder
        sampling = patcher.get_model_object("model_sampling")
        if not isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete) or not isinstance(
            sampling, comfy.model_sampling.EPS
        ):
            raise KilnUserError(
                f"LoRA Kiln trains SD1.x/SD2.x models; this model ({type(base).__name__}) uses a "
                "different noise schedule. Load an SD1.5 or SD2.x checkpoint."
            )
        if getattr(base, "adm_channels", 0):
            raise KilnUserError(
                f"{type(base).__name__} models (SDXL and similar) are not supported by Train Steps yet; "
                "load an SD1.x or SD2.x checkpoint"
            )
        self.base = base
        self.unet: nn.Module = base.diffusion_model
        self.prediction_type = (
            "v_prediction" if isinstance(sampling, comfy.model_sampling.V_PREDICTION) else "epsilon"
        )
        sigmas = sampling.sigmas.detach().float().cpu()
        self.alphas_cumprod = 1.0 / (sigmas**2 + 1.0)
        self.dtype = base.manual_cast_dtype or base.get_dtype()

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.base.process_latent_in(latents)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        dtype = self.dtype if not torch.is_autocast_enabled(x.device.type) else x.dtype
        if "tokens" in cond:  # text-encoder training: encode with gradients, through its adapters
            if self.text_encoder is None:
                raise KilnUserError("this dataset was prepared for text-encoder training but no CLIP was given")
            context = self.text_encoder(cond["tokens"]).to(x.device, dtype)
        else:
            context = cond["context"].to(x.device, dtype)
        return self.unet(x.to(dtype), t.float(), context=context).float()


def unet_roots(patcher: Any) -> dict[str, nn.Module]:
    return {"unet": patcher.model.diffusion_model}


class TextEncoder:
    """Token ids -> cross-attention context with gradients (mirrors ``CLIP.encode_from_tokens``, SD1.x/SD2.x)."""

    def __init__(self, clip: Any) -> None:
        stage = clip.cond_stage_model
        if not hasattr(stage, "clip_name") or not hasattr(stage, "clip"):
            raise KilnUserError(
                f"text-encoder training supports the single CLIP of SD1.x/SD2.x; this CLIP is {type(stage).__name__}. "
                "Turn train_text_encoder off."
            )
        self.clip = clip
        self.key = stage.clip_name  # "l" for SD1.x, "h" for SD2.x
        self.encoder = getattr(stage, stage.clip)

    @property
    def root(self) -> nn.Module:
        return self.encoder.transformer

    def tokens(self, text: str) -> torch.Tensor:
        chunks = self.clip.tokenize(text)[self.key]
        return torch.tensor([[pair[0] for pair in chunk] for chunk in chunks], dtype=torch.long).flatten()

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        stage = self.clip.cond_stage_model
        stage.reset_clip_options()
        if self.clip.layer_idx is not None:  # clip skip, as set by CLIPSetLastLayer
            stage.set_clip_options({"layer": self.clip.layer_idx})
        batch = tokens.shape[0]
        out = self.encoder.encode(tokens.reshape(-1, 77).tolist())[0]
        return out.reshape(batch, -1, out.shape[-1]).float()


    @contextlib.contextmanager
    def trainable(self) -> Iterator[None]:
        """ComfyUI's CLIP layers add residuals in place (``x += attn(norm(x))``), which autograd rejects once
        adapters need gradients; feeding each LayerNorm a copy of its input keeps the saved tensor intact."""
        handles = [m.register_forward_pre_hook(_clone_input) for m in self.root.modules()
                   if isinstance(m, nn.LayerNorm)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def _clone_input(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    if args and isinstance(args[0], torch.Tensor) and torch.is_grad_enabled():
        return (args[0].clone(), *args[1:])
    return None


def text_roots(clip: Any) -> dict[str, nn.Module]:
    return {"te": TextEncoder(clip).root}


def load_text_encoder_for_training(clip: Any) -> TextEncoder:
    with torch.inference_mode(False):
        mm.load_models_gpu([clip.patcher], force_full_load=True)
    encoder = TextEncoder(clip)
    make_autograd_safe(encoder.root)
    return encoder


def clip_with_lora(clip: Any, state: TrainState, naming: KohyaNaming) -> Any:
    """A CLIP clone with the state's text-encoder adapters as ComfyUI weight patches (as LoraLoader does)."""
    import comfy.lora

    from ..lora_core.formats.kohya import export_tensors

    te_specs = tuple(s for s in state.specs if s.name.startswith("te."))
    if not te_specs:
        return clip
    tensors = export_tensors(state.replace(specs=te_specs), naming, "fp32")
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    patches = comfy.lora.load_lora(tensors, key_map)
    new = clip.clone()
    new.add_patches(patches, 1.0)
    return new


def checkpoint_blocks(patcher: Any) -> list[nn.Module]:
    """The layers to recompute in backward: ResBlocks and transformers inside each UNet block.

    Not the ``TimestepEmbedSequential`` containers themselves: the UNet iterates over their children
    (``forward_timestep_embed``) and never calls the container's ``forward``.
    """
    unet = patcher.model.diffusion_model
    containers = list(getattr(unet, "input_blocks", [])) + list(getattr(unet, "output_blocks", []))
    if getattr(unet, "middle_block", None) is not None:
        containers.append(unet.middle_block)
    return [layer for block in containers for layer in block if any(True for _ in layer.parameters())]


def base_model_version(patcher: Any) -> str:
    name = type(patcher.model.model_config).__name__
    if name.startswith("SDXL"):
        return "sdxl_base_v1-0"
    if name.startswith("SD2"):
        return "sd_v2_768_v" if patcher.model.model_type == comfy.model_base.ModelType.V_PREDICTION else "sd_v2"
    return "sd_v1"


def kohya_naming(patcher: Any) -> KohyaNaming:
    """kohya names from ComfyUI's own LDM -> diffusers map (SD1/SD2); SDXL files keep LDM names."""
    if base_model_version(patcher).startswith("sdxl"):
        return KohyaNaming(path_maps={})
    mapping = comfy.utils.unet_to_diffusers(patcher.model.model_config.unet_config)
    ldm_to_diffusers = {
        ldm[: -len(".weight")]: diff[: -len(".weight")]
        for diff, ldm in mapping.items()
        if ldm.endswith(".weight") and diff.endswith(".weight")
    }
    return KohyaNaming(path_maps={"unet": ldm_to_diffusers})


def lora_keys_loadable(patcher: Any, keys: list[str], clip: Any = None) -> list[str]:
    """The kohya base keys ComfyUI's LoraLoader would NOT map onto this model/CLIP (empty: all load)."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    return [k for k in keys if k not in key_map]


# ---- training on a shared module tree --------------------------------------------------------


def make_autograd_safe(module: nn.Module) -> int:
    """Swap inference-mode parameters/buffers for equal normal tensors so autograd can save them.

    ComfyUI builds models inside ``torch.inference_mode()``; such tensors cannot be saved for backward.
    The values do not change, so every clone of the model renders exactly as before. Returns the count.
    """
    swapped = 0
    with torch.inference_mode(False), torch.no_grad():
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and p.is_inference():
                    sub._parameters[name] = nn.Parameter(p.clone(), requires_grad=p.requires_grad)
                    swapped += 1
            for name, b in list(sub._buffers.items()):
                if b is not None and b.is_inference():
                    sub._buffers[name] = b.clone()
                    swapped += 1
    return swapped


def load_for_training(patcher: Any) -> torch.device:
    """Load the model fully on ComfyUI's compute device (GPU when there is one) and make it trainable."""
    with torch.inference_mode(False):
        mm.load_models_gpu([patcher], force_full_load=True)
    swapped = make_autograd_safe(patcher.model.diffusion_model)
    if swapped:
        logger.debug("made %d base tensors autograd-safe", swapped)
    return patcher.load_device


def with_adapters(patcher: Any, state: TrainState) -> Any:
    """A clone of ``patcher`` whose UNet runs with ``state``'s adapters (frozen); the original is untouched."""
    adapters = state.build_adapters().eval().requires_grad_(False)
    placed: dict[tuple[torch.device, torch.dtype], AdapterSet] = {}

    def wrapper(executor: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        unet = executor.class_obj
        x = args[0]
        key = (x.device, torch.float32)
        if key not in placed:
            placed.clear()
            placed[key] = adapters.to(x.device)
        with placed[key].attach({"unet": unet}):
            return executor(*args, **kwargs)

    clone = patcher.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, wrapper)
    return clone


def strip_adapters(patcher: Any) -> Any:
    """The model without any Kiln adapters (what training runs on)."""
    clone = patcher.clone()
    clone.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)
    return clone


# ---- encoding, with caches that survive re-queues ----------------------------------------------

_latent_cache: weakref.WeakKeyDictionary[nn.Module, dict[tuple, torch.Tensor]] = weakref.WeakKeyDictionary()
_text_cache: weakref.WeakKeyDictionary[nn.Module, dict[tuple, torch.Tensor]] = weakref.WeakKeyDictionary()


def encode_image(vae: Any, key: tuple, image: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Latent [C, h, w] of one IMAGE [H, W, 3]; cached per VAE by ``key`` (content digest + size)."""
    cache = _latent_cache.setdefault(vae.first_stage_model, {})
    if key in cache:
        return cache[key], False
    with torch.no_grad():
        latent = vae.encode(image[None, ..., :3])[0].float().cpu()
    latent = _normal_tensor(latent)
    cache[key] = latent
    return latent, True


def encode_text(clip: Any, text: str, cached: bool = True) -> tuple[torch.Tensor, bool]:
    """Cross-attention context [tokens, dim] for ``text``; cached per CLIP, its patches and clip-skip.

    ``cached=False`` while text-encoder adapters are attached (their output changes every step).
    """
    patcher = clip.patcher
    cache = _text_cache.setdefault(clip.cond_stage_model, {}) if cached else {}
    key = (text, patcher.patches_uuid, getattr(clip, "layer_idx", None))
    if key in cache:
        return cache[key], False
    with torch.no_grad():
        cond = clip.encode_from_tokens(clip.tokenize(text))[0].float().cpu()
    cond = _normal_tensor(cond)
    cache[key] = cond
    return cond, True


def _normal_tensor(t: torch.Tensor) -> torch.Tensor:
    """A copy usable by autograd even when ``t`` was made under ComfyUI's ``inference_mode``."""
    with torch.inference_mode(False):
        return t.clone()


def clear_caches() -> None:
    _latent_cache.clear()
    _text_cache.clear()


# ---- folders --------------------------------------------------------------------------------


def input_directory() -> Path:
    return Path(folder_paths.get_input_directory())


def output_directory() -> Path:
    return Path(folder_paths.get_output_directory())


_overrides: dict[str, Path] = {}


def configure_directories(runs: Path | None = None, loras: Path | None = None) -> None:
    """Headless runs put everything under their own output folder (``None`` restores ComfyUI's folders)."""
    _overrides.clear()
    if runs is not None:
        _overrides["runs"] = Path(runs)
    if loras is not None:
        _overrides["loras"] = Path(loras)


def loras_directory() -> Path:
    return _overrides.get("loras") or Path(folder_paths.get_folder_paths("loras")[0])


def runs_directory() -> Path:
    """Where each LoRA's working files go: ``<runs>/<name>/{checkpoints,logs,samples}``."""
    return _overrides.get("runs") or output_directory() / "lora_kiln"


def run_directory(name: str) -> Path:
    return safe_child(runs_directory(), name, "")


def display_path(path: Path) -> str:
    """``models/loras/x.safetensors`` inside ComfyUI's folders, else the full path."""
    base = Path(folder_paths.base_path)
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(path)


def lora_names() -> list[str]:
    return [n for n in folder_paths.get_filename_list("loras") if n.lower().endswith(".safetensors")]


def lora_path(name: str) -> Path:
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise KilnUserError(f"LoRA {name!r} was not found in models/loras; refresh the page and pick it again")
    return Path(path)


_SAFE_PART = re.compile(r"^[\w\-. ]+$", re.UNICODE)


def safe_child(root: Path, relative: str, suffix: str) -> Path:
    """``root/relative`` + suffix, refusing anything that would land outside ``root`` (``..``, absolute, symlinks)."""
    rel = relative.strip().replace("\\", "/")
    if not rel or rel.startswith("/") or re.match(r"^[A-Za-z]:", rel):
        raise KilnUserError(f"name {relative!r} must be a relative name like 'my_lora' or 'kiln/my_lora'")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if any(p == ".." or not _SAFE_PART.match(p) for p in parts):
        raise KilnUserError(
            f"name {relative!r} may only use letters, digits, '-', '_', '.', spaces and '/' between folders "
            "(no '..')"
        )
    name = parts[-1]
    if suffix and name.lower().endswith(suffix):
        name = name[: -len(suffix)]
    target = root.joinpath(*parts[:-1], name + suffix)
    root_real = root.resolve()
    parent_real = target.parent.resolve() if target.parent.exists() else None
    if parent_real is not None and root_real != parent_real and root_real not in parent_real.parents:
        raise KilnUserError(f"name {relative!r} resolves outside {root} (through a symlink?); choose another name")
    if target.is_symlink():
        raise KilnUserError(f"{target.name} is a symlink; refusing to write through it")
    return target


def unused_path(path: Path) -> Path:
    """``path`` if free, else ``name_00001.ext``, ``name_00002.ext``...: never overwrite silently."""
    if not path.exists():
        return path
    stem, suffix = path.name[: -len("".join(path.suffixes))] or path.stem, "".join(path.suffixes)
    for i in range(1, 100_000):
        candidate = path.with_name(f"{stem}_{i:05d}{suffix}")
        if not candidate.exists():
            return candidate
    raise KilnUserError(f"too many files named {stem}* in {path.parent}")


def checkpoint_directory(name: str) -> Path:
    return run_directory(name) / "checkpoints"


def logs_directory(name: str) -> Path:
    return run_directory(name) / "logs"


def samples_directory(name: str) -> Path:
    return run_directory(name) / "samples"


# ---- progress, preview, cancel ---------------------------------------------------------------


def interrupted() -> bool:
    return mm.processing_interrupted()


def raise_if_interrupted() -> None:
    mm.throw_exception_if_processing_interrupted()


class NodeProgress(TrainCallback):
    """ComfyUI progress bar + progress text + live websocket events + Cancel for one Train Steps node."""

    def __init__(
        self, node_id: str | None, total: int, preview: Callable[[int], Any] | None = None,
        samples_dir: Path | None = None,
    ) -> None:
        self.node_id = node_id
        self.samples_dir = samples_dir
        self.total = total
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)
        self.preview = preview
        self.cancelled = False
        self.previews: list[tuple[int, torch.Tensor]] = []
        self._last_sent = 0.0
        self._value = 0
        self._unsent: list[list[float | None]] = []  # [step, loss, lr] since the last live event (for the chart)

    def _server(self) -> Any:
        try:
            from server import PromptServer

            return PromptServer.instance
        except Exception:  # noqa: BLE001 - headless runner has no server
            return None

    def _update(self, value: int, preview: Any = None) -> None:
        """Progress bar (and preview image) on the node; Cancel is recorded, never raised mid-step."""
        if self.cancelled or interrupted():
            self.cancelled = True
            return
        try:
            self.bar.update_absolute(value, self.total, preview)
        except mm.InterruptProcessingException:
            self.cancelled = True  # the node saves a checkpoint, then re-raises
            mm.interrupt_current_processing(True)

    def on_step(self, info: StepInfo) -> None:
        self._value = info.run_step
        self._update(info.run_step)
        if self.cancelled:
            return
        self._unsent = self._unsent[-999:] + [[info.step, _finite(info.loss), _finite(info.lr)]]
        now = time.monotonic()
        if now - self._last_sent >= 0.25 or info.run_step == info.run_steps:
            self._last_sent = now
            points, self._unsent = self._unsent, []
            server = self._server()
            if server is not None and self.node_id is not None:
                text = (
                    f"step {info.step} ({info.run_step}/{info.run_steps}) · loss {info.loss:.4f} "
                    f"(avg {info.smoothed_loss:.4f}) · {info.sec_per_step:.2f} s/it · ETA {_eta(info.eta_seconds)}"
                )
                server.send_progress_text(text, self.node_id, server.client_id)
                server.send_sync(
                    PROGRESS_EVENT,
                    {
                        "node": self.node_id,
                        "step": info.step,
                        "run_step": info.run_step,
                        "run_steps": info.run_steps,
                        "epoch": info.epoch,
                        "loss": _finite(info.loss),
                        "smoothed_loss": _finite(info.smoothed_loss),
                        "lr": _finite(info.lr),
                        "sec_per_step": _finite(info.sec_per_step),
                        "samples_per_sec": _finite(info.samples_per_sec),
                        "eta_seconds": _finite(info.eta_seconds),
                        "points": points,
                    },
                    server.client_id,
                )

    def should_stop(self) -> bool:
        return self.cancelled or interrupted()

    def on_preview(self, step: int, adapters: AdapterSet) -> None:
        if self.preview is None:
            return
        if self.cancelled or interrupted():
            self.cancelled = True
            return
        try:
            image = self.preview(step)  # IMAGE [1, H, W, 3]
        except mm.InterruptProcessingException:
            self.cancelled = True
            mm.interrupt_current_processing(True)
            return
        self.previews.append((step, image))
        from PIL import Image

        arr = (image[0].clamp(0, 1) * 255).byte().cpu().numpy()
        pil = Image.fromarray(arr)
        if self.samples_dir is not None:
            import io as _io

            from ..lora_core.fileio import atomic_write_bytes

            buf = _io.BytesIO()
            pil.save(buf, format="PNG")
            atomic_write_bytes(self.samples_dir / f"step{step:06d}.png", buf.getvalue())
        self._update(self._value, ("JPEG", pil, 512))


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _eta(seconds: float) -> str:
    from ..lora_core.progress import format_eta

    return format_eta(seconds)


def sample_preview(
    patcher: Any, clip: Any, vae: Any, prompt: str, seed: int, width: int, height: int, steps: int, cfg: float,
    text_adapters: bool = False,
) -> torch.Tensor:
    """Render one image with ComfyUI's own sampler on ``patcher`` as it is now (adapters attached)."""
    positive = [[encode_text(clip, prompt, cached=not text_adapters)[0][None], {}]]
    negative = [[encode_text(clip, "", cached=not text_adapters)[0][None], {}]]
    latent = torch.zeros(1, 4, height // 8, width // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    samples = comfy.sample.sample(
        patcher, noise, steps, cfg, "euler", "normal", positive, negative, latent, seed=seed, disable_pbar=True
    )
    image = vae.decode(samples)
    return image.reshape(-1, *image.shape[-3:])[:1].float().cpu()


def client_id() -> str | None:
    try:
        from server import PromptServer

        return PromptServer.instance.client_id
    except Exception:  # noqa: BLE001
        return None


def environment_summary() -> dict[str, str]:
    return {"device": str(mm.get_torch_device()), "comfyui_output": str(output_directory()), "pid": str(os.getpid())}


# ---- live view (web/js/kiln_train_view.js): preview files and events ------------------------------

PREVIEW_EVENT = "kiln.train.preview"


def save_temp_preview(image: torch.Tensor, prefix: str = "lora_kiln/preview") -> dict[str, str]:
    """Write IMAGE [1, H, W, 3] as a PNG into ComfyUI's temp folder (emptied at start-up, like PreviewImage).

    Returns the reference the frontend's ``/view`` route takes: ``{"filename", "subfolder", "type": "temp"}``.
    """
    import random
    import string

    from PIL import Image

    arr = (image[0].clamp(0, 1) * 255).byte().cpu().numpy()
    suffix = "".join(random.choice(string.ascii_lowercase) for _ in range(5))
    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
        f"{prefix}_{suffix}", folder_paths.get_temp_directory(), arr.shape[1], arr.shape[0]
    )
    name = f"{filename}_{counter:05}_.png"
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(arr).save(os.path.join(folder, name), compress_level=1)
    return {"filename": name, "subfolder": subfolder, "type": "temp"}


def send_event(event: str, data: dict[str, Any]) -> None:
    """A custom websocket event to the client that queued the prompt (nothing without a web server)."""
    try:
        from server import PromptServer

        server = PromptServer.instance
    except Exception:  # noqa: BLE001 - headless runner has no server
        return
    if server is not None:
        server.send_sync(event, data, server.client_id)


# ---- Auto Caption: the captioners model folder, device, memory, progress ------------------------

CAPTIONERS_FOLDER = "captioners"


def captioner_directories() -> list[Path]:
    """``models/captioners`` (registered with ComfyUI's folder_paths, so extra_model_paths.yaml can add more)."""
    default = os.path.join(folder_paths.models_dir, CAPTIONERS_FOLDER)
    if CAPTIONERS_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[CAPTIONERS_FOLDER] = ([default], set())
    elif default not in folder_paths.folder_names_and_paths[CAPTIONERS_FOLDER][0]:
        folder_paths.add_model_folder_path(CAPTIONERS_FOLDER, default)
    try:
        os.makedirs(default, exist_ok=True)  # so users find where models go
    except OSError:
        pass
    return [Path(p) for p in folder_paths.get_folder_paths(CAPTIONERS_FOLDER)]


def captioner_names() -> list[str]:
    """The model folders in models/captioners (each a Hugging Face model folder)."""
    names: set[str] = set()
    for root in captioner_directories():
        try:
            names.update(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            continue
    return sorted(names, key=str.lower)


def captioner_path(name: str) -> Path:
    """The folder of captioner ``name``; if there is none, where it is expected (the caller's error names it)."""
    roots = captioner_directories()
    for root in roots:
        candidate = root / name
        if name and "/" not in name and "\\" not in name and name not in (".", "..") and candidate.is_dir():
            return candidate
    return roots[0] / (name or "<name>")


def compute_device() -> torch.device:
    """ComfyUI's compute device: the GPU when it has one (and was not started with --cpu), else the CPU."""
    return mm.get_torch_device()


def inference_dtype(device: torch.device) -> torch.dtype:
    """bf16 (or fp16) on GPUs that handle it well, fp32 on the CPU."""
    if device.type == "cpu":
        return torch.float32
    if mm.should_use_bf16(device):
        return torch.bfloat16
    if mm.should_use_fp16(device):
        return torch.float16
    return torch.float32


def make_room(device: torch.device, nbytes: int) -> None:
    """Ask ComfyUI to unload models until ``nbytes`` fit on ``device`` (no-op on the CPU)."""
    if device.type != "cpu":
        mm.free_memory(nbytes, device)


def release_memory() -> None:
    mm.soft_empty_cache()


def blocked(message: str) -> Any:
    """An output value that stops downstream nodes with ``message`` (for outputs that make no sense here)."""
    from comfy_execution.graph_utils import ExecutionBlocker

    return ExecutionBlocker(message)


class ItemProgress:
    """Progress bar + ``done/total · items/s · ETA`` text on a node, for loops over items; records Cancel."""

    def __init__(self, node_id: str | None, unit: str = "images") -> None:
        self.node_id = node_id
        self.unit = unit
        self.cancelled = False
        self.bar: Any = None
        self.total = 0
        self.started = time.monotonic()

    def start(self, total: int) -> None:
        self.total = total
        self.started = time.monotonic()
        if total > 0:
            self.bar = comfy.utils.ProgressBar(total, node_id=self.node_id)

    def update(self, done: int) -> None:
        if self.bar is None or self.cancelled:
            return
        try:
            self.bar.update_absolute(done, self.total)
        except mm.InterruptProcessingException:
            self.cancelled = True
            mm.interrupt_current_processing(True)  # the node re-raises after keeping what is done
            return
        elapsed = time.monotonic() - self.started
        rate = done / elapsed if elapsed > 0 else float("nan")
        eta = (self.total - done) / rate if rate and rate == rate else float("nan")
        text = f"{done}/{self.total} {self.unit} · {rate:.2f} {self.unit}/s · ETA {_eta(eta)}"
        try:
            from server import PromptServer

            server = PromptServer.instance
            if server is not None and self.node_id is not None:
                server.send_progress_text(text, self.node_id, server.client_id)
        except Exception:  # noqa: BLE001 - headless runner has no server
            pass

    def should_stop(self) -> bool:
        if interrupted():
            self.cancelled = True
        return self.cancelled
