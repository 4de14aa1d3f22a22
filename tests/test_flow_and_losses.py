"""Rectified-flow math (tokenizer/flow.py) and tokenizer losses against closed forms and autograd."""
import math

import pytest
import torch
import torch.nn.functional as F

from tokenizer import flow, losses


@pytest.mark.parametrize("gamma", [1.0, 0.6])
@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("spacing", ["reversed_log", "uniform"])
def test_oracle_velocity_decodes_data_exactly(gamma, steps, spacing):
    x_data = torch.rand(2, 3, 8, 8) * 2 - 1
    noise = torch.randn(2, 3, 8, 8)

    def oracle(x_t, t):
        # The straight path's velocity is constant: noise − γ·x_data.
        return flow.velocity_target(x_data, noise, gamma)

    decoded = flow.euler_sample(oracle, noise, flow.decode_times(steps, spacing), gamma=gamma)
    torch.testing.assert_close(decoded, x_data, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gamma", [1.0, 0.6])
def test_x_data_estimate_inverts_interpolation(gamma):
    x_data, noise = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    t = torch.tensor([0.1, 0.4, 0.7, 0.99])
    x_t = flow.interpolate(x_data, noise, t, gamma)
    v = flow.velocity_target(x_data, noise, gamma)
    torch.testing.assert_close(flow.estimate_x_data(x_t, v, t, gamma), x_data, atol=1e-5, rtol=1e-5)
    # Endpoints of the path.
    torch.testing.assert_close(flow.interpolate(x_data, noise, torch.ones(4), gamma), noise)
    torch.testing.assert_close(flow.interpolate(x_data, noise, torch.zeros(4), gamma), gamma * x_data)


def test_network_input_scale_gives_unit_variance():
    torch.manual_seed(1)
    gamma, data_std = 0.6, 0.5
    x_data = torch.randn(4096, 1, 1, 1) * data_std
    noise = torch.randn(4096, 1, 1, 1)
    for t_value in (0.0, 0.3, 0.8, 1.0):
        t = torch.full((4096,), t_value)
        scaled = flow.network_input_scale(t, gamma, data_std) * flow.interpolate(x_data, noise, t, gamma)
        assert abs(scaled.std().item() - 1.0) < 0.05


def test_reversed_log_times_match_eq13():
    times = flow.reversed_log_times(5)
    assert times.shape == (6,)
    assert times[0].item() == pytest.approx(1.0) and times[-1].item() == pytest.approx(0.0, abs=1e-7)
    assert torch.all(times[1:] < times[:-1])
    m, n = 1.0, 100.0
    for i in range(1, 5):
        s = i / 5
        expected = (math.log(m) - math.log(s * (m - n) + n)) / (math.log(m) - math.log(n))
        assert times[i].item() == pytest.approx(expected, rel=1e-6)
    # Denser near the noise end than the uniform grid: the first step is smaller.
    uniform = flow.uniform_times(5)
    assert (times[0] - times[1]) < (uniform[0] - uniform[1])
    assert torch.all(times[1:-1] > uniform[1:-1])


def test_bad_step_counts_and_names_raise():
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="decode steps"):
            flow.decode_times(bad)
    with pytest.raises(ValueError, match="spacing"):
        flow.decode_times(3, "cosine")
    with pytest.raises(ValueError, match="time distribution"):
        flow.sample_time(4, "beta")


def test_logit_normal_samples():
    g = torch.Generator().manual_seed(0)
    t = flow.sample_time(20000, "logit_normal", generator=g)
    assert torch.all((t > 0) & (t < 1))
    assert t.median().item() == pytest.approx(0.5, abs=0.02)
    # Logit-normal puts less mass near the endpoints than uniform.
    assert ((t < 0.05) | (t > 0.95)).float().mean() < 0.05
    u = flow.sample_time(20000, "uniform", generator=g)
    assert torch.all((u > 0) & (u < 1)) and u.mean().item() == pytest.approx(0.5, abs=0.02)


def test_logit_normal_location_moves_mass_toward_noise():
    """SD3's lognorm(m, 1): the median moves to sigmoid(m), and a 3-step decode's times get more training."""
    g = torch.Generator().manual_seed(0)
    shifted = flow.sample_time(20000, "logit_normal", generator=g, location=1.0)
    assert shifted.median().item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item(), abs=0.02)
    centred = flow.sample_time(20000, "logit_normal", generator=g)
    last_decode_time = flow.decode_times(3)[-2].item()  # ≈ 0.77: the final Euler step starts here
    assert (shifted >= last_decode_time).float().mean() > 2 * (centred >= last_decode_time).float().mean()


