"""Quantized checkpoints train every layer their targets name, on the ComfyUI under test.

"fp8 scaled" checkpoints (per-layer ``scale_weight`` and a ``scaled_fp8`` marker, as people share them) and the newer
per-layer ``comfy_quant`` format (fp8 and int8): ComfyUI 0.3.64 runs the former with ``scaled_fp8_ops`` (``nn.Linear`` subclasses);
newer versions convert both to ``QuantizedTensor`` weights in mixed-precision layers that are *not* ``nn.Linear``,
which Kiln once skipped silently (6 of 36 layers trained). A tiny SD1.5 of each kind, next to the plain one.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from safetensors import safe_open
from test_graph import render_graph, saved_image

from comfy_harness import build_tiny_checkpoint, find_comfyui, tiny_train_workflow

COMFY = find_comfyui()

FORMATS = ["scaled_fp8", "comfy_quant", "comfy_quant_int8"]


def _supports(quant: str) -> bool:
    """comfy_quant files (fp8, int8) are a format of ComfyUI >= 0.3.7x (comfy/quant_ops.py)."""
    return quant == "scaled_fp8" or (COMFY is not None and (COMFY / "comfy" / "quant_ops.py").is_file())


@pytest.fixture(scope="module")
def quantized(server, tmp_path_factory):
    """{format: checkpoint name} in the server's models/checkpoints."""
    names = {}
    for quant in FORMATS:
        if not _supports(quant):
            continue
        path = build_tiny_checkpoint(COMFY, tmp_path_factory.mktemp(quant) / f"tiny_sd15_{quant}.safetensors",
                                     flags=("--quant", quant))
        target = server.base / "models" / "checkpoints" / path.name
        if not target.exists():
            os.link(path, target)
        names[quant] = path.name
    return names


def _adapters(result) -> tuple[int, str]:
    text = result.history["outputs"]["3"]["text"][0]
    return int(re.match(r"(\d+) adapters", text).group(1)), text


def _train(server, name: str, ckpt: str):
    wf = tiny_train_workflow(name, steps=2, learning_rate=5e-3)
    wf["1"]["inputs"]["ckpt_name"] = ckpt
    wf["5"]["inputs"].update(dtype="fp32")
    result = server.run(wf)
    assert result.status == "success", result.error
    return result


@pytest.mark.parametrize("quant", FORMATS)
@pytest.mark.compat
def test_a_quantized_checkpoint_trains_every_targeted_layer_and_the_stock_loader_applies_every_key(
        server, quantized, quant):
    if quant not in quantized:
        pytest.skip(f"this ComfyUI has no {quant} format (comfy/quant_ops.py)")
    plain = _train(server, f"q_plain_{quant}", "tiny_sd15.safetensors")
    log_start = len(server.log())
    result = _train(server, f"q_{quant}", quantized[quant])
    assert "could not estimate the run's memory" not in server.log()[log_start:]  # quantized weights measured too
    n_plain, _ = _adapters(plain)
    n_quant, report = _adapters(result)
    assert n_quant == n_plain, report  # every layer the targets name, quantized or not
    assert "to_q 6" in report and "ff.net.2 3" in report, report  # per target: 3 transformers, 2 attentions each
    with safe_open(str(server.base / "models" / "loras" / f"q_{quant}.safetensors"), "pt") as f:
        keys = set(f.keys())
        ups = {k: f.get_tensor(k) for k in keys if k.endswith("lora_up.weight")}
    with safe_open(str(server.base / "models" / "loras" / f"q_plain_{quant}.safetensors"), "pt") as f:
        assert keys == set(f.keys())
    assert len(ups) == n_quant and all(v.abs().sum() > 0 for v in ups.values())  # every adapter got gradients

    # the stock LoraLoader on the quantized checkpoint: every key applied, the image changes; the base renders as
    # it did before training (the quantized weights are untouched)
    before = server.run({"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": quantized[quant]}},
                         **render_graph(f"qbase_{quant}", ["1", 0], ["1", 1])})
    assert before.status == "success", before.error
    log_start = len(server.log())
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": quantized[quant]}},
             "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                          "lora_name": f"q_{quant}.safetensors",
                                                          "strength_model": 1.0, "strength_clip": 1.0}}}
    graph.update(render_graph(f"qlora_{quant}", ["2", 0], ["2", 1], base_id=200))
    graph.update(render_graph(f"qafter_{quant}", ["1", 0], ["1", 1], sampler="KSamplerAdvanced", base_id=300))
    stock = server.run(graph)
    assert stock.status == "success", stock.error
    assert "lora key not loaded" not in server.log()[log_start:]
    base = saved_image(server, before, "105")
    assert np.array_equal(saved_image(server, stock, "305"), base)
    assert np.abs(saved_image(server, stock, "205") - base).mean() > 1.0


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_quantized_sdxl_and_sd3_checkpoints_train_every_targeted_layer(server, family, tmp_path_factory, request):
    """The same on the tiny SDXL and SD3 (comfy_quant: quantized layers in the UNet/MMDiT, full-precision text
    encoders): the adapters are the plain checkpoint's, all trained, and the stock LoraLoader applies every key."""
    if not _supports("comfy_quant"):
        pytest.skip("this ComfyUI has no comfy_quant format (comfy/quant_ops.py)")
    from test_sdxl import install_checkpoint, keys_and_metadata
    from test_sdxl import render as family_render
    from test_sdxl import train_graph as family_train_graph

    plain = request.getfixturevalue(f"{family}_checkpoint")
    quant = build_tiny_checkpoint(COMFY, tmp_path_factory.mktemp(f"{family}_q") / f"tiny_{family}_q.safetensors",
                                  size=family, flags=("--quant", "comfy_quant"))
    install_checkpoint(server, plain, plain.name)
    install_checkpoint(server, quant, quant.name)
    flow = {"min_snr_gamma": 0.0, "timestep_sampling": "logit_normal"} if family == "sd3" else {}
    texts, keys = [], []
    for ckpt, name in ((plain.name, f"{family}_plain_q"), (quant.name, f"{family}_quant")):
        result = server.run(family_train_graph(ckpt, name, 2, learning_rate=5e-3, **flow), timeout=1200)
        assert result.status == "success", result.error
        texts.append(result.history["outputs"]["3"]["text"][0])
        keys.append(set(keys_and_metadata(server, name)[0]))
    assert texts[0] == texts[1] and keys[0] == keys[1], texts
    untrained = []
    for name in (f"{family}_plain_q", f"{family}_quant"):
        with safe_open(str(server.base / "models" / "loras" / f"{name}.safetensors"), "pt") as f:
            ups = {k: f.get_tensor(k) for k in f.keys() if k.endswith(("lora_up.weight", "lora_B.weight"))}
        untrained.append(sorted(k for k, v in ups.items() if v.abs().sum() == 0))
    # the same adapters trained on both (SD3's last block drops its text outputs, so its text queries get no
    # gradient in either: test_sd3.py), and all of them on SDXL
    assert ups and untrained[0] == untrained[1] and len(untrained[1]) <= (1 if family == "sd3" else 0), untrained
    log_start = len(server.log())
    latent = {"latent": "EmptySD3LatentImage"} if family == "sd3" else {}
    stock = server.run(family_render(quant.name, f"{family}_q_lora", lora=f"{family}_quant.safetensors", **latent))
    assert stock.status == "success", stock.error
    assert "lora key not loaded" not in server.log()[log_start:]
