"""Tokenizer encoders E(x) -> posterior moments, and the diagonal Gaussian posterior (paper Sec. 2, 4).

Two families, both used by the paper ("Model configurations", Sec. 4):

- ``kind="sd"``: the VQGAN / latent-diffusion kl-f8 encoder (Esser et al. 2021, Rombach et al. 2022): biased
  3x3 convs, strided-conv downsampling with asymmetric padding, a mid block with self-attention. The "sd" preset
  has exactly the Stable Diffusion VAE encoder's 34,163,592 parameters (ε-VAE-SD, f=8, 4 latent channels).
- ``kind="lite"``: the MaskGIT / MAGVIT 2-D conv encoder: bias-free 3x3 convs, average-pool downsampling, extra
  residual blocks at the lowest resolution, a 1x1 output conv. The "lite" preset (64 filters, multipliers
  (1, 1, 2, 2, 4), 2 blocks) has ≈5.88M parameters (ε-VAE-lite, f=16, 8 latent channels).

Other compression rates (paper Fig. 2: f in {4, 8, 16, 32}, latent channels in {4, 8, 16, 32}) come from
overriding a preset; the number of multipliers sets the downsampling factor f = 2 ** (len(multipliers) - 1)::

    cfg = dataclasses.replace(ENCODER_PRESETS["lite"],
                              channel_multipliers=multipliers_for_downsample((1, 1, 2, 2, 4), 32),  # f=32
                              latent_channels=16)

`multipliers_for_downsample` follows the latent-diffusion configs (kl-f4 (1,2,4), VQGAN-f8 (1,2,2,4), kl-f16
(1,1,2,2,4), kl-f32 (1,1,2,2,4,4)); the baseline VAE decoder uses the same rule so it mirrors the encoder.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokenizer.nn import group_norm

ENCODER_KINDS = ("sd", "lite")
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # the clamp of latent-diffusion's DiagonalGaussianDistribution


def multipliers_for_downsample(multipliers: tuple[int, ...], downsample: int) -> tuple[int, ...]:
    """Channel multipliers for downsampling factor `downsample`, derived from a reference tuple.

    Too many levels: drop the first entry of the first repeated pair, else the first entry
    ((1,1,2,2,4) -> (1,2,2,4) -> (1,2,4)). Too few: repeat the last entry ((1,1,2,2,4) -> (1,1,2,2,4,4)).
    """
    if downsample < 1 or downsample & (downsample - 1):
        raise ValueError(f"downsample must be a power of two >= 1, got {downsample}")
    if not multipliers:
        raise ValueError("multipliers must be non-empty")
    levels = int(math.log2(downsample)) + 1
    result = list(multipliers)
    while len(result) > levels:
        repeated = [i for i in range(len(result) - 1) if result[i] == result[i + 1]]
        del result[repeated[0] if repeated else 0]
    while len(result) < levels:
        result.append(result[-1])
    return tuple(result)


@dataclass(frozen=True)
class EncoderConfig:
    """Encoder architecture; `downsample` = 2 ** (len(channel_multipliers) - 1)."""

    kind: str = "sd"
    base_channels: int = 128
    channel_multipliers: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    latent_channels: int = 4
    mid_attention: bool = True
    double_z: bool = True  # predict (mean, logvar); False = plain autoencoder with a constant tiny logvar
    # Initial posterior log-variance (bias of the logvar outputs). 0 (the reference init) starts with unit-std
    # sampling noise on a latent whose mean is still small: short runs learn colour slowly until it shrinks.
    logvar_init: float = 0.0
    dropout: float = 0.0
    in_channels: int = 3

    def __post_init__(self):
        # JSON turns tuples into lists; store a tuple so configs stay hashable and compare equal.
        object.__setattr__(self, "channel_multipliers", tuple(int(m) for m in self.channel_multipliers))
        if self.kind not in ENCODER_KINDS:
            raise ValueError(f"EncoderConfig.kind must be one of {ENCODER_KINDS}, got {self.kind!r}")
        if not self.channel_multipliers or min(self.channel_multipliers) < 1:
            raise ValueError(f"channel_multipliers must be positive integers, got {self.channel_multipliers}")
        for name in ("base_channels", "num_res_blocks", "latent_channels", "in_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"EncoderConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not LOGVAR_MIN <= self.logvar_init <= LOGVAR_MAX:
            raise ValueError(f"EncoderConfig.logvar_init must be in [{LOGVAR_MIN}, {LOGVAR_MAX}], got {self.logvar_init}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"EncoderConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderConfig":
        return cls(**d)


ENCODER_PRESETS: dict[str, EncoderConfig] = {
    # Tests only: f=4, one block per level, attention exercised.
    "tiny": EncoderConfig(kind="sd", base_channels=32, channel_multipliers=(1, 2, 2), num_res_blocks=1,
                          latent_channels=4, mid_attention=True),
    "tiny-lite": EncoderConfig(kind="lite", base_channels=32, channel_multipliers=(1, 2, 2), num_res_blocks=1,
                               latent_channels=4, mid_attention=False),
    # ε-VAE-lite (paper Sec. 4): ≈5.88M params, f=16, 8 latent channels.
    "lite": EncoderConfig(kind="lite", base_channels=64, channel_multipliers=(1, 1, 2, 2, 4), num_res_blocks=2,
                          latent_channels=8, mid_attention=False),
    # ε-VAE-SD (paper Sec. 4): the SD kl-f8 encoder, 34,163,592 params.
    "sd": EncoderConfig(kind="sd", base_channels=128, channel_multipliers=(1, 2, 4, 4), num_res_blocks=2,
                        latent_channels=4, mid_attention=True),
    # 16x setting of DESIGN.md: one more downsampling level of the same family.
    "sd-f16": EncoderConfig(kind="sd", base_channels=128, channel_multipliers=(1, 2, 4, 4, 4), num_res_blocks=2,
                            latent_channels=4, mid_attention=True),
}


# --------------------------------------------------------------------------------------------- building blocks
class ResBlock(nn.Module):
    """Pre-activation residual block: GN -> SiLU -> conv3x3, twice; 1x1 shortcut when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias)
        self.shortcut = (nn.Identity() if in_channels == out_channels
                         else nn.Conv2d(in_channels, out_channels, 1, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention with 1x1 q/k/v/out projections (VQGAN mid block)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # (B, C, H, W) -> (B, 1, HW, C): one head over all positions.
        q, k, v = (proj(y).reshape(b, 1, c, h * w).transpose(-1, -2) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class StridedDownsample(nn.Module):
    """3x3 stride-2 conv after (0, 1, 0, 1) padding, as in the latent-diffusion encoder."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Encoder(nn.Module):
    """x (B, 3, H, W) in [-1, 1] -> moments (B, 2·latent_channels, H/f, W/f) = concat(mean, logvar)."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        sd = config.kind == "sd"
        widths = [config.base_channels * m for m in config.channel_multipliers]
        self.conv_in = nn.Conv2d(config.in_channels, config.base_channels, 3, padding=1, bias=sd)

        layers: list[nn.Module] = []
        channels = config.base_channels
        for level, width in enumerate(widths):
            for _ in range(config.num_res_blocks):
                layers.append(ResBlock(channels, width, bias=sd, dropout=config.dropout))
                channels = width
            if level < len(widths) - 1:
                layers.append(StridedDownsample(channels) if sd else nn.AvgPool2d(2))
        self.down = nn.Sequential(*layers)

        # SD: ResBlock, Attention, ResBlock. lite (MaskGIT): num_res_blocks blocks, optional attention after.
        if sd:
            mid = [ResBlock(channels, channels, bias=True, dropout=config.dropout)]
            mid += [AttentionBlock(channels)] if config.mid_attention else []
            mid += [ResBlock(channels, channels, bias=True, dropout=config.dropout)]
        else:
            mid = [ResBlock(channels, channels, bias=False, dropout=config.dropout)
                   for _ in range(config.num_res_blocks)]
            mid += [AttentionBlock(channels)] if config.mid_attention else []
        self.mid = nn.Sequential(*mid)

        self.norm_out = group_norm(channels)
        out_channels = 2 * config.latent_channels if config.double_z else config.latent_channels
        self.conv_out = (nn.Conv2d(channels, out_channels, 3, padding=1) if sd
                         else nn.Conv2d(channels, out_channels, 1))
        # Weights keep PyTorch's default conv init, as the reference implementations do.
        if config.double_z and config.logvar_init:
            with torch.no_grad():
                self.conv_out.bias[config.latent_channels:].fill_(config.logvar_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"encoder expects (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[-2] % cfg.downsample or x.shape[-1] % cfg.downsample:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by downsample {cfg.downsample}")
        h = self.conv_in(x)  # (B, C0, H, W)
        h = self.mid(self.down(h))  # (B, C_last, H/f, W/f)
        moments = self.conv_out(F.silu(self.norm_out(h)))  # (B, 2·Z or Z, H/f, W/f)
        if not cfg.double_z:
            # Plain autoencoder: a near-zero variance keeps the (mean, logvar) contract of the wrappers.
            moments = torch.cat([moments, torch.full_like(moments, LOGVAR_MIN)], dim=1)
        return moments  # (B, 2·Z, H/f, W/f)


def build_encoder(config: EncoderConfig) -> Encoder:
    return Encoder(config)


# -------------------------------------------------------------------------------------------------- posterior
class DiagonalGaussian:
    """Posterior q(z|x) = N(mean, exp(logvar)) from encoder moments (B, 2·Z, h, w); logvar clamped to [-30, 20]."""

    def __init__(self, moments: torch.Tensor):
        if moments.ndim < 2 or moments.shape[1] % 2:
            raise ValueError(f"moments need an even channel dim (mean, logvar), got {tuple(moments.shape)}")
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, Z, h, w) each
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised draw; the same generator state gives the same sample."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over all non-batch dims: (B,)."""
        kl = 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)
        return kl.flatten(1).sum(dim=1)
