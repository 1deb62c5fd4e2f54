"""Auto Caption's engine path vs a plain ``transformers`` loop on the same model, side by side, in one run.

Both sides use the same loaded model and processor, the same images, batch size and generation settings
(greedy, ``max_new_tokens``). The plain loop is ``PIL.open -> processor -> generate -> batch_decode``. The engine
path is :func:`lora_core.caption.caption_images` as the node calls it: existing-caption lookup, image validation
(full decode, EXIF, colour modes), content digest, policy, and an atomic (fsync'd) ``.txt`` write per image. The
generation memo is off, so every image really goes through the model on both sides.

    python bench/bench_caption.py                       # tiny + small BLIP and Florence-2, 32 images
    python bench/bench_caption.py --sizes small --images 64 --batch 8

Random-weight models (built from configs, nothing downloaded): "tiny" is a worst case for overhead (a few ms of
model time per image), "small" (hidden 256, 4 layers, 224 px) is closer to real per-image cost; real BLIP /
Florence-2 checkpoints spend 10-100x more time in the model, so the relative overhead there is smaller still.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from lora_core.caption import CaptionSettings, WriteLedger, caption_images, inspect_model_folder, load_captioner  # noqa: E402
from lora_core.caption.tiny import build_tiny_blip, build_tiny_florence2  # noqa: E402

BUILDERS = {"blip": build_tiny_blip, "florence2": build_tiny_florence2}


def make_images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = Image.new("RGB", (320, 256), (240, 240, 235))
        d = ImageDraw.Draw(img)
        d.ellipse([40 + i % 7 * 10, 30, 260, 220], fill=((50 * i) % 255, 120, (90 + 40 * i) % 255))
        path = folder / f"img_{i:03d}.jpg"
        img.save(path, quality=92)
        paths.append(path)
    return paths


def plain_loop(captioner, paths: list[Path], batch: int, prompt: str, max_new_tokens: int) -> list[str]:
    processor, model = captioner.processor, captioner.model
    out: list[str] = []
    for b in range(0, len(paths), batch):
        images = [Image.open(p).convert("RGB") for p in paths[b : b + batch]]
        if prompt:
            inputs = processor(images=images, text=[prompt] * len(images), return_tensors="pt")
        else:
            inputs = processor(images=images, return_tensors="pt")
        with torch.inference_mode():
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
        out += [" ".join(t.split()) for t in processor.batch_decode(ids, skip_special_tokens=True)]
    return out


def engine_path(captioner, info, paths: list[Path], batch: int, prompt: str, max_new_tokens: int) -> list[str]:
    for p in paths:  # every image gets a fresh caption file written
        p.with_suffix(".txt").unlink(missing_ok=True)
    settings = CaptionSettings(prompt=prompt, max_new_tokens=max_new_tokens, batch_size=batch)
    report = caption_images(paths, info, settings, captioner=captioner, memo=None, ledger=WriteLedger())
    assert report.generated == len(paths) and len(report.files_written) == len(paths)
    return [o.generated for o in report.outcomes]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=["tiny", "small"])
    ap.add_argument("--kinds", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="kiln_bench_caption_"))
    try:
        paths = make_images(tmp / "images", args.images)
        rows = []
        for size in args.sizes:
            for kind in args.kinds:
                folder = BUILDERS[kind](tmp / "models" / f"{kind}-{size}", size=size)
                info = inspect_model_folder(folder)
                captioner = load_captioner(info)
                prompt = "<CAPTION>" if kind == "florence2" else ""
                plain_loop(captioner, paths[: args.batch], args.batch, prompt, args.max_new_tokens)  # warm-up
                plain_t, engine_t = [], []
                for _ in range(args.repeats):  # interleaved, so drift hits both sides alike
                    t = time.perf_counter()
                    a = plain_loop(captioner, paths, args.batch, prompt, args.max_new_tokens)
                    plain_t.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    b = engine_path(captioner, info, paths, args.batch, prompt, args.max_new_tokens)
                    engine_t.append(time.perf_counter() - t)
                    assert a == b, "the engine and the plain loop produced different captions"
                plain = len(paths) / statistics.median(plain_t)
                engine = len(paths) / statistics.median(engine_t)
                overhead_ms = (statistics.median(engine_t) - statistics.median(plain_t)) / len(paths) * 1000
                rows.append((kind, size, plain, engine, engine / plain, overhead_ms))
        print(f"\n{args.images} images 320x256 JPEG, batch {args.batch}, max_new_tokens {args.max_new_tokens}, "
              f"greedy, {torch.get_num_threads()} CPU threads, torch {torch.__version__}")
        print(f"{'model':<10} {'size':<6} {'plain img/s':>12} {'engine img/s':>13} {'engine/plain':>13} "
              f"{'overhead ms/img':>16}")
        for kind, size, plain, engine, ratio, overhead in rows:
            print(f"{kind:<10} {size:<6} {plain:>12.2f} {engine:>13.2f} {ratio:>13.3f} {overhead:>16.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
