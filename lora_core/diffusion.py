"""The math of one diffusion training step, behind a small interface the host implements.

The host (ComfyUI, or a test) supplies a :class:`DiffusionModel`: the noise schedule as
``alphas_cumprod``, the prediction type, and a call ``model(noisy_latents, timesteps, cond)`` that returns
the raw network output. Everything else lives here: timestep sampling, noise (with offset), the
epsilon / v-prediction target, the loss and min-SNR-gamma weighting.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from .config import TrainConfig


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
      the dtype the network's inputs must have when autocast is off.
    """

    prediction_type: str  # "epsilon" | "v_prediction"
    alphas_cumprod: torch.Tensor  # [T], float32

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


def diffusion_loss(
    model: DiffusionModel,
    latents: torch.Tensor,
    cond: Mapping[str, torch.Tensor],
    config: TrainConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """Mean loss of one micro-batch (scalar, float32, differentiable w.r.t. the adapters)."""
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
