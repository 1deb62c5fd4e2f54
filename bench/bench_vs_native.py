"""Kiln's Train Steps vs ComfyUI's own TrainLoraNode, on one real ComfyUI server, side by side.

s/step of each trainer = (time of a long run - time of a short run) / (step difference), so model loading,
encoding and saving cancel. Times come from the server's own execution_start / execution_success stamps.
Each case is measured ``--repeats`` times, the two trainers back to back; the ratio is the median of the
per-pair ratios (the machine this was written on is shared, and its speed drifts by 30 % within minutes).

    python bench/bench_vs_native.py                 # quick matrix (tiny + small UNet)
    python bench/bench_vs_native.py --full          # every combination of the issue's matrix
    python bench/bench_vs_native.py --models tiny   # just the 18.7 M-parameter UNet

Needs ComfyUI (found like the tests: $COMFYUI_PATH, custom_nodes/.., ~/comfy/ComfyUI).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "integration"))
from comfy_harness import ComfyServer, build_tiny_checkpoint, find_comfyui, make_images  # noqa: E402


@dataclass(frozen=True)
class Case:
    model: str  # tiny | small
    batch: int
    dtype: str  # fp32 | bf16
    ckpt: bool  # gradient checkpointing
    layers: str  # like  (every Linear/Conv on both sides) | defaults (each trainer's own defaults)


def native_graph(case: Case, steps: int, tag: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": f"{case.model}.safetensors"}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 4}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a kilnshape circle", "clip": ["1", 1]}},
        "4": {"class_type": "TrainLoraNode", "inputs": {
            "model": ["1", 0], "latents": ["2", 0], "positive": ["3", 0], "batch_size": case.batch,
            "grad_accumulation_steps": 1, "steps": steps, "learning_rate": 1e-4, "rank": 8, "optimizer": "AdamW",
            "loss_function": "MSE", "seed": 0, "training_dtype": case.dtype, "lora_dtype": case.dtype if case.dtype == "bf16" else "fp32",
            "algorithm": "LoRA", "gradient_checkpointing": case.ckpt, "existing_lora": "[None]"}},
        "5": {"class_type": "SaveLoRANode", "inputs": {"lora": ["4", 1], "prefix": f"loras/native_{tag}", "steps": ["4", 3]}},
    }


def kiln_graph(case: Case, steps: int, tag: str) -> dict:
    like = case.layers == "like"
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": f"{case.model}.safetensors"}},
        "2": {"class_type": "KilnLoadDataset", "inputs": {
            "folder": "bench", "vae": ["1", 2], "clip": ["1", 1], "resolution": 64, "bucketing": True,
            "trigger_word": "", "repeats": 1, "caption_extension": ".txt", "on_error": "error"}},
        "3": {"class_type": "KilnInjectLoRA", "inputs": {
            "model": ["1", 0], "name": f"bench_{tag}", "rank": 8, "alpha": 8.0,
            "targets": "all" if like else "attn+ff", "algorithm": "locon" if like else "lora", "conv_rank": 0,
            "dropout": 0.0, "init_lora": "none", "seed": 0}},
        "4": {"class_type": "KilnTrainSteps", "inputs": {
            "state": ["3", 0], "dataset": ["2", 0], "steps": steps, "learning_rate": 1e-4, "optimizer": "adamw",
            "scheduler": "constant", "warmup_steps": 0, "schedule_steps": 0, "batch_size": case.batch, "grad_accum": 1,
            "precision": case.dtype if like else "auto", "gradient_checkpointing": case.ckpt if like else False,
            "min_snr_gamma": 5.0, "noise_offset": 0.0, "save_every": 0, "preview_every": 0, "preview_prompt": "",
            "preview_seed": 0, "preview_size": 64, "preview_steps": 2}},
        "5": {"class_type": "KilnSaveLoRA", "inputs": {"state": ["4", 0], "filename": f"bench_{tag}", "dtype": "fp16",
                                                       "save_checkpoint": False}},
    }


def timed(server: ComfyServer, graph: dict) -> float:
    result = server.run(graph, timeout=3600)
    if result.status != "success":
        raise RuntimeError(json.dumps(result.error)[:2000])
    stamps = {k: d["timestamp"] for k, d in result.history["status"]["messages"]}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000.0


def sec_per_step(server: ComfyServer, build, case: Case, short: int, long: int, tag: str) -> float:
    t_short = timed(server, build(case, short, f"{tag}_s"))
    t_long = timed(server, build(case, long, f"{tag}_l"))
    return (t_long - t_short) / (long - short)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "small"], choices=["tiny", "small"])
    parser.add_argument("--full", action="store_true", help="every batch x dtype x checkpointing combination")
    parser.add_argument("--short", type=int, default=3)
    parser.add_argument("--long", type=int, default=23)
    parser.add_argument("--repeats", type=int, default=3, help="paired repetitions per case (median reported)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "vs_native.json")
    args = parser.parse_args()
    comfy = find_comfyui()
    if comfy is None:
        print("ComfyUI not found (set COMFYUI_PATH)", file=sys.stderr)
        return 2
    cases: list[Case] = []
    for model in args.models:
        if args.full:
            for batch, dtype, ckpt in itertools.product((1, 4), ("fp32", "bf16"), (False, True)):
                cases.append(Case(model, batch, dtype, ckpt, "like"))
        else:
            cases += [Case(model, 1, "fp32", False, "like"), Case(model, 4, "fp32", False, "like"),
                      Case(model, 1, "bf16", False, "like"), Case(model, 1, "fp32", True, "like")]
        cases.append(Case(model, 1, "bf16", True, "defaults"))  # TrainLoraNode's defaults vs Kiln's
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        ckpts = {m: build_tiny_checkpoint(comfy, Path(tmp) / f"{m}.safetensors", size=m) for m in args.models}
        server = ComfyServer(comfy, base, ckpts[args.models[0]])
        for m, path in ckpts.items():
            (base / "models" / "checkpoints" / f"{m}.safetensors").symlink_to(path)
        make_images(base / "input" / "bench", n=4)
        server.start()
        try:
            for i, case in enumerate(cases):
                timed(server, native_graph(case, 1, f"n{i}_warm"))  # loads and caches what a trainer does not redo
                timed(server, kiln_graph(case, 1, f"k{i}_warm"))
                natives, kilns = [], []
                for r in range(args.repeats):  # back to back, so machine noise hits both trainers alike
                    natives.append(sec_per_step(server, native_graph, case, args.short, args.long, f"n{i}_{r}"))
                    kilns.append(sec_per_step(server, kiln_graph, case, args.short, args.long, f"k{i}_{r}"))
                native, kiln = statistics.median(natives), statistics.median(kilns)
                ratio = statistics.median(k / n for k, n in zip(kilns, natives))
                row = {**case.__dict__, "native_s_per_step": native, "kiln_s_per_step": kiln, "ratio": ratio,
                       "native_samples": natives, "kiln_samples": kilns}
                rows.append(row)
                print(f"{case.model:5} b{case.batch} {case.dtype} ckpt={str(case.ckpt):5} {case.layers:8} "
                      f"native {native:.3f} s/step  kiln {kiln:.3f} s/step  kiln/native {ratio:.2f} "
                      f"(pairs: {', '.join(f'{k / n:.2f}' for k, n in zip(kilns, natives))})", flush=True)
        finally:
            server.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print("\n| UNet | batch | dtype | grad ckpt | layers | TrainLoraNode s/step | Kiln s/step | Kiln / native |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['dtype']} | {'on' if r['ckpt'] else 'off'} | {r['layers']} | "
              f"{r['native_s_per_step']:.3f} | {r['kiln_s_per_step']:.3f} | **{r['ratio']:.2f}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
