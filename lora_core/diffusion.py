"""The math of one diffusion training step, behind a small interface the host implements.

The host (ComfyUI, or a test) supplies a :class:`DiffusionModel`: the prediction type, the noise schedule
(``alphas_cumprod`` for the discrete DDPM schedules, ``flow_shift`` for rectified flow), and a call
``model(noisy_latents, timesteps, cond)`` that returns the raw network output. Everything else lives here:
timestep sampling, noise (with offset), the target, the loss and its weighting.

Two kinds of objective:

- **DDPM** (``epsilon``, ``v_prediction``): integer timesteps ``t`` into ``alphas_cumprod``,
  ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps``; min-SNR-gamma weighting.
- **Rectified flow** (``flow``: SD3, Flux, ...): a sigma in (0, 1] per sample,
  ``x_t = (1 - sigma) x_0 + sigma eps``, target ``eps - x_0`` (the velocity the model predicts). The sigma is
  drawn uniformly or logit-normally on (0, 1) and then shifted as the model samples, ``shift * s / (1 + (shift - 1)
  * s)`` (Flux.1: with a shift that grows with the image's token count, :func:`resolution_shift`); the model is
  called with the sigmas themselves (the host maps them to its own timestep scale). Loss
  weightings as in diffusers' SD3/Flux trainers: none, ``sigma_sqrt`` (1 / sigma^2), ``cosmap``.
  min-SNR-gamma is a DDPM weighting and is refused on a flow model (:func:`check_objective`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from .config import TrainConfig

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")
FLOW = "flow"


@runtime_checkable
class DiffusionModel(Protocol):
    """What the trainer needs from a denoising network.

    Optional attributes (read with ``getattr``; a host without them is trained as before, its dtype read from
    the weights), through which the host tells the trainer how its network stores and computes, and the
    trainer (:func:`lora_core.trainer.plan_precision`) decides the compute dtype:

    - ``weight_dtype: torch.dtype`` - the dtype the frozen weights are stored in (ComfyUI: fp16 on most GPUs);
    - ``manual_cast_dtype: torch.dtype | None`` - set when the host's layers cast their stored weights (fp8, ...)
      per layer to their input's dtype; the trainer then never copies them and computes in this dtype or autocast;
    - ``compute_dtype: torch.dtype | None`` - set by the trainer for the duration of a run (restored afterwards):
      the dtype the network's inputs must have when autocast is off;
    - ``flow_shift: float`` - flow models: the shift the model samples with (SD3: 3.0); ``config.flow_shift``
      overrides it when set;
    - ``flow_shift_by_size: tuple[float, float, int] | None`` - flow models whose shift depends on the image size
      (Flux.1): ``(base_shift, max_shift, patch_size)``, see :func:`resolution_shift`; it replaces ``flow_shift``
      (``config.flow_shift`` still overrides both).
    """

    prediction_type: str  # "epsilon" | "v_prediction" | "flow"
    alphas_cumprod: torch.Tensor  # [T], float32 (DDPM objectives; empty for flow)

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Map latents as the VAE produced them into the space the network was trained in."""
        ...

    def __call__(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: Mapping[str, torch.Tensor]
    ) -> torch.Tensor: ...


def sample_timesteps(
    batch: int, num_timesteps: int, config: TrainConfig, generator: torch.Generator
) -> torch.Tensor:
    """Integer timesteps in ``[min_timestep, min(max_timestep, num_timesteps))``, on the CPU."""
    lo = min(config.min_timestep, num_timesteps - 1)
    hi = min(config.max_timestep, num_timesteps)
    if config.timestep_sampling == "logit_normal":
        u = torch.randn(batch, generator=generator) * config.logit_std + config.logit_mean
        t = torch.sigmoid(u) * (hi - lo) + lo
        return t.long().clamp(lo, hi - 1)
    return torch.randint(lo, hi, (batch,), generator=generator)


