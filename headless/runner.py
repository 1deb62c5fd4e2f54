"""Headless training: the same nodes and engine as the graph, run in-process by ComfyUI's own executor.

``kiln.py`` (repository root) boots ComfyUI as a library, loads this package exactly as ComfyUI would,
and calls :func:`main`. A config file becomes an API-format graph of Kiln nodes; a workflow ``.json`` runs
as it is. ComfyUI's executor runs it with a stand-in for the web server that turns the events the UI would
receive into a terminal progress line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import comfy.model_management as mm
import execution
import folder_paths
import yaml

import nodes as comfy_nodes

from ..lora_core import runconfig, settings
from ..lora_core.progress import PhaseText, format_eta, parse_phase_text
from ..lora_core.runconfig import RunConfig
from ..nodes.corridor import compat, folders, reporting
from . import workflow_format

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]


class KilnError(Exception):
    """A message for the terminal, without a traceback."""


# ---- terminal stand-in for ComfyUI's web server ------------------------------------------------


class TerminalServer:
    """Receives what the web UI would, prints a progress line and the nodes' messages."""

    def __init__(self, total_steps: int = 0, epochs: int = 0, stream: Any = None) -> None:
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.total_steps = total_steps
        self.epochs = epochs
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.events: list[tuple[str, Any]] = []
        self._last_line = 0.0
        self._open_line = False
        self._phase: tuple[str, str] | None = None  # (node, label) of the phase line being printed
        self._phase_line = 0.0

    def send_sync(self, event: Any, data: Any, sid: Any = None) -> None:
        if not isinstance(event, str):
            return  # binary frames (preview images) have no terminal form
        self.events.append((event, data))
        if event == reporting.PROGRESS_EVENT:
            self._progress(data)
        elif event == "executed" and isinstance(data, dict):
            for text in (data.get("output") or {}).get("text", []):
                self._print(f"[{data.get('node')}] {text}")
        elif event == "execution_error":
            self._print(f"error in {data.get('node_type')}: {str(data.get('exception_message', '')).strip()}")

    def send_progress_text(self, text: Any, node_id: str, sid: Any = None) -> None:
        """Phase texts (``Load Dataset: encoding latents 12/40 images · …``) become a progress line.

        Train Steps' own step text is not one: its progress event carries the same facts (:meth:`_progress`).
        """
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8", "replace")
        phase = parse_phase_text(str(text))
        if phase is None:
            return
        self.events.append(("progress_text", {"node": node_id, "text": phase.text}))
        self._phase_progress(phase, str(node_id))

    def queue_updated(self) -> None:
        pass

    def _progress(self, d: dict[str, Any]) -> None:
        total = self.total_steps or d["run_steps"]
        epoch = f"Epoch {d['epoch'] + 1}/{self.epochs} | " if self.epochs else f"Epoch {d['epoch'] + 1} | "
        loss = d["loss"] if d["loss"] is not None else float("nan")
        eta = format_eta(d["eta_seconds"] if d["eta_seconds"] is not None else math.inf)
        line = (f"{epoch}Step {d['step']}/{total} | Loss {loss:.4f} (avg {d['smoothed_loss'] or float('nan'):.4f}) | "
                f"{d['sec_per_step'] or 0:.2f} s/it | ETA {eta}")
        bar = _bar(d["run_step"] / max(d["run_steps"], 1))
        now = time.monotonic()
        last = d["run_step"] == d["run_steps"]
        if self.tty:
            self.stream.write(f"\r{bar} {line}\033[K" + ("\n" if last else ""))
            self.stream.flush()
            self._open_line = not last
        elif last or now - self._last_line >= 5.0 or d["run_step"] == 1:
            self._last_line = now
            self.stream.write(f"{bar} {line}\n")
            self.stream.flush()

    def _phase_progress(self, phase: PhaseText, node_id: str) -> None:
        key = (node_id, phase.label)
        new = key != self._phase
        self._phase = key
        if phase.total is None:  # a status without a count ("Train Steps: loading the model…")
            self._print(phase.text)
            return
        line = phase.text if phase.label else f"[{node_id}] {phase.text}"
        last = phase.done is not None and phase.done >= phase.total
        bar = _bar((phase.done or 0) / max(phase.total, 1))
        now = time.monotonic()
        if self.tty:
            if new and self._open_line:
                self.stream.write("\n")
            self.stream.write(f"\r{bar} {line}\033[K" + ("\n" if last else ""))
            self.stream.flush()
            self._open_line = not last
        elif new or last or now - self._phase_line >= 5.0:
            self._phase_line = now
            self.stream.write(f"{bar} {line}\n")
            self.stream.flush()

    def _print(self, text: str) -> None:
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False
        self.stream.write(text + "\n")
        self.stream.flush()


