#!/usr/bin/env python3
"""LoRA Kiln, headless: train from a config file, run a workflow, or try the one-minute demo.

    python kiln.py                      # the demo: tiny model, bundled images, about a minute on a CPU
    python kiln.py my_lora.yaml         # train from a config (keys as in kohya / lora-scripts)
    python kiln.py my_lora.yaml --resume output/my_lora/checkpoints/my_lora_step000500.kiln.safetensors
    python kiln.py run example_workflows/train_sd15_lora.json --set dataset=/data/cat --set steps=500
    python kiln.py export example_workflows/train_sd15_lora.json > my_lora.yaml

It uses ComfyUI as a library, found at --comfyui, $COMFYUI_PATH, the ComfyUI this folder is installed in
(custom_nodes/..), or ~/comfy/ComfyUI, and runs the very nodes the graph uses.

ComfyUI's own flags work as with main.py, anywhere on the line or after a "--":

    python kiln.py my_lora.yaml --lowvram
    python kiln.py run workflow.json --set steps=500 -- --fp16-unet --output-directory /data/out
    python kiln.py -- --help            # ComfyUI's flags
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import functools
import importlib
import importlib.util
import itertools
import logging
import os
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent
log = logging.getLogger("kiln")

# kiln.py's own options (headless/runner.py's parser) -> how many values each takes; every other option must be
# one of ComfyUI's flags (comfy/cli_args.py), which go to ComfyUI.
KILN_OPTIONS = {"--comfyui": 1, "--resume": 1, "--resume_from_checkpoint": 1, "--set": 1, "--output-dir": 1, "--retrain": 0,
                "--steps": 1, "-h": 0, "--help": 0}
# ComfyUI flags that choose the device: with one of them kiln.py never adds --cpu.
DEVICE_CHOICES = ("cpu", "directml", "cuda_device", "default_device", "oneapi_device_selector")
COMFY_FLAGS_HELP = """
ComfyUI's flags:
  Any flag of ComfyUI's main.py is passed on to ComfyUI, anywhere on the line or after a "--" separator
  (put flags that take several values, like --fast, after "--"). For example, on an 8 GB card:
    python kiln.py my_lora.yaml --lowvram
    python kiln.py run workflow.json --set steps=500 -- --fp16-unet --output-directory /data/out
  python kiln.py -- --help lists them. Without a GPU kiln.py adds --cpu (and ignores --lowvram & co.)
  unless you choose a device yourself (--cpu, --directml, --cuda-device, ...)."""


class FlagError(ValueError):
    """A command-line flag that is neither kiln.py's nor ComfyUI's, or a ComfyUI flag with a bad value."""


def find_comfyui(explicit: str | None = None) -> Path | None:
    """``--comfyui``, else ``$COMFYUI_PATH``, else the ComfyUI this package is installed in, else ``~/comfy/ComfyUI``.
    A path given explicitly (the option or the variable) is the only candidate: a wrong one is reported, never
    silently replaced by another ComfyUI (possibly of another version)."""
    given = explicit or os.environ.get("COMFYUI_PATH")
    candidates = [Path(given).expanduser()] if given else []
    if not given and REPO.parent.name == "custom_nodes":
        candidates.append(REPO.parent.parent)
    if not given:
        candidates.append(Path("~/comfy/ComfyUI").expanduser())
    for c in candidates:
        if (c / "main.py").is_file() and (c / "comfy").is_dir():
            return c.resolve()
    return None


@functools.cache
def compat() -> ModuleType:
    """``nodes/corridor/compat.py``: where ComfyUI versions differ. It imports nothing of the package, so it is loaded by
    path here, before ComfyUI loads the package."""
    spec = importlib.util.spec_from_file_location("kiln_comfy_compat", REPO / "nodes" / "corridor" / "compat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def comfy_parser(comfy_dir: Path) -> argparse.ArgumentParser:
    """ComfyUI's own command-line parser (comfy/cli_args.py), imported without parsing anything yet."""
    if sys.path[:1] != [str(comfy_dir)]:  # first: ComfyUI's nodes.py, not this package's nodes/
        sys.path.insert(0, str(comfy_dir))
    import comfy.cli_args  # comfy.options.args_parsing is still off: this parses no command line

    return comfy.cli_args.parser


def _takes(action: argparse.Action, value: str, parser: argparse.ArgumentParser | None = None) -> bool:
    """Whether an optional value of a ComfyUI flag (nargs ?, *, +) can be ``value``."""
    if value.startswith("-"):
        return False
    if parser is not None and action.dest == "verbose" and (levels := compat().verbose_levels(parser)) is not None:
        return value in levels
    if action.choices is not None:
        return value in {getattr(c, "value", c) for c in action.choices}
    if callable(action.type):
        try:
            action.type(value)
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            return False
    return True


