"""Kiln's MODEL output on an INT8-quantized Wan (ComfyUI v0.33's ``comfy_quant`` int8_tensorwise weights): ComfyUI
fuses the feed-forward down-projection's input activation into its INT8 kernel at inference
(``comfy.ops.linear_input_act``) and never calls the layer, so a forward hook there would be skipped: Train Steps' MODEL
(and replayed previews) would render without the ``ffn.2`` adapters, silently. Kiln runs the plain path while its
adapters are attached (``patching.with_adapters``); this checks it in a subprocess with ComfyUI imported, on a tiny
Wan 2.1 T2V the stock loader reads from a file ``nodes/tiny_checkpoint.py --quant comfy_quant_int8`` writes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from comfy_harness import REPO, build_tiny_checkpoint
from conftest import COMFY

pytestmark = pytest.mark.skipif(
    COMFY is None or "def linear_input_act" not in (COMFY / "comfy" / "ops.py").read_text(),
    reason="ComfyUI's fused INT8 activation path (comfy.ops.linear_input_act) is v0.33's (COMFYUI_PATH)")

SCRIPT = textwrap.dedent(
    """
    import importlib, json, sys
    sys.path.insert(0, {repo!r})
    import kiln
    headless = kiln.boot_comfyui(kiln.find_comfyui(), extras=False)
    pkg = headless.__name__.rsplit(".headless.", 1)[0]
    patching = importlib.import_module(pkg + ".nodes.corridor.patching")
    core = importlib.import_module(pkg + ".lora_core")
    import torch, comfy.sd

    patcher = comfy.sd.load_diffusion_model({model!r})
    unet = patcher.model.diffusion_model
    config = core.AdapterConfig(rank=4, alpha=4.0, unet_targets=("ffn.2",))
    state = core.TrainState.from_adapters(core.AdapterSet.create({{"unet": unet}}, config, seed=0), seed=0)
    weights = {{k: (torch.randn_like(v) * 0.5 if "lora_up" in k else v) for k, v in state.weights.items()}}
    state = state.replace(weights=weights)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 3, 8, 8, generator=g)
    context = torch.randn(1, 32, 4096, generator=g)
    sigma = torch.tensor([0.7])

    def _apply(p):  # as a sampler calls it: the patcher's wrappers go into the transformer_options
        return p.model.apply_model(x, sigma, c_crossattn=context, transformer_options={{"wrappers": p.wrappers}})

    with torch.inference_mode():
        plain = _apply(patcher)
        kiln = _apply(patching.with_adapters(patcher, state))
    print("RESULT " + json.dumps({{
        "int8": patching.fused_int8_layers(unet),
        "adapters": len(state.specs),
        "moved": float((kiln - plain).abs().max()),
        "checkpointed": [type(m).__name__ for m in patching.checkpoint_blocks(patcher)],
    }}))
    """
)


def test_kiln_s_model_output_applies_its_adapters_on_int8_layers_comfyui_runs_fused(tmp_path):
    model = build_tiny_checkpoint(COMFY, tmp_path / "tiny_wan21_int8.safetensors", size="wan21",
                                  flags=("--quant", "comfy_quant_int8"))
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT.format(repo=str(REPO), model=str(model)))
    proc = subprocess.run([sys.executable, str(script), "--cpu"], capture_output=True, text=True, timeout=600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(line[len("RESULT "):])
    assert got["int8"] and got["adapters"] == 2  # ffn.2 of both blocks, stored as INT8
    assert got["moved"] > 1e-3, got  # the adapters change the output (they were skipped before the fix)
    # gradient checkpointing recomputes one Wan block at a time (the DiT's block list, found by structure)
    assert got["checkpointed"] == ["WanAttentionBlock", "WanAttentionBlock"], got
