"""Baseline VAE decoder G(z) -> x: the paper's controlled, deterministic comparison (Sec. 4, Tables 5 and 7).

It mirrors the lite (MaskGIT / MAGVIT) encoder: bias-free pre-activation residual blocks with GroupNorm and
SiLU, no attention, and depth-to-space upsampling (a 3x3 conv to 4x the channels, then pixel shuffle) between
levels. Widths and depths follow Table 5 (filters 64/96/128/128/256, blocks 2/2/2/4/2, multipliers
(1, 1, 2, 2, 4)); with 8 latent channels and f=16 the parameter counts land within 0.1% of Table 7
(B 10.14M, M 22.79M, L 40.48M, XL 65.27M, H 161.81M).

The decoder is built for a given latent width and downsampling factor: the multipliers are adapted with
`multipliers_for_downsample`, the rule the encoder uses, so the number of upsampling stages is log2(f).
The output is unbounded (no tanh); the wrapper clamps to [-1, 1] at inference.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokenizer.encoder import ResBlock, multipliers_for_downsample
from tokenizer.nn import group_norm


@dataclass(frozen=True)
class VAEDecoderConfig:
    """Decoder width/depth (Table 5). `channel_multipliers` is the f=16 reference; see module docstring."""

    base_channels: int = 64
    channel_multipliers: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    out_channels: int = 3
    dropout: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "channel_multipliers", tuple(int(m) for m in self.channel_multipliers))
        if not self.channel_multipliers or min(self.channel_multipliers) < 1:
            raise ValueError(f"channel_multipliers must be positive integers, got {self.channel_multipliers}")
        for name in ("base_channels", "num_res_blocks", "out_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"VAEDecoderConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"VAEDecoderConfig.dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VAEDecoderConfig":
        return cls(**d)


VAE_DECODER_PRESETS: dict[str, VAEDecoderConfig] = {
    "tiny": VAEDecoderConfig(base_channels=16, channel_multipliers=(1, 2, 2), num_res_blocks=1),  # tests only
    "B": VAEDecoderConfig(base_channels=64, num_res_blocks=2),
    "M": VAEDecoderConfig(base_channels=96, num_res_blocks=2),
    "L": VAEDecoderConfig(base_channels=128, num_res_blocks=2),
    "XL": VAEDecoderConfig(base_channels=128, num_res_blocks=4),
    "H": VAEDecoderConfig(base_channels=256, num_res_blocks=2),
}


class DepthToSpaceUpsample(nn.Module):
    """x2 upsampling: 3x3 conv to 4·C channels, then pixel shuffle (MAGVIT-v2 style, no checkerboard)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4 * channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(self.conv(x), 2)  # (B, C, 2H, 2W)


class VAEDecoder(nn.Module):
    """z (B, latent_channels, h, w) -> image (B, 3, h·f, w·f)."""

    def __init__(self, config: VAEDecoderConfig, latent_channels: int, downsample: int):
        super().__init__()
        if latent_channels < 1:
            raise ValueError(f"latent_channels must be >= 1, got {latent_channels}")
        self.config, self.latent_channels, self.downsample = config, latent_channels, downsample
        multipliers = multipliers_for_downsample(config.channel_multipliers, downsample)
        widths = [config.base_channels * m for m in multipliers]
        channels = widths[-1]
        self.conv_in = nn.Conv2d(latent_channels, channels, 3, padding=1)
        # Lowest resolution first: the mirror of the encoder's extra blocks, then one stage per level.
        self.mid = nn.Sequential(*[ResBlock(channels, channels, bias=False, dropout=config.dropout)
                                   for _ in range(config.num_res_blocks)])
        layers: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            for _ in range(config.num_res_blocks):
                layers.append(ResBlock(channels, widths[level], bias=False, dropout=config.dropout))
                channels = widths[level]
            if level > 0:
                layers.append(DepthToSpaceUpsample(channels))
        self.up = nn.Sequential(*layers)
        self.norm_out = group_norm(channels)
        self.conv_out = nn.Conv2d(channels, config.out_channels, 3, padding=1)
        # Weights keep PyTorch's default conv init (no zero-initialised layers: the decoder is not residual
        # around an identity path, so a zero output conv would only slow the start of training).

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"decoder expects latents (B, {self.latent_channels}, h, w), got {tuple(z.shape)}")
        h = self.mid(self.conv_in(z))  # (B, C_last, h, w)
        h = self.up(h)  # (B, C0, h·f, w·f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, H, W)


def build_vae_decoder(config: VAEDecoderConfig, latent_channels: int, downsample: int) -> VAEDecoder:
    return VAEDecoder(config, latent_channels, downsample)
