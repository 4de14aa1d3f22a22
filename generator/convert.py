"""Load the published DiT checkpoints (facebookresearch/DiT, Peebles & Xie 2023) into `generator.dit.DiT`.

    model = dit_from_official("DiT-XL-2-256x256.pt", model="DiT-XL/2").eval()   # 256² ImageNet, SD-VAE latents

Key map, official → ours (`official_to_state_dict`); every other key has the same name in both layouts:

    x_embedder.proj.{weight,bias}          → x_embedder.{weight,bias}   (timm PatchEmbed wraps the conv)
    t_embedder.mlp.{0,2}.{weight,bias}     → t_embedder.{0,2}.{weight,bias}
    y_embedder.embedding_table.weight      → y_embedder.weight
    pos_embed                              → (dropped after a check, see below)
    blocks.N.attn.{qkv,proj}.*, blocks.N.mlp.{fc1,fc2}.*, blocks.N.adaLN_modulation.1.*,
    final_layer.{linear,adaLN_modulation.1}.*                           → same names

What the official checkpoints carry, and how it lands here:

- `pos_embed`: the official model keeps its fixed 2-D sin-cos table as a frozen `nn.Parameter`, so it is in
  the state dict; ours rebuilds the same table from the config as a non-persistent buffer. The converter
  checks the official tensor equals ours (float32 rounding) and drops it; a table that differs (a learned
  one, another grid) is refused, since this DiT cannot hold it.
- `learn_sigma=True`: the final layer has 2·C output channels (8 for the 4 SD-VAE channels). It is inferred
  from the weights; the sampler uses the first C channels (ε) and ignores the variance half (fixed variance,
  ε-VAE appendix C.3).
- 1000 ImageNet classes + one null row (index 1000) in the label table: the same layout as ours
  (`num_classes` = rows - 1, inferred).
- Latent scale: the official DiT was trained on SD-VAE latents multiplied by `SD_VAE_SCALING_FACTOR`
  (0.18215; DiT's train.py / sample.py). Here that is the config's latent normalisation
  `(z - latent_mean) / latent_std` with mean 0 and std 1/0.18215 for every channel, which
  `dit_from_official` sets by default (`latent_scale=`; pass the `scaling_factor` that
  `tokenizer.convert.load_diffusers_encoder` returns for another VAE, or `latent_scale=None` with explicit
  `latent_mean=`/`latent_std=`).
- Files: the released `.pt` files are plain state dicts; DiT's training checkpoints are dicts with "model",
  "ema", "opt" and "args" (an argparse.Namespace). Both load with `weights_only=True` (Namespace is the one
  class allowed besides tensors); "ema" is preferred over "model", as DiT's `find_model` does.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping

import torch

from generator.dit import DiT, DiTConfig, sincos_2d

# The one place this number lives: the scale DiT's official checkpoints were trained with (SD-VAE latents).
SD_VAE_SCALING_FACTOR = 0.18215

# Official prefix → ours; keys not listed keep their names. Explicit, checked both ways by the tests.
OFFICIAL_PREFIX_RENAMES: tuple[tuple[str, str], ...] = (
    ("x_embedder.proj.", "x_embedder."),
    ("t_embedder.mlp.", "t_embedder."),
    ("y_embedder.embedding_table.", "y_embedder."),
)
OFFICIAL_POS_EMBED = "pos_embed"
POS_EMBED_TOLERANCE = 1e-5  # official table: float32 positions, float64 maths, stored as float32


def our_key(official: str) -> str:
    for old, new in OFFICIAL_PREFIX_RENAMES:
        if official.startswith(old):
            return new + official[len(old):]
    return official


def official_key(ours: str) -> str:
    for old, new in OFFICIAL_PREFIX_RENAMES:
        if ours.startswith(new):
            return old + ours[len(new):]
    return ours


def latent_stats_for_scale(scale: float, channels: int, shift: float = 0.0) -> dict[str, tuple[float, ...]]:
    """`latent_mean`/`latent_std` config fields equivalent to diffusers' `(z - shift) * scale`."""
    if not scale > 0:
        raise ValueError(f"latent scale must be positive, got {scale}")
    return {"latent_mean": (float(shift),) * channels, "latent_std": (1.0 / scale,) * channels}


# ------------------------------------------------------------------------------------------------- reading


def load_official_state_dict(source: str | Path | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A plain official state dict from a `.pt` / `.safetensors` path or an in-memory dict; a training
    checkpoint's "ema" (else "model") entry is taken."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"DiT checkpoint not found: {path}")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                source = load_file(str(path))
            else:
                with torch.serialization.safe_globals([argparse.Namespace]):  # DiT's train.py saves its args
                    source = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # unpickling / safetensors / truncated-file errors all end here
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"cannot read DiT checkpoint {path}: {first_line}") from None
    if not isinstance(source, Mapping):
        raise ValueError(f"a DiT checkpoint must be a dict of tensors, got {type(source).__name__}")
    for wrapper in ("ema", "model"):
        if isinstance(source.get(wrapper), Mapping):
            source = source[wrapper]
            break
    for name, value in source.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"DiT checkpoint entry {name!r} is a {type(value).__name__}, not a tensor")
    return dict(source)


