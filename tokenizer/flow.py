"""Rectified-flow math for the ε-VAE diffusion decoder, as pure functions over tensors.

Time convention (stated once, used everywhere): **t = 1 is pure noise, t = 0 is data.**

With the noise scaling γ of Chen (2023) the data term is shrunk by γ, lowering the signal-to-noise ratio
(paper Sec. 3.3):

    x_t = (1 - t)·γ·x_data + t·noise           (paper Eq. 5 with x_0 := γ·x_data)
    v   = noise - γ·x_data                       (velocity target, Eq. 6 / Eq. 9)
    x̂_data = (x_t - t·v) / γ                    (Eq. 10, γ undone)

Following the trajectory with the exact velocity from t = 1 to t = 0 lands on γ·x_data, so samplers divide by
γ at the end; an oracle velocity therefore decodes x_data exactly in any number of Euler steps.
The network sees `network_input_scale(t)·x_t`, which has unit variance at every t, so γ ≠ 1 does not change
the input statistics the UNet is trained on (Chen 2023, Karras et al. 2022).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

TIME_DISTRIBUTIONS = ("logit_normal", "uniform")
TIME_SPACINGS = ("reversed_log", "uniform")
PRECONDITIONINGS = ("none", "skip")

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _broadcast_time(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) times → (B, 1, 1, 1) so they scale per-sample images."""
    return t.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def interpolate(x_data: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Point on the straight path between γ·x_data (t=0) and noise (t=1)."""
    t = _broadcast_time(t, x_data)
    return (1.0 - t) * gamma * x_data + t * noise  # (B, C, H, W)


def velocity_target(x_data: torch.Tensor, noise: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """d x_t / d t along the straight path: the regression target of Eq. 9."""
    return noise - gamma * x_data


def network_input_scale(t: torch.Tensor, gamma: float = 1.0, data_std: float = 0.5) -> torch.Tensor:
    """Factor that gives x_t unit variance: Var(x_t) = ((1-t)·γ·σ_data)² + t² for independent noise."""
    t = t.float()
    variance = ((1.0 - t) * gamma * data_std) ** 2 + t**2
    return variance.rsqrt().reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)


def velocity_preconditioning(
    t: torch.Tensor, gamma: float = 1.0, data_std: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out), each (B, 1, 1, 1), for v = c_skip·x_t + c_out·F (Karras et al. 2022, for this path).

    c_skip·x_t is the best linear guess of v from x_t alone (Cov(v, x_t) / Var(x_t) for data of std σ_data),
    and c_out is the std of what it leaves, so the network F regresses a unit-variance residual. At t = 1 this
    passes the noise straight through (c_skip = 1), which a zero-initialised UNet otherwise needs thousands of
    steps to learn: without it, early decodes are noise.
    """
    t = t.float().reshape(-1, 1, 1, 1)
    signal = (gamma * data_std) ** 2
    var_x_t = (1.0 - t) ** 2 * signal + t**2
    cov_v_x_t = t - (1.0 - t) * signal
    c_skip = cov_v_x_t / var_x_t
    c_out = (1.0 + signal - cov_v_x_t**2 / var_x_t).clamp_min(1e-8).sqrt()
    return c_skip, c_out


def estimate_x_data(x_t: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """x̂0 from one velocity prediction (Eq. 10); feeds the perceptual loss and the discriminator."""
    return (x_t - _broadcast_time(t, x_t) * velocity) / gamma


def sample_time(
    batch: int,
    distribution: str = "logit_normal",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    location: float = 0.0,
) -> torch.Tensor:
    """Training times in (0, 1): logit-normal t = sigmoid(n), n ~ N(location, 1) (Esser et al. 2024), or uniform.

    location 0 is the paper's setting. A positive location (SD3's lognorm(m, 1)) spends more of training near
    t = 1, where a 1-3 step decode takes all of its steps (reversed-log times for 3 steps: 1, 0.91, 0.77).
    """
    if distribution == "logit_normal":
        n = torch.randn(batch, generator=generator, device=device)
        return torch.sigmoid(n + location)
    if distribution == "uniform":
        # Keep clear of the exact endpoints so x̂0 = (x_t - t·v)/γ stays well conditioned.
        return torch.rand(batch, generator=generator, device=device).clamp(1e-5, 1.0 - 1e-5)
    raise ValueError(f"unknown time distribution {distribution!r}; choose from {TIME_DISTRIBUTIONS}")


def reversed_log_times(num_steps: int, m: float = 1.0, n: float = 100.0) -> torch.Tensor:
    """Eq. 13, ρ_log(s; m, n) at s = i/N: goes 1 → 0 with steps dense near the noise end (t = 1)."""
    _check_steps(num_steps)
    s = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)
    times = (math.log(m) - torch.log(s * (m - n) + n)) / (math.log(m) - math.log(n))
    return times.float()


def uniform_times(num_steps: int) -> torch.Tensor:
    """Evenly spaced decode times from 1 to 0 (the ablation baseline of Table 4 (g))."""
    _check_steps(num_steps)
    return torch.linspace(1.0, 0.0, num_steps + 1)


_SPACINGS: dict[str, Callable[[int], torch.Tensor]] = {
    "reversed_log": reversed_log_times,
    "uniform": uniform_times,
}


def decode_times(num_steps: int, spacing: str = "reversed_log") -> torch.Tensor:
    """The num_steps + 1 times an Euler decode visits, from 1 (noise) to 0 (data)."""
    if spacing not in _SPACINGS:
        raise ValueError(f"unknown time spacing {spacing!r}; choose from {TIME_SPACINGS}")
    return _SPACINGS[spacing](num_steps)


def euler_sample(velocity_fn: VelocityFn, noise: torch.Tensor, times: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Integrate dx = v·dt (Eq. 7) from times[0] = 1 to times[-1] = 0, then undo γ.

    `velocity_fn(x_t, t_batch)` gets t_batch of shape (B,); NFE = len(times) - 1.
    """
    x = noise
    batch = noise.shape[0]
    for t_now, t_next in zip(times[:-1].tolist(), times[1:].tolist()):
        t_batch = torch.full((batch,), t_now, device=noise.device, dtype=torch.float32)
        x = x + (t_next - t_now) * velocity_fn(x, t_batch)
    return x / gamma


def _check_steps(num_steps: int) -> None:
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"the number of decode steps must be an integer >= 1, got {num_steps!r}")
