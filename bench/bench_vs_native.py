"""Kiln's Train Steps vs ComfyUI's own TrainLoraNode, on one real ComfyUI server, side by side.

s/step of each trainer = (time of a long run - time of a short run) / (step difference), so model loading,
encoding and saving cancel. Times come from the server's own execution_start / execution_success stamps.
Each case is measured ``--repeats`` times, the two trainers back to back; the ratio is the median of the
per-pair ratios (the machine this was written on is shared, and its speed drifts by 30 % within minutes).

    python bench/bench_vs_native.py                 # quick matrix (tiny + small UNet)
    python bench/bench_vs_native.py --full          # every combination of the issue's matrix
    python bench/bench_vs_native.py --models tiny   # just the 18.7 M-parameter UNet
    python bench/bench_vs_native.py --models sdxl --short 2 --long 12   # the 152 M SDXL UNet (CLIP-L + CLIP-G):
                                                    # batch 1 and 2, fp32, checkpointing off/on, 64 px
    python bench/bench_vs_native.py --models sdxl --res 128 --batches 1 # the same at 128 px (16x16 latents)
    python bench/bench_vs_native.py --models sd3 --short 2 --long 12    # the depth-2 SD3 MMDiT (flow matching)
    python bench/bench_vs_native.py --models flux --short 2 --long 6 --batches 1 --repeats 2
                                                    # the 545 M FLUX.1-dev (1 + 1 blocks) from UNETLoader, fp32
                                                    # and fp8-stored weights; text encoder: the tests' tiny T5 node
    python bench/bench_vs_native.py --models zimage flux2 qwen_image --short 3 --long 23 --batches 1
                                                    # ComfyUI v0.33+: the tests' tiny Z-Image, FLUX.2 (Klein-like)
                                                    # and Qwen-Image, fp32 and fp8-stored weights; text encoders:
                                                    # the tests' tiny Qwen3 / Qwen2.5-VL node
    python bench/bench_vs_native.py --models wan21 --short 3 --long 13 --batches 1
                                                    # the tests' tiny Wan 2.1 T2V on 9-frame clips (Kiln: a folder of
                                                    # .mp4 clips; TrainLoraNode: video latents of the same shape)
    python bench/bench_vs_native.py --models tiny_fp8 --bypass both    # the tiny UNet as an "fp8 scaled"
                                                    # checkpoint (quantized weights on ComfyUI >= 0.3.7x); the native
                                                    # trainer with bypass_mode off and on (ComfyUI >= 0.3.7x)

The native trainer's inputs are read from the server's /object_info, so the same script measures ComfyUI 0.3.64's
TrainLoraNode and v0.33's (list inputs, training_dtype, checkpoint_depth 2 = v0.3.64's per-block checkpointing,
bypass_mode, offloading off); each row records the ComfyUI version and the native settings it used.

Needs ComfyUI (found like the tests: $COMFYUI_PATH, custom_nodes/.., ~/comfy/ComfyUI).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "integration"))
from comfy_harness import (  # noqa: E402
    FILES_2026,
    ComfyServer,
    build_2026_files,
    build_tiny_checkpoint,
    link_models,
    make_images,
    require_comfyui,
    write_clip,
)


@dataclass(frozen=True)
class Case:
    model: str  # tiny | small | sdxl | sd3 | flux
    batch: int
    dtype: str  # fp32 | bf16
    ckpt: bool  # gradient checkpointing
    layers: str  # like  (every Linear/Conv on both sides) | defaults (each trainer's own defaults)
    res: int = 64  # image side in pixels (both trainers: latents of res / 8)
    weights: str = "default"  # FLUX: UNETLoader's weight_dtype (default = fp32 on the CPU, or fp8_e4m3fn)
    bypass: bool = False  # the native trainer's bypass_mode (ComfyUI >= 0.3.7x: adapters by forward hooks)


FLOW = ("sd3", "flux", "zimage", "flux2", "qwen_image", "wan21")
VIDEO_FRAMES = 9  # wan21: both trainers on 9-frame clips (3 latent frames); Kiln's from a folder of clips
# the 2026 families (ComfyUI v0.33+): (model node, TestTinyQwenCLIP type, VAELoader name); tiny models as the tests'
FAMILIES_2026 = {
    "zimage": ({"class_type": "TestTinyDiffusionModel", "inputs": {"model": "ZImage", "seed": 0}}, "lumina2",
               "tiny_taesd16.safetensors"),
    "flux2": ({"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_flux2.safetensors"}}, "flux2", "taef2"),
    "qwen_image": ({"class_type": "TestTinyDiffusionModel", "inputs": {"model": "QwenImage", "seed": 0}}, "qwen_image",
                   "tiny_wan21.safetensors"),
    # Wan 2.1 T2V (issue 23): the tests' tiny file for UNETLoader, the one-layer UMT5 node, the width-8 Wan 2.1 VAE
    "wan21": ({"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_wan21_t2v.safetensors"}}, "wan",
              "tiny_wan21.safetensors"),
}


def loaders(case: Case) -> dict:
    """Nodes "1" (MODEL at 0, CLIP at 1, VAE at 2 of a checkpoint) or, for FLUX, "1" UNETLoader, "6" the tests'
    tiny FLUX text encoder, "7" VAELoader; returns the links {model, clip, vae} too."""
    if case.model in FAMILIES_2026:
        model, clip_type, vae = FAMILIES_2026[case.model]
        model = {"class_type": model["class_type"], "inputs": {**model["inputs"], "weight_dtype": case.weights}}
        clip = {"class_type": "TestTinyWanCLIP", "inputs": {"seed": 0, "min_length": 32}} if clip_type == "wan" else \
            {"class_type": "TestTinyQwenCLIP", "inputs": {"type": clip_type, "seed": 0}}
        return {"nodes": {
            "1": model, "6": clip,
            "7": {"class_type": "VAELoader", "inputs": {"vae_name": vae}}},
            "model": ["1", 0], "clip": ["6", 0], "vae": ["7", 0]}
    if case.model == "flux":
        return {"nodes": {
            "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux.safetensors", "weight_dtype": case.weights}},
            "6": {"class_type": "TestTinyFluxCLIP", "inputs": {"seed": 0, "t5_min_length": 256}},
            "7": {"class_type": "VAELoader", "inputs": {"vae_name": "flux_vae.safetensors"}}},
            "model": ["1", 0], "clip": ["6", 0], "vae": ["7", 0]}
    return {"nodes": {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": f"{case.model}.safetensors"}}},
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2]}


NATIVE: dict = {}  # the server's TrainLoraNode / SaveLoRA as /object_info describes them (native_probe)


def install_2026_files(comfy: Path, tmp: Path, base: Path) -> None:
    """The tests' 2026-family files (comfy_harness.FILES_2026), built in ``tmp`` once, into server base ``base``."""
    link_models(build_2026_files(comfy, tmp), base, FILES_2026)


