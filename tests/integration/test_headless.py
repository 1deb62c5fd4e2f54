"""kiln.py: the demo, config-file training, Ctrl-C + resume, workflows run headless, config export."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from comfy_harness import REPO, make_images
from lora_core.state import TrainState


def kiln(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "kiln.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("data") / "shapes", n=3)


def write_config(path: Path, ckpt: Path, data: Path, out: Path, **extra) -> Path:
    cfg = {"base_model": str(ckpt), "train_data_dir": str(data), "output_dir": str(out), "output_name": "cat",
           "resolution": 64, "lora_rank": 4, "lora_alpha": 4, "max_steps": 6, "learning_rate": 1e-3,
           "save_steps": 3, **extra}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.compat
def test_demo_runs_end_to_end_and_says_where_everything_is(tmp_path, tiny_checkpoint):
    model = tmp_path / "_demo_model" / "tiny_sd15.safetensors"
    model.parent.mkdir()
    os.link(tiny_checkpoint, model)  # the demo builds this itself when missing; skip the 290 MB write here
    result = kiln("demo", "--output-dir", str(tmp_path), "--steps", "8", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "kiln_demo"
    assert f"LoRA:        {run / 'kiln_demo.safetensors'}" in result.stdout
    assert "Step 8/8" in result.stderr and "Loss" in result.stderr and "ETA" in result.stderr
    with safe_open(str(run / "kiln_demo.safetensors"), "pt") as f:
        assert f.metadata()["ss_steps"] == "8"
        assert any(k.startswith("lora_unet_") for k in f.keys())
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step000004.png", "step000008.png"]
    assert (run / "config.yaml").is_file() and list((run / "logs").iterdir())


def test_config_run_writes_the_expected_files_and_tensorboard_reads_them(tmp_path, tiny_checkpoint, data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = write_config(tmp_path / "cat.yaml", tiny_checkpoint, data, tmp_path / "out")
    result = kiln(str(cfg), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "out" / "cat"
    assert (run / "cat.safetensors").is_file()
    effective = yaml.safe_load((run / "config.yaml").read_text())
    assert effective["lora_rank"] == 4 and effective["max_steps"] == 6 and effective["optimizer"] == "adamw"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "cat_step000003.kiln.safetensors", "cat_step000006.kiln.safetensors"]
    acc = EventAccumulator(str(run / "logs"))
    acc.Reload()
    losses = acc.Scalars("loss/raw")
    assert [e.step for e in losses] == [1, 2, 3, 4, 5, 6] and all(e.value > 0 for e in losses)


def test_bad_config_names_the_key(tmp_path, tiny_checkpoint, data):
    cfg = write_config(tmp_path / "bad.yaml", tiny_checkpoint, data, tmp_path / "out", lora_rnak=8)
    result = kiln(str(cfg), cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown config key 'lora_rnak' (did you mean 'lora_rank'?)" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_flux_config_in_separate_files_looks_each_file_up_in_its_own_models_folder(tmp_path, tiny_checkpoint, data):
    """kohya's FLUX options build the stock loaders' graph: every file kiln.py cannot find is named, in one message,
    with the folder its loader reads (the diffusion model in models/diffusion_models, CLIP-L and T5 in
    models/text_encoders, the autoencoder in models/vae); a file given as a path is found."""
    (tmp_path / "ae.safetensors").write_bytes(b"")  # a path: found, so not named
    cfg = write_config(tmp_path / "flux.yaml", tmp_path / "flux1-dev.safetensors", data, tmp_path / "out",
                       clip_l="clip_l.safetensors", t5xxl="t5xxl_fp16.safetensors", ae=str(tmp_path / "ae.safetensors"),
                       fp8_base=True, min_snr_gamma=0)
    result = kiln(str(cfg), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "flux1-dev.safetensors' is neither a file nor a file in models/diffusion_models" in result.stderr
    assert "clip_l='clip_l.safetensors' is neither a file nor a file in models/text_encoders" in result.stderr
    assert "t5xxl='t5xxl_fp16.safetensors' is neither a file nor a file in models/text_encoders" in result.stderr
    assert "ae='" not in result.stderr
    assert "Traceback" not in result.stderr
    # the example graph run headless: --set base_model= goes to its UNETLoader, looked up in models/diffusion_models
    result = kiln("run", str(REPO / "example_workflows" / "api" / "train_flux_lora.json"),
                  "--set", "base_model=flux1-schnell.safetensors", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "base_model='flux1-schnell.safetensors' is neither a file nor a file in models/diffusion_models" \
        in result.stderr


@pytest.mark.compat
def test_ctrl_c_leaves_a_resumable_checkpoint_and_resume_continues(tmp_path, tiny_checkpoint, data):
    cfg = write_config(tmp_path / "long.yaml", tiny_checkpoint, data, tmp_path / "out", max_steps=100000,
                       save_steps=0)
    proc = subprocess.Popen([sys.executable, str(REPO / "kiln.py"), str(cfg)], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    ckpts = tmp_path / "out" / "cat" / "checkpoints"
    log = []
    deadline = time.monotonic() + 180
    for line in proc.stdout:
        log.append(line)
        if "Step " in line:
            break
        assert time.monotonic() < deadline, "".join(log)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    output = "".join(log) + rest
    assert proc.returncode == 130, output
    saved = sorted(ckpts.glob("*_cancelled.kiln.safetensors"))
    assert len(saved) == 1, output
    state = TrainState.load(saved[0])
    assert state.step >= 1 and "Resumable checkpoint" in output and "Traceback" not in output

    resume_cfg = write_config(tmp_path / "resume.yaml", tiny_checkpoint, data, tmp_path / "out",
                              max_steps=state.step + 2, save_steps=0)
    result = kiln(str(resume_cfg), "--resume", str(saved[0]), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resuming at step {state.step}" in result.stdout
    final = sorted((tmp_path / "out" / "cat").glob("cat*.safetensors"))[-1]
    with safe_open(str(final), "pt") as f:
        assert f.metadata()["ss_steps"] == str(state.step + 2)


def test_run_a_workflow_headless_with_overrides_and_export_its_config(tmp_path, tiny_checkpoint, data):
    result = kiln("run", str(REPO / "example_workflows" / "train_sd15_lora.json"), "--set", f"dataset={data}",
                  "--set", "steps=2", "--set", f"base_model={tiny_checkpoint}", "--set", "resolution=64",
                  "--set", "name=wf", "--set", "KilnTrainSteps.preview_every=0", "--set", "KilnTrainSteps.save_every=0",
                  "--set", "KilnSaveLoRA.filename=wf_headless", cwd=tmp_path, timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "workflow train_sd15_lora.json: success" in result.stdout
    exported = kiln("export", str(REPO / "example_workflows" / "train_sd15_lora.json"), cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    cfg = yaml.safe_load(exported.stdout)
    assert cfg["max_steps"] == 500 and cfg["lora_rank"] == 16 and cfg["train_data_dir"] == "my_dataset"
