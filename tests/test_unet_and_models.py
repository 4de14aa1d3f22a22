"""ADM U-Net decoder (tokenizer/unet.py) and the EpsVAE / VAE modules (tokenizer/models.py).

Big presets are only built on the meta device; everything that runs numbers uses the tiny presets.
"""
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from tokenizer import EpsVAE, EpsVAEConfig, VAE, VAEConfig, load_tokenizer
from tokenizer import flow
from tokenizer.nn import count_parameters, group_norm
from tokenizer.unet import ADM_PRESETS, ADMConfig, ADMUNet

# Paper Table 7, ε-VAE decoder G parameters in millions.
TABLE7_EPS_VAE_PARAMS_M = {"B": 20.63, "M": 49.33, "L": 88.98, "XL": 140.63, "H": 355.62}


def _tiny_eps_vae(**overrides) -> EpsVAE:
    return EpsVAE.from_preset("tiny", "tiny", **overrides)


def _images(batch=2, size=16) -> torch.Tensor:
    return torch.rand(batch, 3, size, size) * 2 - 1


def _randomize_zero_layers(model: torch.nn.Module) -> None:
    """Give the zero-initialised convs random weights so every path carries signal (tests only)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.abs().sum() == 0:
                parameter.normal_(0.0, 0.02)


# ------------------------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("latent_channels", [8, 4])
@pytest.mark.parametrize("size", list(TABLE7_EPS_VAE_PARAMS_M))
def test_adm_decoder_parameter_counts_match_table7(size, latent_channels):
    with torch.device("meta"):
        decoder = ADMUNet(ADM_PRESETS[size], cond_channels=latent_channels, conditioning="concat")
    count = count_parameters(decoder)
    expected = TABLE7_EPS_VAE_PARAMS_M[size] * 1e6
    print(f"ADM-{size} decoder, {latent_channels} latent channels: {count:,} params "
          f"({count / 1e6:.2f}M; Table 7: {TABLE7_EPS_VAE_PARAMS_M[size]}M)")
    assert abs(count - expected) / expected < 0.03


def test_decoder_counts_through_eps_vae_match_the_bare_unet():
    with torch.device("meta"):
        model = EpsVAE.from_preset("lite", "B")  # ε-VAE-lite: 8 latent channels, f=16
        bare = ADMUNet(ADM_PRESETS["B"], cond_channels=8)
    assert count_parameters(model.decoder) == count_parameters(bare)
    assert model.config.encoder.latent_channels == 8 and model.downsample == 16


def test_adagn_adds_only_the_conditioning_projections():
    config = ADM_PRESETS["tiny"]
    concat, adagn = ADMUNet(config, 4, "concat"), ADMUNet(config, 4, "adagn")
    first_conv_extra = 4 * concat.conv_in.out_channels * 9  # concat: 4 more input channels in the first conv
    projections = sum(count_parameters(m.cond_proj) for m in adagn.modules() if getattr(m, "cond_proj", None))
    assert count_parameters(adagn) - projections == count_parameters(concat) - first_conv_extra


# ------------------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("conditioning", ["concat", "adagn"])
@pytest.mark.parametrize("size", list(ADM_PRESETS))
def test_every_decoder_preset_runs_at_64_128_256(size, conditioning):
    device = torch.device("cpu" if size == "tiny" else "meta")
    with device:
        decoder = ADMUNet(ADM_PRESETS[size], cond_channels=8, conditioning=conditioning)
    for resolution in (64, 128, 256):
        if size == "tiny" and resolution > 64:
            continue  # real compute on CPU: keep it small
        x = torch.randn(2, 3, resolution, resolution, device=device)
        z = torch.randn(2, 8, resolution // 16, resolution // 16, device=device)
        out = decoder(x, torch.rand(2, device=device), z)
        assert out.shape == (2, 3, resolution, resolution)


@pytest.mark.parametrize("conditioning", ["concat", "adagn"])
def test_tiny_model_decodes_at_twice_the_training_size(conditioning):
    model = _tiny_eps_vae(conditioning=conditioning)
    _randomize_zero_layers(model)
    with torch.no_grad():
        for size in (16, 32):  # "training" size and 2x
            z = model.encode(_images(size=size), sample=False)
            assert z.shape == (2, 4, size // 4, size // 4)
            x = model.decode(z, steps=2, generator=torch.Generator().manual_seed(0))
            assert x.shape == (2, 3, size, size)
            assert torch.isfinite(x).all() and x.abs().max() <= 1.0


@pytest.mark.parametrize("channels", [64, 96, 128, 256, 512])
def test_reference_widths_keep_adm_32_groups(channels):
    assert group_norm(channels).num_groups == 32


@pytest.mark.parametrize("channels", [8, 16, 24, 32, 48])
def test_narrow_layers_keep_flat_colour_through_group_norm(channels):
    # One channel per group would be InstanceNorm: constant feature maps (a flat-coloured image) normalise to 0.
    norm = group_norm(channels)
    assert channels // norm.num_groups >= 4
    flat = torch.arange(channels, dtype=torch.float32).view(1, channels, 1, 1).expand(2, channels, 8, 8)
    assert norm(flat).abs().mean() > 0.5


@pytest.mark.parametrize("size", sorted(ADM_PRESETS))
def test_no_decoder_preset_has_single_channel_groups(size):
    with torch.device("meta"):
        unet = ADMUNet(ADM_PRESETS[size], cond_channels=4)
    norms = [m for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_channels // m.num_groups >= 2 for m in norms)


def test_group_norm_eps_is_each_familys_reference_value():
    """ADM's GroupNorm32 uses PyTorch's eps 1e-5; latent-diffusion's encoder Normalize uses 1e-6."""
    model = _tiny_eps_vae()
    decoder_eps = {m.eps for m in model.decoder.modules() if isinstance(m, torch.nn.GroupNorm)}
    encoder_eps = {m.eps for m in model.encoder.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert decoder_eps == {1e-5} and encoder_eps == {1e-6}


def test_unet_rejects_sizes_that_do_not_divide():
    decoder = ADMUNet(ADM_PRESETS["tiny"], cond_channels=4)
    with pytest.raises(ValueError, match="multiple of 4"):
        decoder(torch.randn(1, 3, 18, 18), torch.rand(1), torch.randn(1, 4, 4, 4))
    with pytest.raises(ValueError, match="cond"):
        decoder(torch.randn(1, 3, 16, 16), torch.rand(1))


@pytest.mark.parametrize("conditioning", ["concat", "adagn"])
def test_output_depends_on_latent_and_time(conditioning):
    decoder = ADMUNet(ADM_PRESETS["tiny"], cond_channels=4, conditioning=conditioning)
    _randomize_zero_layers(decoder)
    x, z, t = torch.randn(1, 3, 16, 16), torch.randn(1, 4, 4, 4), torch.tensor([0.3])
    with torch.no_grad():
        base = decoder(x, t, z)
        assert not torch.allclose(base, decoder(x, t, torch.randn(1, 4, 4, 4)))
        assert not torch.allclose(base, decoder(x, torch.tensor([0.7]), z))


def test_zero_initialised_output_and_residual_convs():
    decoder = ADMUNet(ADM_PRESETS["tiny"], cond_channels=4)
    out = decoder(torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 4, 4, 4))
    assert torch.count_nonzero(out) == 0
    assert all(torch.count_nonzero(block.conv_out.weight) == 0
               for block in decoder.modules() if block.__class__.__name__ == "ResBlock")


