"""Load a diffusers `AutoencoderKL` encoder (the SD kl-f8 VAE family) into this project's `sd` encoder.

    model = EpsVAE.from_preset("sd", "B")
    scaling = load_diffusers_encoder(model, "stabilityai/sd-vae-ft-ema")  # or a local folder
    scaling.scaling_factor                                                # 0.18215, read from its config.json

A diffusers VAE folder holds `config.json` + `diffusion_pytorch_model.safetensors` (pickled `.bin` files are
never read). A Hub id is resolved by `huggingface_hub.snapshot_download` with only those two files allowed,
so HF_HUB_OFFLINE / HF_HUB_CACHE behave as everywhere else in the Hub client.

Key map, diffusers → ours (`diffusers_key_map`; R = layers_per_block, our `down` is one flat Sequential):

    encoder.conv_in.*                                        → conv_in.*
    encoder.down_blocks.N.resnets.M.{norm1,conv1,norm2,conv2}.* → down.{N·(R+1)+M}.{same}.*
    encoder.down_blocks.N.resnets.M.conv_shortcut.*          → down.{N·(R+1)+M}.shortcut.*   (widths differ)
    encoder.down_blocks.N.downsamplers.0.conv.*              → down.{N·(R+1)+R}.conv.*       (not the last N)
    encoder.mid_block.resnets.0.*                            → mid.0.*
    encoder.mid_block.attentions.0.group_norm.*              → mid.1.norm.*
    encoder.mid_block.attentions.0.to_{q,k,v}.*              → mid.1.{q,k,v}.*
    encoder.mid_block.attentions.0.to_out.0.*                → mid.1.proj_out.*
    encoder.mid_block.resnets.1.*                            → mid.2.*   (mid.1 without mid attention)
    encoder.conv_norm_out.*                                  → norm_out.*
    encoder.conv_out.* with quant_conv.*                     → conv_out.*   (folded, below)

- Attention projections: diffusers stores them as Linear (C, C) weights, LDM / ours as 1x1 convs
  (C, C, 1, 1): reshaped. Older diffusers files name them query / key / value / proj_attn: accepted too.
- `quant_conv` (LDM / diffusers: a 1x1 conv on the moments, right after `encoder.conv_out`) has no layer of
  its own here. No nonlinearity lies between the two, so it is folded into our `conv_out`:
  W' = Q·W, b' = Q·b + q (in float64), which keeps the `sd` preset at exactly the SD encoder's 34,163,592
  parameters. Configs with `use_quant_conv: false` (SD3-style VAEs) load without folding.
- `decoder.*` and `post_quant_conv.*` are ignored: only the encoder is loaded.
- GroupNorm: diffusers uses 32 groups everywhere; ours does too at the 64+ channel widths of every real
  checkpoint. Narrower test widths get fewer groups (`tokenizer.nn.group_norm`): they load, with a warning
  that their outputs differ from diffusers'.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from tokenizer.encoder import Encoder, EncoderConfig
from tokenizer.nn import group_norm

DIFFUSERS_CONFIG_NAME = "config.json"
DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
IGNORED_PREFIXES = ("decoder.", "post_quant_conv.")  # the rest of an AutoencoderKL state dict
QUANT_CONV_KEYS = ("quant_conv.weight", "quant_conv.bias")

RESNET_PARTS = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
                ("conv_shortcut", "shortcut"))
ATTENTION_PARTS = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))
# Attention names of diffusers files written before v0.14 → current names.
DEPRECATED_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_DEPRECATED_ATTENTION = re.compile(r"(encoder\.mid_block\.attentions\.\d+\.)(query|key|value|proj_attn)\.")


@dataclass(frozen=True)
class LatentScaling:
    """diffusers' latent convention, from the VAE's config.json: model-space latents = (z - shift) · scale.

    For a DiT: `generator.convert.dit_from_official(..., latent_scale=s.scaling_factor,
    latent_shift=s.shift_factor)`, i.e. latent_mean = shift and latent_std = 1 / scale per channel.
    `scaling_factor` is None when the config.json does not state one.
    """

    scaling_factor: float | None
    shift_factor: float = 0.0


# ------------------------------------------------------------------------------------------------- key map


def diffusers_key_map(config: EncoderConfig) -> dict[str, str]:
    """diffusers parameter name → ours for an sd-family encoder (quant_conv is folded, so not listed)."""
    if config.kind != "sd":
        raise ValueError(f"diffusers AutoencoderKL encoders map onto kind 'sd' encoders, not {config.kind!r}")
    pairs: dict[str, str] = {}

    def add(theirs: str, ours: str) -> None:
        for field in ("weight", "bias"):
            pairs[f"{theirs}.{field}"] = f"{ours}.{field}"

    add("encoder.conv_in", "conv_in")
    blocks, levels = config.num_res_blocks, len(config.channel_multipliers)
    for level in range(levels):
        for m in range(blocks):
            for theirs, ours in RESNET_PARTS:
                add(f"encoder.down_blocks.{level}.resnets.{m}.{theirs}", f"down.{level * (blocks + 1) + m}.{ours}")
        if level < levels - 1:
            add(f"encoder.down_blocks.{level}.downsamplers.0.conv", f"down.{level * (blocks + 1) + blocks}.conv")
    last_mid = 2 if config.mid_attention else 1
    for theirs, ours in RESNET_PARTS:
        add(f"encoder.mid_block.resnets.0.{theirs}", f"mid.0.{ours}")
        add(f"encoder.mid_block.resnets.1.{theirs}", f"mid.{last_mid}.{ours}")
    if config.mid_attention:
        for theirs, ours in ATTENTION_PARTS:
            add(f"encoder.mid_block.attentions.0.{theirs}", f"mid.1.{ours}")
    add("encoder.conv_norm_out", "norm_out")
    add("encoder.conv_out", "conv_out")
    present = _expected_shapes(config)
    return {theirs: ours for theirs, ours in pairs.items() if ours in present}  # shortcuts only where widths differ


def _expected_shapes(config: EncoderConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in Encoder(config).state_dict().items()}


def encoder_config_from_diffusers(state_dict: Mapping[str, torch.Tensor]) -> EncoderConfig:
    """The `sd`-kind EncoderConfig whose shapes a diffusers AutoencoderKL encoder state dict has."""

    def weight(name: str) -> torch.Tensor:
        if name not in state_dict:
            raise ValueError(f"diffusers VAE state dict lacks {name!r}")
        return state_dict[name]

    conv_in = weight("encoder.conv_in.weight")  # (C0, 3, 3, 3)
    base = conv_in.shape[0]
    widths = []
    while f"encoder.down_blocks.{len(widths)}.resnets.0.conv1.weight" in state_dict:
        widths.append(state_dict[f"encoder.down_blocks.{len(widths)}.resnets.0.conv1.weight"].shape[0])
    if not widths or any(w % base for w in widths):
        raise ValueError(f"diffusers VAE down block widths {widths} are not multiples of conv_in's {base}")
    blocks = len({name.split(".")[4] for name in state_dict if name.startswith("encoder.down_blocks.0.resnets.")})
    return EncoderConfig(
        kind="sd", base_channels=base, channel_multipliers=tuple(w // base for w in widths), num_res_blocks=blocks,
        latent_channels=weight("encoder.conv_out.weight").shape[0] // 2, in_channels=conv_in.shape[1],
        mid_attention=any(name.startswith("encoder.mid_block.attentions.") for name in state_dict),
    )


# ------------------------------------------------------------------------------------------------- conversion


def encoder_state_from_diffusers(
    state_dict: Mapping[str, torch.Tensor], config: EncoderConfig | None = None, use_quant_conv: bool | None = None
) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict → a `tokenizer.encoder.Encoder` state dict.

    `config` defaults to the one the shapes imply (`encoder_config_from_diffusers`). `use_quant_conv` (from the
    VAE's config.json) says whether quant_conv must be present; None folds it when present. Missing,
    unexpected and wrongly shaped keys are one-line ValueErrors naming the first such key.
    """
    state: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if name.startswith(IGNORED_PREFIXES):
            continue
        modern = _DEPRECATED_ATTENTION.sub(lambda m: m.group(1) + DEPRECATED_ATTENTION_NAMES[m.group(2)] + ".", name)
        if modern in state:
            raise ValueError(f"diffusers VAE state dict holds {name!r} twice (old and new attention names)")
        state[modern] = tensor
    if config is None:
        config = encoder_config_from_diffusers(state)
    key_map, expected = diffusers_key_map(config), _expected_shapes(config)
    quant = {name: state.pop(name) for name in list(state) if name.startswith("quant_conv.")}

    converted: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name not in key_map:
            raise ValueError(f"unexpected key {name!r} in the diffusers VAE state dict for this encoder")
        ours = key_map[name]
        if tensor.ndim == 2 and len(expected[ours]) == 4:  # attention Linear (C, C) → 1x1 conv (C, C, 1, 1)
            tensor = tensor[:, :, None, None]
        if tuple(tensor.shape) != expected[ours]:
            raise ValueError(f"{name} has shape {tuple(state[name].shape)}, the encoder's {ours} is {expected[ours]}")
        converted[ours] = tensor
    missing = [name for name, ours in key_map.items() if ours not in converted]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"diffusers VAE state dict lacks {missing[0]!r}{more}")

    if use_quant_conv is None:
        use_quant_conv = bool(quant)
    if not use_quant_conv:
        if quant:
            raise ValueError(f"unexpected key {sorted(quant)[0]!r}: the VAE config says use_quant_conv is false")
        return converted
    for name in quant:
        if name not in QUANT_CONV_KEYS:
            raise ValueError(f"unexpected key {name!r} in the diffusers VAE state dict")
    for name in QUANT_CONV_KEYS:
        if name not in quant:
            raise ValueError(f"diffusers VAE state dict lacks {name!r}")
    moments = expected["conv_out.bias"][0]
    for name, shape in zip(QUANT_CONV_KEYS, ((moments, moments, 1, 1), (moments,))):
        if tuple(quant[name].shape) != shape:
            raise ValueError(f"{name} has shape {tuple(quant[name].shape)}, expected {shape}")
    converted["conv_out.weight"], converted["conv_out.bias"] = fold_quant_conv(
        converted["conv_out.weight"], converted["conv_out.bias"], *(quant[name] for name in QUANT_CONV_KEYS))
    return converted