def test_adversarial_losses_closed_forms():
    real, fake = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    expected_d = -torch.log(torch.sigmoid(real)).mean() - torch.log(1 - torch.sigmoid(fake)).mean()
    torch.testing.assert_close(losses.discriminator_loss(real, fake), expected_d, atol=1e-5, rtol=1e-5)
    expected_g = -torch.log(torch.sigmoid(fake)).flatten(1).mean(1)
    torch.testing.assert_close(losses.generator_adversarial_loss(fake), expected_g, atol=1e-5, rtol=1e-5)


def test_velocity_and_reconstruction_losses_are_per_sample():
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(losses.velocity_loss(a, b), ((a - b) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(losses.reconstruction_loss(a, b, "l1"), (a - b).abs().mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError):
        losses.reconstruction_loss(a, b, "huber")


def test_kl_term_per_pixel_does_not_depend_on_image_size():
    """The same posterior statistics at 32² and 64² (the 64² latent tiles the 32² one 2×2) give the same KL term
    under "pixels" (summed KL / 3·H·W, the SD/LDM balance); "sum" grows with the number of latent cells."""
    from tokenizer.encoder import DiagonalGaussian

    moments = torch.randn(2, 8, 8, 8)  # (B, 2·Z, h, w) for 32² images at f=4
    small = DiagonalGaussian(moments).kl()
    large = DiagonalGaussian(moments.repeat(1, 1, 2, 2)).kl()  # (B,) over 16×16 latents, same statistics
    images_small, images_large = torch.zeros(2, 3, 32, 32), torch.zeros(2, 3, 64, 64)
    torch.testing.assert_close(losses.kl_loss(small, images_small), losses.kl_loss(large, images_large))
    torch.testing.assert_close(losses.kl_loss(small, images_small), small / (3 * 32 * 32))
    torch.testing.assert_close(losses.kl_loss(large, images_large, "sum"), 4 * losses.kl_loss(small, images_small,
                                                                                               "sum"))
    with pytest.raises(ValueError, match="KL normalization"):
        losses.kl_loss(small, images_small, "mean")


def test_r1_penalty_matches_direct_autograd():
    conv = torch.nn.Conv2d(6, 1, 3, padding=1)
    time_weight = torch.nn.Parameter(torch.tensor(0.5))

    def disc(x, t):
        return torch.tanh(conv(x)) * (1 + time_weight * t.view(-1, 1, 1, 1))

    x = torch.randn(2, 6, 5, 5)
    t = torch.tensor([0.2, 0.9])
    penalty = losses.r1_penalty(disc, x, t)

    x_direct = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(disc(x_direct, t).mean(dim=(1, 2, 3)).sum(), x_direct)
    torch.testing.assert_close(penalty, grad.pow(2).sum(dim=(1, 2, 3)).mean())
    # Differentiable w.r.t. the discriminator's parameters (needed for the D step).
    penalty.backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_r1_penalty_does_not_grow_with_the_number_of_patches():
    """A PatchGAN that repeats one per-image logit over P patches is the same D: same R1 for any P."""
    weight = torch.randn(6, 1, 1)

    def scalar_logit(x):  # (B, 6, H, W) -> (B,)
        return torch.tanh((x * weight).mean(dim=(1, 2, 3)))

    x = torch.randn(3, 6, 8, 8)
    single = losses.r1_penalty(lambda v: scalar_logit(v).view(-1, 1, 1, 1), x)
    for patches in (4, 14):
        tiled = losses.r1_penalty(lambda v: scalar_logit(v).view(-1, 1, 1, 1).expand(-1, 1, patches, patches), x)
        torch.testing.assert_close(tiled, single)


def test_trajectory_pair_stacks_channels():
    x0, xt = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    pair = losses.trajectory_pair(x0, xt)
    assert pair.shape == (2, 6, 4, 4) and pair[:, 3:].eq(1).all() and pair[:, :3].eq(0).all()
    assert F.softplus(torch.zeros(1)).item() == pytest.approx(math.log(2))


def test_velocity_preconditioning_is_the_linear_least_squares_skip():
    torch.manual_seed(2)
    gamma, data_std = 0.6, 0.5
    x_data = torch.randn(200_000) * data_std
    noise = torch.randn(200_000)
    for t_value in (0.05, 0.5, 0.95, 1.0):
        t = torch.full((1,), t_value)
        x_t = (1 - t_value) * gamma * x_data + t_value * noise
        v = noise - gamma * x_data
        c_skip, c_out = flow.velocity_preconditioning(t, gamma, data_std)
        empirical_skip = (v * x_t).mean() / (x_t * x_t).mean()
        assert c_skip.item() == pytest.approx(empirical_skip.item(), abs=0.01)
        # The network's target (v − c_skip·x_t) / c_out has unit variance.
        residual = (v - c_skip.item() * x_t) / c_out.item()
        assert residual.std().item() == pytest.approx(1.0, abs=0.01)
    c_skip, _ = flow.velocity_preconditioning(torch.ones(1), gamma, data_std)
    assert c_skip.item() == pytest.approx(1.0)  # pure noise passes straight through