def split_argv(argv: list[str], parser: argparse.ArgumentParser) -> tuple[list[str], list[str]]:
    """(kiln.py's arguments, ComfyUI's flags): everything after ``--``, and ComfyUI's flags anywhere before it.

    Raises FlagError naming an option that is neither kiln.py's nor ComfyUI's.
    """
    head, tail = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    comfy_flags = parser._option_string_actions  # argparse's own table: every ComfyUI flag, exactly as spelled
    kiln_args: list[str] = []
    comfy_args: list[str] = []
    i = 0
    while i < len(head):
        token = head[i]
        flag, eq, _ = token.partition("=")
        kiln_flag = flag if flag in KILN_OPTIONS else None if flag in comfy_flags else _kiln_abbreviation(flag)
        if kiln_flag is not None:  # kiln.py's own (-h/--help too: ComfyUI's help is "-- --help")
            n = 1 + (0 if eq else KILN_OPTIONS[kiln_flag])
            kiln_args += head[i:i + n]
            i += n
            continue
        if not token.startswith("-") or _is_number(token):
            kiln_args.append(token)
            i += 1
            continue
        action = comfy_flags.get(flag) if flag.startswith("--") else None
        if action is None:
            raise FlagError(_unknown_flag(flag, parser))
        n = 1
        if not eq:
            rest = head[i + 1:]
            if action.nargs is None:
                n += 1
            elif isinstance(action.nargs, int):
                n += action.nargs
            elif action.nargs in ("?", "*", "+"):
                taken = 0
                while taken < len(rest) and _takes(action, rest[taken], parser) and (action.nargs != "?" or taken < 1):
                    taken += 1
                n += max(taken, 1 if action.nargs == "+" and rest else 0)
        comfy_args += head[i:i + n]
        i += n
    return kiln_args, comfy_args + tail


