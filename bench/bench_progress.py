"""What Load Dataset's progress reporting costs while it encodes latents: the same images with and without it.

    python bench/bench_progress.py [--images 32] [--size 64] [--repeats 11]

One process: ComfyUI imported as a library (kiln.py's boot), the tiny SD1.5-shaped checkpoint's VAE, ``--images``
distinct random images at ``--size`` px. Each repeat encodes them all twice, once through
``nodes.dataset.encode_records`` with ``reporting.ItemProgress`` (progress bar every image, throttled progress
text, Cancel check) and once with none, in alternating order, with the latent cache emptied before every pass.
The progress goes where it goes in the UI: ComfyUI's own ``PromptServer`` (its message queue; no browser
attached) through a progress hook that does what ComfyUI's main.py hook does (interrupt check + ``progress``
message). Small images are the worst case (cheapest encodes); the ratio is with / without, median over repeats.
A second row times ``ItemProgress.advance`` alone (no encoding), per image.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from importlib import import_module
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def boot():
    import kiln

    comfy_dir = kiln.find_comfyui()
    if comfy_dir is None:
        raise SystemExit("ComfyUI not found (set COMFYUI_PATH)")
    headless = kiln.boot_comfyui(comfy_dir, extras=False)
    return headless.__name__.rsplit(".headless.", 1)[0]


def install_server():
    """ComfyUI's PromptServer (not started: messages queue up) and a progress hook like main.py's."""
    import comfy.model_management
    import comfy.utils
    import server

    prompt_server = server.PromptServer(asyncio.new_event_loop())

    def hook(value, total, preview_image, prompt_id=None, node_id=None):
        comfy.model_management.throw_exception_if_processing_interrupted()
        prompt_server.send_sync("progress", {"value": value, "max": total, "prompt_id": prompt_id, "node": node_id},
                                prompt_server.client_id)

    comfy.utils.set_progress_bar_global_hook(hook)
    return prompt_server


def drain(prompt_server) -> int:
    """Deliver what send_sync scheduled on the (idle) server loop into its queue, and count it."""
    prompt_server.loop.run_until_complete(asyncio.sleep(0))
    queue = prompt_server.messages
    n = 0
    while not queue.empty():
        queue.get_nowait()
        n += 1
    return n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()

    package = boot()
    dataset_mod = import_module(package + ".nodes.dataset")
    reporting = import_module(package + ".nodes.corridor.reporting")
    caches = import_module(package + ".nodes.corridor.caches")
    tiny = import_module(package + ".nodes.tiny_checkpoint")
    data = import_module(package + ".lora_core.data")
    import comfy.sd
    import numpy as np
    import torch
    from PIL import Image

    prompt_server = install_server()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "tiny.safetensors"
        tiny.write_checkpoint(str(ckpt))
        with torch.inference_mode():
            _, _, vae, _ = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=True, output_clip=False)
        folder = Path(tmp) / "images"
        folder.mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.images):
            Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
        config = data.DatasetConfig(folder=str(folder), resolution=args.size, min_bucket=min(256, args.size),
                                    max_bucket=max(1024, args.size))
        records = data.scan_dataset(config).records

        def one(report: bool) -> float:
            caches._latents.pop(vae.first_stage_model, None)  # encode every image again (bench only)
            progress = reporting.ItemProgress("2", unit="images", phase="Load Dataset: encoding latents") if report else None
            start = time.perf_counter()
            with torch.inference_mode():
                _, _, encoded = dataset_mod.encode_records(records, config, vae, progress)
            seconds = time.perf_counter() - start
            assert encoded == len(records)
            return seconds

        one(True), one(False)  # warm-up: first VAE call, allocator
        drain(prompt_server)
        with_, without, ratios, messages = [], [], [], []
        for r in range(args.repeats):
            order = (True, False) if r % 2 == 0 else (False, True)
            times = {}
            for report in order:
                times[report] = one(report)
                if report:
                    messages.append(drain(prompt_server))
            with_.append(times[True])
            without.append(times[False])
            ratios.append(times[True] / times[False])

        calls = 20_000
        progress = reporting.ItemProgress("2", unit="images", phase="bench")
        progress.start(calls)
        start = time.perf_counter()
        for i in range(1, calls + 1):
            progress.advance(i)
        per_call = (time.perf_counter() - start) / calls
        micro_messages = drain(prompt_server)

    n = len(records)
    print(f"Load Dataset encode, {n} images at {args.size}x{args.size}, tiny SD1.5 VAE, {args.repeats} alternating "
          f"repeats, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"  without progress: median {statistics.median(without):.3f} s ({statistics.median(without) / n * 1e3:.2f} "
          f"ms/image)")
    print(f"  with progress:    median {statistics.median(with_):.3f} s ({statistics.median(with_) / n * 1e3:.2f} "
          f"ms/image), {statistics.median(messages):.0f} messages per pass")
    print(f"  ratio with/without: median {statistics.median(ratios):.4f} (min {min(ratios):.4f}, max {max(ratios):.4f})")
    print(f"  ItemProgress.advance alone: {per_call * 1e6:.1f} us/image ({micro_messages} messages for {calls} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