def config_from_official(state_dict: Mapping[str, torch.Tensor], model: str = "DiT-XL/2",
                         **overrides: Any) -> DiTConfig:
    """The DiT config of an official state dict: the named preset, with `in_channels`, `input_size`,
    `num_classes` and `learn_sigma` read off the weights unless given in `overrides`."""

    def weight(name: str) -> torch.Tensor:
        if name not in state_dict:
            raise ValueError(f"official DiT state dict lacks {name!r}")
        return state_dict[name]

    inferred: dict[str, Any] = {}
    patch = weight("x_embedder.proj.weight")
    if patch.ndim != 4:
        raise ValueError(f"x_embedder.proj.weight has shape {tuple(patch.shape)}, expected a 4-D conv kernel")
    in_channels, patch_size = patch.shape[1], patch.shape[2]
    inferred["in_channels"] = in_channels
    inferred["num_classes"] = weight("y_embedder.embedding_table.weight").shape[0] - 1  # minus the null row
    out_rows = weight("final_layer.linear.weight").shape[0]
    inferred["learn_sigma"] = out_rows == patch_size * patch_size * 2 * in_channels
    if OFFICIAL_POS_EMBED in state_dict:
        tokens = state_dict[OFFICIAL_POS_EMBED].shape[-2]
        grid = math.isqrt(tokens)
        if grid * grid != tokens:
            raise ValueError(f"pos_embed has {tokens} tokens, not a square grid")
        inferred["input_size"] = grid * patch_size
    elif "input_size" not in overrides:
        raise ValueError("official DiT state dict has no pos_embed to read the latent size from; pass input_size=")
    return DiTConfig.from_name(model, **{**inferred, **overrides})


# ------------------------------------------------------------------------------------------------- mapping


def _expected_shapes(config: DiTConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost for XL
        return {name: tuple(t.shape) for name, t in DiT(config).state_dict().items()}


def _check_pos_embed(tensor: torch.Tensor, config: DiTConfig) -> None:
    grid = config.input_size // config.patch_size
    expected = (1, grid * grid, config.hidden_size)
    if tuple(tensor.shape) != expected:
        label = config.model_name or "this DiT"
        raise ValueError(f"pos_embed has shape {tuple(tensor.shape)}, {label} expects {expected}")
    reference = sincos_2d(config.hidden_size, grid)[None]  # (1, N, D) float64
    error = (tensor.detach().to(torch.float64) - reference).abs().max().item()
    if not error <= POS_EMBED_TOLERANCE:
        raise ValueError(f"pos_embed is not DiT's fixed {grid}x{grid} sin-cos table (max difference {error:.3g}); "
                         "this DiT rebuilds it and cannot load a learned one")


def official_to_state_dict(state_dict: Mapping[str, torch.Tensor], config: DiTConfig) -> dict[str, torch.Tensor]:
    """Rename an official DiT state dict to `generator.dit.DiT`'s names for `config`, checking every shape.

    One-line ValueErrors name the first unexpected, wrongly shaped or missing key (in official names).
    """
    expected = _expected_shapes(config)
    label = config.model_name or "this DiT"
    converted: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if name == OFFICIAL_POS_EMBED:
            _check_pos_embed(tensor, config)
            continue
        ours = our_key(name)
        if ours not in expected:
            raise ValueError(f"unexpected key {name!r} in the official DiT state dict for {label}")
        if tuple(tensor.shape) != expected[ours]:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, {label} expects {expected[ours]}")
        converted[ours] = tensor
    missing = [official_key(name) for name in expected if name not in converted]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"official DiT state dict lacks {missing[0]!r}{more} for {label}")
    return converted


def dit_from_official(
    state_dict_or_path: str | Path | Mapping[str, Any],
    model: str = "DiT-XL/2",
    latent_scale: float | None = SD_VAE_SCALING_FACTOR,
    latent_shift: float = 0.0,
    **config_overrides: Any,
) -> DiT:
    """An official DiT checkpoint as a `generator.dit.DiT` (training mode, like `DiT.from_pretrained`).

    `model` names the registry preset the weights were trained as; the data-dependent fields are read off the
    weights (`config_from_official`). `latent_scale`/`latent_shift` set the latent normalisation the weights
    expect (diffusers' `(z - shift) * scale`; SD-VAE's scale by default); pass `latent_scale=None` to leave it
    to `latent_mean=`/`latent_std=` overrides (or to none).
    """
    state = load_official_state_dict(state_dict_or_path)
    if latent_scale is not None:
        given = sorted({"latent_mean", "latent_std"} & set(config_overrides))
        if given:
            raise ValueError(f"pass either latent_scale or {given}, not both (latent_scale=None to use {given})")
    config = config_from_official(state, model, **config_overrides)
    if latent_scale is not None:
        config = dataclasses.replace(config, **latent_stats_for_scale(latent_scale, config.in_channels, latent_shift))
    weights = official_to_state_dict(state, config)
    dit = DiT(config)
    dit.load_state_dict(weights, strict=True)
    return dit
