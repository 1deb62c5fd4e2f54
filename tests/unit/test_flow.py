"""The rectified-flow objective of lora_core.diffusion (SD3, Flux), cross-checked against diffusers' reference code.

References on the same tensors: ``FlowMatchEulerDiscreteScheduler`` (its shifted sigmas and ``scale_noise``),
``diffusers.training_utils.compute_density_for_timestep_sampling`` (the sigma density, same generator) and
``compute_loss_weighting_for_sd3`` (the loss weights). The target ``eps - x_0`` is checked by a model that
predicts it exactly (loss 0) and by training that learns it.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lora_core import AdapterConfig, AdapterSet, TrainConfig, Trainer, TrainState
from lora_core.config import AUTO_GAMMA, auto_defaults
from lora_core.data.latents import LatentDataset, LatentItem
from lora_core.diffusion import (
    check_objective,
    diffusion_loss,
    expert_sigma_range,
    flow_loss_weights,
    flow_noisy,
    model_flow_shift,
    resolution_shift,
    sample_flow_sigmas,
    shift_sigmas,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # noqa: E402
from diffusers.training_utils import (  # noqa: E402
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)


@pytest.mark.parametrize("shift", [1.0, 3.0, 1.15])
def test_shifted_sigmas_are_diffusers_flow_match_sigmas(shift):
    """diffusers' scheduler (as SD3 ships it, shift 3.0) holds shift(s) for s = 1 .. 1/1000: ours on the same s."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    s = torch.linspace(1.0, 1.0 / 1000, 1000)
    assert torch.allclose(shift_sigmas(s, shift), scheduler.sigmas.float(), atol=1e-6, rtol=1e-5)
    assert torch.allclose(shift_sigmas(s, shift) * 1000, scheduler.timesteps.float(), atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("side", [256, 512, 768, 1024, 1536])
def test_flux_resolution_shift_is_diffusers_dynamic_shift(side):
    """Flux.1 samples an image of ``side`` px (latent side / 8, 2 x 2 patches) with diffusers' dynamic shifting:
    mu = calculate_shift(tokens) and the scheduler's exponential time shift; ours is shift_sigmas with exp(mu), from
    a latent of that size."""
    tokens = (side // 16) ** 2
    mu = calculate_shift(tokens)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True)
    s = torch.linspace(1.0, 1.0 / 1000, 1000)
    reference = scheduler.time_shift(mu, 1.0, s)
    assert resolution_shift(tokens) == pytest.approx(math.exp(mu), rel=1e-12)
    assert torch.allclose(shift_sigmas(s, resolution_shift(tokens)), reference.float(), atol=1e-6)

    class FluxLike(ExactVelocity):
        flow_shift_by_size = (0.5, 1.15, 2)

    latents = torch.zeros(1, 16, side // 8, side // 8)
    assert model_flow_shift(FluxLike(), latents) == pytest.approx(math.exp(mu), rel=1e-9)
    assert model_flow_shift(ExactVelocity(), latents) == 3.0  # a fixed shift (SD3) does not depend on the size


def test_noising_is_diffusers_scale_noise():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g)
    for index in (0, 1, 500, 998, 999):
        timestep = scheduler.timesteps[index : index + 1]
        reference = scheduler.scale_noise(latents, timestep, noise)
        ours = flow_noisy(latents, noise, scheduler.sigmas[index : index + 1])
        assert torch.allclose(ours, reference, atol=1e-6), index


@pytest.mark.parametrize("sampling,mean,std", [("logit_normal", 0.0, 1.0), ("logit_normal", 0.5, 1.3),
                                               ("uniform", 0.0, 1.0)])
def test_sigma_density_is_diffusers_density_with_the_same_generator(sampling, mean, std):
    """Unshifted (shift 1) over the full range, the sigmas are diffusers' ``u`` draw for draw."""
    config = TrainConfig(timestep_sampling=sampling, logit_mean=mean, logit_std=std)
    ours = sample_flow_sigmas(64, config, 1.0, torch.Generator().manual_seed(7))
    scheme = "logit_normal" if sampling == "logit_normal" else "none"
    reference = compute_density_for_timestep_sampling(scheme, 64, logit_mean=mean, logit_std=std,
                                                      generator=torch.Generator().manual_seed(7))
    assert torch.allclose(ours, reference.clamp(1e-5, 1.0), atol=1e-7)
    shifted = sample_flow_sigmas(64, config, 3.0, torch.Generator().manual_seed(7))
    assert torch.allclose(shifted, shift_sigmas(reference.clamp(1e-5, 1.0), 3.0), atol=1e-6)
    assert bool((shifted > ours).all())  # shift > 1 moves every sigma towards noise


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = torch.cat([a, b]).sort().values
    cdf = lambda x: torch.searchsorted(x.sort().values, grid, right=True).float() / len(x)  # noqa: E731
    return float((cdf(a) - cdf(b)).abs().max())


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
@pytest.mark.parametrize("expert", ["high_noise", "low_noise"])
def test_an_expert_trains_its_own_noise_levels_with_the_distribution_s_shape(sampling, expert):
    """Wan 2.2 14B: the high-noise expert samples sigma >= 0.875 (after Wan's shift 8), the low-noise one below; inside
    its range each keeps the shape of the full distribution (the full draw filtered to the range, as musubi's
    preserve_distribution_shape does by redrawing)."""
    config = TrainConfig(timestep_sampling=sampling, expert=expert)
    lo, hi = expert_sigma_range(expert, 0.875)
    ours = sample_flow_sigmas(20000, config, 8.0, torch.Generator().manual_seed(1), (lo, hi))
    assert float(ours.min()) >= lo - 1e-6 and float(ours.max()) <= hi + 1e-6
    full = sample_flow_sigmas(200000, TrainConfig(timestep_sampling=sampling), 8.0, torch.Generator().manual_seed(2))
    filtered = full[(full >= lo) & (full <= hi)]
    assert len(filtered) > 10000
    assert _ks(ours, filtered) < 0.02
    # and not merely any distribution on the range: the uniform one over it is far from it
    assert _ks(ours, torch.rand(20000, generator=torch.Generator().manual_seed(3)) * (hi - lo) + lo) > 0.05


def test_an_expert_needs_a_two_expert_model():
    with pytest.raises(ValueError, match="expert='high_noise' is for two-expert models"):
        expert_sigma_range("high_noise", 0.0)
    with pytest.raises(ValueError, match="expert='low_noise' is for two-expert flow models"):
        check_objective(TrainConfig(expert="low_noise"), "epsilon")
    with pytest.raises(ValueError, match="expert='middle'"):
        TrainConfig(expert="middle")


def test_the_timestep_range_limits_the_unshifted_sigmas():
    config = TrainConfig(min_timestep=200, max_timestep=600)
    u = sample_flow_sigmas(2000, config, 1.0, torch.Generator().manual_seed(0))
    assert u.min() >= 0.2 and u.max() <= 0.6 and u.max() - u.min() > 0.39


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap"])
def test_loss_weights_are_diffusers_sd3_weights(scheme):
    sigmas = torch.tensor([0.01, 0.2, 0.5, 0.77, 1.0])
    reference = compute_loss_weighting_for_sd3(scheme, sigmas)
    assert torch.allclose(flow_loss_weights(sigmas, scheme), reference.float(), rtol=1e-6)


class ExactVelocity:
    """Predicts ``eps - x_0`` exactly from ``x_t`` and sigma, knowing ``x_0`` (in ``cond``): loss 0 only if the
    engine noises with ``(1 - sigma) x_0 + sigma eps``, passes sigma (not a 0..1000 timestep) and targets
    ``eps - x_0``."""

    prediction_type = "flow"
    alphas_cumprod = torch.empty(0)
    flow_shift = 3.0

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def scale_latents(self, x):
        return x

    def __call__(self, x, sigma, cond):
        self.seen.append(sigma)
        s = sigma.view(-1, 1, 1, 1)
        return (x - cond["x0"]) / s


class PredictsZero(ExactVelocity):
    def __call__(self, x, sigma, cond):
        return torch.zeros_like(x)


def test_a_model_that_predicts_the_velocity_exactly_has_zero_loss():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 16, 4, 4, generator=g)
    model = ExactVelocity()
    for scheme in ("none", "cosmap"):
        config = TrainConfig(timestep_sampling="logit_normal", loss_weighting=scheme)
        loss = diffusion_loss(model, x0, {"x0": x0}, config, torch.Generator().manual_seed(1))
        assert loss.item() < 1e-8, (scheme, loss.item())
    assert all(0 < s.min() and s.max() <= 1 for s in model.seen)  # sigmas, not timesteps
    loss = diffusion_loss(PredictsZero(), x0, {"x0": x0}, TrainConfig(), torch.Generator().manual_seed(1))
    assert loss.item() > 1.0  # |eps - x0|^2 with both unit Gaussians: about 2


