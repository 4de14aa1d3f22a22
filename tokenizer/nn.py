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


# Reference widths (>= 64 channels) keep ADM's 32 groups; narrower layers keep at least this many channels per group.
MIN_CHANNELS_PER_GROUP_BELOW_REFERENCE = 4


def group_norm(channels: int, groups: int = 32, eps: float = 1e-6) -> nn.GroupNorm:
    """ADM's GroupNorm(32) at reference widths; fewer, wider groups for the narrow demo/test presets.

    With 32 groups a 16- or 32-channel layer gets 1 channel per group, i.e. InstanceNorm: every feature
    map loses its mean, so a narrow decoder cannot carry an image's flat colour and reconstructions fade
    to the dataset mean (measured on the demo: colour correlation 0.38 -> 0.96, PSNR 13.3 -> 18.6 dB).
    Widths of 64+ channels (every paper preset) are unchanged, and GroupNorm's parameters do not depend
    on the group count, so checkpoints load either way.

    `eps` keeps each family's reference value: 1e-6 (latent-diffusion's Normalize, used by the SD-family encoder,
    the baseline VAE decoder and the discriminator), 1e-5 for the ADM U-Net (`tokenizer.unet.ADM_NORM_EPS`).
    """
    if channels < 2 * groups:
        groups = max(1, channels // MIN_CHANNELS_PER_GROUP_BELOW_REFERENCE)
    groups = math.gcd(groups, channels)
    return nn.GroupNorm(groups, channels, eps=eps)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so a residual branch starts as the identity (ADM's output convs)."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