def _kiln_abbreviation(flag: str) -> str | None:
    """A unique abbreviation of a kiln.py option (argparse accepts those), e.g. --res for --resume."""
    if not flag.startswith("--") or len(flag) < 4:
        return None
    matches = [o for o in KILN_OPTIONS if o.startswith(flag) and o != "--resume_from_checkpoint"]
    return matches[0] if len(matches) == 1 else None


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _unknown_flag(flag: str, parser: argparse.ArgumentParser) -> str:
    known = [*KILN_OPTIONS, *(o for o in parser._option_string_actions if o.startswith("--"))]
    close = difflib.get_close_matches(flag, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return (f"unknown option {flag}{hint}: it is neither a kiln.py option nor one of ComfyUI's flags; "
            f"python kiln.py --help lists kiln.py's, python kiln.py -- --help ComfyUI's")


def parse_comfy_flags(parser: argparse.ArgumentParser, flags: list[str]) -> argparse.Namespace:
    """Parse with ComfyUI's parser; its complaints become FlagError (``--help`` prints its help and exits)."""
    def error(message: str) -> None:
        raise FlagError(f"ComfyUI flag: {message}")

    parser.error = error  # type: ignore[method-assign]
    try:
        args = parser.parse_args(flags)
    finally:
        del parser.error
    try:
        compat().visible_devices(args.cuda_device)
    except ValueError as exc:
        raise FlagError(f"ComfyUI flag: {exc}") from None
    return args


def _has_accelerator(torch: object) -> bool:
    if torch.cuda.is_available():  # type: ignore[attr-defined]
        return True
    xpu = getattr(torch, "xpu", None)
    mps = getattr(getattr(torch, "backends", None), "mps", None)
    return bool((xpu is not None and xpu.is_available()) or (mps is not None and mps.is_available()))


def _device_environment(args: argparse.Namespace) -> None:
    """What ComfyUI's main.py sets before torch is imported, for the device flags."""
    visible = compat().visible_devices(args.cuda_device)  # "all" (ComfyUI >= 0.3.7x): every device stays visible
    if args.default_device is not None and (visible is not None or args.cuda_device is None):
        order = [args.default_device, *(d for d in range(32) if d != args.default_device)]
        os.environ["CUDA_VISIBLE_DEVICES"] = os.environ["HIP_VISIBLE_DEVICES"] = ",".join(map(str, order))
    if visible is not None:
        for var in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ASCEND_RT_VISIBLE_DEVICES"):
            os.environ[var] = visible
    if args.oneapi_device_selector is not None:
        os.environ["ONEAPI_DEVICE_SELECTOR"] = args.oneapi_device_selector
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _apply_paths(comfy_dir: Path, args: argparse.Namespace) -> None:
    """The folders ComfyUI's main.py sets up from its flags (main.py itself is not run headless)."""
    import folder_paths
    import utils.extra_config  # ComfyUI's utils package: import it before nodes.py puts comfy/ on sys.path

    extra_paths = comfy_dir / "extra_model_paths.yaml"
    if extra_paths.is_file():
        utils.extra_config.load_extra_path_config(str(extra_paths))
    for config in itertools.chain(*(args.extra_model_paths_config or [])):
        utils.extra_config.load_extra_path_config(config)
    if args.output_directory:
        folder_paths.set_output_directory(os.path.abspath(args.output_directory))
    for kind in ("checkpoints", "clip", "vae", "diffusion_models", "loras"):
        folder_paths.add_model_folder_path(kind, os.path.join(folder_paths.get_output_directory(), kind))
    if args.input_directory:
        folder_paths.set_input_directory(os.path.abspath(args.input_directory))
    if args.user_directory:
        folder_paths.set_user_directory(os.path.abspath(args.user_directory))
    if args.temp_directory:
        folder_paths.set_temp_directory(os.path.join(os.path.abspath(args.temp_directory), "temp"))


def boot_comfyui(comfy_dir: Path, extras: bool, flags: list[str] | None = None) -> object:
    """Import ComfyUI as a library (with ComfyUI's ``flags``) and load this package the way ComfyUI loads custom
    nodes."""
    flags = list(flags or [])
    parser = comfy_parser(comfy_dir)
    given = parse_comfy_flags(parser, flags)
    _device_environment(given)

    import comfy.cli_args
    import comfy.options

    comfy.options.enable_args_parsing()
    sys.argv = [sys.argv[0], *flags]
    importlib.reload(comfy.cli_args)  # now comfy.cli_args.args holds the flags
    import cuda_malloc  # noqa: F401  (ComfyUI's allocator choice; it must come before torch)
    import torch

    if not _has_accelerator(torch) and not any(getattr(given, d) not in (None, False) for d in DEVICE_CHOICES):
        cpu = parser._option_string_actions["--cpu"]
        group = next((g._group_actions for g in parser._mutually_exclusive_groups if cpu in g._group_actions), [cpu])
        memory = {o for a in group if a is not cpu for o in a.option_strings}
        if ignored := [f for f in flags if f in memory]:
            log.warning("no GPU found: %s ignored, running on the CPU", " ".join(ignored))
        sys.argv = [sys.argv[0], *(f for f in flags if f not in memory), "--cpu"]
        importlib.reload(comfy.cli_args)
    args = comfy.cli_args.args
    if "--verbose" in flags or any(f.startswith("--verbose=") for f in flags):
        logging.getLogger().setLevel(compat().log_level(args.verbose))
    _apply_paths(comfy_dir, args)
    import server  # noqa: F401  (the nodes report progress through server.PromptServer.instance)

    import nodes

    if extras:  # stock comfy_extras nodes, for arbitrary workflows
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    if not asyncio.run(nodes.load_custom_node(str(REPO), module_parent="custom_nodes")):
        raise SystemExit("kiln.py: could not load LoRA Kiln into ComfyUI (see the messages above)")
    package = str(REPO).replace(".", "_x_")
    return importlib.import_module(f"{package}.headless.runner")


def _pop_comfyui(argv: list[str]) -> str | None:
    """Take ``--comfyui PATH`` / ``--comfyui=PATH`` out of ``argv`` (before any ``--``)."""
    end = argv.index("--") if "--" in argv else len(argv)
    for i, token in enumerate(argv[:end]):
        if token == "--comfyui":
            value = argv[i + 1] if i + 1 < end else None
            del argv[i:i + 2]
            return value
        if token.startswith("--comfyui="):
            del argv[i]
            return token.split("=", 1)[1]
    return None


def main(argv: list[str]) -> int:
    argv = list(argv)
    comfy_arg = _pop_comfyui(argv)
    comfy = find_comfyui(comfy_arg)
    if comfy is None:
        where = comfy_arg or os.environ.get("COMFYUI_PATH")
        print((f"kiln.py: no ComfyUI at {where} (no main.py and comfy/ there). " if where else
               "kiln.py: ComfyUI not found. ") + "Pass --comfyui PATH, set COMFYUI_PATH, or install LoRA Kiln in "
              "ComfyUI/custom_nodes.", file=sys.stderr)
        return 2
    logging.basicConfig(level=os.environ.get("KILN_LOG_LEVEL", "WARNING"), format="%(levelname)s %(message)s")
    try:
        parser = comfy_parser(comfy)
        kiln_args, comfy_flags = split_argv(argv, parser)
        parse_comfy_flags(parser, comfy_flags)  # bad values fail now, not after the start-up
    except FlagError as exc:
        print(f"kiln.py: {exc}", file=sys.stderr)
        return 2
    headless = boot_comfyui(comfy, extras=bool(kiln_args) and kiln_args[0] == "run", flags=comfy_flags)
    try:
        return headless.main(kiln_args)
    except SystemExit as exc:
        if exc.code in (0, None) and ("-h" in kiln_args or "--help" in kiln_args):
            print(COMFY_FLAGS_HELP)
        raise


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