def test_concat_conditioning_is_nearest_upsampling_inside_the_unet():
    decoder = ADMUNet(ADM_PRESETS["tiny"], cond_channels=4, conditioning="concat")
    _randomize_zero_layers(decoder)
    x, t, z = torch.randn(1, 3, 16, 16), torch.rand(1), torch.randn(1, 4, 4, 4)
    upsampled = z.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)  # independent nearest upsampling
    with torch.no_grad():
        torch.testing.assert_close(decoder(x, t, z), decoder(x, t, upsampled))


def test_gradient_checkpointing_gives_the_same_gradients():
    config = dataclasses.replace(ADM_PRESETS["tiny"], gradient_checkpointing=True)
    plain = ADMUNet(ADM_PRESETS["tiny"], cond_channels=4)
    _randomize_zero_layers(plain)
    checkpointed = ADMUNet(config, cond_channels=4)
    checkpointed.load_state_dict(plain.state_dict())
    x, t, z = torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 4, 4, 4)
    plain(x, t, z).square().mean().backward()
    checkpointed(x, t, z).square().mean().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


# ---------------------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("gamma", [1.0, 0.6])
@pytest.mark.parametrize("steps", [1, 2, 3])
def test_oracle_velocity_through_decode_returns_x0(monkeypatch, gamma, steps):
    model = _tiny_eps_vae(gamma=gamma)
    x0 = torch.rand(2, 3, 16, 16) * 1.8 - 0.9  # inside [-1, 1] so the final clamp does not bite
    z = torch.randn(2, 4, 4, 4)
    seen = {}

    def oracle(x_t, t, latent):
        assert latent is z and t.shape == (2,)
        if "noise" not in seen:
            assert torch.all(t == 1.0)  # the first call is at pure noise, so x_t is the noise itself
            seen["noise"] = x_t.clone()
        seen["calls"] = seen.get("calls", 0) + 1
        return seen["noise"] - gamma * x0  # the straight path's exact velocity

    monkeypatch.setattr(model, "velocity", oracle)
    decoded = model.decode(z, steps=steps, generator=torch.Generator().manual_seed(3))
    assert seen["calls"] == steps
    torch.testing.assert_close(decoded, x0, atol=1e-5, rtol=1e-5)