def make_noise(latents: torch.Tensor, noise_offset: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise like ``latents`` (drawn on the CPU for device-independent runs), plus a per-channel offset."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    if noise_offset > 0:
        noise = noise + noise_offset * torch.randn(
            (latents.shape[0], latents.shape[1], 1, 1), generator=generator, dtype=torch.float32
        )
    return noise.to(latents.device)


def _gather(alphas_cumprod: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    a = alphas_cumprod.to(t.device)[t].float()
    return a.view(-1, *([1] * (ndim - 1)))


def add_noise(latents: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps``."""
    a = _gather(alphas_cumprod, t, latents.ndim)
    return a.sqrt() * latents + (1 - a).sqrt() * noise


def training_target(
    prediction_type: str, latents: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = _gather(alphas_cumprod, t, latents.ndim)
        return a.sqrt() * noise - (1 - a).sqrt() * latents
    raise ValueError(f"prediction_type={prediction_type!r} is not supported; allowed: epsilon, v_prediction")


def snr(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod.to(t.device)[t].float()
    return a / (1 - a).clamp_min(1e-8)


def min_snr_weights(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023): ``min(snr, gamma) / snr`` for epsilon, ``/(snr + 1)`` for v."""
    clipped = snr_t.clamp(max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr_t + 1)
    return clipped / snr_t.clamp_min(1e-8)


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """Per-sample loss, shape [B]."""
    pred = pred.float()
    target = target.float()
    if config.loss == "mse":
        loss = F.mse_loss(pred, target, reduction="none")
    elif config.loss == "l1":
        loss = F.l1_loss(pred, target, reduction="none")
    else:
        loss = F.huber_loss(pred, target, reduction="none", delta=config.huber_delta)
    return loss.mean(dim=tuple(range(1, loss.ndim)))


def check_objective(config: TrainConfig, prediction_type: str) -> None:
    """Refuse settings that belong to the other kind of objective, naming them and what to use instead."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r} is not supported; allowed: {', '.join(PREDICTION_TYPES)}")
    if prediction_type != FLOW and config.expert != "all":
        raise ValueError(
            f"expert={config.expert!r} is for two-expert flow models (Wan 2.2 14B); this model is {prediction_type}: "
            "set expert to all")
    if prediction_type == FLOW:
        if config.min_snr_gamma > 0:
            raise ValueError(
                f"min_snr_gamma={config.min_snr_gamma:g} is a weighting for DDPM (epsilon / v) models and has no "
                "meaning on this flow-matching model: set min_snr_gamma to 0 or -1 (auto) (use loss_weighting, e.g. "
                "cosmap, and timestep_sampling logit_normal instead)"
            )
    else:
        if config.loss_weighting != "none":
            raise ValueError(
                f"loss_weighting={config.loss_weighting!r} is for flow-matching models (SD3, Flux); this model is "
                f"{prediction_type}: set loss_weighting to none (min_snr_gamma is its weighting)"
            )
        if config.flow_shift > 0:
            raise ValueError(
                f"flow_shift={config.flow_shift:g} is for flow-matching models (SD3, Flux); this model is "
                f"{prediction_type}: set flow_shift to 0"
            )


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The time shift flow models sample with (SD3's, ComfyUI's ``time_snr_shift``): ``shift s / (1 + (shift-1) s)``."""
    if shift == 1.0:
        return sigmas
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def resolution_shift(tokens: float, base_shift: float = 0.5, max_shift: float = 1.15, base_tokens: int = 256,
                     max_tokens: int = 4096) -> float:
    """Flux.1's resolution-dependent shift, as the factor :func:`shift_sigmas` takes: ``exp(mu)``, with ``mu`` linear
    in the image's token count, ``base_shift`` at ``base_tokens`` and ``max_shift`` at ``max_tokens`` (ComfyUI's
    ModelSamplingFlux node, diffusers' ``calculate_shift``, kohya's ``flux_shift``). Flux's time shift
    ``e^mu / (e^mu + 1/s - 1)`` is exactly ``shift_sigmas(s, e^mu)``."""
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return math.exp(base_shift + slope * (tokens - base_tokens))


def model_flow_shift(model: DiffusionModel, latents: torch.Tensor) -> float:
    """The shift the model samples this batch's size with: its size-dependent one (Flux.1), else its fixed one."""
    by_size = getattr(model, "flow_shift_by_size", None)
    if by_size is not None:
        base_shift, max_shift, patch = by_size
        tokens = math.ceil(latents.shape[-2] / patch) * math.ceil(latents.shape[-1] / patch)
        return resolution_shift(tokens, base_shift, max_shift)
    return float(getattr(model, "flow_shift", 1.0))


def unshift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The inverse of :func:`shift_sigmas`: the unshifted ``s`` whose shifted value is ``sigmas``."""
    if shift == 1.0:
        return sigmas
    return sigmas / (shift - (shift - 1) * sigmas)


def sample_flow_sigmas(batch: int, config: TrainConfig, shift: float, generator: torch.Generator,
                       sigma_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Sigmas in (0, 1] (float32, on the CPU): ``u`` uniform or logit-normal, limited to
    ``[min_timestep, max_timestep) / 1000`` of the range, then shifted by ``shift``.

    With a ``sigma_range`` narrower than (0, 1) (one expert's noise levels, :func:`expert_sigma_range`) the draw is conditioned on the shifted sigma falling inside it: the
    distribution keeps its shape (as musubi-tuner's ``preserve_distribution_shape``) and is sampled exactly through
    its inverse CDF, since the shift is monotonic (no rejection loop)."""
    lo, hi = config.min_timestep / 1000.0, min(config.max_timestep / 1000.0, 1.0)
    if tuple(sigma_range) == (0.0, 1.0):
        if config.timestep_sampling == "logit_normal":
            u = torch.sigmoid(torch.normal(config.logit_mean, config.logit_std, (batch,), generator=generator))
        else:
            u = torch.rand(batch, generator=generator)
    else:
        # the raw draw's bounds whose scaled and shifted values land in sigma_range
        bounds = unshift_sigmas(torch.tensor(sigma_range, dtype=torch.float64), shift)
        a, b = ((bounds - lo) / (hi - lo)).clamp(0.0, 1.0).tolist()
        if b - a < 1e-6:
            raise ValueError(
                f"expert={config.expert} trains the noise levels {tuple(sigma_range)}, which min_timestep="
                f"{config.min_timestep} / max_timestep={config.max_timestep} exclude at shift {shift:g}: reset them to "
                "0 / 1000")
        v = torch.rand(batch, generator=generator, dtype=torch.float64)
        if config.timestep_sampling == "logit_normal":  # a normal truncated to [logit a, logit b], through its CDF
            normal = torch.distributions.Normal(torch.tensor(config.logit_mean, dtype=torch.float64),
                                                torch.tensor(config.logit_std, dtype=torch.float64))
            cdf = [normal.cdf(torch.logit(torch.tensor(x, dtype=torch.float64), eps=1e-12)) for x in (a, b)]
            u = torch.sigmoid(normal.icdf((cdf[0] + (cdf[1] - cdf[0]) * v).clamp(1e-12, 1 - 1e-12)))
        else:
            u = a + (b - a) * v
        u = u.float()
    u = lo + (hi - lo) * u
    return shift_sigmas(u.clamp(1e-5, 1.0), shift)


def expert_sigma_range(expert: str, boundary: float) -> tuple[float, float]:
    """The noise levels one expert of a two-expert model samples: ``high_noise`` from ``boundary`` up, ``low_noise``
    below it (``boundary``: the model's sigma where sampling switches experts; 0 = a single-expert model)."""
    if expert == "all":
        return (0.0, 1.0)
    if not 0.0 < boundary < 1.0:
        raise ValueError(
            f"expert={expert!r} is for two-expert models (Wan 2.2 14B: a high-noise and a low-noise checkpoint); this "
            "model is a single one, trained on every noise level: set expert to all")
    if expert == "high_noise":
        return (boundary, 1.0)
    if expert == "low_noise":
        return (0.0, boundary)
    raise ValueError(f"expert={expert!r} is not allowed; choose one of: all, high_noise, low_noise")


def flow_noisy(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - sigma) x_0 + sigma eps``."""
    s = sigmas.to(latents.device, torch.float32).view(-1, *([1] * (latents.ndim - 1)))
    return (1 - s) * latents + s * noise


def flow_loss_weights(sigmas: torch.Tensor, scheme: str) -> torch.Tensor:
    """Per-sample loss weights of diffusers' SD3/Flux trainers: none, sigma_sqrt (``sigma^-2``), cosmap."""
    sigmas = sigmas.float()
    if scheme == "sigma_sqrt":
        return sigmas.pow(-2.0)
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    if scheme == "none":
        return torch.ones_like(sigmas)
    raise ValueError(f"loss_weighting={scheme!r}; allowed: none, sigma_sqrt, cosmap")


def flow_loss(
    model: DiffusionModel,
    latents: torch.Tensor,
    cond: Mapping[str, torch.Tensor],
    config: TrainConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """Mean rectified-flow loss of one micro-batch: the model predicts ``eps - x_0`` at ``x_t``."""
    shift = config.flow_shift if config.flow_shift > 0 else model_flow_shift(model, latents)
    sigma_range = expert_sigma_range(config.expert, float(getattr(model, "expert_boundary", 0.0)))
    sigmas = sample_flow_sigmas(latents.shape[0], config, shift, generator, sigma_range)
    noise = make_noise(latents, config.noise_offset, generator)
    noisy = flow_noisy(latents.float(), noise, sigmas).to(latents.dtype)
    target = noise - latents.float()
    pred = model(noisy, sigmas.to(latents.device), cond)
    per_sample = elementwise_loss(pred, target, config) * flow_loss_weights(sigmas, config.loss_weighting).to(
        pred.device)
    return per_sample.mean()


def diffusion_loss(
    model: DiffusionModel,
    latents: torch.Tensor,
    cond: Mapping[str, torch.Tensor],
    config: TrainConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """Mean loss of one micro-batch (scalar, float32, differentiable w.r.t. the adapters)."""
    if model.prediction_type == FLOW:
        return flow_loss(model, latents, cond, config, generator)
    alphas_cumprod = model.alphas_cumprod
    t_cpu = sample_timesteps(latents.shape[0], alphas_cumprod.shape[0], config, generator)
    noise = make_noise(latents, config.noise_offset, generator)
    t = t_cpu.to(latents.device)
    noisy = add_noise(latents.float(), noise, alphas_cumprod, t).to(latents.dtype)
    target = training_target(model.prediction_type, latents.float(), noise, alphas_cumprod, t)
    pred = model(noisy, t, cond)
    per_sample = elementwise_loss(pred, target, config)
    if config.min_snr_gamma > 0:
        per_sample = per_sample * min_snr_weights(snr(alphas_cumprod, t), config.min_snr_gamma, model.prediction_type)
    return per_sample.mean()
