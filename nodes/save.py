"""KilnSaveLoRA (kohya .safetensors into models/loras) and KilnLoadCheckpoint (resume a training state)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import folder_paths
from comfy_api.latest import io

from ..lora_core import TrainState
from ..lora_core.fileio import atomic_save_safetensors
from ..lora_core.formats.kohya import build_metadata, export_tensors
from . import comfy_bridge as bridge
from .objects import KilnRun
from .sockets import CATEGORY, KilnStateType
from .train import save_checkpoint

logger = logging.getLogger(__name__)


class KilnSaveLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KilnSaveLoRA",
            display_name="Save LoRA (Kiln)",
            category=f"{CATEGORY}/train",
            description=(
                "Writes the LoRA as a kohya-format .safetensors into models/loras (LoraLoader lists it at once; "
                "A1111/Forge and diffusers load it too), with training metadata and this workflow."
            ),
            inputs=[
                KilnStateType.Input("state", tooltip="The trained state from Train Steps."),
                io.String.Input("filename", default="", tooltip=(
                    "File name inside models/loras, e.g. 'my_lora' or 'kiln/my_lora'. Empty: the name given in "
                    "Inject LoRA. An existing file is never overwritten: a number is appended.")),
                io.Combo.Input("dtype", options=["fp16", "bf16", "fp32"], default="fp16", tooltip=(
                    "Precision of the saved weights; fp16 is what most tools expect.")),
                io.Boolean.Input("save_checkpoint", default=False, tooltip=(
                    "Also write a resumable training checkpoint (with optimizer state) to "
                    "output/lora_kiln/<name>/checkpoints; continue later with Load Checkpoint.")),
            ],
            outputs=[io.String.Output(display_name="lora_name", tooltip="The saved file's name inside models/loras.")],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, state: KilnRun, filename: str, dtype: str, save_checkpoint: bool) -> io.NodeOutput:
        run = state
        root = bridge.loras_directory()
        target = bridge.unused_path(bridge.safe_child(root, filename.strip() or run.name, ".safetensors"))
        tensors = export_tensors(run.state, run.naming, dtype)
        bases = sorted({k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors})
        unmapped = bridge.lora_keys_loadable(run.model, bases, run.clip)
        if unmapped:
            raise bridge.KilnUserError(
                f"{len(unmapped)} LoRA keys would not load onto this model in ComfyUI, e.g. {unmapped[0]}; "
                "nothing was written. Please report this with your model type."
            )
        extra: dict[str, str] = {}
        if cls.hidden.prompt is not None:
            extra["prompt"] = json.dumps(cls.hidden.prompt)
        workflow = (cls.hidden.extra_pnginfo or {}).get("workflow")
        if workflow is not None:
            extra["workflow"] = json.dumps(workflow)
        metadata = build_metadata(
            run.state, title=target.stem, base_model_version=run.base_model_version,
            base_model_name=run.base_model_name, prediction_type=run.prediction_type, train=run.train_settings,
            extra=extra,
        )
        atomic_save_safetensors(tensors, target, metadata)
        name = target.relative_to(root).as_posix()
        lines = [f"saved {bridge.display_path(target)} ({len(bases)} layers, step {run.state.step})"]
        if save_checkpoint:
            lines.append(f"checkpoint: {save_checkpoint_for(run)}")
        logger.info("LoRA Kiln: %s", "; ".join(lines))
        return io.NodeOutput(name, ui={"text": lines})


def save_checkpoint_for(run: KilnRun) -> Path:
    return save_checkpoint(run, run.state, "")


def checkpoint_names() -> list[str]:
    root = bridge.runs_directory()
    if not root.is_dir():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.glob("*/checkpoints/*.kiln.safetensors"))


class KilnLoadCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        names = checkpoint_names()
        return io.Schema(
            node_id="KilnLoadCheckpoint",
            display_name="Load Checkpoint (Kiln)",
            category=f"{CATEGORY}/train",
            description="Resumes a saved training state (adapters, optimizer, step, RNG) on a model.",
            inputs=[
                io.Model.Input("model", tooltip="The same base model the checkpoint was trained on."),
                io.Combo.Input("checkpoint", options=names or ["(none saved yet)"], tooltip=(
                    "A checkpoint from output/lora_kiln/<name>/checkpoints (written by save_every, Cancel, or Save "
                    "LoRA).")),
                io.Clip.Input("clip", optional=True, tooltip=(
                    "The same checkpoint's CLIP: needed when the checkpoint trains the text encoder.")),
            ],
            outputs=[
                KilnStateType.Output(display_name="state", tooltip="Wire into Train Steps to continue."),
                io.Model.Output(display_name="model", tooltip="The model with the checkpoint's LoRA applied."),
                io.Clip.Output(display_name="clip", tooltip="The CLIP with the checkpoint's text-encoder LoRA (if any)."),
            ],
        )

    @classmethod
    def execute(cls, model: object, checkpoint: str, clip: object = None) -> io.NodeOutput:
        root = bridge.runs_directory()
        path = bridge.safe_child(root, checkpoint, ".kiln.safetensors") if checkpoint.endswith(".kiln.safetensors") \
            else None
        if path is None or not path.is_file():
            raise bridge.KilnUserError(
                f"checkpoint {checkpoint!r} not found in {root}; train with save_every > 0 or Save LoRA's "
                "save_checkpoint first, then refresh the page"
            )
        state = TrainState.load(path)
        base = bridge.strip_adapters(model)
        roots = bridge.unet_roots(base)
        if any(s.name.startswith("te.") for s in state.specs):
            if clip is None:
                raise bridge.KilnUserError(f"{path.name} trains the text encoder: connect the CLIP to Load Checkpoint")
            roots.update(bridge.text_roots(clip))
        for spec in state.specs:
            component, _, module_path = spec.name.partition(".")
            try:
                module = roots[component].get_submodule(module_path)
            except (KeyError, AttributeError):
                raise bridge.KilnUserError(
                    f"{path.name} has an adapter for {spec.name}, which this model does not have: "
                    "load the checkpoint on the model it was trained on"
                ) from None
            shape = (getattr(module, "in_features", None) or getattr(module, "in_channels", None),
                     getattr(module, "out_features", None) or getattr(module, "out_channels", None))
            if shape != (spec.in_features, spec.out_features):
                raise bridge.KilnUserError(
                    f"{path.name}: {spec.name} is {spec.in_features}->{spec.out_features} in the checkpoint but "
                    f"{shape[0]}->{shape[1]} in this model: load it on the model it was trained on"
                )
        diffusion = bridge.ComfyDiffusion(base)
        name = path.parent.parent.name
        run = KilnRun(state=state, model=base, name=name, naming=bridge.kohya_naming(base),
                      base_model_version=bridge.base_model_version(base), prediction_type=diffusion.prediction_type,
                      clip=clip)
        text = f"resumed {name} at step {state.step} (epoch {state.epoch + 1})"
        out_clip = bridge.clip_with_lora(clip, state, run.naming) if clip is not None else None
        return io.NodeOutput(run, bridge.with_adapters(base, state), out_clip, ui={"text": [text]})


_ = folder_paths  # imported for ComfyUI's folder registration side effects
