"""kiln.py passes ComfyUI's own flags (comfy/cli_args.py) to ComfyUI: anywhere on the line or after ``--``."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from comfy_harness import REPO, find_comfyui, make_images


def kiln(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "kiln.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def load_kiln():
    """kiln.py imports nothing of ComfyUI at import time."""
    spec = importlib.util.spec_from_file_location("kiln_cli_under_test", REPO / "kiln.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SPLIT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import kiln
parser = kiln.comfy_parser(kiln.Path(sys.argv[2]))
out = []
for argv in json.loads(sys.argv[3]):
    try:
        out.append(kiln.split_argv(argv, parser))
    except kiln.FlagError as exc:
        out.append(str(exc))
print(json.dumps(out))
"""


def split(*cases: list[str]) -> list:
    """kiln.split_argv with ComfyUI's real parser, in a child process (ComfyUI's modules stay out of this one)."""
    result = subprocess.run([sys.executable, "-c", SPLIT, str(REPO), str(find_comfyui()), json.dumps(cases)],
                            capture_output=True, text=True, timeout=60, check=True)
    return json.loads(result.stdout)


@pytest.mark.compat
def test_comfyui_flags_are_told_apart_from_kilns_own_arguments():
    got = split(
        ["run", "wf.json", "--set", "steps=5", "--lowvram", "--set", "lr=-1e-4"],
        ["cfg.yaml", "--resume", "X.kiln.safetensors", "--fp16-unet", "--output-directory", "/o"],
        ["--cuda-device=1", "run", "wf.json", "--", "--fast", "fp16_accumulation", "--novram"],
        ["--verbose", "run", "wf.json"],
        ["--preview-method", "auto", "demo", "--output-dir", "o", "--steps", "3"],
        ["run", "wf.json", "--lowram"],
        ["run", "wf.json", "--sett", "steps=5"],
    )
    assert got[0] == [["run", "wf.json", "--set", "steps=5", "--set", "lr=-1e-4"], ["--lowvram"]]
    assert got[1] == [["cfg.yaml", "--resume", "X.kiln.safetensors"], ["--fp16-unet", "--output-directory", "/o"]]
    assert got[2] == [["run", "wf.json"], ["--cuda-device=1", "--fast", "fp16_accumulation", "--novram"]]
    assert got[3] == [["run", "wf.json"], ["--verbose"]]  # 'run' is not one of --verbose's levels
    assert got[4] == [["demo", "--output-dir", "o", "--steps", "3"], ["--preview-method", "auto"]]
    assert got[5].startswith("unknown option --lowram (did you mean --lowvram?)")
    assert got[6].startswith("unknown option --sett (did you mean --set?)")


def test_kilns_option_table_knows_every_option_of_the_headless_parser():
    """kiln.py must tell its own options from ComfyUI's before ComfyUI is loaded: its table must be complete."""
    tree = ast.parse((REPO / "headless" / "runner.py").read_text(encoding="utf-8"))
    options = {arg.value for node in ast.walk(tree)
               if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"
               for arg in node.args if isinstance(arg, ast.Constant) and str(arg.value).startswith("-")}
    assert options, "no add_argument calls found in headless/runner.py"
    assert options <= set(load_kiln().KILN_OPTIONS), options - set(load_kiln().KILN_OPTIONS)


@pytest.mark.compat
def test_unknown_flags_and_bad_values_stop_at_once_naming_the_flag(tmp_path):
    result = kiln("run", "wf.json", "--lowram", cwd=tmp_path, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown option --lowram (did you mean --lowvram?)" in result.stderr
    result = kiln("run", "wf.json", "--", "--cuda-device", "abc", cwd=tmp_path, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    # v0.3.64's parser wants an int; v0.33 takes a string (0,1 or all), which kiln.py checks itself
    assert ("ComfyUI flag: argument --cuda-device: invalid int value: 'abc'" in result.stderr
            or "ComfyUI flag: argument --cuda-device: 'abc' is not a device id" in result.stderr), result.stderr


def test_help_says_how_to_pass_comfyui_flags_and_lists_them(tmp_path):
    comfy_help = kiln("--", "--help", cwd=tmp_path, timeout=60)
    assert comfy_help.returncode == 0, comfy_help.stderr
    assert "--lowvram" in comfy_help.stdout and "--output-directory" in comfy_help.stdout
    own = kiln("--help", cwd=tmp_path)
    assert own.returncode == 0, own.stderr
    assert "{train,run,export,demo}" in own.stdout  # kiln.py's own help first
    assert "ComfyUI's flags:" in own.stdout and "python kiln.py -- --help" in own.stdout


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("data") / "shapes", n=2)


def test_flags_reach_comfyui_in_a_headless_run(tmp_path, tiny_checkpoint, data):
    import torch

    out, base = tmp_path / "out", tmp_path / "base"
    result = kiln("run", str(REPO / "example_workflows" / "train_sd15_lora.json"), "--output-directory", str(out),
                  "--set", f"dataset={data}", "--set", "steps=2", "--set", f"base_model={tiny_checkpoint}",
                  "--set", "resolution=64", "--set", "name=flags", "--set", "KilnTrainSteps.preview_every=0",
                  "--set", "KilnTrainSteps.save_every=0", "--set", "KilnSaveLoRA.filename=flags_test", "--lowvram",
                  "--", "--base-directory", str(base), "--verbose", "INFO", cwd=tmp_path, timeout=400)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "workflow train_sd15_lora.json: success" in result.stdout
    assert (out / "lora_kiln" / "flags" / "logs").is_dir()  # --output-directory: ComfyUI's output folder
    assert (base / "models" / "loras" / "flags_test.safetensors").is_file()  # --base-directory: its models
    if torch.cuda.is_available():
        assert "Set vram state to: LOW_VRAM" in log  # --verbose INFO shows ComfyUI's own start-up lines
    else:
        assert "no GPU found: --lowvram ignored, running on the CPU" in log
        assert "Set vram state to: DISABLED" in log
