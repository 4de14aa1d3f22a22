"""Stage-1 training: every loss term, gradient routing between generator and discriminator, exact resume."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelines.train_tokenizer import (
    TokenizerTrainConfig,
    TokenizerTrainingStep,
    _set_requires_grad,
    build_discriminator,
    build_tokenizer,
    discriminator_step_loss,
    generator_losses,
    sample_training_time,
    train_tokenizer,
)
from tokenizer import EpsVAE, VAE
from tokenizer.perceptual import build_perceptual


def tiny_config(tmp_path: Path, **changes) -> TokenizerTrainConfig:
    values = dict(output_dir=str(tmp_path / "run"), encoder="tiny", decoder="tiny", discriminator="tiny",
                  data="offline", resolution=32, batch_size=4, num_workers=0, warmup_steps=2, max_steps=3,
                  perceptual="none", perceptual_weight=0.0, checkpoint_every=1, keep_last=10, log_every=1,
                  image_every=1000, r1_interval=2, seed=3)
    values.update(changes)
    return TokenizerTrainConfig.from_flat(**values)


@pytest.mark.parametrize("model_type,parameterization", [("eps_vae", "velocity"), ("eps_vae", "epsilon"), ("vae", None)])
def test_generator_step_never_reaches_the_discriminator(tmp_path, model_type, parameterization):
    overrides = {"parameterization": parameterization} if parameterization else {}
    config = tiny_config(tmp_path, model_type=model_type, model_overrides=overrides)
    tokenizer = build_tokenizer(config)
    discriminator = build_discriminator(config)
    step = TokenizerTrainingStep(tokenizer)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    t = sample_training_time(tokenizer, 2, images.device)
    noise = torch.randn_like(images)
    perceptual = build_perceptual("none")

    _set_requires_grad(discriminator, False)
    out = step(images, noise, t)
    total, terms = generator_losses(config, tokenizer.objective, out, images, t, perceptual, discriminator, True, 1e-6)
    _set_requires_grad(discriminator, True)
    total.backward()
    assert set(terms) >= {"adv", "kl"} and ({"score"} <= set(terms) or {"rec"} <= set(terms))
    assert all(torch.isfinite(v).all() for v in terms.values())
    assert all(p.grad is None for p in discriminator.parameters())
    decoder_grads = [p.grad for p in tokenizer.decoder.parameters() if p.grad is not None]
    assert decoder_grads and any(g.abs().sum() > 0 for g in decoder_grads)

    tokenizer_grads = {n: p.grad.clone() for n, p in tokenizer.named_parameters() if p.grad is not None}
    loss_d, stats = discriminator_step_loss(config, discriminator, out, images, t, with_r1=True)
    loss_d.backward()
    assert torch.isfinite(loss_d) and stats["r1"] >= 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in discriminator.parameters())
    for name, parameter in tokenizer.named_parameters():  # the D step leaves generator gradients untouched
        if name in tokenizer_grads:
            assert torch.equal(parameter.grad, tokenizer_grads[name]), name


@pytest.mark.parametrize("model_type,perceptual", [("eps_vae", "effnet-l0"), ("vae", "effnet-l0"), ("eps_vae", "none")])
def test_short_run_trains_every_part(tmp_path, model_type, perceptual):
    weight = 0.5 if perceptual != "none" else 0.0
    config = tiny_config(tmp_path, model_type=model_type, perceptual=perceptual, perceptual_weight=weight)
    final_dir = train_tokenizer(config)

    records = [json.loads(line) for line in (Path(config.run.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    expected_terms = {"score" if model_type == "eps_vae" else "rec", "adv", "kl", "d_real_logit", "d_fake_logit"}
    if perceptual != "none":
        expected_terms.add("perceptual")
    for record in records:
        assert expected_terms <= set(record)
        assert all(record[k] is not None for k in expected_terms)  # None = non-finite in the JSONL

    checkpoints = Path(config.run.output_dir) / "checkpoints"
    first, last = sorted(p for p in checkpoints.iterdir() if p.is_dir())[0], checkpoints / "step_000000003"
    before = {**load_file(first / "model_tokenizer.safetensors"), **{
        "disc." + k: v for k, v in load_file(first / "model_discriminator.safetensors").items()}}
    after = {**load_file(last / "model_tokenizer.safetensors"), **{
        "disc." + k: v for k, v in load_file(last / "model_discriminator.safetensors").items()}}
    for part in ("encoder.", "decoder.", "disc."):
        changed = [k for k in before if k.startswith(part) and not torch.equal(before[k], after[k])]
        assert changed, f"no {part} parameter changed between steps 1 and 3"

    model_class = EpsVAE if model_type == "eps_vae" else VAE
    model = model_class.from_pretrained(final_dir)
    ema = load_file(last / "ema_tokenizer.safetensors")
    for name, value in model.state_dict().items():  # final weights are the EMA weights
        torch.testing.assert_close(value, ema[name].to(value.dtype))


def test_resume_equals_uninterrupted_run(tmp_path):
    straight = tiny_config(tmp_path / "a", max_steps=4, model_overrides={"gamma": 0.6})
    train_tokenizer(straight)
    interrupted = tiny_config(tmp_path / "b", max_steps=2, model_overrides={"gamma": 0.6})
    train_tokenizer(interrupted)
    resumed = tiny_config(tmp_path / "b", max_steps=4, model_overrides={"gamma": 0.6}, resume="auto")
    train_tokenizer(resumed)

    for name in ("model_tokenizer", "model_discriminator", "ema_tokenizer"):
        a = load_file(Path(straight.run.output_dir) / "checkpoints" / "step_000000004" / f"{name}.safetensors")
        b = load_file(Path(resumed.run.output_dir) / "checkpoints" / "step_000000004" / f"{name}.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}.{key} differs after resume"
    opt_a = torch.load(Path(straight.run.output_dir) / "checkpoints" / "step_000000004" / "optimizer_generator.pt",
                       weights_only=True)
    opt_b = torch.load(Path(resumed.run.output_dir) / "checkpoints" / "step_000000004" / "optimizer_generator.pt",
                       weights_only=True)
    for key, state in opt_a["state"].items():
        assert torch.equal(state["exp_avg"], opt_b["state"][key]["exp_avg"])


def test_defaults_follow_the_paper_and_new_models_use_the_per_pixel_kl():
    from pipelines.train_generator import GeneratorTrainConfig
    from tokenizer import EpsVAEConfig, VAEConfig

    assert TokenizerTrainConfig().optim.grad_clip is None  # C.2 names no clipping; the flag still sets one
    assert TokenizerTrainConfig.from_flat(grad_clip=1.0).optim.grad_clip == 1.0
    assert GeneratorTrainConfig().optim.grad_clip is None and GeneratorTrainConfig().optim.max_steps == 1_000_000
    assert EpsVAEConfig().kl_normalization == "pixels" and VAEConfig().kl_normalization == "pixels"
    # A saved config without the field is a model trained with the summed KL.
    legacy = {k: v for k, v in EpsVAEConfig().to_dict().items() if k != "kl_normalization"}
    assert EpsVAEConfig.from_dict(legacy).kl_normalization == "sum"
    assert EpsVAEConfig.from_dict(EpsVAEConfig().to_dict()).kl_normalization == "pixels"
    with pytest.raises(ValueError, match="kl_normalization"):
        EpsVAEConfig(kl_normalization="mean")


@pytest.mark.parametrize("normalization", ["pixels", "sum"])
def test_training_step_kl_term_follows_the_models_normalization(tmp_path, normalization):
    config = tiny_config(tmp_path, model_overrides={"kl_normalization": normalization})
    tokenizer = build_tokenizer(config)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    t = sample_training_time(tokenizer, 2, images.device)
    out = TokenizerTrainingStep(tokenizer)(images, torch.randn_like(images), t)
    summed = tokenizer.encode_posterior(images).kl()
    torch.testing.assert_close(out.kl, summed / (3 * 32 * 32) if normalization == "pixels" else summed)


def test_discriminator_warmup_counts_from_disc_start(tmp_path):
    """D's learning rate ramps from its first update at disc_start (1/warmup there), and the ramp resumes."""
    def disc_lr(run: Path, step: int) -> float:
        path = run / "checkpoints" / f"step_{step:09d}" / "optimizer_discriminator.pt"
        return torch.load(path, weights_only=True)["param_groups"][0]["lr"]

    config = tiny_config(tmp_path, max_steps=3, disc_start=2, warmup_steps=4, disc_lr=1e-3,
                         adversarial_weight=0.5)
    train_tokenizer(config)
    run = Path(config.run.output_dir)
    # The lr a checkpoint holds is the one the next update (step k) uses: 0 before disc_start, then k-2+1 / 4.
    assert disc_lr(run, 1) == 0.0
    assert disc_lr(run, 2) == pytest.approx(1e-3 / 4) and disc_lr(run, 3) == pytest.approx(2e-3 / 4)
    train_tokenizer(tiny_config(tmp_path, max_steps=4, disc_start=2, warmup_steps=4, disc_lr=1e-3,
                                adversarial_weight=0.5, resume="auto"))
    assert disc_lr(run, 4) == pytest.approx(3e-3 / 4)


