"""Class-conditional Diffusion Transformer (Peebles & Xie 2023) for the stage-2 latent generator.

adaLN-Zero blocks, a fixed 2-D sin-cos position embedding, a class embedding with one extra "null" row for
label dropout / classifier-free guidance, and a zero-initialised final layer, as in the DiT paper (Sec. 3.2,
Table 1). The latent shape (`input_size`, `in_channels`) and `num_classes` come from the caller (the latent
shard manifest), never from the presets. The ε-VAE paper trains without the VLB term (appendix C.3), so
`learn_sigma` defaults to False and the model predicts ε only.

The file ends in the size registry `DiT_models` ("DiT-S/2" ... "DiT-XL/8").
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from tokenizer import pretrained
from tokenizer.nn import timestep_embedding  # [cos | sin] of the 0..999 DDPM step, as ADM / DiT

MODEL_TYPE = "dit"
TIMESTEP_FREQUENCY_DIM = 256  # DiT's TimestepEmbedder frequency size


@dataclass(frozen=True, kw_only=True)
class DiTConfig:
    """Everything needed to rebuild a DiT; saved as config.json beside the weights."""

    input_size: int  # latent height = width
    patch_size: int
    in_channels: int
    hidden_size: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    num_classes: int
    class_dropout_prob: float = 0.1
    learn_sigma: bool = False
    qk_norm: bool = False
    # Per-channel normalisation of the training latents (from the shard manifest), kept so that sampling
    # undoes exactly the normalisation the model was trained on.
    latent_mean: tuple[float, ...] | None = None
    latent_std: tuple[float, ...] | None = None
    model_name: str | None = None
    # What sampling needs besides the weights, so a folder copied anywhere works alone (recorded from the shard
    # manifest at training time): the class names, and the tokenizer whose latents it learned (the sha256 of its
    # weights, its downsampling factor and the image size the latents came from).
    class_names: tuple[str, ...] | None = None
    tokenizer_fingerprint: str | None = None
    downsample: int | None = None
    image_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes"):
            value = getattr(self, name)
            smallest = 0 if name == "num_classes" else 1  # 0 classes: an unconditional DiT (paper C.3, Table 8)
            if not isinstance(value, int) or isinstance(value, bool) or value < smallest:
                raise ValueError(f"DiTConfig.{name} must be an int >= {smallest}, got {value!r}")
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by 4 for the 2-D sin-cos embedding")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")
        for name in ("latent_mean", "latent_std"):
            value = getattr(self, name)
            if value is None:
                continue
            value = tuple(float(v) for v in value)  # JSON lists → tuples
            object.__setattr__(self, name, value)
            if len(value) != self.in_channels:
                raise ValueError(f"DiTConfig.{name} has {len(value)} entries for {self.in_channels} latent channels")
        if self.latent_std is not None and min(self.latent_std) <= 0:
            raise ValueError(f"DiTConfig.latent_std must be positive, got {self.latent_std}")
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(str(name) for name in self.class_names))
            if len(self.class_names) != self.num_classes:
                raise ValueError(f"DiTConfig.class_names has {len(self.class_names)} names for {self.num_classes} "
                                 "classes")

    @property
    def unconditional(self) -> bool:
        """No classes: every sample carries the null label (the paper's stage-2 comparisons, appendix C.3)."""
        return self.num_classes == 0

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "DiTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown DiTConfig fields {unknown}")
        return cls(**values)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "DiTConfig":
        """A registry preset ("DiT-XL/2", ...) plus the caller's data-dependent fields."""
        if name not in DIT_PRESETS:
            raise ValueError(f"unknown DiT model {name!r}; choose from {sorted(DIT_PRESETS)}")
        missing = [k for k in ("input_size", "in_channels", "num_classes") if k not in overrides]
        if missing:
            raise ValueError(f"{name} needs {missing} from the latent manifest; presets do not fix them")
        return cls(**{**DIT_PRESETS[name], "model_name": name, **overrides})


