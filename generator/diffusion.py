"""DDPM math for the stage-2 latent DiT, as pure functions over tensors (Ho et al. 2020; ADM; DiT).

Time convention (stated once, used everywhere): discrete steps, **index 0 is (almost) data, index T-1 is
(almost) pure noise**, the opposite direction from the tokenizer's continuous rectified-flow time
(`tokenizer/flow.py`, t=1 noise) because DiT checkpoints and the DDPM literature count this way.

    q(x_t | x_0)       = N(√ᾱ_t · x_0, (1 - ᾱ_t) I)                (Ho et al. Eq. 4)
    ε-prediction loss  = ‖ε - ε_θ(x_t, t, y)‖²                      (Ho et al. Eq. 14, "L_simple")
    x̂_0               = (x_t - √(1 - ᾱ_t) · ε_θ) / √ᾱ_t
    posterior mean     = coef1 · x̂_0 + coef2 · x_t                  (Ho et al. Eq. 7)

The ε-VAE paper's stage 2 (appendix C.3) keeps DiT's defaults but drops the VLB term, so the variance is
fixed: "fixed_large" (σ² = β_t, ADM/DiT's choice when sigma is not learned) or "fixed_small" (σ² = β̃_t).

A schedule may be *respaced* (ADM's `SpacedDiffusion`): it keeps a subset of the original T=1000 steps and
recomputes β so that each kept step has exactly the original ᾱ. The network always sees the ORIGINAL step
index (`schedule.timesteps[i]`), never the position `i` inside the respaced schedule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

VARIANCES = ("fixed_large", "fixed_small")

# model_fn(x_t (B, C, H, W), original_timesteps (B,) int64, **model_kwargs) -> ε (B, C or 2C, H, W)
ModelFn = Callable[..., torch.Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None


@dataclass(frozen=True)
class DiffusionSchedule:
    """Per-step float64 coefficients of one (possibly respaced) DDPM process; all tensors are (num_steps,)."""

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    timesteps: torch.Tensor  # int64: index of each step in the ORIGINAL process

    @property
    def num_steps(self) -> int:
        return int(self.betas.shape[0])


def schedule_from_betas(betas: torch.Tensor, timesteps: torch.Tensor | None = None) -> DiffusionSchedule:
    """All derived DDPM coefficients from β (float64, as ADM computes them in numpy float64)."""
    betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
    if betas.numel() == 0:
        raise ValueError("a diffusion schedule needs at least one step, got an empty beta tensor")
    if not bool(((betas > 0) & (betas <= 1)).all()):
        raise ValueError(f"betas must lie in (0, 1], got min {betas.min().item()} max {betas.max().item()}")
    if timesteps is None:
        timesteps = torch.arange(betas.numel(), dtype=torch.int64)
    timesteps = torch.as_tensor(timesteps, dtype=torch.int64).flatten()
    if timesteps.numel() != betas.numel():
        raise ValueError(f"got {timesteps.numel()} timesteps for {betas.numel()} betas")

    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    # Variance of q(x_{t-1} | x_t, x_0): β̃_t = β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t)   (Ho et al. Eq. 7)
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # β̃_0 = 0; ADM clips the log by reusing β̃_1 so the log stays finite.
    first = posterior_variance[1:2] if posterior_variance.numel() > 1 else betas[:1]
    posterior_log_variance_clipped = torch.log(torch.cat([first, posterior_variance[1:]]))
    return DiffusionSchedule(
        betas=betas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=posterior_log_variance_clipped,
        posterior_mean_coef1=betas * torch.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * torch.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
        timesteps=timesteps,
    )


def linear_beta_schedule(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> DiffusionSchedule:
    """Ho et al.'s linear β schedule, used unchanged by ADM, DiT and the ε-VAE paper's stage 2 (C.3)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
    return schedule_from_betas(torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64))


