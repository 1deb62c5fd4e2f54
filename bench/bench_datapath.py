"""The data path on a real ComfyUI server: queue -> first training step, and what a re-queue costs.

    python bench/bench_datapath.py [--images 32] [--size 256]

Rows: first queue (scan + VAE encode + text encode + model load), re-queue with only Train Steps' step count
changed (Load Dataset comes from ComfyUI's cache), re-queue after touching one image (Load Dataset runs
again, only that image is re-encoded: the latent cache is keyed by content). Times are client-side, from
the server's execution_start to the first progress message of the Train Steps node.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "integration"))
from comfy_harness import ComfyServer, build_tiny_checkpoint, require_comfyui  # noqa: E402


def graph(folder: str, steps: int) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "2": {"class_type": "KilnLoadDataset", "inputs": {
            "folder": folder, "vae": ["1", 2], "clip": ["1", 1], "resolution": 256, "bucketing": True,
            "trigger_word": "", "repeats": 1, "caption_extension": ".txt", "on_error": "error"}},
        "3": {"class_type": "KilnInjectLoRA", "inputs": {
            "model": ["1", 0], "name": "datapath", "rank": 8, "alpha": 8.0, "targets": "attn+ff", "algorithm": "lora",
            "conv_rank": 0, "dropout": 0.0, "init_lora": "none", "seed": 0}},
        "4": {"class_type": "KilnTrainSteps", "inputs": {
            "state": ["3", 0], "dataset": ["2", 0], "steps": steps, "learning_rate": 1e-4, "optimizer": "adamw",
            "scheduler": "constant", "warmup_steps": 0, "schedule_steps": 0, "batch_size": 1, "grad_accum": 1,
            "precision": "auto", "gradient_checkpointing": False, "min_snr_gamma": 5.0, "noise_offset": 0.0,
            "save_every": 0, "preview_every": 0, "preview_prompt": "", "preview_seed": 0, "preview_size": 64,
            "preview_steps": 2, "retrain": True}},  # measures the way to the first step: never a reused run
        "5": {"class_type": "KilnSaveLoRA", "inputs": {"state": ["4", 0], "filename": "datapath", "dtype": "fp16",
                                                       "save_checkpoint": False}},
    }


def to_first_step(server: ComfyServer, g: dict) -> tuple[float, str]:
    marks: dict[str, float] = {}

    def on_message(kind: str, data: dict) -> None:
        if kind == "execution_start":
            marks.setdefault("start", time.monotonic())
        if kind == "progress" and data.get("node") == "4":
            marks.setdefault("first", time.monotonic())

    result = server.run(g, on_message=on_message, timeout=1800)
    assert result.status == "success", result.error
    cached = {n for d in result.of_type("execution_cached") for n in d["nodes"]}
    if "2" in cached:
        return marks["first"] - marks["start"], "not run (ComfyUI's cache)"
    lines = result.history["outputs"]["2"]["text"][0].splitlines()
    return marks["first"] - marks["start"], next(x for x in lines if x.startswith("latents:"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    comfy = require_comfyui()
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        ckpt = build_tiny_checkpoint(comfy, Path(tmp) / "tiny.safetensors")
        folder = base / "input" / "datapath"
        folder.mkdir(parents=True)
        for i in range(args.images):
            Image.effect_noise((args.size, args.size), 40 + i).convert("RGB").save(folder / f"{i:03d}.png")
            (folder / f"{i:03d}.txt").write_text(f"noise pattern number {i}")
        server = ComfyServer(comfy, base, ckpt)
        server.start()
        try:
            rows = [("first queue", *to_first_step(server, graph("datapath", 2)))]
            rows.append(("re-queue, only steps changed", *to_first_step(server, graph("datapath", 3))))
            os.utime(folder / "000.png")  # mtime changes: ComfyUI re-runs Load Dataset
            (folder / "001.png").write_bytes((folder / "001.png").read_bytes())
            Image.effect_noise((args.size, args.size), 999).convert("RGB").save(folder / "002.png")
            rows.append(("re-queue, one image replaced", *to_first_step(server, graph("datapath", 4))))
        finally:
            server.stop()
    print(f"\n{args.images} images of {args.size}x{args.size}, tiny SD1.5-shaped checkpoint (TAESD VAE), CPU")
    print("| queue | to first step (s) | ratio to first queue | Load Dataset says |")
    print("|---|---|---|---|")
    for name, seconds, text in rows:
        print(f"| {name} | {seconds:.2f} | {seconds / rows[0][1]:.2f} | {text} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