def test_velocity_feeds_the_unit_variance_input_to_the_network(monkeypatch):
    model = _tiny_eps_vae(gamma=0.6)
    received = {}
    monkeypatch.setattr(model.decoder, "forward", lambda x, t, z: received.setdefault("x", x))
    x_t, t = torch.randn(2, 3, 16, 16), torch.tensor([0.2, 0.9])
    model.velocity(x_t, t, torch.randn(2, 4, 4, 4))
    variance = ((1 - t) * 0.6 * 0.5) ** 2 + t**2
    torch.testing.assert_close(received["x"], x_t / variance.sqrt().view(2, 1, 1, 1))


def test_decode_validates_steps():
    model = _tiny_eps_vae()
    z = torch.randn(1, 4, 4, 4)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="steps"):
            model.decode(z, steps=bad)


def test_same_seed_same_decode_different_seed_different_decode():
    model = _tiny_eps_vae()
    _randomize_zero_layers(model)
    z = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        a = model.decode(z, steps=2, generator=torch.Generator().manual_seed(7))
        b = model.decode(z, steps=2, generator=torch.Generator().manual_seed(7))
        c = model.decode(z, steps=2, generator=torch.Generator().manual_seed(8))
        # Per-image seeds: image 1 alone with seed 8 equals image 1 of a batch seeded (7, 8).
        per_image = model.decode(z, steps=2, generator=[torch.Generator().manual_seed(s) for s in (7, 8)])
        alone = model.decode(z[1:], steps=2, generator=[torch.Generator().manual_seed(8)])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3
    torch.testing.assert_close(per_image[1:], alone)


