"""A tiny UNet with Stable Diffusion 1.5's (diffusers) module naming, and a DiffusionModel around it.

Small enough to train for 100 steps in a second on a CPU, shaped like the real thing where names matter:
``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``, ``...ff.net.0.proj``, ``...proj_in``,
``down_blocks.0.resnets.0.conv1`` and so on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

CTX = 16


class Attention(nn.Module):
    def __init__(self, dim: int, ctx_dim: int | None = None) -> None:
        super().__init__()
        ctx_dim = ctx_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(ctx_dim, dim, bias=False)
        self.to_v = nn.Linear(ctx_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        ctx = x if ctx is None else ctx
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[1](self.to_out[0](out))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * 2), nn.Dropout(0.0), nn.Linear(dim * 2, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.net:
            x = m(x)
        return x


class TransformerBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = Attention(dim)
        self.attn2 = Attention(dim, CTX)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), ctx)
        return x + self.ff(self.norm3(x))


class Transformer2D(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(8, ch)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(ch)])
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        for blk in self.transformer_blocks:
            y = blk(y, ctx)
        return x + self.proj_out(y.transpose(1, 2).reshape(b, c, h, w))


class Resnet(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(8, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.conv_shortcut(x) if self.conv_shortcut is not None else x)


class Down(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Up(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class CrossAttnBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, down: bool = False, up: bool = False) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([Resnet(cin, cout, temb)])
        self.attentions = nn.ModuleList([Transformer2D(cout)])
        if down:
            self.downsamplers = nn.ModuleList([Down(cout)])
        if up:
            self.upsamplers = nn.ModuleList([Up(cout)])

    def forward(self, x: torch.Tensor, temb: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        x = self.attentions[0](self.resnets[0](x, temb), ctx)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x)
        return x


class TimeEmbedding(nn.Module):
    def __init__(self, ch: int, temb: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(ch, temb)
        self.linear_2 = nn.Linear(temb, temb)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(t)))


class TinyUNet(nn.Module):
    """4-channel latents in and out; context [B, 77|any, 16]."""

    def __init__(self, ch: int = 32) -> None:
        super().__init__()
        temb = ch * 2
        self.ch = ch
        self.conv_in = nn.Conv2d(4, ch, 3, padding=1)
        self.time_embedding = TimeEmbedding(ch, temb)
        self.down_blocks = nn.ModuleList([CrossAttnBlock(ch, ch, temb, down=True)])
        self.up_blocks = nn.ModuleList([CrossAttnBlock(ch, ch, temb, up=True)])
        self.conv_norm_out = nn.GroupNorm(8, ch)
        self.conv_out = nn.Conv2d(ch, 4, 3, padding=1)

    def timestep_embedding(self, t: torch.Tensor) -> torch.Tensor:
        half = self.ch // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        temb = self.time_embedding(self.timestep_embedding(t))
        h = self.conv_in(x)
        h = self.down_blocks[0](h, temb, ctx)
        h = self.up_blocks[0](h, temb, ctx)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


def sd_alphas_cumprod(steps: int = 1000) -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0).float()


class TinyDiffusion:
    """The :class:`lora_core.DiffusionModel` a host would provide, around :class:`TinyUNet`."""

    def __init__(self, unet: TinyUNet, prediction_type: str = "epsilon") -> None:
        self.unet = unet
        self.prediction_type = prediction_type
        self.alphas_cumprod = sd_alphas_cumprod()

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents * 0.5

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.unet(x, t, cond["context"])


def make_unet(seed: int = 0) -> TinyUNet:
    torch.manual_seed(seed)
    return TinyUNet().eval()


def make_dataset(n: int = 4, seed: int = 1, sizes: tuple[tuple[int, int], ...] = ((8, 8),), repeats: int = 1):
    from lora_core.data.latents import LatentDataset, LatentItem

    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        items.append(
            LatentItem(
                latent=torch.randn(4, h, w, generator=g),
                cond={"context": torch.randn(7, CTX, generator=g)},
                repeats=repeats,
                caption=f"item {i}",
                key=f"img{i}.png",
            )
        )
    return LatentDataset(tuple(items))
