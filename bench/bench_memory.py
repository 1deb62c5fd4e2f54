"""Peak memory (RSS) of one process each: Kiln training, ComfyUI's TrainLoraNode, plain inference.

    python bench/bench_memory.py [--size small] [--steps 5]
    python bench/bench_memory.py --size sdxl     # the 152 M SDXL UNet with the full CLIP-L + CLIP-G
    python bench/bench_memory.py --size sd3      # the depth-2 SD3 MMDiT with the full CLIP-L + CLIP-G
    python bench/bench_memory.py --size zimage flux2 qwen_image   # ComfyUI v0.33: the tests' tiny 2026 models

Each graph runs in its own fresh process (``kiln.py run``, ComfyUI as a library, no web server), so the peak
RSS belongs to that job alone. Same checkpoint, 64x64, batch 1, rank 8. The 2026 families' tiny models come from
the tests' fixture nodes, which only a server loads: each of their jobs runs in a fresh server process instead, and
its peak is that process's ``VmHWM`` after the job.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests" / "integration"))
from bench_vs_native import (  # noqa: E402
    FAMILIES_2026,
    Case,
    install_2026_files,
    kiln_graph,
    native_graph,
    native_probe,
)

from comfy_harness import ComfyServer, build_tiny_checkpoint, make_images, require_comfyui  # noqa: E402

PROBE = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
)


def peak_mib(graph: dict, tmp: Path, tag: str, ckpt: Path) -> float:
    path = tmp / f"{tag}.json"
    path.write_text(json.dumps(graph))
    proc = subprocess.run([sys.executable, "-c", PROBE, sys.executable, str(REPO / "kiln.py"), "run", str(path),
                           "--set", f"base_model={ckpt}"],
                          capture_output=True, text=True, cwd=tmp)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
    kb = next(int(x.split()[1]) for x in proc.stdout.splitlines() if x.startswith("PEAK_KB"))
    return kb / 1024


def inference_graph(model: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": f"{model}.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a kilnshape circle", "clip": ["1", 1]}},
        "3": {"class_type": "EmptySD3LatentImage" if model == "sd3" else "EmptyLatentImage",
              "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "KSampler", "inputs": {"seed": 0, "steps": 5, "cfg": 7.0, "sampler_name": "euler",
                                                   "scheduler": "normal", "denoise": 1.0, "model": ["1", 0],
                                                   "positive": ["2", 0], "negative": ["2", 0], "latent_image": ["3", 0]}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "mem"}},
    }


def probe_native(comfy: Path, base: Path, ckpt: Path) -> None:
    """The native trainer's inputs, as this ComfyUI has them (bench_vs_native.native_probe on a throwaway server)."""
    probe = ComfyServer(comfy, base, ckpt)
    probe.start()
    try:
        native_probe(probe)
    finally:
        probe.stop()


def server_peak_mib(comfy: Path, tmp: Path, tag: str, graph: dict, folder: Path) -> float:
    """Peak RSS (VmHWM) of a fresh server process that ran ``graph`` once."""
    base = tmp / f"srv_{tag}"
    install_2026_files(comfy, tmp, base)
    server = ComfyServer(comfy, base, tmp / "tiny_flux2.safetensors")
    (base / "input").mkdir(parents=True, exist_ok=True)
    (base / "input" / "bench").symlink_to(folder)
    server.start()
    try:
        result = server.run(graph, timeout=1200)
        if result.status != "success":
            raise RuntimeError(json.dumps(result.error)[:2000])
        status = Path(f"/proc/{server.proc.pid}/status").read_text()
        return int(next(x for x in status.splitlines() if x.startswith("VmHWM")).split()[1]) / 1024
    finally:
        server.stop()


def families_2026(comfy: Path, sizes: list[str], steps: int) -> int:
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        folder = make_images(tmp / "images", n=4)
        install_2026_files(comfy, tmp, tmp / "probe")
        probe_native(comfy, tmp / "probe", tmp / "tiny_flux2.safetensors")
        rows = []
        for size in sizes:
            case = Case(size, 1, "fp32", True, "like")
            for label, graph in (("ComfyUI TrainLoraNode, fp32, all layers", native_graph(case, steps, "m")),
                                 ("Kiln, fp32, all layers (locon)", kiln_graph(case, steps, "m"))):
                rows.append((size, label, server_peak_mib(comfy, tmp, f"{size}{len(rows)}", graph, folder)))
    print(f"\n64x64, batch 1, rank 8, gradient checkpointing on, {steps} steps; peak RSS of a fresh server process")
    print("| model | job | peak RSS (MiB) |")
    print("|---|---|---|")
    for size, label, mib in rows:
        print(f"| {size} | {label} | {mib:.0f} |")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", nargs="+", default=["small"], choices=["tiny", "small", "sdxl", "sd3", *FAMILIES_2026])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    comfy = require_comfyui()
    if set(args.size) & set(FAMILIES_2026):
        if not set(args.size) <= set(FAMILIES_2026):
            parser.error("measure the 2026 families (server processes) and the others (kiln.py run) in separate calls")
        return families_2026(comfy, args.size, args.steps)
    if len(args.size) > 1:
        parser.error("one --size at a time, except for the 2026 families")
    args.size = args.size[0]
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        ckpt = build_tiny_checkpoint(comfy, tmp / f"{args.size}.safetensors", size=args.size)
        make_images(tmp / "bench", n=4)
        probe_native(comfy, tmp / "probe", ckpt)

        rows = []
        for label, g in (
            ("inference (KSampler, 5 steps)", inference_graph(args.size)),
            ("ComfyUI TrainLoraNode, fp32, all layers", native_graph(Case(args.size, 1, "fp32", False, "like"), args.steps, "m")),
            ("Kiln, fp32, all layers (locon)", kiln_graph(Case(args.size, 1, "fp32", False, "like"), args.steps, "m")),
            ("Kiln, fp32, attn+ff (default)", kiln_graph(Case(args.size, 1, "fp32", False, "defaults"), args.steps, "d")),
        ):
            if g["2"]["class_type"] == "KilnLoadDataset":
                g["2"]["inputs"]["folder"] = str(tmp / "bench")
            rows.append((label, peak_mib(g, tmp, label.split()[0].lower() + str(len(rows)), ckpt)))
    base = rows[0][1]
    print(f"\nUNet {args.size}, 64x64, batch 1, rank 8, {args.steps} steps; peak RSS of the whole process")
    print("| job | peak RSS (MiB) | vs inference |")
    print("|---|---|---|")
    for label, mib in rows:
        print(f"| {label} | {mib:.0f} | {mib / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
