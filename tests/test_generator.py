"""Stage-2 generator: DDPM math (generator/diffusion.py) against closed forms and oracle models, and the DiT
(generator/dit.py): registry shapes on the meta device, adaLN-Zero init, parameter counts, save/load."""
import json
import math

import numpy as np
import pytest
import torch

from generator import diffusion
from generator.dit import DIT_PRESETS, DiT, DiTConfig, DiT_models, sincos_2d

# ---------------------------------------------------------------------------------------------- schedules


def test_linear_schedule_matches_closed_forms():
    schedule = diffusion.linear_beta_schedule()
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    alphas_cumprod = np.cumprod(1.0 - betas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])

    assert schedule.num_steps == 1000
    assert schedule.betas.dtype == torch.float64 and schedule.timesteps.dtype == torch.int64
    assert schedule.betas[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert schedule.betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    np.testing.assert_allclose(schedule.betas.numpy(), betas, rtol=1e-12)
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy(), alphas_cumprod, rtol=1e-12)
    np.testing.assert_allclose(schedule.alphas_cumprod_prev.numpy(), alphas_cumprod_prev, rtol=1e-12)
    # Ho et al. Eq. 7: β̃_t = β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t); mean = coef1·x0 + coef2·x_t.
    posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
    np.testing.assert_allclose(schedule.posterior_variance.numpy(), posterior_variance, rtol=1e-12)
    assert schedule.posterior_variance[0].item() == 0.0
    np.testing.assert_allclose(
        schedule.posterior_log_variance_clipped.numpy(),
        np.log(np.append(posterior_variance[1], posterior_variance[1:])), rtol=1e-12,
    )
    np.testing.assert_allclose(
        schedule.posterior_mean_coef1.numpy(), np.sqrt(alphas_cumprod_prev) * betas / (1 - alphas_cumprod), rtol=1e-12
    )
    np.testing.assert_allclose(
        schedule.posterior_mean_coef2.numpy(),
        np.sqrt(1 - betas) * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod), rtol=1e-12,
    )
    assert torch.equal(schedule.timesteps, torch.arange(1000))


def test_respace_250_keeps_original_alpha_bar_at_evenly_strided_steps():
    base = diffusion.linear_beta_schedule()
    spaced = diffusion.respace(base, "250")
    kept = spaced.timesteps
    assert spaced.num_steps == 250 and kept.dtype == torch.int64
    assert kept[0].item() == 0 and kept[-1].item() == 999
    steps = torch.diff(kept)
    assert set(steps.tolist()) <= {4, 5}  # 999 / 249 ≈ 4.01
    assert torch.allclose(kept.double(), torch.linspace(0, 999, 250, dtype=torch.float64), atol=0.5)
    # Recomputed betas reproduce the original ᾱ at the kept steps.
    torch.testing.assert_close(spaced.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.cumprod(1 - spaced.betas, 0), base.alphas_cumprod[kept], rtol=1e-12, atol=0)
    assert bool(((spaced.betas > 0) & (spaced.betas < 1)).all())
    # An int spec means the same; respacing to all steps is the identity.
    assert torch.equal(diffusion.respace(base, 250).timesteps, kept)
    full = diffusion.respace(base, "1000")
    torch.testing.assert_close(full.betas, base.betas, rtol=1e-10, atol=0)


def test_respace_ddim_and_section_specs():
    base = diffusion.linear_beta_schedule()
    assert diffusion.respace(base, "ddim50").timesteps.tolist() == list(range(0, 1000, 20))
    sections = diffusion.respace(base, "2,3").timesteps.tolist()
    assert sections == [0, 499, 500, 750, 999]
    for bad in ("abc", "0", "ddim7x", "600,600"):
        with pytest.raises(ValueError):
            diffusion.respace(base, bad)


