"""Kiln's engine vs a plain peft training loop vs the model's own forward pass, on ComfyUI's UNet, one process.

    python bench/bench_floor.py                       # the 107 M UNet, fp32, 8x8 latents, batch 1
    python bench/bench_floor.py --size tiny --batch 4
    python bench/bench_floor.py --profile             # also print torch.profiler's top ops for one Kiln step
    python bench/bench_floor.py --size sd15 --latent 64 --batch 8 --rank 16 --dtype bf16 --native --peak-tflops 989
                                                      # the GPU row: full SD1.5 UNet at 512 px, with MFU
    python bench/bench_floor.py --size sdxl --latent 8 --targets attn+ff all --native
                                                      # SDXL: context 2048, pooled + sizes -> y via extra_conds
    bash bench/gpu_sdxl.sh                            # the SDXL GPU rows: full SDXL UNet at 1024 px, bf16, MFU
    python bench/bench_floor.py --size wan21 --latent 8 --frames 9 --t5-tokens 512 --targets attn+ff --no-peft
                                                      # Wan 2.1 T2V: 5-D clip latents, UMT5 context [512, 4096]
    bash bench/gpu_wan.sh                             # the Wan GPU row: Wan 2.1 1.3B at 480p x 33 frames, bf16
    python bench/bench_floor.py --size flux --latent 8 --targets attn+ff --no-peft --grad-ckpt
                                                      # FLUX.1: T5 context [256, 4096], CLIP-L pooled + guidance
    bash bench/gpu_flux.sh                            # the FLUX GPU rows: 12 B FLUX.1-dev at 1024 px, bf16/fp8, MFU

Rows: forward only (no grad), plain peft loop (peft LoRA layers injected into a copy of the UNet, AdamW),
Kiln (lora_core.Trainer with hook adapters on the shared UNet), for attention-only and all-layer targets, and
with ``--native`` ComfyUI's own TrainLoraNode (called in-process, like the server does). The device is
ComfyUI's (the GPU when there is one). ``--peak-tflops`` adds MFU: the FLOPs torch's FlopCounterMode counts for
one Kiln step (forward + backward, as executed) per second, over that peak (and, with ``--native``, the FLOPs of one
TrainLoraNode step, for its own MFU). On a GPU the table adds each row's peak ``torch.cuda.max_memory_allocated``.
SDXL sizes (``sdxl``, ``sdxl_full``) condition every row like Kiln's trainer does: a [77, 2048] context, the pooled
[1280] vector and the [6] size row per sample, turned into ``y`` by ComfyUI's ``extra_conds`` through Kiln's
denoiser (TrainLoraNode gets the pooled output in its conditioning and does the same through ComfyUI's sampler).
FLUX sizes (``flux``, ``flux_full``) are loaded as UNETLoader loads them (``--weight-dtype fp8_e4m3fn``: fp8 weights)
and conditioned per sample with a random T5 context ([256, 4096]), a CLIP-L pooled vector (-> ``y``) and guidance 1,
through Kiln's denoiser; they train as rectified flow (the peft and TrainLoraNode rows do not apply). ``--vram-cap``
caps the process's CUDA memory (e.g. 24 GiB, a consumer card) to show whether a configuration fits there.
Each s/step is (long run - short run) / step difference, interleaved so machine noise hits all alike.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def boot(size: str, tmp: Path, checkpoint: Path | None = None, weight_dtype: str = "default"):
    import kiln

    comfy_dir = kiln.find_comfyui()
    if comfy_dir is None:
        raise SystemExit("ComfyUI not found (set COMFYUI_PATH)")
    headless = kiln.boot_comfyui(comfy_dir, extras=False)
    pkg = sys.modules[headless.__name__.rsplit(".headless.", 1)[0]]
    from importlib import import_module

    tiny = import_module(pkg.__name__ + ".nodes.tiny_checkpoint")
    patching = import_module(pkg.__name__ + ".nodes.corridor.patching")
    denoiser = import_module(pkg.__name__ + ".nodes.corridor.denoiser")
    core = import_module(pkg.__name__ + ".lora_core")
    if size in tiny.DIT_FILES and checkpoint is None:  # built in memory: no 24 GB file to write for the 12 B FLUX
        import comfy.sd
        import torch

        options = {"dtype": torch.float8_e4m3fn} if weight_dtype == "fp8_e4m3fn" else {}
        with torch.inference_mode():  # built in bf16 directly: 24 GB, not 48 GB of fp32 first, for the 12 B layout
            torch.manual_seed(0)
            sd = tiny.build_dit(size, dtype=torch.bfloat16).state_dict()
            model = comfy.sd.load_diffusion_model_state_dict(sd, model_options=options)
        del sd
        return model, patching, denoiser, core
    path = checkpoint or tmp / f"{size}.safetensors"
    if not path.exists():  # --checkpoint: built once, reused by later runs (the full SDXL one takes a minute)
        path.parent.mkdir(parents=True, exist_ok=True)
        tiny.write_checkpoint(str(path), size)
    import comfy.sd
    import torch

    with torch.inference_mode():
        if size in tiny.DIT_FILES:  # FLUX.1 / Chroma: a diffusion-model file, as UNETLoader loads it
            options = {"dtype": torch.float8_e4m3fn} if weight_dtype == "fp8_e4m3fn" else {}
            return comfy.sd.load_diffusion_model(str(path), model_options=options), patching, denoiser, core
        # SDXL: CLIP-L + CLIP-G are not needed here (random conditioning), and loading them costs a GPU run time
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            str(path), output_vae=True, output_clip=size not in tiny.SDXL_SIZES)
    return model, patching, denoiser, core


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small",
                        choices=["tiny", "small", "sd15", "sdxl", "sdxl_full", "flux", "flux_full", "flux2",
                                 "flux2_klein4b_full", "flux2_klein9b_full", "zimage_full", "wan21", "wan21_1_3b_full"])
    parser.add_argument("--frames", type=int, default=1,
                        help="Wan: frames per sample, 4k+1 (33 = 9 latent frames); the latents are [C, T, s, s]")
    parser.add_argument("--weight-dtype", default="default", choices=["default", "fp8_e4m3fn"],
                        help="FLUX: the stored weights, as UNETLoader's weight_dtype (default: bf16 as written)")
    parser.add_argument("--t5-tokens", type=int, default=256,
                        help="FLUX.1: T5 context length (ComfyUI pads T5 to 256); FLUX.2 / Z-Image: the caption's "
                             "token count (FLUX.2 pads to 512 itself)")
    parser.add_argument("--vram-cap", type=float, default=0.0,
                        help="GiB: cap this process's CUDA memory (torch's per-process fraction), e.g. 24 for a "
                             "consumer card; a run that needs more fails with an out-of-memory error")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--latent", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--short", type=int, default=3)
    parser.add_argument("--long", type=int, default=13)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing on (Kiln and TrainLoraNode)")
    parser.add_argument("--native", action="store_true", help="also time ComfyUI's TrainLoraNode (all layers)")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="dense peak of the device, for MFU")
    parser.add_argument("--targets", nargs="+", default=["attn", "all"], choices=["attn", "attn+ff", "all"],
                        help="peft/Kiln rows (all = every Linear/Conv, LoCon on k x k convs)")
    parser.add_argument("--no-peft", action="store_true", help="skip the plain peft rows (a UNet copy each)")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint file to reuse (built there when missing)")
    args = parser.parse_args()

    import torch

    tmp = Path(tempfile.mkdtemp())
    if args.vram_cap and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.vram_cap * 1024**3 / total))
    model, patching, denoiser, core = boot(args.size, tmp, args.checkpoint, args.weight_dtype)
    from importlib import import_module

    compat = import_module(patching.__name__.rsplit(".", 1)[0] + ".compat")
    device = patching.load_for_training(model)
    loaded = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    diffusion = denoiser.ComfyDiffusion(model)
    unet = diffusion.unet
    b, s = args.batch, args.latent
    flux = diffusion.family.name == "FLUX.1"  # T5 context, CLIP-L pooled -> y, guidance; rectified flow
    flow = diffusion.prediction_type == "flow"
    # FLUX.2 / Z-Image: a Qwen context of the width the network reads, conditioned through ComfyUI's extra_conds
    unet_config = model.model.model_config.unet_config
    qwen_width = unet_config.get("context_in_dim") or unet_config.get("cap_feat_dim") if not flux else None
    xl = not flow and model.model.adm_channels > 0  # SDXL: y = pooled text output + size embeddings
    channels = diffusion.family.latent_channels
    g = torch.Generator().manual_seed(0)
    # a video model (Wan): clips of --frames frames, [C, 1 + (F - 1) / 4, s, s], the UMT5 context of 512 tokens
    frames = ((args.frames - 1) // 4 + 1,) if diffusion.family.video else ()
    x = torch.randn(b, channels, *frames, s, s, generator=g).to(device)
    ctx_shape = (args.t5_tokens, qwen_width or 4096) if flow else (77, 2048 if xl else 768)
    ctx = torch.randn(b, *ctx_shape, generator=g).to(device)
    t = (torch.rand(b, generator=g) if flow else torch.randint(0, 1000, (b,), generator=g)).to(device)
    conds = [{"context": ctx[i].cpu()} for i in range(b)]
    if flux:
        pooled = torch.randn(b, 768, generator=g)
        for i, c in enumerate(conds):
            c["pooled"] = pooled[i]
    if xl:  # per sample, as Load Dataset stores them: pooled [1280] and [orig h, w, crop top, left, target h, w]
        pooled = torch.randn(b, 1280, generator=g)
        for i, c in enumerate(conds):
            c.update(pooled=pooled[i], size=torch.tensor([s * 8, s * 8, 0, 0, s * 8, s * 8], dtype=torch.long))
    with torch.no_grad():  # the same y every row gets: ComfyUI's extra_conds, through Kiln's denoiser
        ctx, extra = diffusion.conditioning({k: torch.stack([c[k] for c in conds]) for k in conds[0]}, device, x)
    amp = torch.bfloat16 if args.dtype == "bf16" else None

    def autocast():
        return torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
    items = tuple(core.LatentItem(latent=torch.randn(channels, *frames, s, s, generator=g), cond=conds[i % b])
                  for i in range(max(b, 4)))
    data = core.LatentDataset(items)
    presets = sys.modules[core.__name__ + ".config"].TARGET_PRESETS  # the patterns Kiln's own presets use

    def forward_run(n: int) -> float:
        sync()
        start = time.perf_counter()
        with torch.no_grad(), autocast():
            for _ in range(n):
                unet(x, t.float(), context=ctx, **extra)
        sync()
        return time.perf_counter() - start

    def peft_run(targets: str):
        from peft import LoraConfig, inject_adapter_in_model

        copy_unet = copy.deepcopy(unet)
        names = None
        if presets[targets] is not None:
            names = [n for n, m in copy_unet.named_modules() if n.endswith(presets[targets])]
        else:
            names = [n for n, m in copy_unet.named_modules()
                     if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and n]
        cfg = LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=names)
        copy_unet = inject_adapter_in_model(cfg, copy_unet)
        params = [p for n, p in copy_unet.named_parameters() if "lora_" in n]
        for n, p in copy_unet.named_parameters():
            p.requires_grad_("lora_" in n)
        copy_unet.to(device)
        opt = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
        ac = diffusion.alphas_cumprod.to(device)

        def run(n: int) -> float:
            sync()
            start = time.perf_counter()
            for _ in range(n):
                tt = torch.randint(0, 1000, (b,), device=device)
                noise = torch.randn_like(x)
                a = ac[tt].view(-1, 1, 1, 1)
                noisy = a.sqrt() * x + (1 - a).sqrt() * noise
                with autocast():
                    pred = copy_unet(noisy, tt.float(), context=ctx, **extra)
                loss = torch.nn.functional.mse_loss(pred.float(), noise)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            sync()
            return time.perf_counter() - start

        return run

    def kiln_run(targets: str):
        cfg = core.AdapterConfig(rank=args.rank, alpha=args.rank, unet_targets=targets,
                                 algorithm="locon" if targets == "all" else "lora")
        state = core.TrainState.from_adapters(core.AdapterSet.create({"unet": unet}, cfg))
        trainer = core.Trainer(diffusion, {"unet": unet}, device, patching.checkpoint_blocks(model))

        # as Train Steps runs it: FLUX's in-place residuals need its LayerNorm inputs copied while it trains
        inplace_safe = patching.norm_inputs_cloned if diffusion.family.inplace_residuals else None

        def run(n: int) -> float:
            train = core.TrainConfig(steps=n, batch_size=b, min_snr_gamma=0.0, precision=args.dtype,
                                     gradient_checkpointing=args.grad_ckpt)
            sync()
            start = time.perf_counter()
            # as Train Steps runs it: ComfyUI's training switch (differentiable rope / norm kernels on v0.33)
            with compat.training(), inplace_safe([unet]) if inplace_safe is not None else contextlib.nullcontext():
                trainer.run(state, data, train)
            sync()
            return time.perf_counter() - start

        return run

    def native_run():
        import comfy.sd  # noqa: F401
        from comfy_extras.nodes_train import TrainLoraNode
        latents = {"samples": torch.randn(b, 4, s, s, generator=g)}
        positive = [[ctx[:1].cpu(), {"pooled_output": pooled[:1]} if xl else {}]]
        dtype = "bf16" if args.dtype == "bf16" else "fp32"

        def run(n: int) -> float:
            sync()
            start = time.perf_counter()
            inputs = dict(model=model, latents=latents, positive=positive, batch_size=b, steps=n,
                          grad_accumulation_steps=1, learning_rate=1e-4, rank=args.rank, optimizer="AdamW",
                          loss_function="MSE", seed=0, training_dtype=dtype, lora_dtype=dtype, algorithm="LoRA",
                          gradient_checkpointing=args.grad_ckpt, existing_lora="[None]")
            with torch.inference_mode():  # as ComfyUI's executor calls every node
                if hasattr(TrainLoraNode, "train"):  # ComfyUI 0.3.64's node
                    TrainLoraNode().train(**inputs)
                else:  # v0.33's V3 node: list inputs, and what it added (checkpoint_depth 2 = one block at a time,
                    # as v0.3.64 checkpointed; bypass_mode off = v0.3.64's weight wrappers)
                    inputs.update(quantized_backward=False, checkpoint_depth=2, offloading=False, bucket_mode=False,
                                  bypass_mode=False)
                    TrainLoraNode.execute(**{k: [v] for k, v in inputs.items()})
            sync()
            elapsed = time.perf_counter() - start
            # TrainLoraNode returns its clone still loaded: its weight wrappers stay on the shared UNet's modules
            # (every later forward would run them). Reload the base patcher, as the graph does before Kiln trains.
            patching.load_for_training(model)
            leftover = [n for n, m in unet.named_modules() if getattr(m, "weight_function", None)]
            if leftover:
                raise RuntimeError(f"TrainLoraNode's weight wrappers are still on {leftover[:3]}")
            return elapsed

        return run

    if flow and (args.native or not args.no_peft):
        raise SystemExit("flow-model rows: pass --no-peft and no --native (the plain peft loop noises as DDPM; "
                         "TrainLoraNode cannot train FLUX as UNETLoader stores it, see BENCHMARKS 1c)")
    runs = {"forward": forward_run}
    for targets in args.targets:
        if not args.no_peft:
            runs[f"peft {targets}"] = peft_run(targets)
        runs[f"kiln {targets}"] = kiln_run(targets)
    if args.native:
        runs["native all"] = native_run()
    samples: dict[str, list[float]] = {k: [] for k in runs}
    cuda = device.type == "cuda"
    vram: dict[str, int] = dict.fromkeys(runs, 0)

    def measured(name: str, n: int) -> float:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        elapsed = runs[name](n)
        if cuda:
            vram[name] = max(vram[name], torch.cuda.max_memory_allocated(device))
        return elapsed

    with torch.inference_mode(False), torch.enable_grad():
        for name in runs:
            measured(name, 1)  # warm-up
        for _ in range(args.repeats):  # interleaved: noise from a shared machine hits every row alike
            for name in runs:
                samples[name].append((measured(name, args.long) - measured(name, args.short))
                                     / (args.long - args.short))
                gc.collect()
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            run = runs[f"kiln {args.targets[0]}"]
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run(3)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
        flops: dict[str, float] = {}
        if args.peak_tflops:
            from torch.utils.flop_counter import FlopCounterMode

            for name in [n for n in runs if n.startswith(("kiln", "native"))]:
                counter = FlopCounterMode(display=False)
                with counter:
                    runs[name](1)
                flops[name] = counter.get_total_flops()
    med = {k: statistics.median(v) for k, v in samples.items()}
    fwd = med["forward"]
    stored = f", weights {args.weight_dtype}" if args.weight_dtype != "default" else ""
    cap = f", VRAM capped at {args.vram_cap:g} GiB" if args.vram_cap else ""
    print(f"\nUNet {args.size}{stored}{cap}, batch {b}, latents {s}x{s}, rank {args.rank}, {args.dtype}, {device}, "
          f"gradient checkpointing {'on (Kiln, TrainLoraNode)' if args.grad_ckpt else 'off'}, "
          f"median of {args.repeats}")
    unet_params = sum(p.numel() for p in unet.parameters()) / 1e6
    gib = 1024 ** 3
    print(f"UNet {unet_params:.1f} M parameters" + (f"; weights on the GPU before training "
          f"{loaded / gib:.1f} GiB" if cuda else ""))
    print("| run | s/step | it/s | x forward | Kiln / peft | Kiln / native | GFLOP/step | MFU |"
          + (" peak VRAM GiB |" if cuda else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|" if cuda else ""))
    for name, v in med.items():
        rel = native = mfu = gflop = ""
        if name.startswith("kiln"):
            peft_name = "peft " + name.split()[1]
            rel = f"**{v / med[peft_name]:.2f}**" if peft_name in med else ""
            if "native all" in med:
                native = f"{v / med['native all']:.2f}"
        if name in flops:
            gflop = f"{flops[name] / 1e9:.4g}"
            mfu = f"{flops[name] / v / (args.peak_tflops * 1e12):.1%}"
        print(f"| {name} | {v:.4f} | {1 / v:.2f} | {v / fwd:.2f} | {rel} | {native} | {gflop} | {mfu} |"
              + (f" {vram[name] / gib:.1f} |" if cuda else ""))
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