class FlowRegression:
    """x_0 = 0, so x_t = sigma eps and the target eps = x_t / sigma: learnable exactly by a linear map of x_t,
    divided by the sigma the engine passes."""

    prediction_type = "flow"
    alphas_cumprod = torch.empty(0)
    flow_shift = 3.0

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 4, bias=False))

    def scale_latents(self, x):
        return x

    def __call__(self, x, sigma, cond):
        return self.net(x.transpose(1, 3)).transpose(1, 3) / sigma.view(-1, 1, 1, 1)


def test_flow_training_learns_the_velocity():
    model = FlowRegression()
    items = tuple(LatentItem(torch.zeros(4, 2, 2), {"c": torch.zeros(1)}) for _ in range(4))
    adapters = AdapterSet.create({"m": model.net}, AdapterConfig(rank=4, alpha=4, unet_targets="all"), seed=0)
    trainer = Trainer(model, {"m": model.net})
    cfg = TrainConfig(steps=300, learning_rate=3e-2, batch_size=4, weight_decay=0.0, max_grad_norm=0,
                      timestep_sampling="logit_normal")
    losses = [h[1] for h in trainer.run(TrainState.from_adapters(adapters), LatentDataset(items), cfg).state.history]
    assert losses[0] > 0.2
    assert sum(losses[-20:]) / 20 < 0.05 * losses[0]


