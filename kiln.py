#!/usr/bin/env python3
"""LoRA Kiln, headless: train from a config file, run a workflow, or try the one-minute demo.

    python kiln.py                      # the demo: tiny model, bundled images, about a minute on a CPU
    python kiln.py my_lora.yaml         # train from a config (keys as in kohya / lora-scripts)
    python kiln.py my_lora.yaml --resume output/my_lora/checkpoints/my_lora_step000500.kiln.safetensors
    python kiln.py run example_workflows/train_sd15_lora.json --set dataset=/data/cat --set steps=500
    python kiln.py export example_workflows/train_sd15_lora.json > my_lora.yaml

It uses ComfyUI as a library, found at --comfyui, $COMFYUI_PATH, the ComfyUI this folder is installed in
(custom_nodes/..), or ~/comfy/ComfyUI, and runs the very nodes the graph uses.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent


def find_comfyui(explicit: str | None = None) -> Path | None:
    candidates = [Path(explicit).expanduser()] if explicit else []
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(os.environ["COMFYUI_PATH"]).expanduser())
    if REPO.parent.name == "custom_nodes":
        candidates.append(REPO.parent.parent)
    candidates.append(Path("~/comfy/ComfyUI").expanduser())
    for c in candidates:
        if (c / "main.py").is_file() and (c / "comfy").is_dir():
            return c.resolve()
    return None


def boot_comfyui(comfy_dir: Path, extras: bool) -> object:
    """Import ComfyUI as a library and load this package the way ComfyUI loads custom nodes."""
    import torch

    sys.path.insert(0, str(comfy_dir))
    sys.argv = [sys.argv[0], *([] if torch.cuda.is_available() else ["--cpu"])]
    import comfy.options

    comfy.options.enable_args_parsing()
    import utils.extra_config  # ComfyUI's utils package: import it before nodes.py puts comfy/ on sys.path

    extra_paths = comfy_dir / "extra_model_paths.yaml"
    if extra_paths.is_file():
        utils.extra_config.load_extra_path_config(str(extra_paths))
    import server  # noqa: F401  (the nodes report progress through server.PromptServer.instance)

    import nodes

    if extras:  # stock comfy_extras nodes, for arbitrary workflows
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    if not asyncio.run(nodes.load_custom_node(str(REPO), module_parent="custom_nodes")):
        raise SystemExit("kiln.py: could not load LoRA Kiln into ComfyUI (see the messages above)")
    package = str(REPO).replace(".", "_x_")
    return importlib.import_module(f"{package}.nodes.headless")


def main(argv: list[str]) -> int:
    comfy_arg = None
    if "--comfyui" in argv:
        i = argv.index("--comfyui")
        comfy_arg = argv[i + 1] if i + 1 < len(argv) else None
        argv = argv[:i] + argv[i + 2:]
    comfy = find_comfyui(comfy_arg)
    if comfy is None:
        print("kiln.py: ComfyUI not found. Pass --comfyui PATH, set COMFYUI_PATH, or install LoRA Kiln in "
              "ComfyUI/custom_nodes.", file=sys.stderr)
        return 2
    logging.basicConfig(level=os.environ.get("KILN_LOG_LEVEL", "WARNING"), format="%(levelname)s %(message)s")
    headless = boot_comfyui(comfy, extras=bool(argv) and argv[0] == "run")
    return headless.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
