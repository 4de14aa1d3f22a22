"""Time-conditioned PatchGAN discriminator for adversarial trajectory matching (paper Sec. 3.2, Eq. 12).

The layout is VQGAN's NLayerDiscriminator (Esser et al. 2021; paper Sec. 4 "Model configurations"): 4x4 convs,
stride 2 for the first `num_layers` stages, LeakyReLU(0.2), one logit per patch. Two changes:

- GroupNorm instead of BatchNorm, so logits are per-sample (no cross-sample statistics under DDP, and the R1
  penalty's input gradient does not leak across the batch).
- AdaGN time conditioning (Dhariwal & Nichol 2021) when `time_conditioned`: after each norm,
  ``h = GN(h) * (1 + scale(emb)) + shift(emb)`` with ``emb = MLP(timestep_embedding(1000·t))``. ε-VAE feeds
  trajectory pairs concat(x0, x_t) (6 channels) with their t; the baseline VAE feeds images (3 channels), no t.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokenizer.nn import group_norm, timestep_embedding


@dataclass(frozen=True)
class DiscriminatorConfig:
    in_channels: int = 6
    base_channels: int = 64
    num_layers: int = 3
    time_conditioned: bool = True
    max_channel_multiplier: int = 8  # VQGAN caps widths at 8·base
    time_embed_dim: int | None = None  # default 4·base_channels, as ADM
    leaky_slope: float = 0.2

    def __post_init__(self):
        for name in ("in_channels", "base_channels", "num_layers", "max_channel_multiplier"):
            if getattr(self, name) < 1:
                raise ValueError(f"DiscriminatorConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.time_embed_dim is not None and self.time_embed_dim < 1:
            raise ValueError(f"DiscriminatorConfig.time_embed_dim must be >= 1 or None, got {self.time_embed_dim}")

    @property
    def embed_dim(self) -> int:
        return self.time_embed_dim or 4 * self.base_channels

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DiscriminatorConfig":
        return cls(**d)


DISCRIMINATOR_PRESETS: dict[str, DiscriminatorConfig] = {
    "tiny": DiscriminatorConfig(in_channels=6, base_channels=16, num_layers=2, time_conditioned=True),
    "default": DiscriminatorConfig(in_channels=6, base_channels=64, num_layers=3, time_conditioned=True),
    "vae": DiscriminatorConfig(in_channels=3, base_channels=64, num_layers=3, time_conditioned=False),
}


class AdaGroupNorm(nn.Module):
    """GroupNorm, then an optional per-sample affine from the time embedding: h·(1 + scale) + shift."""

    def __init__(self, channels: int, embed_dim: int | None):
        super().__init__()
        self.norm = group_norm(channels)
        self.modulation = nn.Linear(embed_dim, 2 * channels) if embed_dim else None

    def forward(self, h: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        h = self.norm(h)
        if self.modulation is None:
            return h
        scale, shift = self.modulation(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
        return h * (1 + scale) + shift


class TrajectoryDiscriminator(nn.Module):
    """x (B, in_channels, H, W) [, t (B,) in [0, 1]] -> patch logits (B, 1, h, w)."""

    def __init__(self, config: DiscriminatorConfig):
        super().__init__()
        self.config = config
        embed_dim = config.embed_dim if config.time_conditioned else None
        if config.time_conditioned:
            self.time_embed = nn.Sequential(
                nn.Linear(config.base_channels, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))

        self.conv_in = nn.Conv2d(config.in_channels, config.base_channels, 4, stride=2, padding=1)
        widths = [config.base_channels * min(2**n, config.max_channel_multiplier)
                  for n in range(config.num_layers + 1)]
        # Stages 1..num_layers-1 halve the resolution; the last keeps it (stride 1), as in VQGAN.
        self.convs = nn.ModuleList(
            nn.Conv2d(widths[n - 1], widths[n], 4, stride=2 if n < config.num_layers else 1, padding=1, bias=False)
            for n in range(1, config.num_layers + 1))
        self.norms = nn.ModuleList(AdaGroupNorm(widths[n], embed_dim) for n in range(1, config.num_layers + 1))
        self.conv_out = nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1)
        self._init_weights()

    def _init_weights(self) -> None:
        """VQGAN's N(0, 0.02) conv init; GN at identity. AdaGN projections get the same small init, not zero,
        so the logits depend on t from the first step."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"discriminator expects (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        emb = None
        if cfg.time_conditioned:
            if t is None:
                raise ValueError("time-conditioned discriminator needs t (B,) in [0, 1]")
            t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])  # scalar or (B,) -> (B,)
            emb = self.time_embed(timestep_embedding(1000.0 * t, cfg.base_channels).to(x.dtype))  # (B, E)
        h = F.leaky_relu(self.conv_in(x), cfg.leaky_slope)  # (B, C0, H/2, W/2)
        for conv, norm in zip(self.convs, self.norms):
            h = F.leaky_relu(norm(conv(h), emb), cfg.leaky_slope)
        return self.conv_out(h)  # (B, 1, h, w)


def build_discriminator(config: DiscriminatorConfig) -> TrajectoryDiscriminator:
    return TrajectoryDiscriminator(config)
