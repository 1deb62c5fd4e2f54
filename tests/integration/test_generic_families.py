"""The generic path: every image model ComfyUI v0.33 loads trains, or is refused by name with the reason.

In a separate process (ComfyUI imported as a library), for every class of ComfyUI's ``supported_models.models``:
a family entry claims it, Kiln refuses it by name (video, audio, 3D, pixel space, edit/inpaint, ...), or it is one
of the image models the generic path trains. Each of those is built tiny (tests/integration/generic_tiny_models.py)
and loaded through ComfyUI's own ``load_diffusion_model_state_dict``; Inject LoRA's steps find its attention / MLP
layers by structure, two training steps run on the conditioning ComfyUI's own ``extra_conds`` gives (the
encoder's outputs as CLIPTextEncode would hand them over), the loss is finite and the adapters move, ComfyUI's
LoRA key map takes every key of the kohya file Kiln writes for it, and ComfyUI's own LoRA math (``calculate_weight``)
turns each into exactly the delta Kiln trained on that layer.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
from generic_tiny_models import REFUSED_GENERIC, TINY_GENERIC

from comfy_harness import REPO
from conftest import COMFY

pytestmark = pytest.mark.skipif(
    COMFY is None or "class ZImage" not in (COMFY / "comfy" / "supported_models.py").read_text(),
    reason="the generic path's model list is ComfyUI v0.33's (COMFYUI_PATH)")

SCRIPT = textwrap.dedent(
    """
    import json, sys, importlib, logging, math, types
    from unittest import mock
    sys.path.insert(0, {repo!r})
    sys.path.insert(0, {here!r})
    import kiln
    headless = kiln.boot_comfyui(kiln.find_comfyui(), extras=False)
    pkg = headless.__name__.rsplit(".headless.", 1)[0]
    families = importlib.import_module(pkg + ".nodes.corridor.families")
    patching = importlib.import_module(pkg + ".nodes.corridor.patching")
    denoiser = importlib.import_module(pkg + ".nodes.corridor.denoiser")
    compat = importlib.import_module(pkg + ".nodes.corridor.compat")
    errors = importlib.import_module(pkg + ".nodes.corridor.errors")
    core = importlib.import_module(pkg + ".lora_core")
    adapters = importlib.import_module(pkg + ".lora_core.adapters")
    kohya = importlib.import_module(pkg + ".lora_core.formats.kohya")
    import torch, comfy.sd, comfy.lora, comfy.model_detection, comfy.supported_models as sm
    from generic_tiny_models import TINY_GENERIC, REFUSED_TINY

    def build(name, spec):
        def config():
            c = getattr(sm, name)(dict(spec["unet_config"]))
            c.unet_config.update(spec["unet_config"])  # over the class's unet_extra_config
            return c
        builder = config()
        builder.set_inference_dtype(torch.float32, None)
        net = builder.get_model({{}}).diffusion_model
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for pname, p in net.named_parameters():
                if p.ndim >= 2:
                    p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
                elif pname.endswith("weight") or pname.endswith("scale"):
                    p.fill_(1.0)
                else:
                    p.zero_()
        detected = config()
        with mock.patch.object(comfy.model_detection, "model_config_from_unet", lambda *a, **k: detected):
            return comfy.sd.load_diffusion_model_state_dict(dict(net.state_dict()))

    def items(spec):
        g = torch.manual_seed(0)
        out = []
        for _ in range(2):
            kwargs = spec["cond"](torch)
            cond = {{"context": kwargs.pop("cross_attn")[0]}}
            pooled = kwargs.pop("pooled_output", None)
            if pooled is not None:
                cond["pooled"] = pooled[0]
            cond.update({{"extra." + k: v[0] for k, v in kwargs.items() if isinstance(v, torch.Tensor)}})
            out.append(core.LatentItem(latent=torch.randn(spec["latent"]), cond=cond))
        return core.LatentDataset(tuple(out))

    out = {{"classes": {{}}, "trained": {{}}, "refused": {{}}}}
    for cls in sm.models:
        name = cls.__name__
        entry = next((f.name for f in families.FAMILIES if name in f.model_configs), None)
        out["classes"][name] = ["entry", entry] if entry else ["refused", families.refusal(name)] \\
            if families.refusal(name) else ["generic", None]
    for name, spec in TINY_GENERIC.items():
        try:
            patcher = build(name, spec)
            d = families.detect(patcher)
            roots = patching.unet_roots(patcher)
            targets = adapters.structural_targets(roots["unet"])["attn+ff"]
            state = core.TrainState.from_adapters(core.AdapterSet.create(
                roots, core.AdapterConfig(rank=2, alpha=2, unet_targets=targets)), seed=0)
            naming = families.lora_naming(patcher, d.family)
            naming.names(s.name for s in state.specs)
            with torch.inference_mode(False), torch.enable_grad():
                patching.load_for_training(patcher)
                network = denoiser.ComfyDiffusion(patcher, detected=d)
                trainer = core.Trainer(network, patching.unet_roots(patcher))
                with patching.norm_inputs_cloned([network.unet]), compat.training():
                    result = trainer.run(state, items(spec), core.TrainConfig(
                        steps=2, learning_rate=1e-2, precision="fp32", min_snr_gamma=-1.0, timestep_sampling="auto"))
            trained = result.state
            tensors = kohya.export_tensors(trained, naming, "fp32")
            key_map = comfy.lora.model_lora_keys_unet(patcher.model, {{}})
            loaded = comfy.lora.load_lora(tensors, key_map, log_missing=False)
            moved = sum(1 for s in trained.specs if trained.weights[s.name + ".lora_up.weight"].abs().sum() > 0)
            # ComfyUI's own LoRA math on each loaded key (calculate_weight, as a LoraLoader patch applies it) against
            # W + alpha / rank * up @ down of the adapter with that path: the file means what Kiln trained
            weights = patcher.model.state_dict()
            errors_ = []
            for s in trained.specs:
                key = "diffusion_model." + s.name[len("unet."):] + ".weight"
                w = weights[key].float()
                delta = (s.alpha / s.rank) * (trained.weights[s.name + ".lora_up.weight"].float()
                                              @ trained.weights[s.name + ".lora_down.weight"].float())
                got = comfy.lora.calculate_weight([(1.0, loaded[key], 1.0, None, None)], w.clone(), key)
                errors_.append(float((got - w - delta.reshape(w.shape)).abs().max() / (delta.abs().max() + 1e-12)))
            out["trained"][name] = {{
                "generic": d.family.generic, "objective": d.objective.prediction_type,
                "adapters": len(trained.specs), "moved": moved, "loaded": len(loaded),
                "losses": [h[1] for h in trained.history], "targets": len(targets),
                "delta_error": max(errors_) if errors_ else None}}
        except Exception as exc:  # reported per class; the test names it
            out["trained"][name] = {{"error": f"{{type(exc).__name__}}: {{exc}}"[:800]}}
    for name, spec in REFUSED_TINY.items():
        try:
            families.detect(build(name, spec))
            out["refused"][name] = None
        except errors.KilnUserError as exc:
            out["refused"][name] = str(exc)
    for name in ("JoyImage", "Anima", "ErnieImage"):  # refused by name before anything of the model is read
        config = type(name, (), {{"unet_config": {{}}}})()
        try:
            families.detect(types.SimpleNamespace(model=types.SimpleNamespace(model_config=config)))
            out["refused"][name] = None
        except errors.KilnUserError as exc:
            out["refused"][name] = str(exc)
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    script = tmp_path_factory.mktemp("generic") / "probe.py"
    script.write_text(SCRIPT.format(repo=str(REPO), here=str(REPO / "tests" / "integration")))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(line[len("RESULT "):])