def test_epsilon_parameterisation_decodes_with_ddpm(monkeypatch):
    pytest.importorskip("generator.diffusion")
    model = _tiny_eps_vae(parameterization="epsilon")
    _randomize_zero_layers(model)
    times = []
    network = model.velocity
    monkeypatch.setattr(model, "velocity", lambda x_t, t, z: times.append(t.clone()) or network(x_t, t, z))
    with torch.no_grad():
        x = model.decode(torch.randn(2, 4, 4, 4), steps=5, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()
    # Five respaced steps of the T=1000 process, fed as t = original_step / 1000, noisiest first.
    assert len(times) == 5
    fed = torch.stack([t[0] for t in times])
    assert torch.all(fed[1:] < fed[:-1]) and fed[0] > 0.9 and fed[-1] == 0.0
    assert torch.allclose(fed * 1000, (fed * 1000).round())


# ---------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("conditioning", ["concat", "adagn"])
def test_velocity_loss_gradients_reach_the_encoder(conditioning):
    model = _tiny_eps_vae(conditioning=conditioning)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = _images()

    def loss_and_backward():
        optimizer.zero_grad()
        z = model.encode(x)
        noise = torch.randn_like(x)
        t = flow.sample_time(x.shape[0])
        x_t = flow.interpolate(x, noise, t, model.config.gamma)
        prediction = model.velocity(x_t, t, z)
        F.mse_loss(prediction, flow.velocity_target(x, noise, model.config.gamma)).backward()

    # Zero-initialised convs block the gradient at first: the output conv at step 0, and in AdaGN mode (where z
    # enters only through the residual branches) the residual out-convs at step 1. Two steps open every path.
    for _ in range(2):
        loss_and_backward()
        optimizer.step()
    loss_and_backward()
    encoder_grads = [p.grad for p in model.encoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in encoder_grads)
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.encoder.conv_out.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------- configs and presets
def test_configs_round_trip_through_json():
    adm = ADM_PRESETS["L"]
    assert ADMConfig.from_dict(json.loads(json.dumps(adm.to_dict()))) == adm
    eps = EpsVAE.from_preset("lite", "M", latent_channels=16, downsample=8, gamma=1.0).config
    assert EpsVAEConfig.from_dict(json.loads(json.dumps(eps.to_dict()))) == eps
    vae = VAE.from_preset("sd", "B", latent_channels=4).config
    assert VAEConfig.from_dict(json.loads(json.dumps(vae.to_dict()))) == vae


@pytest.mark.parametrize("downsample", [4, 8, 16, 32])
@pytest.mark.parametrize("latent_channels", [4, 8, 16, 32])
def test_from_preset_compression_overrides(downsample, latent_channels):
    with torch.device("meta"):
        eps = EpsVAE.from_preset("lite", "B", latent_channels=latent_channels, downsample=downsample)
        vae = VAE.from_preset("lite", "B", latent_channels=latent_channels, downsample=downsample)
    for model in (eps, vae):
        assert model.config.encoder.downsample == downsample and model.latent_channels == latent_channels
        z = model.encode(torch.zeros(1, 3, 64, 64, device="meta"), sample=False)
        assert z.shape == (1, latent_channels, 64 // downsample, 64 // downsample)
    x = eps.decode(z, steps=1)
    assert x.shape == (1, 3, 64, 64)
    assert vae.decode(z).shape == (1, 3, 64, 64)


def test_from_preset_rejects_unknown_names():
    with pytest.raises(ValueError, match="decoder preset"):
        EpsVAE.from_preset("lite", "XXL")
    with pytest.raises(ValueError, match="encoder preset"):
        VAE.from_preset("nope", "B")
    with pytest.raises(ValueError, match="unknown override"):
        EpsVAE.from_preset("tiny", "tiny", gama=0.5)
    with pytest.raises(ValueError, match="parameterization"):
        EpsVAE.from_preset("tiny", "tiny", parameterization="x0")


# -------------------------------------------------------------------------------------------------- save / load
def test_eps_vae_save_load_round_trip(tmp_path):
    model = _tiny_eps_vae(conditioning="adagn", gamma=1.0)
    _randomize_zero_layers(model)
    model.save_pretrained(tmp_path / "eps")
    config = json.loads((tmp_path / "eps" / "config.json").read_text())
    assert config["model_type"] == "eps_vae" and config["format_version"] == 2 and config["_class_name"] == "EpsVAE"
    loaded = EpsVAE.from_pretrained(tmp_path / "eps")
    assert loaded.config == model.config
    x = _images()
    with torch.no_grad():
        z = model.encode(x, sample=False)
        torch.testing.assert_close(loaded.encode(x, sample=False), z, rtol=0, atol=0)
        expected = model.decode(z, steps=2, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(loaded.decode(z, steps=2, generator=torch.Generator().manual_seed(1)),
                                   expected, rtol=0, atol=0)
    assert isinstance(load_tokenizer(tmp_path / "eps"), EpsVAE)


def test_vae_save_load_round_trip(tmp_path):
    model = VAE.from_preset("tiny", "tiny")
    model.save_pretrained(tmp_path / "vae")
    loaded = VAE.from_pretrained(tmp_path / "vae")
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(loaded.encode(x, sample=False)),
                                   model.decode(model.encode(x, sample=False)), rtol=0, atol=0)
    assert isinstance(load_tokenizer(tmp_path / "vae"), VAE)


def test_from_pretrained_picks_ema_or_raw_weights(tmp_path):
    model = VAE.from_preset("tiny", "tiny")
    raw = {name: torch.full_like(value, 0.5) if value.is_floating_point() else value
           for name, value in model.state_dict().items()}
    model.save_pretrained(tmp_path, raw_state_dict=raw)
    assert torch.all(VAE.from_pretrained(tmp_path, weights="raw").encoder.conv_in.weight == 0.5)
    torch.testing.assert_close(VAE.from_pretrained(tmp_path).encoder.conv_in.weight, model.encoder.conv_in.weight)
    with pytest.raises(ValueError, match="weights must be one of"):
        VAE.from_pretrained(tmp_path, weights="best")


def test_format_1_folders_with_an_ema_copy_still_load(tmp_path):
    """Format 1 wrote model.safetensors (raw) + ema.safetensors; use_ema picked between them."""
    from safetensors.torch import save_file

    model = VAE.from_preset("tiny", "tiny")
    model.save_pretrained(tmp_path)
    ema = {name: torch.full_like(value, 0.25) for name, value in model.state_dict().items()}
    save_file({k: v.contiguous() for k, v in ema.items()}, str(tmp_path / "ema.safetensors"))
    assert torch.all(VAE.from_pretrained(tmp_path).encoder.conv_in.weight == 0.25)  # EMA is the default
    assert torch.all(VAE.from_pretrained(tmp_path, use_ema=True).encoder.conv_in.weight == 0.25)
    torch.testing.assert_close(VAE.from_pretrained(tmp_path, use_ema=False).encoder.conv_in.weight,
                               model.encoder.conv_in.weight)


def test_from_pretrained_errors(tmp_path):
    VAE.from_preset("tiny", "tiny").save_pretrained(tmp_path / "vae")
    with pytest.raises(ValueError, match="model_type 'vae'"):
        EpsVAE.from_pretrained(tmp_path / "vae")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        EpsVAE.from_pretrained(tmp_path / "missing")

    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_tokenizer(other)
    (other / "config.json").write_text(json.dumps({"model_type": "dit", "depth": 28}))
    with pytest.raises(ValueError, match="not one of"):
        load_tokenizer(other)
    (other / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        VAE.from_pretrained(other)

    (tmp_path / "vae" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        VAE.from_pretrained(tmp_path / "vae")


def test_from_pretrained_rejects_weights_that_do_not_match_the_config(tmp_path):
    VAE.from_preset("tiny", "tiny").save_pretrained(tmp_path / "a")
    VAE.from_preset("tiny", "tiny", latent_channels=8).save_pretrained(tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").replace(tmp_path / "a" / "model.safetensors")
    with pytest.raises(ValueError, match="cannot load"):
        VAE.from_pretrained(tmp_path / "a")