def _bar(frac: float, width: int = 20) -> str:
    filled = int(round(frac * width))
    return "[" + "#" * filled + "." * (width - filled) + "]"


# ---- running a graph ---------------------------------------------------------------------------


def execute(prompt: dict[str, Any], server: TerminalServer) -> tuple[str, dict[str, Any]]:
    """Validate and run an API-format graph; returns (status, outputs ui by node). Ctrl-C cancels cleanly."""
    from server import PromptServer

    PromptServer.instance = server  # the nodes report progress through it, as in the web UI
    prompt_id = uuid.uuid4().hex
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid:
        details = [f"{error.get('message', error)}: {error.get('details', '')}".strip()]
        for nid, info in (node_errors or {}).items():
            for err in info.get("errors", []):
                details.append(f"node {nid} ({info.get('class_type')}): {err.get('message')} {err.get('details', '')}")
        raise KilnError("the graph is not valid:\n  " + "\n  ".join(details))
    executor = compat.prompt_executor(execution, server)
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum: int, frame: Any) -> None:
        server._print("Ctrl-C: stopping and writing a checkpoint of the last finished step (Ctrl-C again to abort)")
        mm.interrupt_current_processing(True)
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, on_sigint)
    try:
        executor.execute(prompt, prompt_id, {"client_id": "terminal"}, outputs)
    finally:
        signal.signal(signal.SIGINT, previous)
    kinds = [event for event, _ in executor.status_messages]
    status = "interrupted" if "execution_interrupted" in kinds else ("error" if "execution_error" in kinds else "success")
    ui = executor.history_result.get("outputs", {}) if executor.history_result else {}
    return status, ui


def object_info() -> dict[str, Any]:
    """What ``/object_info`` would answer, for the node types loaded in this process."""
    info = {}
    for name, cls in comfy_nodes.NODE_CLASS_MAPPINGS.items():
        try:
            inputs = cls.INPUT_TYPES()
            order = {k: list(v) for k, v in inputs.items() if isinstance(v, dict)}
            outputs = list(cls.RETURN_TYPES)
            names = list(getattr(cls, "RETURN_NAMES", None) or outputs)
        except Exception:  # noqa: BLE001 - a broken third-party node must not stop us
            continue
        info[name] = {"input": inputs, "input_order": order, "output": outputs, "output_name": names,
                      "output_node": bool(getattr(cls, "OUTPUT_NODE", False))}
    return info


# ---- config -> graph ---------------------------------------------------------------------------


def checkpoint_name(base_model: str, folder: str = "checkpoints", key: str = "base_model") -> str:
    """A model file name as its ComfyUI loader wants it (``folder``: the models/ folder type it lists); a path's
    folder is registered first."""
    path = Path(base_model).expanduser()
    if path.suffix and path.is_file():
        folder_paths.add_model_folder_path(folder, str(path.parent.resolve()), is_default=True)
        return path.name
    if base_model in folder_paths.get_filename_list(folder):
        return base_model
    known = folder_paths.get_filename_list(folder)
    raise KilnError(
        f"{key}={base_model!r} is neither a file nor a {'checkpoint' if folder == 'checkpoints' else 'file'} in "
        f"models/{folder} "
        f"(there: {', '.join(known[:8]) or 'nothing'}); give a path or one of those names"
    )


def steps_per_epoch(cfg: RunConfig) -> int:
    try:
        return cfg.steps_per_epoch()
    except ValueError as exc:
        raise KilnError(str(exc)) from None


def graph_from_config(cfg: RunConfig, steps: int, resume: str | None) -> dict[str, Any]:
    """The same graph a user wires in ComfyUI (see example_workflows/train_sd15_lora.json)."""
    if not cfg.split_model:
        return runconfig.training_graph(cfg, steps, resume, checkpoint_name(cfg.base_model))
    # each file in its own loader's folder; every one not found is named at once, so one fix-up covers them all
    folders = {"base_model": "diffusion_models", "clip_l": "text_encoders", "t5xxl": "text_encoders", "ae": "vae"}
    names: dict[str, str] = {}
    missing: list[str] = []
    for key in ("base_model", *cfg.split_files):
        try:
            names[key] = checkpoint_name(getattr(cfg, key), folders[key], key)
        except KilnError as exc:
            missing.append(str(exc))
    if missing:
        raise KilnError("; ".join(missing))
    model = names.pop("base_model")
    return runconfig.training_graph(cfg, steps, resume, model, names)


