"""Every phase that makes a user wait shows progress: Load Dataset, Train Steps' caption encoding and model load.

In the UI (progress messages and progress text on a real server, Cancel) and in kiln.py's terminal.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import yaml

from comfy_harness import REPO, make_images, tiny_train_workflow

PHASE = "Load Dataset: encoding latents"


def load_dataset_graph(folder: str, resolution: int = 64) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "2": {"class_type": "KilnLoadDataset", "inputs": {
            "folder": folder, "vae": ["1", 2], "clip": ["1", 1], "resolution": resolution, "bucketing": True,
            "trigger_word": "", "repeats": 1, "caption_extension": ".txt", "on_error": "error"}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}},
    }


def distinct_images(folder, n: int, size: int) -> None:
    """``n`` images with different content (make_images repeats six colours, which the latent cache shares)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"noise_{i:03d}.png")
        (folder / f"noise_{i:03d}.txt").write_text(f"noise {i}", encoding="utf-8")


def texts_of(result, node: str) -> list[str]:
    return [d["text"] for d in result.of_type("progress_text") if d["node"] == node]


def test_load_dataset_reports_every_image_and_names_the_phase(server):
    make_images(server.base / "input" / "progress_set", n=6)
    result = server.run(load_dataset_graph("progress_set"))
    assert result.status == "success", result.error
    values = [(d["value"], d["max"]) for d in result.of_type("progress") if d["node"] == "2"]
    # one update per image, which ComfyUI sends on (v0.33 drops those closer than about 100 ms to the last one sent,
    # keeping the first and the last)
    assert values[0] == (1, 6) and values[-1] == (6, 6) and values == sorted(set(values))
    assert set(values) <= {(i, 6) for i in range(1, 7)}
    texts = texts_of(result, "2")
    assert texts[0] == "Load Dataset: checking the images in progress_set…"
    counted = [t for t in texts if t.startswith(PHASE)]
    assert counted[0].startswith(f"{PHASE} 0/6 images")
    assert re.fullmatch(rf"{PHASE} 6/6 images · [\d.]+ images/s · ETA 0:00", counted[-1]), counted[-1]
    assert len(counted) <= 8  # throttled: the first, at most 4 a second, the last


def test_cancel_stops_a_slow_load_dataset_between_images(server):
    n = 10
    distinct_images(server.base / "input" / "progress_slow", n, 256)
    seen: list[tuple[float, int]] = []

    def on_message(kind, data):
        if kind == "progress" and data.get("node") == "2":
            seen.append((time.monotonic(), data["value"]))
            if len(seen) == 2:
                server.interrupt()

    result = server.run(load_dataset_graph("progress_slow", resolution=256), on_message=on_message, timeout=300)
    stopped = time.monotonic()
    assert result.status == "interrupted"
    assert seen and seen[-1][1] <= 4 < n  # stopped within an image or two of the request
    assert stopped - seen[1][0] < 30
    assert not result.of_type("executed")  # nothing downstream ran
    assert server.get("/system_stats")
    again = server.run(load_dataset_graph("progress_slow", resolution=256), timeout=600)  # and the next run works
    assert again.status == "success", again.error
    summary = again.history["outputs"]["2"]["text"][0]
    assert f"{n} images" in summary and f"latents: {n} encoded" not in summary  # what was done before Cancel is kept


def test_train_steps_reports_model_loading_and_caption_encoding(server):
    result = server.run(tiny_train_workflow("phases", steps=2))
    assert result.status == "success", result.error
    texts = texts_of(result, "4")
    assert "Train Steps: loading the model for training…" in texts
    encoding = [t for t in texts if t.startswith("Train Steps: encoding captions")]
    assert encoding[0].startswith("Train Steps: encoding captions 0/4 captions")
    assert encoding[-1].startswith("Train Steps: encoding captions 4/4 captions · ")
    order = [i for i, t in enumerate(texts) if t.startswith("Train Steps:")] + [
        i for i, t in enumerate(texts) if t.startswith("step ")]
    assert order == sorted(order)  # both phases come before the first step


def test_kiln_py_prints_the_phases_as_progress_lines(tmp_path, tiny_checkpoint):
    data = make_images(tmp_path / "shapes", n=3)
    cfg = {"base_model": str(tiny_checkpoint), "train_data_dir": str(data), "output_dir": str(tmp_path / "out"),
           "output_name": "phases", "resolution": 64, "lora_rank": 4, "lora_alpha": 4, "max_steps": 2,
           "learning_rate": 1e-3}
    (tmp_path / "phases.yaml").write_text(yaml.safe_dump(cfg))
    result = subprocess.run([sys.executable, str(REPO / "kiln.py"), str(tmp_path / "phases.yaml")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    err = result.stderr
    assert "Load Dataset: checking the images in shapes…" in err
    assert re.search(rf"\[#+\] {PHASE} 3/3 images · [\d.]+ images/s · ETA 0:00", err), err[-3000:]
    assert "Train Steps: loading the model for training…" in err
    assert re.search(r"\] Train Steps: encoding captions 3/3 captions", err), err[-3000:]
    assert "Step 2/2" in err
    assert not re.search(r"^step \d+ \(", err, re.M)  # the step text is printed once, as the training line
