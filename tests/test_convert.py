"""Loading published weights: official DiT checkpoints (generator.convert) and diffusers AutoencoderKL
encoders (tokenizer.convert). The foreign layouts are written out here by hand, key by key, from the
official sources (facebookresearch/DiT models.py; diffusers' AutoencoderKL), so the converters' maps are
checked against an independent spelling, not against their own inverse."""
import argparse
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from generator.convert import (SD_VAE_SCALING_FACTOR, dit_from_official, official_key, official_to_state_dict,
                               our_key)
from generator.dit import DiT, DiTConfig
from tokenizer.convert import (LatentScaling, diffusers_key_map, encoder_config_from_diffusers,
                               encoder_state_from_diffusers, load_diffusers_encoder)
from tokenizer.encoder import ENCODER_PRESETS, Encoder, EncoderConfig
from tokenizer.models import VAE
from tokenizer.nn import group_norm

# ------------------------------------------------------------------------------------------------ DiT

TINY_DIT = dict(depth=1, hidden_size=32, num_heads=2)  # overrides of the DiT-S/2 preset


def official_pos_embed(dim: int, grid_size: int) -> np.ndarray:
    """facebookresearch/DiT `get_2d_sincos_pos_embed`, transcribed (numpy, w first in the meshgrid)."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32)))
    grid = grid.reshape([2, 1, grid_size, grid_size])
    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


def random_dit(config: DiTConfig) -> DiT:
    model = DiT(config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():  # also the zero-initialised layers, so the output is not 0
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def official_layout(model: DiT) -> dict[str, torch.Tensor]:
    """The official DiT state dict holding `model`'s weights, in the official key order (pos_embed first)."""
    config, ours = model.config, model.state_dict()
    grid = config.input_size // config.patch_size
    state = {"pos_embed": torch.from_numpy(official_pos_embed(config.hidden_size, grid)).float()[None]}
    for field in ("weight", "bias"):
        state[f"x_embedder.proj.{field}"] = ours[f"x_embedder.{field}"]
    for index in (0, 2):
        for field in ("weight", "bias"):
            state[f"t_embedder.mlp.{index}.{field}"] = ours[f"t_embedder.{index}.{field}"]
    state["y_embedder.embedding_table.weight"] = ours["y_embedder.weight"]
    layers = [f"blocks.{i}.{name}" for i in range(config.depth)
              for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")]
    layers += ["final_layer.linear", "final_layer.adaLN_modulation.1"]
    for layer in layers:
        for field in ("weight", "bias"):
            state[f"{layer}.{field}"] = ours[f"{layer}.{field}"].clone()
    return state


@pytest.fixture(scope="module")
def tiny_dit():
    config = DiTConfig.from_name("DiT-S/2", input_size=8, in_channels=4, num_classes=10, learn_sigma=True, **TINY_DIT)
    return random_dit(config)


def one_line_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_dit_key_map_round_trips_every_key(tiny_dit):
    official = official_layout(tiny_dit)
    ours = set(tiny_dit.state_dict())
    assert {our_key(name) for name in official if name != "pos_embed"} == ours
    assert all(our_key(official_key(name)) == name for name in ours)
    assert "pos_embed" not in tiny_dit.state_dict()  # ours is rebuilt from the config, not stored


def test_official_dit_forward_matches(tiny_dit):
    converted = dit_from_official(official_layout(tiny_dit), model="DiT-S/2", latent_scale=None, **TINY_DIT).eval()
    config = converted.config
    # in_channels, input_size (from pos_embed), num_classes (rows - null) and learn_sigma are read off the weights.
    assert (config.in_channels, config.input_size, config.num_classes, config.learn_sigma) == (4, 8, 10, True)
    assert config.out_channels == 8 and converted.null_class == 10
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    y = torch.tensor([1, 9, 10])  # 10: the null class row
    with torch.no_grad():
        assert torch.equal(converted(x, t, y), tiny_dit(x, t, y))
    assert converted.config.latent_mean is None and converted.config.latent_std is None


def test_official_dit_latent_scale(tiny_dit):
    converted = dit_from_official(official_layout(tiny_dit), model="DiT-S/2", **TINY_DIT)
    assert converted.config.latent_mean == (0.0,) * 4
    assert converted.config.latent_std == pytest.approx((1 / SD_VAE_SCALING_FACTOR,) * 4)
    z = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(converted.normalize_latents(z), z * SD_VAE_SCALING_FACTOR)  # DiT's train.py
    shifted = dit_from_official(official_layout(tiny_dit), model="DiT-S/2", latent_scale=0.5, latent_shift=0.25,
                                **TINY_DIT)
    torch.testing.assert_close(shifted.normalize_latents(z), (z - 0.25) * 0.5)  # diffusers' (z - shift) · scale
    with pytest.raises(ValueError) as excinfo:
        dit_from_official(official_layout(tiny_dit), model="DiT-S/2", latent_std=(2.0,) * 4, **TINY_DIT)
    one_line_error(excinfo, "latent_scale", "latent_std")
    explicit = dit_from_official(official_layout(tiny_dit), model="DiT-S/2", latent_scale=None,
                                 latent_std=(2.0,) * 4, **TINY_DIT)
    assert explicit.config.latent_std == (2.0,) * 4


def test_official_dit_files(tiny_dit, tmp_path):
    official = official_layout(tiny_dit)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 5])
    with torch.no_grad():
        reference = tiny_dit(x, t, y)

    plain = tmp_path / "DiT-S-2-tiny.pt"
    torch.save(official, plain)
    # DiT's train.py checkpoint: model, ema, opt, args (an argparse.Namespace); "ema" is the one sampled from.
    noisy = {name: tensor + 1.0 for name, tensor in official.items() if name != "pos_embed"}
    training = tmp_path / "0400000.pt"
    torch.save({"model": noisy, "ema": official, "opt": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(model="DiT-S/2", image_size=16)}, training)
    safetensors_file = tmp_path / "dit.safetensors"
    save_file({name: tensor.contiguous() for name, tensor in official.items()}, str(safetensors_file))
    for path in (plain, training, safetensors_file):
        converted = dit_from_official(path, model="DiT-S/2", **TINY_DIT).eval()
        with torch.no_grad():
            assert torch.equal(converted(x, t, y), reference), path

    with pytest.raises(FileNotFoundError) as excinfo:
        dit_from_official(tmp_path / "absent.pt", model="DiT-S/2", **TINY_DIT)
    one_line_error(excinfo, "absent.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(plain.read_bytes()[:100])
    with pytest.raises(ValueError) as excinfo:
        dit_from_official(corrupt, model="DiT-S/2", **TINY_DIT)
    one_line_error(excinfo, "corrupt.pt")


@pytest.mark.parametrize("case, fragment", [
    ("wrong_shape", "blocks.0.attn.qkv.weight"),
    ("missing", "final_layer.linear.bias"),
    ("unexpected", "blocks.0.attn.q_norm.weight"),
    ("learned_pos_embed", "pos_embed"),
    ("wrong_preset", "DiT-B/2"),
])
def test_official_dit_refuses_in_one_line(tiny_dit, case, fragment):
    official = official_layout(tiny_dit)
    overrides, model = dict(TINY_DIT), "DiT-S/2"
    if case == "wrong_shape":
        official["blocks.0.attn.qkv.weight"] = torch.zeros(95, 32)
    elif case == "missing":
        del official["final_layer.linear.bias"]
    elif case == "unexpected":
        official["blocks.0.attn.q_norm.weight"] = torch.ones(16)
    elif case == "learned_pos_embed":
        official["pos_embed"] = official["pos_embed"] + 0.01
    else:
        overrides, model = {"depth": 1}, "DiT-B/2"  # weights of hidden 32 declared as a DiT-B/2 (hidden 768)
    with pytest.raises(ValueError) as excinfo:
        dit_from_official(official, model=model, **overrides)
    one_line_error(excinfo, fragment)


def test_official_to_state_dict_takes_a_config(tiny_dit):
    converted = official_to_state_dict(official_layout(tiny_dit), tiny_dit.config)
    ours = tiny_dit.state_dict()
    assert converted.keys() == ours.keys()
    assert all(torch.equal(converted[name], ours[name]) for name in ours)


# ------------------------------------------------------------------------------------------------ encoder

TINY_SD = EncoderConfig(kind="sd", base_channels=32, channel_multipliers=(1, 2), num_res_blocks=1,
                        latent_channels=4, mid_attention=True)


def diffusers_vae_state(config: EncoderConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """An AutoencoderKL state dict in diffusers' names (encoder + quant_conv, plus decoder keys to ignore)."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def randn(*shape):
        return torch.randn(shape, generator=generator)

    def conv(name, out, inp, kernel):
        state[f"{name}.weight"] = randn(out, inp, kernel, kernel) / math.sqrt(inp * kernel * kernel)
        state[f"{name}.bias"] = 0.1 * randn(out)

    def linear(name, out, inp):
        state[f"{name}.weight"] = randn(out, inp) / math.sqrt(inp)
        state[f"{name}.bias"] = 0.1 * randn(out)

    def norm(name, channels):
        state[f"{name}.weight"] = 1 + 0.1 * randn(channels)
        state[f"{name}.bias"] = 0.1 * randn(channels)

    def resnet(prefix, inp, out):
        norm(f"{prefix}.norm1", inp)
        conv(f"{prefix}.conv1", out, inp, 3)
        norm(f"{prefix}.norm2", out)
        conv(f"{prefix}.conv2", out, out, 3)
        if inp != out:
            conv(f"{prefix}.conv_shortcut", out, inp, 1)

    widths = [config.base_channels * m for m in config.channel_multipliers]
    conv("encoder.conv_in", widths[0], config.in_channels, 3)
    channels = widths[0]
    for level, width in enumerate(widths):
        for m in range(config.num_res_blocks):
            resnet(f"encoder.down_blocks.{level}.resnets.{m}", channels, width)
            channels = width
        if level < len(widths) - 1:
            conv(f"encoder.down_blocks.{level}.downsamplers.0.conv", channels, channels, 3)
    resnet("encoder.mid_block.resnets.0", channels, channels)
    norm("encoder.mid_block.attentions.0.group_norm", channels)
    for name in ("to_q", "to_k", "to_v", "to_out.0"):
        linear(f"encoder.mid_block.attentions.0.{name}", channels, channels)
    resnet("encoder.mid_block.resnets.1", channels, channels)
    norm("encoder.conv_norm_out", channels)
    moments = 2 * config.latent_channels
    conv("encoder.conv_out", moments, channels, 3)
    conv("quant_conv", moments, moments, 1)
    conv("post_quant_conv", config.latent_channels, config.latent_channels, 1)  # decoder side: ignored
    conv("decoder.conv_in", channels, config.latent_channels, 3)
    return state


def diffusers_config(config: EncoderConfig, **changes) -> dict:
    levels = len(config.channel_multipliers)
    return {"_class_name": "AutoencoderKL", "_diffusers_version": "0.30.0", "act_fn": "silu",
            "block_out_channels": [config.base_channels * m for m in config.channel_multipliers],
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "in_channels": config.in_channels, "out_channels": 3, "latent_channels": config.latent_channels,
            "layers_per_block": config.num_res_blocks, "norm_num_groups": 32, "sample_size": 32,
            "scaling_factor": 0.3, **changes}


def write_diffusers_vae(folder, config: EncoderConfig, state=None, **changes):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(diffusers_config(config, **changes)))
    state = state if state is not None else diffusers_vae_state(config)
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


def diffusers_encoder_forward(state: dict[str, torch.Tensor], config: EncoderConfig, x: torch.Tensor) -> torch.Tensor:
    """The diffusers / LDM encoder computation written against diffusers' names (float64), quant_conv included.

    GroupNorm uses this project's group counts (the same as diffusers' 32 at 64+ channels; see tokenizer.convert).
    """
    s = {name: tensor.double() for name, tensor in state.items()}

    def conv(h, name, **kw):
        return F.conv2d(h, s[f"{name}.weight"], s[f"{name}.bias"], **kw)

    def norm(h, name):
        return F.group_norm(h, group_norm(h.shape[1]).num_groups, s[f"{name}.weight"], s[f"{name}.bias"], eps=1e-6)

    def resnet(h, prefix):
        r = conv(F.silu(norm(h, f"{prefix}.norm1")), f"{prefix}.conv1", padding=1)
        r = conv(F.silu(norm(r, f"{prefix}.norm2")), f"{prefix}.conv2", padding=1)
        return (conv(h, f"{prefix}.conv_shortcut") if f"{prefix}.conv_shortcut.weight" in s else h) + r

    def attention(h, prefix):
        b, c, height, width = h.shape
        y = norm(h, f"{prefix}.group_norm").flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = (F.linear(y, s[f"{prefix}.{n}.weight"], s[f"{prefix}.{n}.bias"]) for n in ("to_q", "to_k", "to_v"))
        out = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), dim=-1) @ v
        out = F.linear(out, s[f"{prefix}.to_out.0.weight"], s[f"{prefix}.to_out.0.bias"])
        return h + out.transpose(1, 2).reshape(b, c, height, width)

    levels = len(config.channel_multipliers)
    h = conv(x.double(), "encoder.conv_in", padding=1)
    for level in range(levels):
        for m in range(config.num_res_blocks):
            h = resnet(h, f"encoder.down_blocks.{level}.resnets.{m}")
        if level < levels - 1:
            h = conv(F.pad(h, (0, 1, 0, 1)), f"encoder.down_blocks.{level}.downsamplers.0.conv", stride=2)
    h = resnet(h, "encoder.mid_block.resnets.0")
    h = attention(h, "encoder.mid_block.attentions.0")
    h = resnet(h, "encoder.mid_block.resnets.1")
    h = conv(F.silu(norm(h, "encoder.conv_norm_out")), "encoder.conv_out", padding=1)
    return conv(h, "quant_conv")  # (B, 2Z, H/f, W/f)


def test_diffusers_key_map_covers_the_sd_presets():
    for name in ("sd", "sd-f16"):
        config = ENCODER_PRESETS[name]
        key_map = diffusers_key_map(config)
        assert sorted(key_map.values()) == sorted(Encoder(config).state_dict())
        assert len(key_map) == len(set(key_map.values()))
    sd_map = diffusers_key_map(ENCODER_PRESETS["sd"])  # SD kl-f8: widths change entering levels 1 and 2
    assert sd_map["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"] == "down.3.shortcut.weight"
    assert "encoder.down_blocks.3.resnets.0.conv_shortcut.weight" not in sd_map
    assert sd_map["encoder.down_blocks.2.downsamplers.0.conv.weight"] == "down.8.conv.weight"
    assert sd_map["encoder.mid_block.attentions.0.to_out.0.weight"] == "mid.1.proj_out.weight"


def test_diffusers_encoder_output_matches_reference(tmp_path):
    state = diffusers_vae_state(TINY_SD)
    folder = write_diffusers_vae(tmp_path / "vae", TINY_SD, state)
    model = VAE.from_preset("tiny", "tiny", downsample=2)  # tiny encoder at f=2: the TINY_SD architecture
    assert model.config.encoder == TINY_SD
    decoder_before = {name: p.clone() for name, p in model.decoder.state_dict().items()}
    with pytest.warns(UserWarning, match="width 32"):  # GroupNorm(8) at 32 channels vs diffusers' 32 groups
        scaling = load_diffusers_encoder(model, folder)
    assert scaling == LatentScaling(scaling_factor=0.3, shift_factor=0.0)
    assert all(torch.equal(p, decoder_before[name]) for name, p in model.decoder.state_dict().items())

    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        ours = model.encoder.double()(x.double())
    torch.testing.assert_close(ours, diffusers_encoder_forward(state, TINY_SD, x), rtol=1e-6, atol=1e-6)

    # Every parameter landed where the map says (quant_conv folded into conv_out, attention reshaped).
    loaded = model.encoder.state_dict()
    for theirs, name in diffusers_key_map(TINY_SD).items():
        if name.startswith("conv_out."):
            continue
        torch.testing.assert_close(loaded[name].float().reshape(state[theirs].shape), state[theirs], rtol=0, atol=0)


def test_diffusers_state_conversion_edge_cases():
    state = diffusers_vae_state(TINY_SD)
    assert encoder_config_from_diffusers(state) == TINY_SD
    inferred = encoder_state_from_diffusers(state)
    assert inferred.keys() == Encoder(TINY_SD).state_dict().keys()
    # Pre-0.14 attention names, 1x1-conv shaped: the same weights.
    old = {}
    for name, tensor in state.items():
        for new, deprecated in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            name = name.replace(f"attentions.0.{new}.", f"attentions.0.{deprecated}.")
        old[name] = tensor[:, :, None, None] if tensor.ndim == 2 else tensor
    converted = encoder_state_from_diffusers(old, TINY_SD)
    assert all(torch.equal(converted[name], inferred[name]) for name in inferred)
    # use_quant_conv false (SD3-style): conv_out kept as is.
    no_quant = {name: t for name, t in state.items() if not name.startswith("quant_conv.")}
    plain = encoder_state_from_diffusers(no_quant, TINY_SD, use_quant_conv=False)
    assert torch.equal(plain["conv_out.weight"], state["encoder.conv_out.weight"])


@pytest.mark.parametrize("case, fragment", [
    ("missing", "encoder.mid_block.attentions.0.to_k.bias"),
    ("missing_quant", "quant_conv.bias"),
    ("extra", "encoder.mid_block.attentions.1.to_q.weight"),
    ("wrong_shape", "encoder.down_blocks.1.resnets.0.conv1.weight"),
])
def test_diffusers_state_refuses_in_one_line(case, fragment):
    state = diffusers_vae_state(TINY_SD)
    if case in ("missing", "missing_quant"):
        del state[fragment]
    elif case == "extra":
        state[fragment] = torch.zeros(64, 64)
    else:
        state[fragment] = torch.zeros(64, 32, 1, 1)
    with pytest.raises(ValueError) as excinfo:
        encoder_state_from_diffusers(state, TINY_SD, use_quant_conv=True)
    one_line_error(excinfo, fragment)


@pytest.mark.parametrize("changes, fragment", [
    ({"layers_per_block": 2}, "layers_per_block"),
    ({"block_out_channels": [32, 128]}, "block_out_channels"),
    ({"latent_channels": 8}, "latent_channels"),
    ({"mid_block_add_attention": False}, "mid_block_add_attention"),
    ({"_class_name": "AutoencoderTiny"}, "AutoencoderTiny"),
])
def test_diffusers_config_mismatch_refused(tmp_path, changes, fragment):
    folder = write_diffusers_vae(tmp_path / "vae", TINY_SD, **changes)
    with pytest.raises(ValueError) as excinfo:
        load_diffusers_encoder(Encoder(TINY_SD), folder)
    one_line_error(excinfo, fragment)


@pytest.mark.filterwarnings("ignore:the encoder's GroupNorm")
def test_diffusers_folder_without_safetensors(tmp_path):
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(diffusers_config(TINY_SD)))
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError) as excinfo:
        load_diffusers_encoder(Encoder(TINY_SD), folder)
    one_line_error(excinfo, "diffusion_pytorch_model.safetensors")


@pytest.fixture
def offline_hub_cache(tmp_path, monkeypatch):
    """An HF_HUB_CACHE on disk (models--owner--name/snapshots/<commit>/..., refs/main) and HF_HUB_OFFLINE=1."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The Hub client reads both variables once, at import: set its constants too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def add(repo_id: str, subfolder: str = "", commit: str = "0123456789abcdef0123456789abcdef01234567"):
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        write_diffusers_vae(repo / "snapshots" / commit / subfolder, TINY_SD)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)

    return add


def test_diffusers_encoder_from_offline_hub_cache(offline_hub_cache):
    offline_hub_cache("owner/tiny-vae")
    offline_hub_cache("owner/tiny-pipeline", subfolder="vae")
    expected = encoder_state_from_diffusers(diffusers_vae_state(TINY_SD), TINY_SD)
    for repo_id, subfolder in (("owner/tiny-vae", None), ("owner/tiny-pipeline", "vae")):
        encoder = Encoder(TINY_SD)
        with pytest.warns(UserWarning, match="width 32"):
            scaling = load_diffusers_encoder(encoder, repo_id, subfolder=subfolder)
        assert scaling.scaling_factor == 0.3
        assert all(torch.equal(p, expected[name]) for name, p in encoder.state_dict().items())

    with pytest.raises(FileNotFoundError) as excinfo:
        load_diffusers_encoder(Encoder(TINY_SD), "owner/not-cached")
    one_line_error(excinfo, "owner/not-cached", "HF_HUB_OFFLINE")
    with pytest.raises(FileNotFoundError) as excinfo:
        load_diffusers_encoder(Encoder(TINY_SD), "no such folder")
    one_line_error(excinfo, "no such folder")