def fold_quant_conv(weight: torch.Tensor, bias: torch.Tensor, quant_weight: torch.Tensor, quant_bias: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """conv(W, b) followed by the 1x1 conv (Q, q) as one conv: (Q·W, Q·b + q). W (O, C, k, k), Q (O', O, 1, 1)."""
    q = quant_weight.to(torch.float64)[:, :, 0, 0]  # (O', O)
    folded_weight = torch.einsum("po,ochw->pchw", q, weight.to(torch.float64))
    folded_bias = q @ bias.to(torch.float64) + quant_bias.to(torch.float64)
    return folded_weight.to(weight.dtype), folded_bias.to(bias.dtype)


# ------------------------------------------------------------------------------------------------- files


def resolve_diffusers_folder(folder_or_hub_id: str | Path, subfolder: str | None = None) -> Path:
    """A local diffusers VAE folder, or a Hub id's cached snapshot of only its two files."""
    from tokenizer.pretrained import resolve_model_dir

    return resolve_model_dir(folder_or_hub_id, "diffusers VAE", (DIFFUSERS_CONFIG_NAME, DIFFUSERS_WEIGHTS_NAME),
                             subfolder)


def read_diffusers_config(folder: Path) -> dict[str, Any]:
    from tokenizer.pretrained import read_json_object

    return read_json_object(folder / DIFFUSERS_CONFIG_NAME, "a diffusers VAE folder")


def check_diffusers_config(values: Mapping[str, Any], config: EncoderConfig, source: str) -> None:
    """Refuse, in one line, a diffusers VAE config.json whose encoder is not `config`'s architecture."""
    class_name = values.get("_class_name", "AutoencoderKL")
    if class_name != "AutoencoderKL":
        raise ValueError(f"{source} holds a {class_name}, not an AutoencoderKL")
    if config.kind != "sd" or not config.double_z:
        raise ValueError(f"diffusers AutoencoderKL encoders load into kind 'sd' encoders with double_z, not {config}")
    levels = len(config.channel_multipliers)
    # field: (ours, diffusers' default when the file omits it; None = the file must state it)
    fields = {
        "block_out_channels": ([config.base_channels * m for m in config.channel_multipliers], None),
        "layers_per_block": (config.num_res_blocks, None),
        "latent_channels": (config.latent_channels, None),
        "in_channels": (config.in_channels, 3),
        "down_block_types": (["DownEncoderBlock2D"] * levels, None),
        "mid_block_add_attention": (config.mid_attention, True),
        "act_fn": ("silu", "silu"),
    }
    for field, (ours, default) in fields.items():
        if field not in values and default is None:
            raise ValueError(f"{source}/{DIFFUSERS_CONFIG_NAME} lacks {field!r}")
        theirs = values.get(field, default)
        if (list(theirs) if isinstance(theirs, (list, tuple)) else theirs) != ours:
            raise ValueError(f"{source} has {field}={theirs!r}, the encoder needs {ours!r}")
    groups = values.get("norm_num_groups", 32)
    for width in sorted({config.base_channels * m for m in config.channel_multipliers}):
        ours = group_norm(width).num_groups
        if ours != groups:
            warnings.warn(f"the encoder's GroupNorm at width {width} has {ours} groups, {source} uses {groups}: "
                          "the weights load, but outputs differ from diffusers'", stacklevel=3)


def load_diffusers_encoder(model_or_encoder: nn.Module, folder_or_hub_id: str | Path,
                           subfolder: str | None = None) -> LatentScaling:
    """Fill an `EpsVAE`'s / `VAE`'s encoder (or a bare `Encoder`) of the `sd` family with a diffusers
    AutoencoderKL encoder; returns the VAE's latent scaling for the caller to record.

    `subfolder` selects a VAE inside a pipeline repository (e.g. "vae"). Only the encoder is replaced.
    """
    encoder = getattr(model_or_encoder, "encoder", model_or_encoder)
    if not isinstance(encoder, Encoder):
        raise TypeError(f"expected a tokenizer with an `encoder` or an Encoder, got {type(model_or_encoder).__name__}")
    folder = resolve_diffusers_folder(folder_or_hub_id, subfolder)
    source = str(folder_or_hub_id) + (f"/{subfolder}" if subfolder else "")
    values = read_diffusers_config(folder)
    check_diffusers_config(values, encoder.config, source)
    weights = folder / DIFFUSERS_WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"no {DIFFUSERS_WEIGHTS_NAME} in diffusers VAE {source} "
                                "(pickled .bin files are not read)")
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights))
    except Exception as error:  # safetensors raises its own error type for truncated / corrupt files
        raise ValueError(f"cannot read {weights}: {error}") from None
    converted = encoder_state_from_diffusers(state, encoder.config, use_quant_conv=values.get("use_quant_conv", True))
    encoder.load_state_dict(converted, strict=True)
    scaling = values.get("scaling_factor")
    return LatentScaling(scaling_factor=None if scaling is None else float(scaling),
                         shift_factor=float(values.get("shift_factor") or 0.0))
