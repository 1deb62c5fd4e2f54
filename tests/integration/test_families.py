"""The family registry on ComfyUI's real classes, in a separate process (ComfyUI imported as a library).

SDXL's size conditioning must reach the UNet as each sample's own sizes (ComfyUI's ``SDXL.encode_adm`` silently
uses 768 x 768 and crop 0 without them), and what Kiln cannot train is refused by name before a step runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from comfy_harness import REPO

SCRIPT = textwrap.dedent(
    """
    import json, sys, importlib, types
    sys.path.insert(0, {repo!r})
    import kiln
    headless = kiln.boot_comfyui(kiln.find_comfyui(), extras=False)
    pkg = headless.__name__.rsplit(".headless.", 1)[0]
    families = importlib.import_module(pkg + ".nodes.corridor.families")
    denoiser = importlib.import_module(pkg + ".nodes.corridor.denoiser")
    errors = importlib.import_module(pkg + ".nodes.corridor.errors")
    import torch, comfy.sd, comfy.model_sampling as ms
    out = {{}}
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config({ckpt!r}, output_vae=True, output_clip=True)
        d = denoiser.ComfyDiffusion(model)
        g = torch.Generator().manual_seed(0)
        pooled = torch.randn(2, 1280, generator=g)
        sizes = torch.tensor([[48, 80, 8, 0, 64, 64], [1024, 768, 0, 32, 896, 1152]])
        _, extra = d.conditioning({{"context": torch.zeros(2, 77, 2048), "pooled": pooled, "size": sizes}}, "cpu")
        y = extra["y"]
        base = model.model
        ref = torch.cat([base.encode_adm(pooled_output=pooled[i:i + 1], height=h, width=w, crop_h=ct, crop_w=cl,
                                         target_height=th, target_width=tw, device="cpu")
                         for i, (h, w, ct, cl, th, tw) in enumerate(sizes.tolist())])
        default = base.encode_adm(pooled_output=pooled[:1], device="cpu")
        out["y_shape"] = list(y.shape)
        out["y_equals_comfyui_with_sizes"] = bool(torch.equal(y, ref))
        out["y_differs_from_768_default"] = bool(not torch.equal(y[:1], default))
        out["family"] = d.family.name
        out["auto_res"] = list(families.auto_resolution(clip))  # Load Dataset's auto: read from the CLIP
        sd1_clip = types.SimpleNamespace(cond_stage_model=type("SD1ClipModel", (), {{}})())
        out["auto_res_sd1"] = list(families.auto_resolution(sd1_clip))

    def refusal(patcher):
        try:
            families.detect(patcher)
        except errors.KilnUserError as exc:
            return str(exc)
        return None

    def fake(config_name, in_channels=4, concat_keys=(), sampling=None, patches=None, **unet):
        cfg = type(config_name, (), {{"unet_config": {{"in_channels": in_channels, **unet}}}})()
        inner = types.SimpleNamespace(model_config=cfg, concat_keys=concat_keys,
                                      latent_format=types.SimpleNamespace(latent_channels=in_channels))
        return types.SimpleNamespace(model=inner, get_model_object=lambda name: sampling,
                                     object_patches=patches or {{}})

    eps = type("MS", (ms.ModelSamplingDiscrete, ms.EPS), {{}})()
    x0 = type("MS", (ms.ModelSamplingDiscrete, ms.X0), {{}})()
    flow = type("MS", (ms.ModelSamplingDiscreteFlow, ms.CONST), {{}})()
    out["sd3"] = refusal(fake("SD3", 16, sampling=flow))
    flux_sampling = type("MS", (ms.ModelSamplingFlux, ms.CONST), {{}})()  # FLUX.1-dev's, shift (mu) 1.15
    dev = families.detect(fake("Flux", 16, sampling=flux_sampling, guidance_embed=True))
    fixed = families.detect(fake("Flux", 16, sampling=flux_sampling, patches={{"model_sampling": flux_sampling}},
                                 guidance_embed=True))
    schnell_sampling = type("MS", (ms.ModelSamplingDiscreteFlow, ms.CONST), {{}})()
    schnell_sampling.set_parameters(shift=1.0, multiplier=1.0)  # FluxSchnell's sampling_settings
    schnell = families.detect(fake("FluxSchnell", 16, sampling=schnell_sampling, guidance_embed=False))
    out["flux"] = {{name: [d.family.name, d.base_model_version, d.model_spec, d.guidance, d.objective.prediction_type,
                           d.objective.flow_shift, d.objective.timestep_multiplier,
                           list(d.objective.flow_shift_by_size or [])]
                   for name, d in (("dev", dev), ("dev_fixed", fixed), ("schnell", schnell))}}
    out["flux_eps"] = refusal(fake("Flux", 16, sampling=eps))
    out["sd3_eps"] = refusal(fake("SD3", 16, sampling=eps))
    out["sdxl_flow"] = refusal(fake("SDXL", sampling=flow))
    out["others"] = {{name: refusal(fake(name, 16, sampling=flow)) for name in {others!r}}}
    out["edit"] = refusal(fake("QwenImage", 64, sampling=flow, default_ref_method="index_timestep_zero"))
    out["inpaint"] = refusal(fake("SD15", 9, ("mask", "masked_image"), sampling=eps))
    out["x0"] = refusal(fake("SDXL", sampling=x0))
    out["sd15_eps"] = refusal(fake("SD15", sampling=eps))
    print("RESULT " + json.dumps(out))
    """
)


# models no family entry claims that the generic path must not train (in both ComfyUI versions) -> a word of the
# reason the refusal gives; every other image model trains through the generic path (test_generic_families.py)
OTHERS = {"FluxInpaint": "input image", "ChromaRadiance": "pixel space", "Stable_Cascade_C": "Wuerstchen",
          "SDXLRefiner": "refiner", "SD21UnclipH": "input image", "SDXL_instructpix2pix": "input image",
          "LotusD": "not a diffusion model", "WAN21_I2V": "video model", "HunyuanVideo": "video model",
          "StableAudio": "audio model", "Hunyuan3Dv2": "3D", "SVD_img2vid": "video model"}


def test_sdxl_size_conditioning_is_explicit_and_unsupported_models_are_refused_by_name(sdxl_checkpoint, tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT.format(repo=str(REPO), ckpt=str(sdxl_checkpoint), others=list(OTHERS)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(line[len("RESULT "):])
    assert out["family"] == "SDXL" and out["y_shape"] == [2, 2816]
    assert out["auto_res"][0] == 1024 and "SDXLClipModel" in out["auto_res"][1] and out["auto_res_sd1"][0] == 512
    assert out["y_equals_comfyui_with_sizes"] and out["y_differs_from_768_default"]
    assert out["sd3"] is None  # rectified flow: trained since issue 13
    e = 2.718281828459045
    dev, fixed, schnell = out["flux"]["dev"], out["flux"]["dev_fixed"], out["flux"]["schnell"]
    # FLUX.1-dev as loaded: the shift follows the image size (mu from 0.5 at 256 tokens to the model's 1.15)
    assert dev[:5] == ["FLUX.1", "flux1", "flux1-dev", True, "flow"] and dev[6] == 1.0, dev
    assert abs(dev[5] - e ** 1.15) < 1e-9 and dev[7] == [0.5, 1.15, 2], dev
    assert fixed[7] == [] and abs(fixed[5] - e ** 1.15) < 1e-9, fixed  # a ModelSamplingFlux node fixed it
    assert schnell[:5] == ["FLUX.1", "flux1", "flux1-schnell", False, "flow"] and schnell[5:] == [1.0, 1.0, []]
    assert "samples as epsilon, but FLUX.1 trains as flow" in out["flux_eps"], out["flux_eps"]
    assert "samples as epsilon, but SD3/SD3.5 trains as flow" in out["sd3_eps"], out["sd3_eps"]
    assert "samples as flow, but SDXL trains as epsilon / v_prediction" in out["sdxl_flow"], out["sdxl_flow"]
    assert set(out["others"]) == set(OTHERS)
    for name, message in out["others"].items():
        assert f"cannot train {name} models" in message and OTHERS[name] in message, message
        assert "SD1.x, SD2.x, SDXL, SD3/SD3.5" in message and "generically" in message, message
    assert "Qwen-Image-Edit-2511" in out["edit"] and "reference image" in out["edit"], out["edit"]
    assert "inpainting" in out["inpaint"] and "9 input channels" in out["inpaint"], out["inpaint"]
    assert "X0" in out["x0"] and "Inject LoRA" in out["x0"], out["x0"]
    assert out["sd15_eps"] is None  # the plain model passes