def config_from_graph(api: dict[str, Any]) -> RunConfig:
    """The settings of a Kiln training graph as a config (inverse of :func:`graph_from_config`)."""
    return runconfig.config_from_graph(api)


# ---- commands ----------------------------------------------------------------------------------


def force_retrain(graph: dict[str, Any]) -> None:
    """``--retrain``: every Train Steps node trains from its start state, ignoring finished runs and checkpoints."""
    for node in graph.values():
        if isinstance(node, dict) and node.get("class_type") == "KilnTrainSteps":
            node.setdefault("inputs", {})["retrain"] = True


def train(cfg: RunConfig, resume: str | None = None, out: Any = None, retrain: bool = False) -> int:
    out = out or sys.stdout
    output_dir = Path(cfg.output_dir).expanduser().resolve()
    run_dir = output_dir / cfg.output_name
    folders.configure_directories(runs=output_dir, loras=run_dir)
    resume = resume or cfg.resume_from_checkpoint or None
    start_step = 0
    resume_name = None
    if resume:
        path = Path(resume).expanduser().resolve()
        if not path.is_file():
            raise KilnError(f"resume_from_checkpoint={resume!r}: no such file")
        try:
            resume_name = path.relative_to(output_dir).as_posix()
        except ValueError:
            raise KilnError(f"resume_from_checkpoint must be inside output_dir ({output_dir}); got {path}") from None
        from ..lora_core import TrainState

        start_step = TrainState.load(path).step
    per_epoch = steps_per_epoch(cfg)
    total = cfg.max_steps or cfg.epochs * per_epoch
    steps = total - start_step
    if steps <= 0:
        raise KilnError(f"nothing to do: the checkpoint is at step {start_step} and the run has {total} steps")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(
        "# the effective configuration of this run (written by kiln.py)\n" + cfg.to_yaml(), encoding="utf-8")
    graph = graph_from_config(cfg, steps, resume_name)
    if retrain:
        force_retrain(graph)
    server = TerminalServer(total_steps=total, epochs=cfg.epochs)
    print(f"LoRA Kiln: training {cfg.output_name} for {steps} steps "
          f"({per_epoch} steps per epoch{', resuming at step ' + str(start_step) if start_step else ''})", file=out)
    status, ui = execute(graph, server)
    checkpoints = sorted((run_dir / "checkpoints").glob("*.kiln.safetensors"), key=lambda p: p.stat().st_mtime)
    if status == "interrupted":
        last = checkpoints[-1] if checkpoints else None
        print(f"\nStopped. Resumable checkpoint: {last}\nRun the same command again to continue from it (a run with "
              "the same settings resumes from its newest checkpoint by itself; --retrain starts over).", file=out)
        return 130
    if status == "error":
        return 1
    loras = sorted(run_dir.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    print(f"\nDone.\n  LoRA:        {loras[-1] if loras else '?'}"
          f"\n  config:      {run_dir / 'config.yaml'}\n  logs:        {run_dir / 'logs'}  "
          f"(tensorboard --logdir {run_dir / 'logs'})\n  checkpoints: {run_dir / 'checkpoints'}"
          f"\n  samples:     {run_dir / 'samples'}", file=out)
    return 0


def run_workflow(path: Path, sets: list[str], out: Any = None, retrain: bool = False) -> int:
    out = out or sys.stdout
    api = load_workflow(path)
    apply_sets(api, sets)
    if retrain:
        force_retrain(api)
    server = TerminalServer()
    status, _ = execute(api, server)
    print(f"workflow {path.name}: {status}", file=out)
    return {"success": 0, "interrupted": 130}.get(status, 1)


def load_workflow(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise KilnError(f"{path}: cannot read the workflow ({exc})") from None
    if "nodes" in data and "links" in data:  # UI format: convert like the frontend does on Run
        return workflow_format.ui_to_api(data, object_info())
    return data


MODEL_FOLDERS = {settings.CHECKPOINT_LOADER: "checkpoints", settings.UNET_LOADER: "diffusion_models"}
SET_ALIASES = settings.SET_NAMES  # dataset, steps, lr, base_model, name, rank, resolution ... -> (node, input)


def apply_sets(api: dict[str, Any], sets: list[str]) -> None:
    """``key=value``: an alias (dataset, steps, lr, base_model, name, rank, resolution), ``Type.input`` or ``id.input``."""
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep:
            raise KilnError(f"--set {item!r}: write key=value, e.g. --set steps=500")
        value = yaml.safe_load(raw)
        target_type = None
        if key in SET_ALIASES:
            present = {n["class_type"] for n in api.values()}
            target_type, field = next(((t, f) for t, f in settings.SET_TARGETS[key] if t in present), SET_ALIASES[key])
            targets = [n for n in api.values() if n["class_type"] == target_type]
        elif "." in key:
            head, field = key.rsplit(".", 1)
            targets = [api[head]] if head in api else [n for n in api.values() if n["class_type"] == head]
        else:
            raise KilnError(f"--set {key}: unknown key; use one of {', '.join(SET_ALIASES)} or NodeType.input")
        if key in SET_ALIASES and isinstance(value, str) and target_type in MODEL_FOLDERS:
            value = checkpoint_name(value, MODEL_FOLDERS[target_type])
        if not targets:
            raise KilnError(f"--set {key}: the workflow has no matching node")
        for node in targets:
            if field not in node["inputs"]:
                raise KilnError(f"--set {key}: {node['class_type']} has no input {field!r} "
                                f"(inputs: {', '.join(node['inputs'])})")
            node["inputs"][field] = value


def demo(out_dir: Path, steps: int, out: Any = None) -> int:
    """Build a tiny SD1.5-shaped model, train on the bundled images for about a minute on a CPU."""
    out = out or sys.stdout
    from ..nodes import tiny_checkpoint

    cache = out_dir / "_demo_model" / "tiny_sd15.safetensors"
    if not cache.exists():
        print("LoRA Kiln demo: building a tiny random SD1.5-shaped model (once, ~290 MB)...", file=out)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tiny_checkpoint.write_checkpoint(str(cache))
    cfg = RunConfig.from_mapping({
        "base_model": str(cache), "train_data_dir": str(REPO / "demo" / "images"), "output_dir": str(out_dir),
        "output_name": "kiln_demo", "resolution": 64, "lora_rank": 8, "lora_alpha": 8, "max_steps": steps,
        "learning_rate": 1e-3, "save_steps": max(steps // 2, 1), "sample_prompts": ["a kiln demo shape"],
        "sample_every": max(steps // 2, 1), "sample_size": 64, "sample_steps": 4, "trigger_word": "kilndemo",
    })
    print("LoRA Kiln demo: random weights, so the samples are noise; the point is the whole path working.", file=out)
    return train(cfg, out=out)


def export_config(path: Path, out: Any = None) -> int:
    out = out or sys.stdout
    out.write(config_from_graph(load_workflow(path)).to_yaml())
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kiln.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    p_train = sub.add_parser("train", help="train from a config file (the default when given a .yaml)")
    p_train.add_argument("config")
    p_train.add_argument("--resume", "--resume_from_checkpoint", dest="resume", default=None)
    p_train.add_argument("--set", action="append", default=[], help="override a config key: key=value")
    retrain_help = ("train from scratch even if a finished run with the same settings is on disk (by default it is "
                    "reused, and an interrupted one resumes from its newest checkpoint)")
    p_train.add_argument("--retrain", action="store_true", help=retrain_help)
    p_run = sub.add_parser("run", help="run a workflow .json (UI or API format) headless")
    p_run.add_argument("workflow")
    p_run.add_argument("--set", action="append", default=[], help="dataset=..., steps=..., Type.input=...")
    p_run.add_argument("--retrain", action="store_true", help=retrain_help)
    p_export = sub.add_parser("export", help="print a workflow's training settings as a config.yaml")
    p_export.add_argument("workflow")
    p_demo = sub.add_parser("demo", help="the one-minute demo on a tiny model (the default with no arguments)")
    p_demo.add_argument("--output-dir", default="output")
    p_demo.add_argument("--steps", type=int, default=300)
    if argv and argv[0].endswith((".yaml", ".yml")):
        argv = ["train", *argv]
    args = parser.parse_args(argv or ["demo"])
    try:
        if args.command == "train":
            cfg = RunConfig.from_yaml(args.config)
            if args.set:
                cfg = cfg.replace(**{k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in args.set)})
            return train(cfg, args.resume, retrain=args.retrain)
        if args.command == "run":
            return run_workflow(Path(args.workflow), args.set, retrain=args.retrain)
        if args.command == "export":
            return export_config(Path(args.workflow))
        return demo(Path(args.output_dir).expanduser().resolve(), args.steps)
    except (KilnError, ValueError) as exc:
        print(f"kiln.py: {exc}", file=sys.stderr)
        return 2
    finally:
        folders.configure_directories()


