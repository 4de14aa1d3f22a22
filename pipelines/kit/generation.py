"""Class ids → DiT latents: ancestral DDPM on a respaced linear-β schedule, then the model's own un-normalisation.

Used for the training run's sample grids; the full sampling CLI (250 steps, per-image seeds across ranks, PNGs
and `.npz`) builds on the same function. The paper's numbers use no classifier-free guidance (C.3), so
`cfg_scale=1` is the default.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import torch

from generator.diffusion import DiffusionSchedule, classifier_free_guidance, ddpm_sample, linear_beta_schedule, respace
from generator.dit import DiT

DIFFUSION_STEPS = 1000  # T of the training process (paper C.3)


def sampling_schedule(num_steps: int | str, diffusion_steps: int = DIFFUSION_STEPS) -> DiffusionSchedule:
    """The training schedule (linear β, T steps) respaced to `num_steps` (ADM spacing: "250", "ddim50", ...)."""
    return respace(linear_beta_schedule(diffusion_steps), str(num_steps))


def _initial_noise(shape: tuple[int, ...], generator: torch.Generator | Sequence[torch.Generator] | None,
                   device: torch.device) -> torch.Tensor:
    """x_T ~ N(0, I): one generator for the batch, or one per sample (same seed → same latent in any batch)."""
    if generator is None or isinstance(generator, torch.Generator):
        noise_device = generator.device if generator is not None else device
        return torch.randn(shape, generator=generator, device=noise_device).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for {shape[0]} labels")
    return torch.stack([torch.randn(shape[1:], generator=g, device=g.device).to(device) for g in generator])


@torch.no_grad()
def generate_latents(
    dit: DiT,
    labels: torch.Tensor,
    num_steps: int | str = 250,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    *,
    cfg_scale: float = 1.0,
    diffusion_steps: int = DIFFUSION_STEPS,
    variance: str = "fixed_large",
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Sample tokenizer latents (B, C, h, w) for class `labels` (B,) with `num_steps` respaced DDPM steps.

    The DiT works in the per-channel standardised space of its training latents; the result is mapped back with
    `dit.denormalize_latents` (the manifest's mean/std stored in its config), ready for the tokenizer's decoder.
    The model runs in eval mode (no label dropout) and is put back in its previous mode afterwards.
    """
    config = dit.config
    device = next(dit.parameters()).device
    labels = torch.as_tensor(labels, dtype=torch.int64, device=device).flatten()  # (B,)
    if labels.numel() == 0 or labels.min() < 0 or labels.max() >= config.num_classes:
        raise ValueError(f"labels must be class ids in [0, {config.num_classes}), got {labels.tolist()[:8]}")
    schedule = sampling_schedule(num_steps, diffusion_steps)
    noise = _initial_noise((labels.numel(), config.in_channels, config.input_size, config.input_size),
                           generator, device)  # (B, C, h, w)

    def model_fn(x_t: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
        with autocast:  # the DiT in bf16 / fp16 if asked; the DDPM state stays float32
            return dit(x_t, timesteps, y).float()

    guided = classifier_free_guidance(model_fn, cfg_scale, dit.null_class)
    was_training = dit.training
    dit.eval()
    try:
        normalised = ddpm_sample(guided, schedule, noise, variance=variance, generator=generator,
                                 model_kwargs={"y": labels}, progress=progress)
    finally:
        dit.train(was_training)
    return dit.denormalize_latents(normalised.float())  # (B, C, h, w)
