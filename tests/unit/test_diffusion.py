"""The step math of lora_core.diffusion, cross-checked on the same tensors against diffusers' reference code.

diffusers' DDPMScheduler (add_noise, get_velocity), its zero-terminal-SNR rescale and training_utils.compute_snr
are the references; the min-SNR-gamma weights follow diffusers' train_text_to_image(_lora) scripts.
"""

from __future__ import annotations

import pytest
import torch

from lora_core import TrainConfig
from lora_core.diffusion import (
    add_noise,
    diffusion_loss,
    min_snr_weights,
    sample_timesteps,
    snr,
    training_target,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMScheduler  # noqa: E402
from diffusers.training_utils import compute_snr  # noqa: E402


def sd_scheduler(**kw) -> DDPMScheduler:
    """SD1.x/SD2.x/SDXL's schedule: scaled_linear betas 0.00085 .. 0.012 over 1000 steps (ComfyUI's default too)."""
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         **kw)


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(6, 4, 8, 8, generator=g)
    noise = torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    return latents, noise, t


def test_noising_and_the_v_target_equal_diffusers(tensors):
    latents, noise, t = tensors
    sched = sd_scheduler()
    ac = sched.alphas_cumprod.float()
    torch.testing.assert_close(add_noise(latents, noise, ac, t), sched.add_noise(latents, noise, t))
    torch.testing.assert_close(training_target("v_prediction", latents, noise, ac, t),
                               sched.get_velocity(latents, noise, t))
    assert torch.equal(training_target("epsilon", latents, noise, ac, t), noise)
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        training_target("sample", latents, noise, ac, t)


def test_alphas_from_comfyui_sigmas_are_diffusers_alphas():
    """The corridor hands the engine 1 / (sigma^2 + 1) of ComfyUI's sigmas; ComfyUI's sigmas are
    sqrt((1 - a) / a) of the same scaled_linear schedule, so the round trip must give diffusers' alphas back."""
    ac = sd_scheduler().alphas_cumprod.double()
    sigmas = ((1 - ac) / ac).sqrt()
    torch.testing.assert_close(1.0 / (sigmas**2 + 1.0), ac)


def test_snr_equals_diffusers_compute_snr(tensors):
    _, _, t = tensors
    sched = sd_scheduler()
    torch.testing.assert_close(snr(sched.alphas_cumprod.float(), t), compute_snr(sched, t), rtol=1e-5, atol=1e-6)


def _reference_min_snr(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    # diffusers examples/text_to_image/train_text_to_image_lora.py
    w = torch.stack([snr_t, gamma * torch.ones_like(snr_t)], dim=1).min(dim=1)[0]
    return w / snr_t if prediction_type == "epsilon" else w / (snr_t + 1)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_equal_the_diffusers_formula(tensors, prediction_type):
    _, _, t = tensors
    sched = sd_scheduler()
    snr_t = compute_snr(sched, t)
    torch.testing.assert_close(min_snr_weights(snr_t, 5.0, prediction_type), _reference_min_snr(snr_t, 5.0, prediction_type))


def test_zero_terminal_snr_keeps_min_snr_finite():
    """At zero-terminal SNR the last timestep has SNR 0: diffusers' epsilon formula divides by zero there; the
    v weights (what v-prediction ztsnr models train with) are 0 at SNR 0, and nothing is NaN or inf."""
    sched = sd_scheduler(rescale_betas_zero_snr=True)
    ac = sched.alphas_cumprod.float()
    assert ac[-1] == 0
    t = torch.arange(1000)
    snr_t = snr(ac, t)
    assert snr_t[-1] == 0
    for kind in ("epsilon", "v_prediction"):
        w = min_snr_weights(snr_t, 5.0, kind)
        assert torch.isfinite(w).all(), kind
    assert min_snr_weights(snr_t, 5.0, "v_prediction")[-1] == 0
    # ComfyUI's zsnr schedule keeps a tiny last alpha instead of 0 (sigma_max about 4500): finite as well
    comfy_like = ac.clone()
    comfy_like[-1] = 4.8973451890853435e-08
    assert torch.isfinite(min_snr_weights(snr(comfy_like, t), 5.0, "v_prediction")).all()


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
def test_timesteps_stay_in_the_configured_range(sampling):
    cfg = TrainConfig(timestep_sampling=sampling, min_timestep=100, max_timestep=400)
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(20_000, 1000, cfg, g)
    assert t.dtype == torch.long and int(t.min()) >= 100 and int(t.max()) <= 399
    assert int(t.min()) <= 110 and int(t.max()) >= 390  # the whole range is reached
    full = sample_timesteps(20_000, 1000, TrainConfig(timestep_sampling=sampling), g)
    assert int(full.min()) >= 0 and int(full.max()) <= 999
    if sampling == "logit_normal":  # mass in the middle, as SD3's paper describes
        assert (full - 500).abs().float().mean() < (torch.randint(0, 1000, (20_000,), generator=g) - 500).abs().float().mean()


def test_diffusion_loss_uses_the_v_target_and_min_snr_weights(tensors):
    """One micro-batch through diffusion_loss equals the loss written out with diffusers' functions."""
    latents, _, _ = tensors
    sched = sd_scheduler()

    class Echo:  # returns a fixed prediction, so the loss is a pure function of target and weights
        prediction_type = "v_prediction"
        alphas_cumprod = sched.alphas_cumprod.float()

        def scale_latents(self, x):
            return x

        def __call__(self, x, t, cond):
            return torch.zeros_like(x)

    cfg = TrainConfig(min_snr_gamma=5.0)
    got = diffusion_loss(Echo(), latents, {}, cfg, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # the same draws, in the same order: timesteps, then noise
    t = torch.randint(0, 1000, (latents.shape[0],), generator=g)
    noise = torch.randn(latents.shape, generator=g)
    v = sched.get_velocity(latents, noise, t)
    per_sample = (v**2).mean(dim=(1, 2, 3)) * _reference_min_snr(compute_snr(sched, t), 5.0, "v_prediction")
    torch.testing.assert_close(got, per_sample.mean())
