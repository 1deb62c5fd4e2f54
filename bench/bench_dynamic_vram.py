"""Dynamic VRAM (ComfyUI >= 0.3.7x on NVIDIA) vs --disable-dynamic-vram: the same gradients, peak VRAM, s/step.

Kiln's policy (README, "ComfyUI versions"): Train Steps trains on a non-dynamic copy of a Dynamic VRAM model. This
checks it on a real GPU, with two ComfyUI servers on the same tiny SD1.5 checkpoint (or ``--size small|sd15``):

- gradients: one SGD step at learning rate 1 from the same seeded adapters, no clipping; the LoRA's up matrices start
  at zero, so after the step they are exactly -grad. Saved in fp32 by Save LoRA and compared between the servers
  (max |difference| relative to the largest value; bf16 rounding is about 4e-3);
- s/step: (time of a 12-step run - time of a 2-step run) / 10, from the server's execution stamps;
- peak VRAM: nvidia-smi's memory.used, polled every 0.1 s during the long run (the whole process: ComfyUI included);
- which path ran: the server log's "training on a non-dynamic copy" line.

    python bench/bench_dynamic_vram.py                  # on the GPU machine (bench/gpu_dynamic_vram.sh)
    python bench/bench_dynamic_vram.py --cpu            # a CPU smoke test: both servers take the same path

Needs ComfyUI (found like the tests: $COMFYUI_PATH, custom_nodes/.., ~/comfy/ComfyUI).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "integration"))
from comfy_harness import (  # noqa: E402
    ComfyServer,
    build_tiny_checkpoint,
    make_images,
    require_comfyui,
    tiny_train_workflow,
)


def vram_poller(samples: list[int], stop: threading.Event) -> None:
    while not stop.wait(0.1):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5).stdout
            samples.append(int(out.split()[0]))
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            return


def train(server: ComfyServer, name: str, steps: int, res: int, precision: str) -> tuple[dict, float]:
    wf = tiny_train_workflow(name, steps=steps, learning_rate=1.0, optimizer="sgd", max_grad_norm=0.0,
                             min_snr_gamma=0.0, precision=precision, batch_size=1, retrain=True)
    wf["2"]["inputs"].update(resolution=res)
    wf["5"]["inputs"].update(dtype="fp32")
    result = server.run(wf, timeout=1800)
    if result.status != "success":
        raise RuntimeError(json.dumps(result.error)[:2000])
    stamps = {k: d["timestamp"] for k, d in result.history["status"]["messages"]}
    return result.history, (stamps["execution_success"] - stamps["execution_start"]) / 1000.0


def measure(comfy: Path, base: Path, ckpt: Path, flags: list[str], cpu: bool, res: int, precision: str) -> dict:
    from safetensors.torch import load_file

    server = ComfyServer(comfy, base, ckpt, extra_args=flags, cpu=cpu)
    make_images(base / "input" / "shapes", n=4, size=(res, res))
    server.start()
    try:
        train(server, "grad", 1, res, precision)
        ups = {k: v for k, v in load_file(str(base / "models" / "loras" / "grad.safetensors")).items()
               if k.endswith("lora_up.weight")}
        _, short = train(server, "speed_s", 2, res, precision)
        samples: list[int] = []
        stop = threading.Event()
        poller = threading.Thread(target=vram_poller, args=(samples, stop), daemon=True)
        poller.start()
        _, long = train(server, "speed_l", 12, res, precision)
        stop.set()
        poller.join()
        log = server.log()
    finally:
        server.stop()
    return {"flags": flags, "ups": ups, "s_per_step": (long - short) / 10,
            "peak_vram_mib": max(samples) if samples else None,
            "non_dynamic_copy": "training on a non-dynamic copy" in log,
            "dynamic_vram_log": [line for line in log.splitlines() if "aimdo" in line.lower() or "dynamic vram" in line.lower()][:5]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=["tiny", "small", "sd15"])
    parser.add_argument("--res", type=int, default=512)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32", "auto"])
    parser.add_argument("--cpu", action="store_true", help="a CPU smoke test (both servers run --cpu)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "dynamic_vram.json")
    args = parser.parse_args()
    comfy = require_comfyui()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_tiny_checkpoint(comfy, Path(tmp) / f"{args.size}.safetensors", size=args.size)
        runs = {}
        for label, flags in (("dynamic (ComfyUI's default)", []), ("--disable-dynamic-vram", ["--disable-dynamic-vram"])):
            base = Path(tmp) / label.split()[0].strip("-")
            base.mkdir()
            runs[label] = measure(comfy, base, ckpt, flags, args.cpu, args.res, args.precision)
    (a_label, a), (b_label, b) = runs.items()
    worst = 0.0
    for key, up in a["ups"].items():
        other = b["ups"][key]
        worst = max(worst, float((up - other).abs().max() / up.abs().max().clamp(min=1e-12)))
    rows = {label: {k: v for k, v in r.items() if k != "ups"} for label, r in runs.items()}
    report = {"size": args.size, "res": args.res, "precision": args.precision, "cpu": args.cpu,
              "max_relative_gradient_difference": worst, "layers": len(a["ups"]), "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    print("\n| ComfyUI start | s/step | peak VRAM (MiB) | trained on a non-dynamic copy |")
    print("|---|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} | {r['s_per_step']:.3f} | {r['peak_vram_mib']} | {r['non_dynamic_copy']} |")
    print(f"gradients: max relative difference {worst:.2e} over {len(a['ups'])} layers "
          f"({'equal within bf16 rounding' if worst < 8e-3 else 'NOT equal within bf16 rounding'})")
    return 0 if worst < 8e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