def test_channels_last_trains_the_same_model_and_resumes(tmp_path):
    standard = tiny_config(tmp_path / "a", max_steps=2, adversarial_weight=0.5)
    train_tokenizer(standard)
    nhwc = tiny_config(tmp_path / "b", max_steps=1, adversarial_weight=0.5, channels_last=True)
    train_tokenizer(nhwc)
    train_tokenizer(tiny_config(tmp_path / "b", max_steps=2, adversarial_weight=0.5, channels_last=True,
                                resume="auto"))
    for name in ("model_tokenizer", "model_discriminator"):
        a = load_file(Path(standard.run.output_dir) / "checkpoints" / "step_000000002" / f"{name}.safetensors")
        b = load_file(Path(nhwc.run.output_dir) / "checkpoints" / "step_000000002" / f"{name}.safetensors")
        assert a.keys() == b.keys()
        for key in a:  # only the convolution algorithms differ
            torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-5, msg=f"{name}.{key}")
    assert EpsVAE.from_pretrained(Path(nhwc.run.output_dir) / "model") is not None


def test_config_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="model_type"):
        tiny_config(tmp_path, model_type="vqgan")
    with pytest.raises(ValueError, match="batch_size"):
        tiny_config(tmp_path, batch_size=0)


def test_freeze_encoder_trains_only_the_decoder(tmp_path):
    config = tiny_config(tmp_path, max_steps=2, freeze_encoder=True)
    final_dir = train_tokenizer(config)
    trained = EpsVAE.from_pretrained(final_dir, weights="raw")
    start = build_tokenizer(tiny_config(tmp_path))  # the same seeded initialisation
    torch.manual_seed(config.run.seed)
    fresh = build_tokenizer(config)
    del start
    for name, value in fresh.encoder.state_dict().items():
        assert torch.equal(trained.encoder.state_dict()[name], value), name
    assert any(not torch.equal(trained.decoder.state_dict()[k], v) for k, v in fresh.decoder.state_dict().items())


def test_init_from_with_model_overrides_is_refused(tmp_path):
    with pytest.raises(ValueError, match="cannot apply"):
        tiny_config(tmp_path, init_from=str(tmp_path), model_overrides={"gamma": 1.0})