def test_q_sample_and_epsilon_loss():
    schedule = diffusion.respace(diffusion.linear_beta_schedule(), "250")
    x_start, noise = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    step_index = torch.tensor([0, 10, 100, 249])
    original = schedule.timesteps[step_index]
    alpha_bar = torch.tensor(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))[original].float().view(-1, 1, 1, 1)
    x_t = diffusion.q_sample(schedule, x_start, step_index, noise)
    torch.testing.assert_close(x_t, alpha_bar.sqrt() * x_start + (1 - alpha_bar).sqrt() * noise)

    seen = {}

    def exact(x, t, y):
        seen["t"], seen["y"] = t, y
        return noise

    loss = diffusion.epsilon_loss(exact, schedule, x_start, step_index, noise, model_kwargs={"y": torch.arange(4)})
    assert loss.shape == (4,) and torch.all(loss == 0)
    assert torch.equal(seen["t"], original)  # the model sees ORIGINAL timesteps
    assert seen["t"].dtype == torch.int64 and torch.equal(seen["y"], torch.arange(4))

    zero = diffusion.epsilon_loss(lambda x, t: torch.zeros_like(x), schedule, x_start, step_index, noise)
    torch.testing.assert_close(zero, noise.pow(2).mean(dim=(1, 2, 3)))
    # A learn_sigma output (2C channels) is scored on its ε half.
    doubled = diffusion.epsilon_loss(
        lambda x, t: torch.cat([noise, torch.randn_like(noise)], 1), schedule, x_start, step_index, noise
    )
    assert torch.all(doubled == 0)


# ---------------------------------------------------------------------------------------------- samplers


def _oracle(x_start: torch.Tensor):
    """ε-model that knows x0: returns the exact ε implied by x_t at the ORIGINAL timestep."""
    alphas_cumprod = torch.tensor(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))

    def model(x_t, t):
        alpha_bar = alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x_t - alpha_bar.sqrt() * x_start) / (1 - alpha_bar).sqrt()

    return model


@pytest.mark.parametrize("spec", ["1000", "250", "ddim25"])
@pytest.mark.parametrize("sampler", ["fixed_large", "fixed_small", "ddim", "ddim_eta1"])
def test_oracle_model_recovers_data(spec, sampler):
    schedule = diffusion.respace(diffusion.linear_beta_schedule(), spec)
    x_start = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    noise = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    generator = torch.Generator().manual_seed(1)
    if sampler.startswith("ddim"):
        eta = 1.0 if sampler == "ddim_eta1" else 0.0
        out = diffusion.ddim_sample(_oracle(x_start), schedule, noise, eta=eta, generator=generator)
    else:
        out = diffusion.ddpm_sample(_oracle(x_start), schedule, noise, variance=sampler, generator=generator)
    torch.testing.assert_close(out, x_start, rtol=0, atol=1e-9)


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_ddpm_gaussian_data_variance(variance):
    """Data x0 ~ N(0, s²) has the closed-form optimal ε-model; the sampler's output variance must match the
    variance propagated through the reverse chain (computed here independently in numpy) and be close to s²."""
    s, spec = 0.5, "250"
    schedule = diffusion.respace(diffusion.linear_beta_schedule(), spec)
    alpha_bar_full = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))

    def optimal(x_t, t):
        alpha_bar = torch.tensor(alpha_bar_full)[t].view(-1, 1, 1, 1)
        return (1 - alpha_bar).sqrt() * x_t / (alpha_bar * s**2 + 1 - alpha_bar)

    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(40000, 1, 1, 1, generator=generator, dtype=torch.float64)
    out = diffusion.ddpm_sample(optimal, schedule, noise, variance=variance, generator=generator)

    kept = alpha_bar_full[schedule.timesteps.numpy()]
    prev = np.append(1.0, kept[:-1])
    betas = 1 - kept / prev
    var = 1.0
    for i in reversed(range(len(kept))):
        shrink = np.sqrt(kept[i]) * s**2 / (kept[i] * s**2 + 1 - kept[i])  # E[x0 | x_t] = shrink · x_t
        coef1 = np.sqrt(prev[i]) * betas[i] / (1 - kept[i])
        coef2 = np.sqrt(1 - betas[i]) * (1 - prev[i]) / (1 - kept[i])
        tilde = betas[i] * (1 - prev[i]) / (1 - kept[i])
        step_var = 0.0 if i == 0 else (betas[i] if variance == "fixed_large" else tilde)
        var = (coef1 * shrink + coef2) ** 2 * var + step_var
    assert out.var().item() == pytest.approx(var, rel=0.03)
    assert math.sqrt(var) == pytest.approx(s, rel=0.05)