# ---------------------------------------------------------------------------------------------- embeddings


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """1-D sin-cos embedding (Vaswani et al.), [sin | cos] halves as in MAE / DiT; float64 (N, dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64).flatten()[:, None] * omega[None]  # (N, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D position embedding (MAE / DiT): half the channels encode the row, half the column. (N, dim)."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # token n = row * grid_size + col
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: per-sample affine of normalised tokens; x (B, N, D), shift/scale (B, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


# ---------------------------------------------------------------------------------------------- layers


class Attention(nn.Module):
    """Multi-head self-attention through `scaled_dot_product_attention`, with optional QK-norm.

    QK-norm (LayerNorm over each head's queries and keys, as in ViT-22B / SD3) bounds attention logits,
    which keeps large models stable in bf16.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (DiT paper Fig. 3, right)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))  # zero-initialised

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (B, N, D)


class FinalLayer(nn.Module):
    """adaLN then a linear map from tokens to patches of ε (and Σ when learn_sigma)."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)  # zero-initialised
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))  # zero-initialised

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, N, p*p*C_out)


# ---------------------------------------------------------------------------------------------- model


class DiT(nn.Module):
    """Class-conditional DiT: (B, C, H, W) noisy latents, (B,) timesteps, (B,) labels → (B, C or 2C, H, W)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        dim, patch = config.hidden_size, config.patch_size
        self.x_embedder = nn.Conv2d(config.in_channels, dim, kernel_size=patch, stride=patch)
        self.t_embedder = nn.Sequential(nn.Linear(TIMESTEP_FREQUENCY_DIM, dim), nn.SiLU(), nn.Linear(dim, dim))
        # Row `num_classes` is the null class: label dropout in training, the unconditional branch of CFG, and the
        # only row of an unconditional model (num_classes 0).
        self.y_embedder = nn.Embedding(config.num_classes + 1, dim)
        # Fixed, rebuilt from the config in initialize_weights, so not saved with the weights.
        self.register_buffer("pos_embed", torch.zeros(1, config.num_patches, dim), persistent=False)
        self.blocks = nn.ModuleList(
            DiTBlock(dim, config.num_heads, config.mlp_ratio, config.qk_norm) for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(dim, patch, config.out_channels)
        self.initialize_weights()

    @property
    def null_class(self) -> int:
        """Label index of the unconditional ("dropped") class."""
        return self.config.num_classes

    def initialize_weights(self) -> None:
        """All initialisation in one place (DiT `initialize_weights`).

        Zero-initialised, so a fresh model outputs exactly 0 (adaLN-Zero): every block's and the final layer's
        `adaLN_modulation` linear, and `final_layer.linear`.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:  # QK-norm
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            grid = int(math.isqrt(self.config.num_patches))
            self.pos_embed.copy_(sincos_2d(self.config.hidden_size, grid).float()[None])
        # Patch embedding as a linear layer on flattened patches.
        nn.init.xavier_uniform_(self.x_embedder.weight.view(self.x_embedder.weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def drop_labels(self, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace labels by the null class: at random with `class_dropout_prob` in training, or where
        `force_drop_ids` is true / 1 (any mode)."""
        if force_drop_ids is not None:
            drop = force_drop_ids.to(y.device).bool()
        elif self.training and self.config.class_dropout_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.config.class_dropout_prob
        else:
            return y
        return torch.where(drop, torch.full_like(y, self.null_class), y)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) tokens → (B, C, H, W) image."""
        patch, channels = self.config.patch_size, self.config.out_channels
        grid = self.config.input_size // patch
        x = x.reshape(x.shape[0], grid, grid, patch, patch, channels)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(x.shape[0], channels, grid * patch, grid * patch)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        config = self.config
        expected = (config.in_channels, config.input_size, config.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"DiT expects latents of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        tokens = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D)
        c = self.t_embedder(timestep_embedding(t, TIMESTEP_FREQUENCY_DIM).to(tokens.dtype))  # (B, D)
        if config.unconditional:
            y = torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device)
        c = c + self.y_embedder(self.drop_labels(y, force_drop_ids))
        for block in self.blocks:
            tokens = block(tokens, c)
        return self.unpatchify(self.final_layer(tokens, c))  # (B, C or 2C, H, W)

    # ------------------------------------------------------------------------------------------ latents

    def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Tokenizer latents → the per-channel standardised space the model was trained in."""
        mean, std = self._latent_stats(latents)
        return (latents - mean) / std

    def denormalize_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Sampled model-space latents → tokenizer latents (undoes `normalize_latents` exactly)."""
        mean, std = self._latent_stats(x)
        return x * std + mean

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.config
        mean = config.latent_mean if config.latent_mean is not None else (0.0,) * config.in_channels
        std = config.latent_std if config.latent_std is not None else (1.0,) * config.in_channels
        shape = (1, config.in_channels, 1, 1)
        return (torch.tensor(mean, dtype=like.dtype, device=like.device).view(shape),
                torch.tensor(std, dtype=like.dtype, device=like.device).view(shape))

    # ------------------------------------------------------------------------------------------ I/O

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "DiT":
        """Build a registry preset; `input_size`, `in_channels`, `num_classes` are required overrides."""
        return cls(DiTConfig.from_name(name, **overrides))

    def save_pretrained(self, directory: str | Path, raw_state_dict: Mapping[str, torch.Tensor] | None = None,
                        training: Mapping[str, Any] | None = None) -> Path:
        """Write the model folder (`tokenizer.pretrained`): config.json, model.safetensors (these weights),
        raw.safetensors when `raw_state_dict` is given, and a model card with `training` facts."""
        config = self.config
        facts = {"architecture": f"{config.model_name or 'DiT'}: {config.depth} blocks, width {config.hidden_size}, "
                                 f"{config.num_heads} heads, patch {config.patch_size}",
                 "parameters": f"{sum(p.numel() for p in self.parameters()):,}",
                 "latents": f"{config.in_channels}×{config.input_size}×{config.input_size}"
                            + (f" ({config.image_size}px images, {config.downsample}x tokenizer)"
                               if config.image_size else ""),
                 "classes": config.num_classes,
                 "tokenizer weights sha256": config.tokenizer_fingerprint, **(training or {})}
        usage = ("from pipelines import GenerationPipeline\n"
                 "pipe = GenerationPipeline.from_pretrained(\"this/folder\", \"its/tokenizer/folder\")\n"
                 "images = pipe([0, 1, 2], generator=0, output_type=\"pil\")")
        card = pretrained.model_card("Class-conditional DiT", "A DiT (Peebles & Xie, 2023) trained on the latents of "
                                     "an ε-VAE tokenizer; DDPM, 250 sampling steps by default.", facts, usage)
        return pretrained.save_folder(directory, type(self).__name__, MODEL_TYPE, config.to_dict(), self.state_dict(),
                                      raw_state_dict, card)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, weights: str = "ema", device: str | torch.device | None = None,
                        dtype: torch.dtype | str | None = None, use_ema: bool | None = None) -> "DiT":
        """Rebuild from a local folder or a Hub id; `weights` "ema" (default) or "raw" (see `tokenizer.pretrained`).

        `use_ema` is the format-1 spelling (True: "ema"; False: model.safetensors).
        """
        directory = pretrained.resolve_model_dir(name_or_path, "DiT")
        model = cls(load_config(directory))
        pretrained.load_weights(model, directory, pretrained.weights_choice(directory, weights, use_ema))
        return pretrained.place(model, device, dtype)


def load_config(name_or_path: str | Path) -> DiTConfig:
    """Read and validate a DiT folder's config.json (one-line errors for every way it can be wrong)."""
    directory = pretrained.resolve_model_dir(name_or_path, "DiT")
    _, values = pretrained.read_config(directory, {MODEL_TYPE: "DiT"})
    try:
        return DiTConfig.from_dict(values)
    except TypeError as error:
        raise ValueError(f"bad DiT config in {directory / pretrained.CONFIG_NAME}: {error}") from None


# ---------------------------------------------------------------------------------------------- registry

# DiT paper Table 1: model sizes; patch size 2, 4 or 8 for each.
DIT_SIZES: dict[str, dict[str, int]] = {
    "S": dict(hidden_size=384, depth=12, num_heads=6),
    "B": dict(hidden_size=768, depth=12, num_heads=12),
    "L": dict(hidden_size=1024, depth=24, num_heads=16),
    "XL": dict(hidden_size=1152, depth=28, num_heads=16),
}
DIT_PATCH_SIZES = (2, 4, 8)

DIT_PRESETS: dict[str, dict[str, int]] = {
    f"DiT-{size}/{patch}": {**fields, "patch_size": patch}
    for size, fields in reversed(DIT_SIZES.items())
    for patch in DIT_PATCH_SIZES
}

# name → factory(input_size=..., in_channels=..., num_classes=..., **overrides) -> DiT
DiT_models: dict[str, Callable[..., DiT]] = {name: partial(DiT.from_name, name) for name in DIT_PRESETS}
