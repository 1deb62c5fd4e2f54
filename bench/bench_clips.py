"""The clip data path: Load Dataset's decode + resample + bucket + VAE encode of a clip, against ComfyUI's own way to
the same latents (Load Video's decoder, then VAE Encode of the frames), in one process, side by side.

    python bench/bench_clips.py [--clips 6] [--size 256] [--frames 33] [--repeats 5]

Clips are written with PyAV at 16 fps (the Wan 2.1 rate: no resampling), size x size, ``--frames`` long; the VAE is
the tests' Wan 2.1 VAE (width 8; ``--vae-dim 96`` is the real Wan 2.1 VAE's width) through ComfyUI's ``comfy.sd.VAE``.
Rows, per clip (median over ``--repeats`` interleaved rounds, seconds): Kiln (lora_core.data.read_clip_frames ->
fit_to_bucket -> one VAE encode of the window, what nodes/dataset.encode_records does on a cache miss), ComfyUI's
VAE Encode of the already decoded frames (the encoder alone), and ComfyUI's VideoFromFile.get_components (Load Video's
decoder) + VAE Encode. The ratio Kiln / (ComfyUI decode + encode) is the issue's goal (<= 1.05).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "integration"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=6)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--vae-dim", type=int, default=8, help="Wan 2.1 VAE width (96 = the real one)")
    args = parser.parse_args()

    import kiln

    headless = kiln.boot_comfyui(kiln.find_comfyui(), extras=False)
    pkg = headless.__name__.rsplit(".headless.", 1)[0]
    from importlib import import_module

    data = import_module(pkg + ".lora_core.data")
    tiny = import_module(pkg + ".nodes.tiny_checkpoint")
    import comfy.sd
    import torch
    from comfy_api.latest import InputImpl

    from comfy_harness import write_clip

    vae = comfy.sd.VAE(sd=tiny.wan21_vae_state_dict(0, dim=args.vae_dim))
    tmp = Path(tempfile.mkdtemp())
    clips = [write_clip(tmp / f"clip{k}.mp4", args.frames, 16, size=(args.size, args.size), seed=k)
             for k in range(args.clips)]
    bucket = (args.size, args.size)

    def kiln_path(path: Path) -> torch.Tensor:
        frames = data.read_clip_frames(path, 16.0, 0, args.frames, 178_956_970)
        pixels = torch.stack([data.image_to_tensor(data.fit_to_bucket(f, bucket)[0]) for f in frames])
        with torch.no_grad():
            return vae.encode(pixels)

    def comfy_decode(path: Path) -> torch.Tensor:
        return InputImpl.VideoFromFile(str(path)).get_components().images[: args.frames]

    def comfy_encode(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return vae.encode(images)

    decoded = {p: comfy_decode(p) for p in clips}
    ours, theirs = kiln_path(clips[0]), comfy_encode(decoded[clips[0]])
    print(f"latent {tuple(ours.shape)}; Kiln vs ComfyUI latents: max |diff| {float((ours - theirs).abs().max()):.4f} "
          "(both decode H.264 to RGB with FFmpeg; conversions may round differently)", flush=True)
    rows: dict[str, list[float]] = {"kiln": [], "encode": [], "comfy": []}
    for _ in range(args.repeats):  # interleaved: machine noise hits every row alike
        for name, fn in (("kiln", kiln_path), ("encode", lambda p: comfy_encode(decoded[p])),
                         ("comfy", lambda p: comfy_encode(comfy_decode(p)))):
            start = time.perf_counter()
            for p in clips:
                fn(p)
            rows[name].append((time.perf_counter() - start) / len(clips))
    med = {k: statistics.median(v) for k, v in rows.items()}
    ratios = [k / c for k, c in zip(rows["kiln"], rows["comfy"])]
    print(f"\n{args.clips} clips of {args.frames} frames at {args.size} px, Wan 2.1 VAE width {args.vae_dim}, "
          f"{args.repeats} rounds; s per clip (median)")
    print("| Kiln: decode + resample + bucket + encode | ComfyUI VAE Encode alone | ComfyUI Load Video decode + "
          "VAE Encode | Kiln / ComfyUI |")
    print("|---|---|---|---|")
    print(f"| {med['kiln']:.3f} | {med['encode']:.3f} | {med['comfy']:.3f} | **{statistics.median(ratios):.3f}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