def test_every_model_comfyui_loads_has_a_family_entry_or_trains_generically_or_is_refused_with_a_reason(probe):
    generic = {name for name, (kind, _) in probe["classes"].items() if kind == "generic"}
    untested = generic - set(TINY_GENERIC) - set(REFUSED_GENERIC)  # LongCatImage: refused by what its model does
    assert not untested, f"image models the generic path would train without a tiny model in the test set: {untested}"
    for name, (kind, why) in probe["classes"].items():
        if kind == "refused":
            assert why and len(why) > 20, (name, why)
    assert probe["classes"]["ZImage"] == ["entry", "Z-Image"]
    assert probe["classes"]["WAN21_T2V"] == ["entry", "Wan 2.1 / 2.2 14B"]
    assert probe["classes"]["WAN22_T2V"] == ["entry", "Wan 2.2 5B"]
    # the other Wan variants (image-to-video, VACE, camera, ...) take inputs a text-to-video dataset lacks
    assert probe["classes"]["WAN21_I2V"][0] == probe["classes"]["WAN21_Vace"][0] == "refused"


@pytest.mark.parametrize("name", list(TINY_GENERIC))
def test_a_generic_image_model_trains_and_comfyui_takes_every_key(probe, name):
    got = probe["trained"][name]
    assert "error" not in got, got
    assert got["generic"] and got["targets"] > 0
    assert len(got["losses"]) == 2 and all(math.isfinite(v) for v in got["losses"]), got
    assert got["moved"] > 0, got
    assert got["loaded"] == got["adapters"], got  # ComfyUI's key map took every adapter of the file
    assert got["delta_error"] is not None and got["delta_error"] < 1e-4, got  # and applies Kiln's delta to each


@pytest.mark.parametrize("name", list(REFUSED_GENERIC))
def test_models_the_generic_path_would_get_wrong_are_refused_with_the_reason(probe, name):
    message = probe["refused"][name]
    assert message and REFUSED_GENERIC[name] in message and f"cannot train {name} models" in message, message
