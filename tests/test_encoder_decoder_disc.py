"""Encoders, baseline VAE decoder and trajectory discriminator: sizes (paper Sec. 4, Table 7), shapes, posterior."""
import dataclasses
import json

import pytest
import torch

from tokenizer.discriminator import DISCRIMINATOR_PRESETS, TrajectoryDiscriminator, build_discriminator
from tokenizer.encoder import (ENCODER_PRESETS, DiagonalGaussian, EncoderConfig, build_encoder,
                               multipliers_for_downsample)
from tokenizer.nn import count_parameters
from tokenizer.vae_decoder import VAE_DECODER_PRESETS, build_vae_decoder

META = torch.device("meta")
SMALL_ENCODERS = ("tiny", "tiny-lite")


def _on_meta(builder, *args):
    with META:
        return builder(*args)


# ---------------------------------------------------------------------------------------------- parameter counts
def test_sd_encoder_matches_stable_diffusion_param_count():
    # Stable Diffusion's AutoencoderKL encoder (kl-f8), without quant_conv.
    assert count_parameters(_on_meta(build_encoder, ENCODER_PRESETS["sd"])) == 34_163_592


def test_lite_encoder_is_about_6m_params():
    n = count_parameters(_on_meta(build_encoder, ENCODER_PRESETS["lite"]))
    assert abs(n / 5.88e6 - 1) < 0.03


@pytest.mark.parametrize("name, paper_millions", [("B", 10.14), ("M", 22.79), ("L", 40.48), ("XL", 65.27),
                                                   ("H", 161.81)])
def test_vae_decoder_params_match_table7(name, paper_millions):
    decoder = _on_meta(build_vae_decoder, VAE_DECODER_PRESETS[name], 8, 16)
    assert abs(count_parameters(decoder) / (paper_millions * 1e6) - 1) < 0.05


def test_default_discriminator_matches_vqgan_layout():
    # VQGAN's NLayerDiscriminator(3, ndf=64, n_layers=3) has 2,765,633 params; GN affine == BN affine in size.
    assert count_parameters(build_discriminator(DISCRIMINATOR_PRESETS["vae"])) == 2_765_633


