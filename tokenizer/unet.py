"""ADM U-Net diffusion decoder G(x_t, t, z) of ε-VAE (paper Sec. 3.1, Table 5, Table 7, appendix D).

The architecture is the U-Net of Dhariwal & Nichol (2021, "ADM") with the settings that reproduce the
decoder parameter counts of Table 7: residual blocks with scale-shift norm (time enters as a per-channel
scale/shift after the second group norm), up/down-sampling inside residual blocks, multi-head self-attention
in the middle block and at the downsample ratios listed in `ADMConfig.attention_downsample`. Attention is
placed by downsample ratio (not by absolute resolution), so the same network runs at 2x its training size.

Conditioning on the latent z (B, Z, h, w):

- ``"concat"`` (paper default, Sec. 3.1): the UNet itself nearest-upsamples z to the image size and
  concatenates it to x_t, so the first conv sees 3 + Z channels. Callers pass z at latent resolution.
- ``"adagn"`` (appendix D): z is bilinearly resized to each residual block's resolution and a 1x1 conv turns
  it into a spatial scale/shift added to the time scale/shift after the block's second group norm.

Parameter counts with 8 latent channels, concat conditioning (tests/test_unet_and_models.py prints them):
B 20.63M, M 49.33M, L 88.97M, XL 140.62M, H 355.61M; paper Table 7: 20.63, 49.33, 88.98, 140.63, 355.62.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tokenizer.nn import group_norm, timestep_embedding, zero_module

# ADM's normalization() is GroupNorm32(32, channels) with PyTorch's default eps 1e-5; the SD-family encoder and
# the baseline VAE decoder keep latent-diffusion's 1e-6 (tokenizer.nn.group_norm's default). eps is not a
# weight, so folders trained with 1e-6 still load; their outputs move by ~1e-5 relative at most.
ADM_NORM_EPS = 1e-5

CONDITIONING_MODES = ("concat", "adagn")
TIME_SCALE = 1000.0  # continuous t in [0, 1] is embedded as 1000·t, the range of discrete DDPM steps


@dataclass(frozen=True)
class ADMConfig:
    """Width/depth of the ADM decoder (Table 5). The first level has `base_channels` channels."""

    base_channels: int = 64
    channel_multipliers: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attention_downsample: tuple[int, ...] = (8,)  # downsample ratios (1, 2, 4, ...) with self-attention
    head_channels: int = 64  # channels per attention head (ADM's num_head_channels)
    dropout: float = 0.0
    in_channels: int = 3  # image channels of x_t; conditioning channels are added by the model
    out_channels: int = 3
    gradient_checkpointing: bool = False

    def __post_init__(self):
        # JSON turns tuples into lists; store tuples so configs stay hashable and compare equal.
        object.__setattr__(self, "channel_multipliers", tuple(int(m) for m in self.channel_multipliers))
        object.__setattr__(self, "attention_downsample", tuple(int(d) for d in self.attention_downsample))
        if not self.channel_multipliers or min(self.channel_multipliers) < 1:
            raise ValueError(f"channel_multipliers must be positive integers, got {self.channel_multipliers}")
        for name in ("base_channels", "num_res_blocks", "head_channels", "in_channels", "out_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"ADMConfig.{name} must be >= 1, got {getattr(self, name)}")
        valid = {2**level for level in range(len(self.channel_multipliers))}
        if not set(self.attention_downsample) <= valid:
            raise ValueError(f"attention_downsample {self.attention_downsample} must be among {sorted(valid)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ADMConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def size_multiple(self) -> int:
        """H and W must be multiples of this (the total downsampling of the U-Net)."""
        return 2 ** (len(self.channel_multipliers) - 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ADMConfig":
        return cls(**d)


ADM_PRESETS: dict[str, ADMConfig] = {
    # Tests only: three levels, one block each, attention at ratio 2 and in the middle.
    "tiny": ADMConfig(base_channels=32, channel_multipliers=(1, 2, 2), num_res_blocks=1,
                      attention_downsample=(2,), head_channels=32),
    # Not a paper size: a CPU-friendly decoder for the offline demo (attention only at the coarsest level).
    "S": ADMConfig(base_channels=24, channel_multipliers=(1, 2, 4), num_res_blocks=1,
                   attention_downsample=(4,), head_channels=32),
    # Half the compute of "S": the offline demo's decoder and the quick studies' narrow width.
    "XS": ADMConfig(base_channels=16, channel_multipliers=(1, 2, 4), num_res_blocks=1,
                    attention_downsample=(4,), head_channels=32),
    # Table 5 (channels, blocks); attention ratios as measured on guided-diffusion's UNetModel.
    "B": ADMConfig(base_channels=64, num_res_blocks=2, attention_downsample=(8,)),
    "M": ADMConfig(base_channels=96, num_res_blocks=2, attention_downsample=(8, 16)),
    "L": ADMConfig(base_channels=128, num_res_blocks=2, attention_downsample=(4, 8, 16)),
    "XL": ADMConfig(base_channels=128, num_res_blocks=4, attention_downsample=(4, 8, 16)),
    "H": ADMConfig(base_channels=256, num_res_blocks=2, attention_downsample=(4, 8, 16)),
}


# --------------------------------------------------------------------------------------------- building blocks
class ResBlock(nn.Module):
    """ADM residual block: GN-SiLU-[resample]-conv, scale-shift norm from t (and z in AdaGN mode), conv.

    `resample` is None, "up" (nearest x2) or "down" (average pool x2), applied to both branches.
    """

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, dropout: float = 0.0,
                 adagn_channels: int = 0, resample: str | None = None):
        super().__init__()
        if resample not in (None, "up", "down"):
            raise ValueError(f"resample must be None, 'up' or 'down', got {resample!r}")
        self.resample = resample
        self.norm_in = group_norm(in_channels, eps=ADM_NORM_EPS)
        self.conv_in = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(embed_dim, 2 * out_channels)  # time -> (scale, shift)
        self.cond_proj = nn.Conv2d(adagn_channels, 2 * out_channels, 1) if adagn_channels else None
        self.norm_out = group_norm(out_channels, eps=ADM_NORM_EPS)
        self.dropout = nn.Dropout(dropout)
        self.conv_out = nn.Conv2d(out_channels, out_channels, 3, padding=1)  # zero-initialised
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        h = self._resample(F.silu(self.norm_in(x)))
        x = self._resample(x)
        h = self.conv_in(h)  # (B, C_out, H', W')
        scale, shift = self.time_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # (B, C_out, 1, 1) each
        if self.cond_proj is not None:
            # Appendix D: z bilinearly resized to this block's resolution, injected after the group norm.
            z = F.interpolate(cond, size=h.shape[-2:], mode="bilinear", align_corners=False)
            z_scale, z_shift = self.cond_proj(z.to(h.dtype)).chunk(2, dim=1)  # (B, C_out, H', W') each
            scale, shift = scale + z_scale, shift + z_shift
        h = self.norm_out(h) * (1 + scale) + shift
        h = self.conv_out(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head spatial self-attention with a residual connection (zero-initialised output projection)."""

    def __init__(self, channels: int, head_channels: int):
        super().__init__()
        self.num_heads = max(1, channels // head_channels)
        if channels % self.num_heads:
            raise ValueError(f"{channels} channels do not split into {self.num_heads} heads")
        self.norm = group_norm(channels, eps=ADM_NORM_EPS)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)  # zero-initialised

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None, cond: torch.Tensor | None = None):
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(dim=1)  # (B, heads, HW, C/heads) each
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C/heads)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Stage(nn.ModuleList):
    """A sequence of blocks that all take (h, emb, cond); one skip connection is saved per down stage."""

    def forward(self, h: torch.Tensor, emb: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        for block in self:
            h = block(h, emb, cond)
        return h


# ------------------------------------------------------------------------------------------------------ U-Net
class ADMUNet(nn.Module):
    """G(x_t, t, z): (B, in_channels, H, W), (B,) t in [0, 1], latent (B, Z, h, w) -> (B, out_channels, H, W).

    `cond_channels` is the latent width Z (0: unconditional); `conditioning` is "concat" or "adagn".
    H and W must be multiples of `config.size_multiple`; any such size works.
    """

    def __init__(self, config: ADMConfig, cond_channels: int = 0, conditioning: str = "concat"):
        super().__init__()
        if conditioning not in CONDITIONING_MODES:
            raise ValueError(f"conditioning must be one of {CONDITIONING_MODES}, got {conditioning!r}")
        if cond_channels < 0:
            raise ValueError(f"cond_channels must be >= 0, got {cond_channels}")
        self.config, self.cond_channels, self.conditioning = config, cond_channels, conditioning
        self.gradient_checkpointing = config.gradient_checkpointing
        base, mults = config.base_channels, config.channel_multipliers
        embed_dim = 4 * base
        adagn = cond_channels if conditioning == "adagn" else 0
        concat = cond_channels if conditioning == "concat" else 0

        def res_block(c_in: int, c_out: int, resample: str | None = None) -> ResBlock:
            return ResBlock(c_in, c_out, embed_dim, config.dropout, adagn, resample)

        def attention(c: int) -> AttentionBlock:
            return AttentionBlock(c, config.head_channels)

        self.time_embed = nn.Sequential(nn.Linear(base, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))
        channels = base * mults[0]
        self.conv_in = nn.Conv2d(config.in_channels + concat, channels, 3, padding=1)

        skip_channels = [channels]
        ratio = 1
        self.down = nn.ModuleList()
        for level, mult in enumerate(mults):
            for _ in range(config.num_res_blocks):
                blocks: list[nn.Module] = [res_block(channels, base * mult)]
                channels = base * mult
                if ratio in config.attention_downsample:
                    blocks.append(attention(channels))
                self.down.append(Stage(blocks))
                skip_channels.append(channels)
            if level < len(mults) - 1:
                self.down.append(Stage([res_block(channels, channels, "down")]))
                skip_channels.append(channels)
                ratio *= 2

        self.middle = Stage([res_block(channels, channels), attention(channels), res_block(channels, channels)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            for index in range(config.num_res_blocks + 1):
                blocks = [res_block(channels + skip_channels.pop(), base * mult)]
                channels = base * mult
                if ratio in config.attention_downsample:
                    blocks.append(attention(channels))
                if level > 0 and index == config.num_res_blocks:
                    blocks.append(res_block(channels, channels, "up"))
                    ratio //= 2
                self.up.append(Stage(blocks))

        self.norm_out = group_norm(channels, eps=ADM_NORM_EPS)
        self.conv_out = nn.Conv2d(channels, config.out_channels, 3, padding=1)  # zero-initialised
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """All init in one place: PyTorch defaults, except zero-initialised layers that make every residual
        branch start as the identity and the output start at 0 (ADM): each ResBlock's `conv_out`, each
        AttentionBlock's `proj_out`, and the final `conv_out`. AdaGN's `cond_proj` keeps its default init so
        z modulates the network from the first step."""
        for module in self.modules():
            if isinstance(module, ResBlock):
                zero_module(module.conv_out)
            elif isinstance(module, AttentionBlock):
                zero_module(module.proj_out)
        zero_module(self.conv_out)

    def _run(self, stage: Stage, h: torch.Tensor, emb: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(stage, h, emb, cond, use_reentrant=False)
        return stage(h, emb, cond)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"ADMUNet expects x of shape (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[-2] % cfg.size_multiple or x.shape[-1] % cfg.size_multiple:
            raise ValueError(f"image size {tuple(x.shape[-2:])} must be a multiple of {cfg.size_multiple}")
        if (cond is None) != (self.cond_channels == 0):
            raise ValueError(f"ADMUNet built with cond_channels={self.cond_channels} got cond="
                             f"{None if cond is None else tuple(cond.shape)}")
        if cond is not None and (cond.ndim != 4 or cond.shape[:2] != (x.shape[0], self.cond_channels)):
            raise ValueError(f"cond must be (B={x.shape[0]}, {self.cond_channels}, h, w), got {tuple(cond.shape)}")
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")

        emb = self.time_embed(timestep_embedding(TIME_SCALE * t, cfg.base_channels).to(x.dtype))  # (B, 4·C0)
        if self.conditioning == "concat" and cond is not None:
            # Sec. 3.1: nearest-neighbour upsampling of z to the image size, then channel concatenation.
            cond = F.interpolate(cond.to(x.dtype), size=x.shape[-2:], mode="nearest")  # (B, Z, H, W)
            x = torch.cat([x, cond], dim=1)  # (B, 3 + Z, H, W)
            cond = None  # the residual blocks take no spatial conditioning in this mode

        h = self.conv_in(x)  # (B, C0, H, W)
        skips = [h]
        for stage in self.down:
            h = self._run(stage, h, emb, cond)
            skips.append(h)
        h = self._run(self.middle, h, emb, cond)  # (B, C_last, H/r, W/r)
        for stage in self.up:
            h = self._run(stage, torch.cat([h, skips.pop()], dim=1), emb, cond)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_channels, H, W)


def build_adm_unet(config: ADMConfig, cond_channels: int = 0, conditioning: str = "concat") -> ADMUNet:
    return ADMUNet(config, cond_channels, conditioning)
