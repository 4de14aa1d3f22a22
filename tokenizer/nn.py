"""Small building blocks shared by the tokenizer's networks (UNet decoder, discriminator, encoders)."""
import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in ADM / DiT.

    `t` is (B,) on any scale; callers working with continuous t in [0, 1] multiply by 1000 first so the
    frequencies cover the same range as for discrete DDPM steps.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding  # (B, dim)


def group_norm(channels: int, groups: int = 32, eps: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= `groups` that divides `channels` (tiny test presets)."""
    groups = math.gcd(groups, channels)
    return nn.GroupNorm(groups, channels, eps=eps)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so a residual branch starts as the identity (ADM's output convs)."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
