"""Stage 2: class-conditional DiT over ε-VAE latents, and the DDPM math that trains and samples it."""
from generator.diffusion import (
    DiffusionSchedule,
    classifier_free_guidance,
    ddim_sample,
    ddpm_sample,
    epsilon_loss,
    linear_beta_schedule,
    q_sample,
    respace,
)
from generator.dit import DiT, DiTConfig, DiT_models

__all__ = [
    "DiT",
    "DiTConfig",
    "DiT_models",
    "DiffusionSchedule",
    "classifier_free_guidance",
    "ddim_sample",
    "ddpm_sample",
    "epsilon_loss",
    "linear_beta_schedule",
    "q_sample",
    "respace",
]
