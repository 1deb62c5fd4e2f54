"""Which checkpoint file a MODEL input came from, read off the API prompt (no ComfyUI import).

A ComfyUI MODEL object does not know its file name, but the prompt that is running does: follow the node's
``model`` link upstream through model-passing nodes (LoraLoader, ModelSampling*, Inject LoRA, Train Steps via its
``state``...) to the loader node and read its file input. kohya writes this base name as ``ss_sd_model_name``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# Loader node -> the input holding the file (or folder) name. Unknown nodes with one of these inputs count too.
LOADERS = {
    "CheckpointLoaderSimple": "ckpt_name",
    "CheckpointLoader": "ckpt_name",
    "unCLIPCheckpointLoader": "ckpt_name",
    "ImageOnlyCheckpointLoader": "ckpt_name",
    "UNETLoader": "unet_name",
    "UnetLoaderGGUF": "unet_name",
    "UnetLoaderGGUFAdvanced": "unet_name",
    "DiffusersLoader": "model_path",
}
FILE_INPUTS = ("ckpt_name", "unet_name")
# Inputs that carry the model a node passes on, in the order they are tried ("state": Kiln's Train Steps).
MODEL_INPUTS = ("model", "model1", "base_model", "state")
MAX_DEPTH = 256


def _is_link(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], (str, int))
            and isinstance(value[1], int) and not isinstance(value[1], bool))


def _file_base_name(name: str) -> str:
    parts = [p for p in re.split(r"[\\/]", name.strip()) if p]
    return parts[-1] if parts else ""


def _string_value(prompt: Mapping[str, Any], value: Any, depth: int = 0) -> str | None:
    """A widget value, or the string a primitive node linked into it holds."""
    if isinstance(value, str):
        return value
    if _is_link(value) and depth < 8:
        node = prompt.get(str(value[0]))
        inputs = node.get("inputs", {}) if isinstance(node, Mapping) else {}
        for candidate in (inputs.get("value"), *inputs.values()):
            found = _string_value(prompt, candidate, depth + 1) if candidate is not None else None
            if found:
                return found
    return None


def model_file_name(prompt: Mapping[str, Any] | None, node_id: str | None, input_name: str = "model") -> str:
    """Base name of the checkpoint/diffusion-model file behind ``node_id``'s ``input_name``; ``""`` if unknown.

    ``prompt`` is the API prompt (``{node_id: {"class_type", "inputs"}}``) ComfyUI hands a node as its hidden
    ``prompt``. Never raises on a malformed prompt: the name is a courtesy for the metadata.
    """
    if not isinstance(prompt, Mapping) or node_id is None:
        return ""
    node = prompt.get(str(node_id))
    if not isinstance(node, Mapping):
        return ""
    link = node.get("inputs", {}).get(input_name) if isinstance(node.get("inputs"), Mapping) else None
    seen: set[str] = set()
    while _is_link(link) and len(seen) < MAX_DEPTH:
        current = str(link[0])
        if current in seen:
            return ""
        seen.add(current)
        upstream = prompt.get(current)
        if not isinstance(upstream, Mapping) or not isinstance(upstream.get("inputs"), Mapping):
            return ""
        inputs = upstream["inputs"]
        file_input = LOADERS.get(str(upstream.get("class_type")))
        candidates = (file_input,) if file_input else FILE_INPUTS
        for name in candidates:
            value = _string_value(prompt, inputs.get(name))
            if value:
                return _file_base_name(value)
        link = next((inputs[name] for name in MODEL_INPUTS if _is_link(inputs.get(name))), None)
        if link is None:  # any other link whose name says it carries a model (e.g. "model_a")
            link = next((v for k, v in inputs.items() if "model" in k.lower() and _is_link(v)), None)
    return ""