def native_probe(server: ComfyServer) -> dict:
    """What this ComfyUI's native trainer takes and returns: v0.3.64 (SaveLoRANode; outputs model, lora, loss,
    steps) or v0.33 (SaveLoRA; outputs lora, loss_map, steps; more required inputs, all list inputs)."""
    info = server.get("/object_info")
    train = info["TrainLoraNode"]
    NATIVE.update(inputs={**train["input"]["required"], **train["input"].get("optional", {})},
                  required=set(train["input"]["required"]), lora=train["output_name"].index("lora"),
                  steps=train["output_name"].index("steps"), save="SaveLoRA" if "SaveLoRA" in info else "SaveLoRANode")
    return NATIVE


def native_graph(case: Case, steps: int, tag: str) -> dict:
    ld = loaders(case)
    train = {"model": ld["model"], "latents": ["2", 0], "positive": ["3", 0], "batch_size": case.batch,
             "grad_accumulation_steps": 1, "steps": steps, "learning_rate": 1e-4, "rank": 8, "optimizer": "AdamW",
             "loss_function": "MSE", "seed": 0, "training_dtype": case.dtype,
             "lora_dtype": case.dtype if case.dtype == "bf16" else "fp32", "algorithm": "LoRA",
             "gradient_checkpointing": case.ckpt, "existing_lora": "[None]"}
    newer = {"quantized_backward": False, "offloading": False, "bucket_mode": False, "bypass_mode": case.bypass,
             "checkpoint_depth": 2}  # depth 2 = one checkpoint per block, what v0.3.64 did (1 = the whole model)
    train.update({k: v for k, v in newer.items() if k in NATIVE["inputs"]})
    if missing := NATIVE["required"] - set(train):  # a ComfyUI newer than this script: say so, never guess
        raise RuntimeError(f"this ComfyUI's TrainLoraNode needs inputs the bench does not set: {sorted(missing)}")
    return {
        **ld["nodes"],
        # the latent each model's own template starts from (Qwen-Image: a one-frame video latent, [B, 16, 1, h, w])
        # (Wan: a 9-frame video latent, [B, 16, 3, h, w], as the clips Kiln reads)
        "2": {"class_type": "EmptyFlux2LatentImage" if case.model == "flux2" else
              "EmptyHunyuanLatentVideo" if case.model in ("qwen_image", "wan21") else
              "EmptySD3LatentImage" if case.model in FLOW else "EmptyLatentImage",
              "inputs": {"width": case.res, "height": case.res, "batch_size": 4,
                         **({"length": 1} if case.model == "qwen_image" else
                            {"length": VIDEO_FRAMES} if case.model == "wan21" else {})}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a kilnshape circle", "clip": ld["clip"]}},
        "4": {"class_type": "TrainLoraNode", "inputs": train},
        "5": {"class_type": NATIVE["save"], "inputs": {"lora": ["4", NATIVE["lora"]], "prefix": f"loras/native_{tag}",
                                                       "steps": ["4", NATIVE["steps"]]}},
    }


def image_folder(res: int) -> str:
    """Input folder of 4 captioned images of res x res (the 64 px one is the original ``bench``)."""
    return "bench" if res == 64 else f"bench{res}"


def clip_folder(res: int) -> str:
    """Input folder of 4 captioned clips of res x res, 12 frames at 16 fps (one 9-frame window each)."""
    return f"benchclips{res}"


def kiln_graph(case: Case, steps: int, tag: str) -> dict:
    like = case.layers == "like"
    ld = loaders(case)
    return {
        **ld["nodes"],
        "2": {"class_type": "KilnLoadDataset", "inputs": {
            "folder": clip_folder(case.res) if case.model == "wan21" else image_folder(case.res), "vae": ld["vae"],
            "clip": ld["clip"], "resolution": case.res, "bucketing": True,
            "trigger_word": "", "repeats": 1, "caption_extension": ".txt", "on_error": "error",
            **({"frames": VIDEO_FRAMES} if case.model == "wan21" else {})}},
        "3": {"class_type": "KilnInjectLoRA", "inputs": {
            "model": ld["model"], "name": f"bench_{tag}", "rank": 8, "alpha": 8.0,
            "targets": "all" if like else "attn+ff", "algorithm": "locon" if like else "lora", "conv_rank": 0,
            "dropout": 0.0, "init_lora": "none", "seed": 0}},
        "4": {"class_type": "KilnTrainSteps", "inputs": {
            "state": ["3", 0], "dataset": ["2", 0], "steps": steps, "learning_rate": 1e-4, "optimizer": "adamw",
            "scheduler": "constant", "warmup_steps": 0, "schedule_steps": 0, "batch_size": case.batch, "grad_accum": 1,
            "precision": case.dtype if like else "auto", "gradient_checkpointing": case.ckpt if like else False,
            "min_snr_gamma": 0.0 if case.model in FLOW else 5.0, "noise_offset": 0.0, "save_every": 0,
            "timestep_sampling": "uniform",
            "preview_every": 0, "preview_prompt": "",
            "preview_seed": 0, "preview_size": 64, "preview_steps": 2,
            "retrain": True}},  # every run trains: a repeat must not reuse the identical earlier run (issue 15)
        "5": {"class_type": "KilnSaveLoRA", "inputs": {"state": ["4", 0], "filename": f"bench_{tag}", "dtype": "fp16",
                                                       "save_checkpoint": False}},
    }


def server_cpu_seconds(server: ComfyServer) -> float:
    """User + system CPU time of the server process so far, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{server.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


CLOCKS: dict[str, float] = {}  # the last timed() call's wall and CPU seconds, for the log


def timed(server: ComfyServer, graph: dict, clock: str = "wall") -> float:
    cpu = server_cpu_seconds(server)
    result = server.run(graph, timeout=3600)
    if result.status != "success":
        raise RuntimeError(json.dumps(result.error)[:2000])
    stamps = {k: d["timestamp"] for k, d in result.history["status"]["messages"]}
    CLOCKS.update(wall=(stamps["execution_success"] - stamps["execution_start"]) / 1000.0,
                  cpu=server_cpu_seconds(server) - cpu)  # the CPU time the prompt cost: robust on a loaded machine
    return CLOCKS[clock]


def sec_per_step(server: ComfyServer, build, case: Case, short: int, long: int, tag: str, clock: str = "wall",
                 settle: bool = False) -> float:
    if settle:  # one discarded 1-step run first: whatever switching trainers costs is not in the short run alone
        timed(server, build(case, 1, f"{tag}_w"), clock)
    t_short = timed(server, build(case, short, f"{tag}_s"), clock)
    short_clocks = dict(CLOCKS)
    t_long = timed(server, build(case, long, f"{tag}_l"), clock)
    if clock != "wall" or settle:
        print(f"    {tag}: short {short_clocks['wall']:.2f} s wall {short_clocks['cpu']:.2f} CPU-s, "
              f"long {CLOCKS['wall']:.2f} s wall {CLOCKS['cpu']:.2f} CPU-s", flush=True)
    return (t_long - t_short) / (long - short)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "small"],
                        choices=["tiny", "small", "tiny_fp8", "sdxl", "sd3", "flux", *FAMILIES_2026])
    parser.add_argument("--bypass", default="off", choices=["off", "on", "both"],
                        help="the native trainer's bypass_mode (ComfyUI >= 0.3.7x; ignored where it has none)")
    parser.add_argument("--res", type=int, default=64, help="image side in px (SD1.5 rows were all measured at 64)")
    parser.add_argument("--batches", type=int, nargs="+", help="SDXL/SD3 only: the batch sizes (default 1 2)")
    parser.add_argument("--no-defaults", action="store_true", help="skip the each-trainer's-defaults case")
    parser.add_argument("--full", action="store_true", help="every batch x dtype x checkpointing combination")
    parser.add_argument("--short", type=int, default=3)
    parser.add_argument("--long", type=int, default=23)
    parser.add_argument("--repeats", type=int, default=3, help="paired repetitions per case (median reported)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "vs_native.json")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="wall: the server's execution stamps; cpu: CPU-seconds the server process used per step "
                             "(all threads), for a machine other jobs load")
    parser.add_argument("--settle", action="store_true",
                        help="a discarded 1-step run of each trainer before its short run (for small step counts)")
    args = parser.parse_args()
    if args.short < 2 or args.long <= args.short:
        # TrainLoraNode's inputs do not change with the tag: a 1-step run after the 1-step warm-up (or settle run)
        # would be ComfyUI's cached result, not a run
        parser.error("need 2 <= --short < --long")
    comfy = require_comfyui()
    cases: list[Case] = []
    for model in args.models:
        if model in FAMILIES_2026:  # fp32 compute; checkpointing off and on with fp32 weights, fp8-stored weights
            for batch in args.batches or (1,):
                cases += [Case(model, batch, "fp32", ckpt, "like", args.res, weights)
                          for ckpt, weights in ((False, "default"), (True, "default"), (True, "fp8_e4m3fn"))]
        elif model == "flux":  # fp32 compute, checkpointing on; fp32- and fp8-stored weights
            for batch, weights in itertools.product(args.batches or (1,), ("default", "fp8_e4m3fn")):
                cases.append(Case(model, batch, "fp32", True, "like", args.res, weights))
        elif model in ("sdxl", "sd3"):  # fp32 (the fast path on a CPU for both), checkpointing off and on
            for batch, ckpt in itertools.product(args.batches or (1, 2), (False, True)):
                cases.append(Case(model, batch, "fp32", ckpt, "like", args.res))
        elif args.full:
            for batch, dtype, ckpt in itertools.product((1, 4), ("fp32", "bf16"), (False, True)):
                cases.append(Case(model, batch, dtype, ckpt, "like", args.res))
        else:
            cases += [Case(model, batch, dtype, ckpt, "like", args.res)
                      for batch, dtype, ckpt in ((1, "fp32", False), (4, "fp32", False), (1, "bf16", False),
                                                 (1, "fp32", True))]
        if not args.no_defaults and model != "flux" and model not in FAMILIES_2026:
            cases.append(Case(model, 1, "bf16", True, "defaults", args.res))  # TrainLoraNode's defaults vs Kiln's
    bypass = {"off": (False,), "on": (True,), "both": (False, True)}[args.bypass]
    cases = [Case(**{**c.__dict__, "bypass": b}) for c in cases for b in bypass]
    rows = []
    unit = "s/step" if args.clock == "wall" else "CPU-s/step"
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        checkpoints = [m for m in args.models if m != "flux" and m not in FAMILIES_2026]
        ckpts = {m: build_tiny_checkpoint(comfy, Path(tmp) / f"{m}.safetensors", size=m.removesuffix("_fp8"),
                                          flags=("--quant", "scaled_fp8") if m.endswith("_fp8") else ())
                 for m in checkpoints or ["tiny"]}
        server = ComfyServer(comfy, base, next(iter(ckpts.values())))
        for m, path in ckpts.items():
            if m in checkpoints:
                (base / "models" / "checkpoints" / f"{m}.safetensors").symlink_to(path)
        if "flux" in args.models:  # UNETLoader + VAELoader files; the text encoder is the tests' TestTinyFluxCLIP
            for folder in ("diffusion_models", "vae"):
                (base / "models" / folder).mkdir(parents=True, exist_ok=True)
            vae = Path(tmp) / "flux_vae.safetensors"
            build_tiny_checkpoint(comfy, Path(tmp) / "flux.safetensors", size="flux", flags=("--vae", str(vae)))
            (base / "models" / "diffusion_models" / "flux.safetensors").symlink_to(Path(tmp) / "flux.safetensors")
            (base / "models" / "vae" / "flux_vae.safetensors").symlink_to(vae)
        if set(args.models) & set(FAMILIES_2026):  # the tests' tiny FLUX.2 file and the three VAEs
            install_2026_files(comfy, Path(tmp), base)
        make_images(base / "input" / image_folder(args.res), n=4, size=(args.res, args.res))
        if "wan21" in args.models:
            for k in range(4):
                clip = write_clip(base / "input" / clip_folder(args.res) / f"clip{k}.mp4", 12, 16,
                                  size=(args.res, args.res), seed=k)
                clip.with_suffix(".txt").write_text(f"a kilnshape disc moving, clip {k}")
        server.start()
        native_probe(server)
        version = server.get("/system_stats")["system"].get("comfyui_version", "?")
        print(f"ComfyUI {version} at {comfy}; native trainer: {NATIVE['save']}, inputs {sorted(NATIVE['inputs'])}",
              flush=True)
        try:
            for i, case in enumerate(cases):
                try:  # loads and caches what a trainer does not redo
                    timed(server, native_graph(case, 1, f"n{i}_warm"))
                    native_error = None
                except RuntimeError as exc:  # TrainLoraNode cannot train this model: Kiln's row alone, with the reason
                    native_error = str(exc)[:300]
                    print(f"    TrainLoraNode failed on {case}: {native_error}", flush=True)
                timed(server, kiln_graph(case, 1, f"k{i}_warm"))
                natives, kilns = [], []
                for r in range(args.repeats):  # back to back, so machine noise hits both trainers alike
                    if native_error is None:
                        natives.append(sec_per_step(server, native_graph, case, args.short, args.long, f"n{i}_{r}",
                                                    args.clock, args.settle))
                    kilns.append(sec_per_step(server, kiln_graph, case, args.short, args.long, f"k{i}_{r}",
                                              args.clock, args.settle))
                kiln = statistics.median(kilns)
                native = statistics.median(natives) if natives else float("nan")
                ratio = statistics.median(k / n for k, n in zip(kilns, natives)) if natives else float("nan")
                row = {**case.__dict__, "comfyui": version, "clock": args.clock, "settle": args.settle, "native_s_per_step": native,
                       "kiln_s_per_step": kiln, "ratio": ratio, "native_samples": natives, "kiln_samples": kilns,
                       "native_error": native_error}
                rows.append(row)
                print(f"{case.model:5} {case.res}px b{case.batch} {case.dtype} ckpt={str(case.ckpt):5} {case.layers:8} "
                      f"weights={case.weights} bypass={case.bypass} "
                      f"native {native:.3f} {unit}  kiln {kiln:.3f} {unit}  kiln/native {ratio:.2f} "
                      f"(pairs: {', '.join(f'{k / n:.2f}' for k, n in zip(kilns, natives))})", flush=True)
        finally:
            server.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print(f"\n| ComfyUI | UNet | px | batch | dtype | weights | grad ckpt | layers | native bypass | TrainLoraNode {unit} | "
          f"Kiln {unit} | Kiln / native |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['comfyui']} | {r['model']} | {r['res']} | {r['batch']} | {r['dtype']} | {r['weights']} | "
              f"{'on' if r['ckpt'] else 'off'} | {r['layers']} | {'on' if r['bypass'] else 'off'} | "
              f"{r['native_s_per_step']:.3f} | {r['kiln_s_per_step']:.3f} | **{r['ratio']:.2f}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