def test_ddpm_settings_on_a_flow_model_and_flow_settings_on_a_ddpm_model_are_refused_by_name():
    with pytest.raises(ValueError, match=r"min_snr_gamma=5 .* set min_snr_gamma to 0"):
        check_objective(TrainConfig(min_snr_gamma=5.0), "flow")
    with pytest.raises(ValueError, match=r"loss_weighting='cosmap' .* epsilon: set loss_weighting to none"):
        check_objective(TrainConfig(loss_weighting="cosmap"), "epsilon")
    with pytest.raises(ValueError, match=r"flow_shift=3 .* v_prediction: set flow_shift to 0"):
        check_objective(TrainConfig(flow_shift=3.0), "v_prediction")
    check_objective(TrainConfig(loss_weighting="cosmap", flow_shift=3.0), "flow")
    check_objective(TrainConfig(min_snr_gamma=5.0), "epsilon")
    with pytest.raises(ValueError, match="loss_weighting='mode'.*none, sigma_sqrt, cosmap"):
        TrainConfig(loss_weighting="mode")
    # the trainer checks before its first step
    model = FlowRegression()
    adapters = AdapterSet.create({"m": model.net}, AdapterConfig(rank=2, alpha=2, unet_targets="all"), seed=0)
    items = (LatentItem(torch.zeros(4, 2, 2), {"c": torch.zeros(1)}),)
    with pytest.raises(ValueError, match="min_snr_gamma"):
        Trainer(model, {"m": model.net}).run(TrainState.from_adapters(adapters), LatentDataset(items),
                                             TrainConfig(steps=1, min_snr_gamma=5.0))


def test_auto_settings_resolve_per_objective_and_explicit_ones_stay():
    """``auto`` (the node's default) is min-SNR 5 + uniform on DDPM models and no min-SNR + logit-normal on flow
    models; an explicit value is kept, so a wrong one is still refused by name."""
    auto = TrainConfig(min_snr_gamma=AUTO_GAMMA, timestep_sampling="auto")
    assert auto.auto_fields == ("min_snr_gamma", "timestep_sampling")
    flow = auto.resolved(auto_defaults("flow"))
    ddpm = auto.resolved(auto_defaults("v_prediction"))
    assert (flow.min_snr_gamma, flow.timestep_sampling, flow.auto_fields) == (0.0, "logit_normal", ())
    assert (ddpm.min_snr_gamma, ddpm.timestep_sampling) == (5.0, "uniform")
    check_objective(flow, "flow")
    explicit = TrainConfig(min_snr_gamma=5.0, timestep_sampling="auto").resolved(auto_defaults("flow"))
    assert explicit.min_snr_gamma == 5.0 and explicit.timestep_sampling == "logit_normal"
    with pytest.raises(ValueError, match=r"min_snr_gamma=5 .* set min_snr_gamma to 0"):
        check_objective(explicit, "flow")
    assert TrainConfig(min_snr_gamma=-0.5).auto_fields == ("min_snr_gamma",)  # any negative value: the slider's
    with pytest.raises(ValueError, match=r"min_snr_gamma \(-1 = auto\)=101"):
        TrainConfig(min_snr_gamma=101.0)


def test_a_flow_model_trains_on_the_auto_defaults_without_a_change():
    """A freshly placed Train Steps (auto settings) on a flow model trains: the trainer resolves what the host left
    at auto, and draws the logit-normal sigmas (the same first loss as an explicit logit_normal run)."""
    model = FlowRegression()
    items = tuple(LatentItem(torch.zeros(4, 2, 2), {"c": torch.zeros(1)}) for _ in range(2))

    def first_loss(cfg: TrainConfig) -> float:
        adapters = AdapterSet.create({"m": model.net}, AdapterConfig(rank=2, alpha=2, unet_targets="all"), seed=0)
        state = Trainer(model, {"m": model.net}).run(TrainState.from_adapters(adapters), LatentDataset(items), cfg).state
        return state.history[0][1]

    auto = first_loss(TrainConfig(steps=1, min_snr_gamma=AUTO_GAMMA, timestep_sampling="auto"))
    assert auto == first_loss(TrainConfig(steps=1, timestep_sampling="logit_normal"))
    assert auto != first_loss(TrainConfig(steps=1, timestep_sampling="uniform"))
