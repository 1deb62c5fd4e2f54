"""The network the engine trains: ComfyUI's diffusion model, called the way ComfyUI's own sampler calls it.

The engine (``lora_core.diffusion``) noises latents and picks the target from plain data (the family's
:class:`~.families.Objective`); this adapter turns one micro-batch into the diffusion model's inputs. Extra inputs
(SDXL's ``y`` vector: pooled CLIP-G output + size embeddings) come from ComfyUI's own ``BaseModel.extra_conds``, per
sample, with each sample's own sizes: ComfyUI's ``SDXL.encode_adm`` would silently use 768 x 768 and crop 0
when they are missing. FLUX.1 takes CLIP-L's pooled output as ``y`` and (dev) the training guidance; Chroma only the
guidance ComfyUI samples it with (0).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .errors import KilnUserError
from .families import Detected, detect
from .text_encoders import EXTRA, TextEncoder

SIZE = "size"  # cond key: [orig_h, orig_w, crop_top, crop_left, target_h, target_w] per sample (SDXL)


class ComfyDiffusion:
    """:class:`lora_core.DiffusionModel` over a ComfyUI ModelPatcher of a family in :mod:`.families`."""

    def __init__(self, patcher: Any, text_encoder: TextEncoder | None = None, detected: Detected | None = None,
                 guidance: float = 1.0) -> None:
        self.detected = detected or detect(patcher)  # refuses what Kiln cannot train, by name
        self.family = self.detected.family
        self.base = patcher.model
        self.unet: nn.Module = self.base.diffusion_model
        self.text_encoder = text_encoder
        objective = self.detected.objective
        self.prediction_type = objective.prediction_type
        self.alphas_cumprod = objective.alphas_cumprod
        self.flow_shift = objective.flow_shift  # flow: the engine draws sigmas with it (unless the run overrides it)
        self.flow_shift_by_size = objective.flow_shift_by_size  # FLUX.1-dev as loaded: per image size instead
        self.expert_boundary = objective.expert_boundary  # Wan 2.2 14B: where the high-noise expert hands over
        self.guidance = guidance  # guidance-distilled models: the value fed while training (TrainConfig.guidance)
        self._timestep_scale = objective.timestep_multiplier if objective.prediction_type == "flow" else 1.0
        self.weight_dtype: torch.dtype = self.base.get_dtype()  # as stored: fp16 on most GPUs, maybe fp8
        self.manual_cast_dtype: torch.dtype | None = self.base.manual_cast_dtype  # ComfyUI's ops cast per layer to it
        self.dtype = self.manual_cast_dtype or self.weight_dtype  # what ComfyUI's own sampler feeds the network
        self.compute_dtype: torch.dtype | None = None  # set by the trainer for a run (its frozen-weight copies' dtype)

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if self.base.latent_format.latent_dimensions == 3 and latents.ndim == 4:
            latents = latents.unsqueeze(2)  # an image as a one-frame video latent (Qwen-Image's Wan VAE space)
        return self.base.process_latent_in(latents)

    def conditioning(self, cond: Mapping[str, torch.Tensor], device: torch.device,
                     x: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """(context, extra diffusion-model kwargs) for a batch, through ComfyUI's ``extra_conds``."""
        if any(k.startswith("tokens.") for k in cond):  # text-encoder training: encode with gradients
            if self.text_encoder is None:
                raise KilnUserError("this dataset was prepared for text-encoder training but no CLIP was given")
            context, pooled = self.text_encoder(cond)
        else:
            context, pooled = cond["context"], cond.get("pooled")
        names = self.family.extra_inputs
        if names is None:
            return self._extra_conds(context, pooled, device, {k[len(EXTRA):]: v for k, v in cond.items()
                                                               if k.startswith(EXTRA)}, x)
        if not names:
            return context, {}
        if pooled is None and "y" in names:
            raise KilnUserError(
                f"{self.family.name} needs the pooled text-encoder output; the CLIP gave none. Connect the CLIP of the "
                "same model to Load Dataset (FLUX.1: DualCLIPLoader with clip_l + t5xxl, type flux)")
        sizes = cond.get(SIZE)
        rows: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        for i in range(context.shape[0]):
            # as CLIPTextEncode's conditioning carries it: None for a T5-only encoder (Chroma)
            kwargs: dict[str, Any] = {"device": device,
                                      "pooled_output": None if pooled is None else pooled[i : i + 1].to(device)}
            if self.detected.guidance:  # FLUX.1-dev; other models get ComfyUI's own default (Chroma: 0)
                kwargs["guidance"] = self.guidance
            if sizes is not None:
                oh, ow, ct, cl, th, tw = (int(v) for v in sizes[i].tolist())
                kwargs.update(height=oh, width=ow, crop_h=ct, crop_w=cl, target_height=th, target_width=tw)
            conds = self.base.extra_conds(**kwargs)
            for name in names:
                rows[name].append(conds[name].cond)
        return context, {name: torch.cat(r).to(device) for name, r in rows.items()}

    def _extra_conds(self, context: torch.Tensor, pooled: torch.Tensor | None, device: torch.device,
                     encoder_extras: Mapping[str, torch.Tensor],
                     x: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Every input ComfyUI's ``extra_conds`` gives for each sample's text conditioning, as its sampler passes them:
        the context it returns (a family may pad it: FLUX.2 to 512 tokens), tensors batched, constants (Z-Image's
        ``num_tokens``) once (a batch holds captions of one length: the dataset batches by shape). ``encoder_extras``:
        the text encoder's other outputs per sample (attention masks, HiDream's Llama states), as CLIPTextEncode puts
        them into the conditioning. As ComfyUI's ``encode_model_conds``, each call also gets the latent (``noise``)
        and the image size it implies (``width`` / ``height``: latent side x 8), which some models' micro-conditions
        read (PixArt-alpha, HunyuanDiT)."""
        contexts: list[torch.Tensor] = []
        rows: dict[str, list[Any]] = {}
        for i in range(context.shape[0]):
            kwargs: dict[str, Any] = {"device": device, "cross_attn": context[i : i + 1].to(device),
                                      "pooled_output": None if pooled is None else pooled[i : i + 1].to(device),
                                      **{k: v[i : i + 1].to(device) for k, v in encoder_extras.items()}}
            if self.detected.guidance:
                kwargs["guidance"] = self.guidance
            if x is not None:
                sample = x[i : i + 1]
                kwargs.update(noise=sample, height=sample.shape[2] * 8, prompt_type="positive",
                              width=sample.shape[3] * 8 if sample.ndim >= 4 else None)
            conds = self.base.extra_conds(**kwargs)
            if "c_concat" in conds:
                raise KilnUserError(f"{self.family.name} asks for a concatenated image input (c_concat), which a "
                                    "text-to-image dataset lacks: load the plain text-to-image model")
            contexts.append(conds.pop("c_crossattn").cond if "c_crossattn" in conds else kwargs["cross_attn"])
            for name, value in conds.items():
                rows.setdefault(name, []).append(value.cond)
        extra: dict[str, Any] = {}
        for name, values in rows.items():
            if isinstance(values[0], torch.Tensor):
                extra[name] = torch.cat(values).to(device)
            elif all(v == values[0] for v in values):
                extra[name] = values[0]
            else:
                raise KilnUserError(f"{self.family.name}: the samples of one batch differ in {name} ({values}); "
                                    "train with batch_size 1")
        return torch.cat(contexts), extra

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            dtype = x.dtype  # autocast picks each op's dtype
        else:
            dtype = self.compute_dtype or self.dtype  # fp32 when the trainer swapped fp32 copies in
        context, extra = self.conditioning(cond, x.device, x)
        extra = {k: v.to(x.device, dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                 for k, v in extra.items()}
        # DDPM: integer timesteps as ComfyUI passes them; flow: the engine's sigmas on the network's timestep scale
        # (ComfyUI's model_sampling.timestep: sigma * multiplier, 1000 for SD3)
        timesteps = t.float() * self._timestep_scale
        # a model may change the timestep from the latent and its conditions before its network (ComfyUI's
        # _apply_model: process_timestep; MageFlow rounds it to bf16); the identity for most
        timesteps = self.base.process_timestep(timesteps, x=x, **extra)
        return self.unet(x.to(dtype), timesteps, context=context.to(x.device, dtype), **extra).float()