def test_sampler_noise_is_reproducible_and_per_sample():
    schedule = diffusion.respace(diffusion.linear_beta_schedule(), "10")
    model = lambda x, t: 0.1 * x  # noqa: E731
    noise = torch.randn(3, 2, 4, 4)
    run = lambda gen: diffusion.ddpm_sample(model, schedule, noise, generator=gen)  # noqa: E731
    torch.testing.assert_close(run(torch.Generator().manual_seed(5)), run(torch.Generator().manual_seed(5)), rtol=0, atol=0)
    assert not torch.equal(run(torch.Generator().manual_seed(5)), run(torch.Generator().manual_seed(6)))
    # One generator per sample: each sample's result is independent of the batch it was drawn in.
    batch = run([torch.Generator().manual_seed(seed) for seed in (7, 8, 9)])
    alone = diffusion.ddpm_sample(model, schedule, noise[1:2], generator=[torch.Generator().manual_seed(8)])
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=1e-6)


def _random_tiny_dit(**overrides) -> DiT:
    """Tiny DiT whose zero-initialised layers are filled with noise so outputs depend on x, t and y."""
    fields = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=5)
    model = DiT(DiTConfig(**{**fields, **overrides}))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


def test_classifier_free_guidance():
    model = _random_tiny_dit()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 3])
    assert diffusion.classifier_free_guidance(model, 1.0, model.null_class) is model
    with torch.no_grad():
        torch.testing.assert_close(diffusion.classifier_free_guidance(model, 1.0, model.null_class)(x, t, y=y), model(x, t, y))
        cond = model(x, t, y)
        uncond = model(x, t, torch.full_like(y, model.null_class))
        guided = diffusion.classifier_free_guidance(model, 4.0, model.null_class)(x, t, y=y)
    torch.testing.assert_close(guided, uncond + 4.0 * (cond - uncond), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(guided, cond)


def test_bad_sampler_arguments():
    schedule = diffusion.linear_beta_schedule(10)
    with pytest.raises(ValueError, match="variance"):
        diffusion.ddpm_sample(lambda x, t: x, schedule, torch.zeros(1, 1, 2, 2), variance="learned")
    with pytest.raises(ValueError, match="shape"):
        diffusion.ddpm_sample(lambda x, t: x[:, :1], schedule, torch.zeros(1, 3, 2, 2))


# ---------------------------------------------------------------------------------------------- DiT


def _dit_parameter_count(hidden, depth, heads, patch, channels, num_classes, learn_sigma, qk_norm=False):
    """Closed-form parameter count of the DiT paper's architecture (excluding the fixed position embedding)."""
    d, out = hidden, channels * (2 if learn_sigma else 1)
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + (d * 6 * d + 6 * d)
    block += 4 * (d // heads) if qk_norm else 0
    embed = channels * patch * patch * d + d + (256 * d + d + d * d + d) + (num_classes + 1) * d
    final = (d * 2 * d + 2 * d) + (d * patch * patch * out + patch * patch * out)
    return embed + depth * block + final


@pytest.mark.parametrize("name", list(DiT_models))
def test_registry_shapes_on_meta(name):
    assert len(DiT_models) == 12
    config = DIT_PRESETS[name]
    for learn_sigma in (False, True):
        with torch.device("meta"):
            model = DiT_models[name](input_size=32, in_channels=4, num_classes=1000, learn_sigma=learn_sigma)
            x = torch.empty(2, 4, 32, 32)
            out = model(x, torch.tensor([0, 999]), torch.tensor([0, 1000]))
        assert model.config.model_name == name and model.config.patch_size == config["patch_size"]
        assert out.shape == (2, 8 if learn_sigma else 4, 32, 32)
        assert model.pos_embed.shape == (1, (32 // config["patch_size"]) ** 2, config["hidden_size"])


def test_parameter_counts():
    with torch.device("meta"):
        xl = DiT.from_name("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
        small = DiT.from_name("DiT-S/2", input_size=32, in_channels=4, num_classes=1000)
    xl_count = sum(p.numel() for p in xl.parameters())
    assert xl_count == _dit_parameter_count(1152, 28, 16, 2, 4, 1000, True) == 674_834_720
    # The DiT repo's 675,129,632 also counts its frozen position embedding (256 tokens × 1152), a buffer here.
    assert xl_count + xl.pos_embed.numel() == 675_129_632
    assert abs(xl_count - 675e6) / 675e6 < 1e-3
    small_count = sum(p.numel() for p in small.parameters())
    assert small_count == _dit_parameter_count(384, 12, 6, 2, 4, 1000, False) == 32_858_896


def test_position_embedding_matches_dit_reference():
    """DiT / MAE `get_2d_sincos_pos_embed`, re-derived in numpy: first half encodes the column (w) index."""
    dim, grid = 16, 4

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    w, h = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    reference = np.concatenate([one_d(dim // 2, w), one_d(dim // 2, h)], axis=1)
    np.testing.assert_allclose(sincos_2d(dim, grid).numpy(), reference, rtol=1e-12, atol=1e-12)


def test_fresh_model_outputs_zeros_adaln_zero():
    model = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                          num_classes=10, learn_sigma=True))
    out = model(torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([0, 5, 10]))
    assert out.shape == (3, 8, 8, 8) and torch.count_nonzero(out) == 0
    assert model.null_class == 10


def test_unpatchify_inverts_patchify():
    """A token holding patch (r, c) must land at rows r·p.., cols c·p.. of the output image."""
    model = _random_tiny_dit()
    image = torch.randn(2, 3, 8, 8)
    p = 2
    tokens = image.reshape(2, 3, 4, p, 4, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, p * p * 3)  # (B, N, p·p·C)
    torch.testing.assert_close(model.unpatchify(tokens), image, rtol=0, atol=0)


def test_label_dropout_and_timestep_types():
    model = _random_tiny_dit(class_dropout_prob=0.5)
    x, y = torch.randn(64, 3, 8, 8), torch.randint(0, 5, (64,))
    t_int = torch.full((64,), 300)
    with torch.no_grad():
        eval_out = model(x, t_int, y)
        torch.testing.assert_close(model(x, t_int.float(), y), eval_out)  # int and float timesteps agree
        dropped = model(x, t_int, y, force_drop_ids=torch.ones(64, dtype=torch.long))
        torch.testing.assert_close(dropped, model(x, t_int, torch.full_like(y, model.null_class)))
        model.train()
        nulls = (model.drop_labels(y) == model.null_class).float().mean().item()
    assert 0.2 < nulls < 0.8
    model.eval()
    assert torch.equal(model.drop_labels(y), y)


def test_save_load_round_trip_and_raw_weights(tmp_path):
    model = _random_tiny_dit(latent_mean=[0.1, -0.2, 0.3], latent_std=(1.5, 2.0, 0.5), qk_norm=True)
    raw = _random_tiny_dit(latent_mean=[0.1, -0.2, 0.3], latent_std=(1.5, 2.0, 0.5), qk_norm=True)
    model.save_pretrained(tmp_path / "dit", raw_state_dict=raw.state_dict())
    saved = json.loads((tmp_path / "dit" / "config.json").read_text())
    assert saved["model_type"] == "dit" and saved["_class_name"] == "DiT" and saved["latent_mean"] == [0.1, -0.2, 0.3]
    assert "DiT" in (tmp_path / "dit" / "README.md").read_text()  # the generated model card

    loaded = DiT.from_pretrained(tmp_path / "dit").eval()
    assert loaded.config == model.config and loaded.config.latent_std == (1.5, 2.0, 0.5)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 4])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))
        assert torch.equal(DiT.from_pretrained(tmp_path / "dit", weights="raw").eval()(x, t, y), raw(x, t, y))
    latents = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(loaded.denormalize_latents(loaded.normalize_latents(latents)), latents)
    assert torch.allclose(loaded.normalize_latents(latents)[:, 1], (latents[:, 1] + 0.2) / 2.0)

    model.save_pretrained(tmp_path / "dit")  # a re-save without raw weights drops the stale ones
    with pytest.raises(FileNotFoundError, match="no raw weights"):
        DiT.from_pretrained(tmp_path / "dit", weights="raw")
    half = DiT.from_pretrained(tmp_path / "dit", dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="directory"):
        DiT.from_pretrained(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        DiT.from_pretrained(empty)
    (empty / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        DiT.from_pretrained(empty)
    (empty / "config.json").write_text(json.dumps({"model_type": "eps_vae", "latent_channels": 4}))
    with pytest.raises(ValueError, match="eps_vae"):
        DiT.from_pretrained(empty)
    (empty / "config.json").write_text(json.dumps({"model_type": "dit", "depth": 1, "bogus": 3}))
    with pytest.raises(ValueError, match="bogus"):
        DiT.from_pretrained(empty)

    _random_tiny_dit().save_pretrained(tmp_path / "ok")
    (tmp_path / "ok" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot load"):
        DiT.from_pretrained(tmp_path / "ok")
    (tmp_path / "ok" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="weights"):
        DiT.from_pretrained(tmp_path / "ok")


def test_config_validation_and_required_fields():
    with pytest.raises(ValueError, match="input_size"):
        DiT.from_name("DiT-S/2", in_channels=4, num_classes=10)
    with pytest.raises(ValueError, match="unknown DiT model"):
        DiT.from_name("DiT-M/2", input_size=32, in_channels=4, num_classes=10)
    with pytest.raises(ValueError, match="divisible"):
        DiTConfig.from_name("DiT-S/8", input_size=12, in_channels=4, num_classes=10)
    with pytest.raises(ValueError, match="latent channels"):
        DiTConfig.from_name("DiT-S/2", input_size=16, in_channels=4, num_classes=10, latent_mean=(0.0,))
    model = _random_tiny_dit()
    with pytest.raises(ValueError, match="expects latents"):
        model(torch.randn(1, 4, 8, 8), torch.zeros(1), torch.zeros(1, dtype=torch.long))


def test_qk_norm_and_bf16_autocast():
    model = _random_tiny_dit(qk_norm=True)
    plain = sum(p.numel() for p in _random_tiny_dit().parameters())
    assert sum(p.numel() for p in model.parameters()) == plain + 4 * (32 // 2)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 999]), torch.tensor([2, 5])
    with torch.no_grad():
        reference = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t, y)
    assert torch.isfinite(low).all() and low.shape == reference.shape
    torch.testing.assert_close(low.float(), reference, rtol=0.1, atol=0.05)


def test_tiny_dit_learns_with_epsilon_loss():
    """A few Adam steps on a fixed batch must lower the ε-loss (gradients reach through adaLN-Zero)."""
    model = DiT(DiTConfig(input_size=4, patch_size=2, in_channels=2, hidden_size=32, depth=1, num_heads=2,
                          num_classes=3, class_dropout_prob=0.0)).train()
    schedule = diffusion.linear_beta_schedule()
    x_start, y = torch.randn(8, 2, 4, 4), torch.randint(0, 3, (8,))
    step_index, noise = torch.randint(0, 1000, (8,)), torch.randn(8, 2, 4, 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = diffusion.epsilon_loss(model, schedule, x_start, step_index, noise, model_kwargs={"y": y}).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_unconditional_dit_ignores_labels_and_samples_without_classes():
    from pipelines.kit.generation import generate_latents

    model = DiT.from_name("DiT-S/2", input_size=8, in_channels=3, num_classes=0, depth=1, hidden_size=32,
                          num_heads=2).eval()
    assert model.config.unconditional and model.y_embedder.num_embeddings == 1
    torch.nn.init.normal_(model.final_layer.linear.weight)  # a non-zero output, so labels could matter
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        assert torch.equal(model(x, t, torch.tensor([0, 0])), model(x, t, torch.tensor([5, 7])))
    latents = generate_latents(model, torch.zeros(2, dtype=torch.long), 4, torch.Generator().manual_seed(0))
    assert latents.shape == (2, 3, 8, 8) and torch.isfinite(latents).all()
    with pytest.raises(ValueError, match="unconditional"):
        generate_latents(model, torch.zeros(2, dtype=torch.long), 4, cfg_scale=2.0)
