"""The corridor on ComfyUI's real UNet, in a separate process (ComfyUI imported as a library)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from comfy_harness import REPO

SCRIPT = textwrap.dedent(
    """
    import json, sys, importlib, collections
    sys.path.insert(0, {repo!r})
    import kiln
    headless = kiln.boot_comfyui(kiln.find_comfyui(), extras=False)
    pkg = headless.__name__.rsplit(".headless.", 1)[0]
    patching = importlib.import_module(pkg + ".nodes.corridor.patching")
    denoiser = importlib.import_module(pkg + ".nodes.corridor.denoiser")
    core = importlib.import_module(pkg + ".lora_core")
    import torch, comfy.sd
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config({ckpt!r}, output_vae=True, output_clip=True)
    blocks = patching.checkpoint_blocks(model)
    calls = collections.Counter()
    for b in blocks:  # count the layers inside: a recomputation calls them again
        for name, m in b.named_modules():
            if isinstance(m, torch.nn.Linear):
                m.register_forward_pre_hook(lambda mod, a, name=name: calls.update([name]))
    out = {{"blocks": len(blocks), "types": sorted({{type(b).__name__ for b in blocks}})}}
    g = torch.Generator().manual_seed(0)
    items = tuple(core.LatentItem(latent=torch.randn(4, 8, 8, generator=g), cond={{"context": torch.randn(77, 768, generator=g)}})
                  for _ in range(2))
    data = core.LatentDataset(items)
    for ckpt in (False, True):
        with torch.inference_mode(False), torch.enable_grad():
            patching.load_for_training(model)
            state = core.TrainState.from_adapters(core.AdapterSet.create(patching.unet_roots(model), core.AdapterConfig(rank=4)))
            trainer = core.Trainer(denoiser.ComfyDiffusion(model), patching.unet_roots(model),
                                   checkpoint_modules=blocks)
            calls.clear()
            result = trainer.run(state, data, core.TrainConfig(steps=2, gradient_checkpointing=ckpt, precision="fp32"))
        out[f"calls_ckpt_{{ckpt}}"] = sum(calls.values())
        out[f"loss_ckpt_{{ckpt}}"] = [h[1] for h in result.state.history]
    print("RESULT " + json.dumps(out))
    """
)


def test_gradient_checkpointing_really_recomputes_comfyui_blocks(tiny_checkpoint, tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT.format(repo=str(REPO), ckpt=str(tiny_checkpoint)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(line[len("RESULT "):])
    assert {"ResBlock", "SpatialTransformer"} <= set(out["types"])
    # layers inside checkpointed blocks run again in backward (torch stops recomputing a block early once
    # it has every tensor backward needs, so slightly under twice)
    assert 1.8 * out["calls_ckpt_False"] <= out["calls_ckpt_True"] <= 2 * out["calls_ckpt_False"]
    assert out["loss_ckpt_True"] == out["loss_ckpt_False"]  # same math, bit for bit on CPU