# ------------------------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("name", list(ENCODER_PRESETS))
@pytest.mark.parametrize("size", [64, 128, 256])
def test_encoder_preset_shapes(name, size):
    config = ENCODER_PRESETS[name]
    device = torch.device("cpu") if name in SMALL_ENCODERS and size <= 128 else META
    with device:
        encoder = build_encoder(config)
        moments = encoder(torch.zeros(2, 3, size, size))
    f = config.downsample
    assert moments.shape == (2, 2 * config.latent_channels, size // f, size // f)


@pytest.mark.parametrize("name, downsample, latent", [("lite", 16, 8), ("sd", 8, 4), ("sd-f16", 16, 4)])
def test_preset_compression_settings(name, downsample, latent):
    assert ENCODER_PRESETS[name].downsample == downsample
    assert ENCODER_PRESETS[name].latent_channels == latent


def test_lite_encoder_runs_on_cpu():
    encoder = build_encoder(ENCODER_PRESETS["lite"]).eval()
    with torch.no_grad():
        moments = encoder(torch.rand(1, 3, 64, 64) * 2 - 1)
    assert moments.shape == (1, 16, 4, 4) and torch.isfinite(moments).all()


@pytest.mark.parametrize("downsample", [4, 8, 16, 32])
@pytest.mark.parametrize("latent", [4, 8, 16, 32])
@pytest.mark.parametrize("base", ["lite", "sd"])
def test_compression_overrides(base, downsample, latent):
    preset = ENCODER_PRESETS[base]
    config = dataclasses.replace(
        preset, channel_multipliers=multipliers_for_downsample(preset.channel_multipliers, downsample),
        latent_channels=latent)
    assert config.downsample == downsample
    with META:
        moments = build_encoder(config)(torch.zeros(2, 3, 128, 128))
        decoder = build_vae_decoder(VAE_DECODER_PRESETS["B"], latent, downsample)
        image = decoder(torch.zeros(2, latent, *moments.shape[-2:]))
    assert moments.shape == (2, 2 * latent, 128 // downsample, 128 // downsample)
    assert image.shape == (2, 3, 128, 128)


def test_multipliers_for_downsample_follows_latent_diffusion_configs():
    ref = (1, 1, 2, 2, 4)
    assert multipliers_for_downsample(ref, 16) == ref
    assert multipliers_for_downsample(ref, 8) == (1, 2, 2, 4)  # VQGAN f8
    assert multipliers_for_downsample(ref, 4) == (1, 2, 4)  # LDM kl-f4
    assert multipliers_for_downsample(ref, 32) == (1, 1, 2, 2, 4, 4)  # LDM kl-f32
    with pytest.raises(ValueError):
        multipliers_for_downsample(ref, 12)


@pytest.mark.parametrize("name", list(VAE_DECODER_PRESETS))
def test_vae_decoder_shapes(name):
    device = torch.device("cpu") if name == "tiny" else META
    with device:
        decoder = build_vae_decoder(VAE_DECODER_PRESETS[name], 8, 16)
        image = decoder(torch.randn(2, 8, 4, 6))
    assert image.shape == (2, 3, 64, 96)


def test_tiny_encoder_decoder_round_trip_on_cpu_and_gradients():
    encoder = build_encoder(ENCODER_PRESETS["tiny"])
    decoder = build_vae_decoder(VAE_DECODER_PRESETS["tiny"], 4, encoder.config.downsample)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    posterior = DiagonalGaussian(encoder(x))
    reconstruction = decoder(posterior.sample())
    assert reconstruction.shape == x.shape
    (reconstruction - x).pow(2).mean().add(posterior.kl().mean()).backward()
    assert all(p.grad is not None for p in encoder.parameters())
    assert all(p.grad is not None for p in decoder.parameters())


def test_bad_inputs_raise():
    encoder = build_encoder(ENCODER_PRESETS["tiny"])
    with pytest.raises(ValueError):
        encoder(torch.zeros(1, 3, 30, 32))  # not divisible by f=4
    with pytest.raises(ValueError):
        encoder(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError):
        build_vae_decoder(VAE_DECODER_PRESETS["tiny"], 4, 4)(torch.zeros(1, 8, 8, 8))
    with pytest.raises(ValueError):
        EncoderConfig(kind="vit")


def test_encoder_without_double_z_keeps_moment_layout():
    config = dataclasses.replace(ENCODER_PRESETS["tiny"], double_z=False)
    posterior = DiagonalGaussian(build_encoder(config)(torch.zeros(1, 3, 16, 16)))
    assert posterior.mean.shape == (1, 4, 4, 4)
    assert torch.allclose(posterior.sample(), posterior.mean, atol=1e-5)


def test_logvar_init_sets_the_initial_posterior_spread_only():
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    reference = build_encoder(ENCODER_PRESETS["tiny"])
    torch.manual_seed(0)
    shrunk = build_encoder(dataclasses.replace(ENCODER_PRESETS["tiny"], logvar_init=-6.0))
    before, after = DiagonalGaussian(reference(x)), DiagonalGaussian(shrunk(x))
    assert torch.equal(before.mean, after.mean)  # only the logvar bias moves
    assert torch.equal(shrunk.conv_out.bias[4:], torch.full((4,), -6.0))
    assert after.std.max() < 0.1 < before.std.min()
    with pytest.raises(ValueError, match="logvar_init"):
        EncoderConfig(logvar_init=-40.0)


def test_logvar_init_is_a_model_override_and_survives_the_config():
    from tokenizer.models import EpsVAE, EpsVAEConfig

    model = EpsVAE.from_preset("tiny", "tiny", logvar_init=-5.0)
    assert model.config.encoder.logvar_init == -5.0
    assert EpsVAEConfig.from_dict(json.loads(json.dumps(model.config.to_dict()))) == model.config


# --------------------------------------------------------------------------------------------------- posterior
def test_kl_of_standard_normal_is_zero():
    assert torch.equal(DiagonalGaussian(torch.zeros(3, 8, 4, 4)).kl(), torch.zeros(3))


def test_kl_matches_torch_distributions():
    moments = torch.randn(3, 8, 4, 4)
    posterior = DiagonalGaussian(moments)
    q = torch.distributions.Normal(posterior.mean, posterior.std)
    p = torch.distributions.Normal(torch.zeros_like(posterior.mean), torch.ones_like(posterior.mean))
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    torch.testing.assert_close(posterior.kl(), expected, rtol=1e-5, atol=1e-5)


def test_sample_is_reproducible_and_mode_is_mean():
    posterior = DiagonalGaussian(torch.randn(2, 8, 4, 4))
    a = posterior.sample(torch.Generator().manual_seed(7))
    b = posterior.sample(torch.Generator().manual_seed(7))
    c = posterior.sample(torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(posterior.mode(), posterior.mean)


def test_sample_statistics_follow_moments():
    mean, logvar = torch.full((1, 1, 64, 64), 0.5), torch.full((1, 1, 64, 64), 2 * torch.log(torch.tensor(3.0)))
    posterior = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    draws = torch.stack([posterior.sample(torch.Generator().manual_seed(s)) for s in range(16)])
    assert abs(draws.mean().item() - 0.5) < 0.1 and abs(draws.std().item() - 3.0) < 0.1


def test_logvar_is_clamped():
    logvar = torch.tensor([-100.0, 100.0]).reshape(1, 2, 1, 1).expand(1, 2, 2, 2)
    moments = torch.cat([torch.zeros(1, 2, 2, 2), logvar], dim=1)
    logvar = DiagonalGaussian(moments).logvar
    assert logvar[:, 0].eq(-30).all() and logvar[:, 1].eq(20).all()


# ----------------------------------------------------------------------------------------------- discriminator
def test_discriminator_depends_on_t():
    disc = build_discriminator(DISCRIMINATOR_PRESETS["tiny"])
    x = torch.randn(2, 6, 32, 32)
    logits_a = disc(x, torch.tensor([0.1, 0.1]))
    logits_b = disc(x, torch.tensor([0.9, 0.9]))
    assert logits_a.shape == (2, 1, 6, 6)
    assert not torch.allclose(logits_a, logits_b)
    torch.testing.assert_close(disc(x, 0.1), logits_a)  # scalar t broadcasts
    with pytest.raises(ValueError):
        disc(x)


def test_discriminator_is_per_sample():
    # GroupNorm, not BatchNorm: a sample's logits do not depend on the rest of the batch.
    disc = build_discriminator(DISCRIMINATOR_PRESETS["tiny"]).train()
    x, t = torch.randn(4, 6, 32, 32), torch.rand(4)
    torch.testing.assert_close(disc(x, t)[:1], disc(x[:1], t[:1]))


def test_unconditional_discriminator_and_input_gradients():
    config = dataclasses.replace(DISCRIMINATOR_PRESETS["tiny"], in_channels=3, time_conditioned=False)
    disc = TrajectoryDiscriminator(config)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    logits = disc(x)
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)  # R1 needs the input gradient
    assert grad.shape == x.shape and grad.abs().sum() > 0
    grad.pow(2).sum().backward()  # and a second-order backward through it
    # Every weight gets an R1 gradient; only the output bias cannot (it does not change d logits / d x).
    without_grad = {name for name, p in disc.named_parameters() if p.grad is None}
    assert without_grad == {"conv_out.bias"}


@pytest.mark.parametrize("name", list(DISCRIMINATOR_PRESETS))
def test_discriminator_presets_run(name):
    config = DISCRIMINATOR_PRESETS[name]
    with META:
        logits = build_discriminator(config)(torch.zeros(2, config.in_channels, 128, 128), torch.rand(2))
    assert logits.shape[:2] == (2, 1)


# ------------------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("config", [*ENCODER_PRESETS.values(), *VAE_DECODER_PRESETS.values(),
                                    *DISCRIMINATOR_PRESETS.values()])
def test_config_json_round_trip(config):
    restored = type(config)(**json.loads(json.dumps(dataclasses.asdict(config))))
    assert restored == config and hash(restored) == hash(config)
    assert type(config).from_dict(config.to_dict()) == config