def spaced_step_indices(num_steps: int, spec: str | int) -> list[int]:
    """Which of `num_steps` steps to keep (ADM's `space_timesteps`).

    "250" keeps 250 steps evenly strided from the first to the last (rounded); "10,15,20" splits the process
    into 3 equal sections and keeps that many evenly strided steps in each; "ddim50" keeps every
    (num_steps // 50)-th step starting at 0, the DDIM paper's spacing.
    """
    text = str(spec).strip()
    if text.startswith("ddim"):
        count = _positive_int(text[len("ddim"):], spec)
        for stride in range(1, num_steps):
            if len(range(0, num_steps, stride)) == count:
                return list(range(0, num_steps, stride))
        if count == num_steps:
            return list(range(num_steps))
        raise ValueError(f"cannot keep exactly {count} evenly strided steps of {num_steps} (spec {spec!r})")

    section_counts = [_positive_int(part, spec) for part in text.split(",")]
    size_per, extra = divmod(num_steps, len(section_counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"cannot keep {count} steps of a {size}-step section (spec {spec!r}, {num_steps} steps)")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        kept.extend(start + round(j * stride) for j in range(count))
        start += size
    return kept


def _positive_int(text: str, spec: str | int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"bad respacing spec {spec!r}: expected e.g. '250', '10,20,30' or 'ddim50'") from None
    if value < 1:
        raise ValueError(f"bad respacing spec {spec!r}: step counts must be >= 1")
    return value


def respace(schedule: DiffusionSchedule, spec: str | int) -> DiffusionSchedule:
    """Keep a subset of steps and recompute β so each kept step has the original ᾱ (ADM `SpacedDiffusion`).

    β'_i = 1 - ᾱ_{k_i} / ᾱ_{k_{i-1}} (with ᾱ_{k_{-1}} = 1), so cumprod(1 - β') reproduces ᾱ at the kept steps.
    """
    kept = torch.tensor(spaced_step_indices(schedule.num_steps, spec), dtype=torch.int64)
    alphas_cumprod = schedule.alphas_cumprod[kept]
    previous = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    return schedule_from_betas(1.0 - alphas_cumprod / previous, timesteps=schedule.timesteps[kept])


def _extract(values: torch.Tensor, step_index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather per-sample float64 coefficients (B,) and shape them (B, 1, ..., 1) to scale `like`.

    float64 inputs keep float64 (exact oracle tests); everything else computes in float32.
    """
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    picked = values[step_index.to(values.device, torch.int64)]
    return picked.to(device=like.device, dtype=dtype).reshape(-1, *([1] * (like.ndim - 1)))


def _original_timesteps(schedule: DiffusionSchedule, step_index: torch.Tensor, device: torch.device) -> torch.Tensor:
    return schedule.timesteps[step_index.to(schedule.timesteps.device, torch.int64)].to(device)


def q_sample(schedule: DiffusionSchedule, x_start: torch.Tensor, step_index: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t · x_0 + √(1 - ᾱ_t) · ε  (Ho et al. Eq. 4); `step_index` (B,) indexes this schedule."""
    if noise.shape != x_start.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
    signal = _extract(torch.sqrt(schedule.alphas_cumprod), step_index, x_start)
    sigma = _extract(torch.sqrt(1.0 - schedule.alphas_cumprod), step_index, x_start)
    return signal * x_start + sigma * noise  # (B, C, H, W)


def predict_x_start(schedule: DiffusionSchedule, x_t: torch.Tensor, step_index: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x̂_0 = (x_t - √(1 - ᾱ_t) ε) / √ᾱ_t, written as ADM does to keep float error small."""
    recip = _extract(torch.sqrt(1.0 / schedule.alphas_cumprod), step_index, x_t)
    recip_m1 = _extract(torch.sqrt(1.0 / schedule.alphas_cumprod - 1.0), step_index, x_t)
    return recip * x_t - recip_m1 * eps


def predict_eps(schedule: DiffusionSchedule, x_t: torch.Tensor, step_index: torch.Tensor, x_start: torch.Tensor) -> torch.Tensor:
    """Inverse of `predict_x_start`: the ε that maps x_0 to x_t."""
    recip = _extract(torch.sqrt(1.0 / schedule.alphas_cumprod), step_index, x_t)
    recip_m1 = _extract(torch.sqrt(1.0 / schedule.alphas_cumprod - 1.0), step_index, x_t)
    return (recip * x_t - x_start) / recip_m1


def _epsilon_channels(output: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """ε from a model output: all of it, or the first C channels of a learn_sigma (2C) output."""
    channels = like.shape[1]
    if output.shape[1] == 2 * channels and output.shape[2:] == like.shape[2:]:
        output = output[:, :channels]  # the variance channels are unused: fixed variance, no VLB (C.3)
    if output.shape != like.shape:
        raise ValueError(f"model output shape {tuple(output.shape)} does not match x_t shape {tuple(like.shape)}")
    return output.to(like.dtype)


def epsilon_loss(
    model_fn: ModelFn,
    schedule: DiffusionSchedule,
    x_start: torch.Tensor,
    step_index: torch.Tensor,
    noise: torch.Tensor | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """Per-sample ε-prediction MSE, mean over non-batch dims (Ho et al. Eq. 14; paper C.3 drops the VLB).

    Returns (B,). The model sees ORIGINAL timestep indices, so a respaced schedule trains the same network.
    """
    if noise is None:
        noise = torch.randn_like(x_start)
    x_t = q_sample(schedule, x_start, step_index, noise)
    timesteps = _original_timesteps(schedule, step_index, x_start.device)
    eps = _epsilon_channels(model_fn(x_t, timesteps, **dict(model_kwargs or {})), x_start)
    return (eps.float() - noise.float()).pow(2).flatten(1).mean(dim=1)  # (B,)


def _randn_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Fresh Gaussian noise; one generator for the batch, or one per sample (EDM-style per-image seeds)."""
    if generator is None:
        return torch.randn_like(x)
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
    if len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
    return torch.stack(
        [torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype).to(x.device) for g in generator]
    )


def _step_iterator(num_steps: int, progress: bool):
    steps = range(num_steps - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm

        return tqdm(steps, total=num_steps, desc="sampling")
    return steps


def _model_x_start(
    model_fn: ModelFn, schedule: DiffusionSchedule, x_t: torch.Tensor, index: int,
    model_kwargs: Mapping[str, Any], clip_denoised: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(step_index (B,), x̂_0) for one reverse step; the model is called with the original timestep."""
    step_index = torch.full((x_t.shape[0],), index, dtype=torch.int64, device=x_t.device)
    timesteps = _original_timesteps(schedule, step_index, x_t.device)
    eps = _epsilon_channels(model_fn(x_t, timesteps, **model_kwargs), x_t)
    x_start = predict_x_start(schedule, x_t, step_index, eps)
    if clip_denoised:
        x_start = x_start.clamp(-1.0, 1.0)
    return step_index, x_start


def ddpm_sample(
    model_fn: ModelFn,
    schedule: DiffusionSchedule,
    noise: torch.Tensor,
    variance: str = "fixed_large",
    generator: Generators = None,
    model_kwargs: Mapping[str, Any] | None = None,
    progress: bool = False,
    clip_denoised: bool = False,
) -> torch.Tensor:
    """Ancestral DDPM sampling from x_T = `noise` (Ho et al. Alg. 2, ADM `p_sample_loop`).

    x_{t-1} = coef1 · x̂_0 + coef2 · x_t + σ_t z, z ~ N(0, I), no noise at the last step. σ² is β_t
    ("fixed_large", DiT's default without learn_sigma; β̃_1 at the first step as in ADM) or β̃_t ("fixed_small").
    Latent diffusion leaves `clip_denoised` off: latents are not confined to [-1, 1].
    """
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    if variance == "fixed_large":
        # ADM: the first entry uses β̃_1 so the final step's log-variance stays a finite, small value.
        first = schedule.posterior_variance[1:2] if schedule.num_steps > 1 else schedule.betas[:1]
        log_variance = torch.log(torch.cat([first, schedule.betas[1:]]))
    else:
        log_variance = schedule.posterior_log_variance_clipped
    kwargs = dict(model_kwargs or {})
    x_t = noise
    with torch.no_grad():
        for index in _step_iterator(schedule.num_steps, progress):
            step_index, x_start = _model_x_start(model_fn, schedule, x_t, index, kwargs, clip_denoised)
            mean = (_extract(schedule.posterior_mean_coef1, step_index, x_t) * x_start
                    + _extract(schedule.posterior_mean_coef2, step_index, x_t) * x_t)
            if index > 0:
                std = torch.exp(0.5 * _extract(log_variance, step_index, x_t))
                x_t = (mean + std * _randn_like(x_t, generator)).to(noise.dtype)
            else:
                x_t = mean.to(noise.dtype)
    return x_t  # (B, C, H, W)


def ddim_sample(
    model_fn: ModelFn,
    schedule: DiffusionSchedule,
    noise: torch.Tensor,
    eta: float = 0.0,
    generator: Generators = None,
    model_kwargs: Mapping[str, Any] | None = None,
    progress: bool = False,
    clip_denoised: bool = False,
) -> torch.Tensor:
    """DDIM sampling (Song et al. 2021, Eq. 12; ADM `ddim_sample`): deterministic for eta=0, DDPM-like for eta=1.

    Use with a respaced schedule (e.g. `respace(schedule, "ddim50")`); ᾱ_prev is the previous KEPT step's ᾱ.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    kwargs = dict(model_kwargs or {})
    x_t = noise
    with torch.no_grad():
        for index in _step_iterator(schedule.num_steps, progress):
            step_index, x_start = _model_x_start(model_fn, schedule, x_t, index, kwargs, clip_denoised)
            # Re-derive ε from the (possibly clipped) x̂_0 so the update stays consistent with it.
            eps = predict_eps(schedule, x_t, step_index, x_start)
            alpha_bar = _extract(schedule.alphas_cumprod, step_index, x_t)
            alpha_bar_prev = _extract(schedule.alphas_cumprod_prev, step_index, x_t)
            sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
            mean = torch.sqrt(alpha_bar_prev) * x_start + torch.sqrt((1 - alpha_bar_prev - sigma**2).clamp(min=0)) * eps
            if index > 0 and eta > 0:
                x_t = (mean + sigma * _randn_like(x_t, generator)).to(noise.dtype)
            else:
                x_t = mean.to(noise.dtype)
    return x_t  # (B, C, H, W)


def classifier_free_guidance(model_fn: ModelFn, scale: float, null_class: int) -> ModelFn:
    """Wrap `model_fn(x_t, t, y=..., **kw)` with classifier-free guidance (Ho & Salimans 2022).

    ε̃ = ε(x, ∅) + s · (ε(x, y) - ε(x, ∅)) on ALL output channels (the DiT repo guides only the first three,
    an artefact of 4-channel SD latents; here every latent channel is guided). The batch is doubled with the
    null label, so one forward pass serves both. Scale 1 means no guidance (the paper's setting) and returns
    `model_fn` itself.
    """
    if scale == 1.0:
        return model_fn

    def guided(x_t: torch.Tensor, timesteps: torch.Tensor, *, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        null = torch.full_like(y, null_class)
        output = model_fn(torch.cat([x_t, x_t]), torch.cat([timesteps, timesteps]), y=torch.cat([y, null]), **kwargs)
        cond, uncond = output.chunk(2, dim=0)
        return uncond + scale * (cond - uncond)

    return guided
