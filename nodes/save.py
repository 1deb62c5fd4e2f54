"""KilnSaveLoRA (kohya .safetensors into models/loras) and KilnLoadCheckpoint (resume a training state)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from comfy_api.latest import io

from ..lora_core import TrainState
from ..lora_core.fileio import atomic_save_safetensors
from ..lora_core.formats.kohya import build_metadata, with_addnet_hashes
from ..lora_core.formats.privacy import Redactor
from .corridor import families, folders, patching, text_encoders
from .corridor.errors import KilnUserError
from .file_names import check_file_name, scrub, shown_path
from .model_source import model_file_name
from .objects import KilnRun
from .sockets import CATEGORY, KilnStateType
from .training_run import save_checkpoint

logger = logging.getLogger(__name__)

EMBED_WORKFLOW = ("redacted", "full", "none")


def client_roots() -> dict[str, Path]:
    """Kiln's folders by the name a client may see (``models/loras``...): messages never show where they are."""
    roots: dict[str, Path] = {}
    for root in (folders.loras_directory(), folders.runs_directory(), folders.output_directory(),
                 folders.input_directory()):
        label = folders.display_path(root)
        roots.setdefault(root.name if Path(label).is_absolute() else label, root)
    return roots


def embedded_workflow(prompt: object, workflow: object, mode: str) -> dict[str, str]:
    """The ``prompt`` / ``workflow`` metadata entries for ``embed_workflow`` (redaction happens on the whole)."""
    if mode not in EMBED_WORKFLOW:
        raise KilnUserError(f"embed_workflow={mode!r} is not allowed; choose one of: {', '.join(EMBED_WORKFLOW)}")
    if mode == "none":
        return {}
    extra: dict[str, str] = {}
    if prompt is not None:
        extra["prompt"] = json.dumps(prompt)
    if workflow is not None:
        extra["workflow"] = json.dumps(workflow)
    return extra


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
                io.Combo.Input("embed_workflow", options=list(EMBED_WORKFLOW), default="redacted", optional=True,
                               tooltip=(
                    "What of this workflow goes into the file's metadata (anyone you share the file with can read "
                    "it). redacted: the workflow with every folder reduced to its last name: no absolute path, home "
                    "folder, user or host name. full: exactly as here, paths included. none: no workflow.")),
            ],
            outputs=[io.String.Output(display_name="lora_name", tooltip="The saved file's name inside models/loras.")],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, state: KilnRun, filename: str, dtype: str, save_checkpoint: bool,
                embed_workflow: str = "redacted") -> io.NodeOutput:
        run = state
        root = folders.loras_directory()
        roots = client_roots()
        name = filename.strip() or run.name
        try:
            check_file_name(root, name, ".safetensors", what="filename")
        except ValueError as exc:
            raise KilnUserError(f"{exc}; nothing was written") from None
        try:
            target = folders.unused_path(folders.safe_child(root, name, ".safetensors"))
        except KilnUserError as exc:
            raise KilnUserError(scrub(str(exc), roots)) from None
        tensors = run.naming.export(run.state, dtype)
        bases = sorted({k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors})
        unmapped = patching.lora_keys_loadable(run.model, bases, run.clip)
        if unmapped:
            raise KilnUserError(
                f"{len(unmapped)} LoRA keys would not load onto this model in ComfyUI, e.g. {unmapped[0]}; "
                "nothing was written. Please report this with your model type."
            )
        extra = embedded_workflow(cls.hidden.prompt, (cls.hidden.extra_pnginfo or {}).get("workflow"),
                                  embed_workflow)
        metadata = build_metadata(
            run.state, title=target.stem, base_model_version=run.base_model_version,
            base_model_name=run.base_model_name, prediction_type=run.prediction_type,
            zero_terminal_snr=run.detected.objective.zero_terminal_snr, train=run.train_settings, extra=extra,
            model_spec=run.detected.model_spec, guidance=run.detected.guidance,
            model_flow_shift=None if run.detected.objective.flow_shift_by_size else run.detected.objective.flow_shift,
        )
        redactor = Redactor()
        metadata = redactor.metadata(metadata, keep=("prompt", "workflow") if embed_workflow == "full" else ())
        metadata = with_addnet_hashes(tensors, metadata)  # last: kohya hashes the final ss_* values
        try:
            atomic_save_safetensors(tensors, target, metadata)
        except OSError as exc:
            logger.error("LoRA Kiln: writing %s failed: %s", target, exc)
            raise KilnUserError(redactor.text(scrub(str(exc), roots))) from None
        name = target.relative_to(root).as_posix()
        lines = [f"saved {shown_path(target, roots)} ({len(bases)} layers, step {run.state.step})"]
        if save_checkpoint:
            lines.append(f"checkpoint: {shown_path(save_checkpoint_for(run), roots)}")
        logger.info("LoRA Kiln: %s", "; ".join(lines))
        return io.NodeOutput(name, ui={"text": lines})


def save_checkpoint_for(run: KilnRun) -> Path:
    return save_checkpoint(run, run.state, "")


def checkpoint_names() -> list[str]:
    root = folders.runs_directory()
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
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model: object, checkpoint: str, clip: object = None) -> io.NodeOutput:
        root = folders.runs_directory()
        roots = client_roots()
        try:
            path = folders.safe_child(root, checkpoint, ".kiln.safetensors") \
                if checkpoint.endswith(".kiln.safetensors") else None
        except KilnUserError as exc:
            raise KilnUserError(scrub(str(exc), roots)) from None
        if path is None or not path.is_file():
            raise KilnUserError(
                f"checkpoint {checkpoint!r} not found in {shown_path(root, roots)}; train with save_every > 0 or "
                "Save LoRA's save_checkpoint first, then refresh the page"
            )
        state = TrainState.load(path)
        base = patching.strip_adapters(model)
        detected = families.detect(base)
        roots = patching.unet_roots(base)
        if any(not s.name.startswith("unet.") for s in state.specs):
            if clip is None:
                raise KilnUserError(f"{path.name} trains the text encoder: connect the CLIP to Load Checkpoint")
            roots.update(text_encoders.text_roots(clip, detected.family))
        for spec in state.specs:
            component, _, module_path = spec.name.partition(".")
            try:
                module = roots[component].get_submodule(module_path)
            except (KeyError, AttributeError):
                raise KilnUserError(
                    f"{path.name} has an adapter for {spec.name}, which this model does not have: "
                    "load the checkpoint on the model it was trained on"
                ) from None
            shape = (getattr(module, "in_features", None) or getattr(module, "in_channels", None),
                     getattr(module, "out_features", None) or getattr(module, "out_channels", None))
            if shape != (spec.in_features, spec.out_features):
                raise KilnUserError(
                    f"{path.name}: {spec.name} is {spec.in_features}->{spec.out_features} in the checkpoint but "
                    f"{shape[0]}->{shape[1]} in this model: load it on the model it was trained on"
                )
        name = path.parent.parent.name
        run = KilnRun(state=state, model=base, name=name, naming=families.lora_naming(base, detected.family),
                      detected=detected, clip=clip,
                      base_model_name=model_file_name(cls.hidden.prompt, cls.hidden.unique_id))
        text = f"resumed {name} at step {state.step} (epoch {state.epoch + 1})"
        out_clip = text_encoders.clip_with_lora(clip, state, run.naming) if clip is not None else None
        return io.NodeOutput(run, patching.with_adapters(base, state), out_clip, ui={"text": [text]})

