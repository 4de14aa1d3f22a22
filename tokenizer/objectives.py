"""What a tokenizer is trained to predict, and how it decodes: one object per objective, chosen from a registry.

- `velocity`: ε-VAE (paper Sec. 3): rectified flow with noise scaling γ, logit-normal t, Euler decoding on the
  reversed-log grid (Eq. 5-13; the math is `tokenizer.flow`).
- `epsilon`: the DDPM ε-prediction baseline of Table 4: linear-β schedule, t uniform over the T steps,
  ancestral decoding respaced to the number of steps (the math is `generator.diffusion`).
- `reconstruction`: the baseline VAE (Sec. 4): one deterministic decoder pass, no time.

Training code calls `model.objective.sample_time(...)`, `.training_outputs(...)` and `.regression_loss(...)`;
users call `model.decode(z, steps=None, generator=None)`. Nobody branches on the model's type.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence

import torch

from tokenizer import flow, losses

if TYPE_CHECKING:
    from tokenizer.models import EpsVAE, VAE

# The paper's final setting (Table 4 (g)): every default decode-step count in the project is this one.
DEFAULT_DECODE_STEPS = 3

Generators = torch.Generator | Sequence[torch.Generator] | None  # one for the batch, or one per sample


@dataclass
class TrainingOutputs:
    """The generator side of one training step (Eq. 1, 9-12); every tensor is per sample.

    x_hat: (B, 3, H, W) x̂0 from one network evaluation (the VAE's reconstruction), unclamped so gradients flow;
    it feeds the perceptual loss and the discriminator. kl: (B,) KL term of the posterior, normalised as the
    model's `kl_normalization` says (`losses.kl_loss`). prediction / target:
    the regression pair of the objective (None for the VAE, whose loss compares x_hat with the images).
    x_t: (B, 3, H, W) the noisy input as the network sees it, paired with x0 / x̂0 for the trajectory
    discriminator (Eq. 12); None when the discriminator is unconditional.
    """

    x_hat: torch.Tensor
    kl: torch.Tensor
    prediction: torch.Tensor | None = None
    target: torch.Tensor | None = None
    x_t: torch.Tensor | None = None


class Objective(Protocol):
    """The interface every objective implements (see the module docstring)."""

    name: str
    iterative: bool  # False: one deterministic decoder pass, the decode-step count changes nothing
    regression_term: str  # the name its regression loss is logged under: "score" or "rec"

    def sample_time(self, model, batch: int, device: torch.device | str) -> torch.Tensor: ...

    def training_outputs(self, model, images: torch.Tensor, z: torch.Tensor, kl: torch.Tensor,
                         noise: torch.Tensor, t: torch.Tensor) -> TrainingOutputs: ...

    def regression_loss(self, outputs: TrainingOutputs, images: torch.Tensor, reconstruction: str) -> torch.Tensor: ...

    def decode(self, model, z: torch.Tensor, noise: torch.Tensor | None, steps: int, generator: Generators,
               spacing: str | None) -> torch.Tensor: ...


class VelocityObjective:
    """Rectified flow (ε-VAE): x_t = (1-t)·γ·x + t·ε, the network predicts v = ε - γ·x."""

    name = "velocity"
    iterative = True  # the decode-step count changes the result
    regression_term = "score"

    def sample_time(self, model: "EpsVAE", batch: int, device: torch.device | str) -> torch.Tensor:
        config = model.config
        return flow.sample_time(batch, config.time_sampling, device=device, location=config.time_location)

    def training_outputs(self, model: "EpsVAE", images: torch.Tensor, z: torch.Tensor, kl: torch.Tensor,
                         noise: torch.Tensor, t: torch.Tensor) -> TrainingOutputs:
        config = model.config
        x_t = flow.interpolate(images, noise, t, config.gamma)  # (B, 3, H, W)
        prediction = model.velocity(x_t, t, z)
        return TrainingOutputs(
            x_hat=flow.estimate_x_data(x_t, prediction, t, config.gamma), kl=kl, prediction=prediction,
            target=flow.velocity_target(images, noise, config.gamma),
            x_t=x_t * flow.network_input_scale(t, config.gamma, config.data_std),
        )

    def regression_loss(self, outputs: TrainingOutputs, images: torch.Tensor, reconstruction: str) -> torch.Tensor:
        return losses.velocity_loss(outputs.prediction, outputs.target)  # (B,)

    def decode(self, model: "EpsVAE", z: torch.Tensor, noise: torch.Tensor, steps: int, generator: Generators,
               spacing: str | None) -> torch.Tensor:
        """Euler steps (Eq. 7) over `flow.decode_times(steps, spacing)` (default: the config's spacing, Eq. 13)."""
        times = flow.decode_times(steps, spacing or model.config.time_spacing)
        return flow.euler_sample(lambda x_t, t: model.velocity(x_t, t, z), noise, times, model.config.gamma)


@functools.lru_cache(maxsize=4)
def _ddpm_schedule(num_steps: int):
    from generator import diffusion  # the DDPM math lives with the DiT; only this baseline needs it here

    return diffusion.linear_beta_schedule(num_steps)


class EpsilonObjective:
    """DDPM ε-prediction (Table 4 baseline): x_t = √ᾱ·x + √(1-ᾱ)·ε on the linear-β grid; the network sees
    t = step / T and predicts ε."""

    name = "epsilon"
    iterative = True
    regression_term = "score"

    def sample_time(self, model: "EpsVAE", batch: int, device: torch.device | str) -> torch.Tensor:
        """t = step / T for a step uniform over {0..T-1}, so loss buckets and logging share flow's [0, 1)."""
        num_steps = model.config.ddpm_num_steps
        return torch.randint(0, num_steps, (batch,), device=device).float() / num_steps

    def training_outputs(self, model: "EpsVAE", images: torch.Tensor, z: torch.Tensor, kl: torch.Tensor,
                         noise: torch.Tensor, t: torch.Tensor) -> TrainingOutputs:
        from generator import diffusion

        num_steps = model.config.ddpm_num_steps
        schedule = _ddpm_schedule(num_steps)
        steps = (t * num_steps).round().long().clamp_(0, num_steps - 1)  # (B,)
        x_t = diffusion.q_sample(schedule, images, steps, noise).to(images.dtype)  # (B, 3, H, W)
        prediction = model.velocity(x_t, steps.float() / num_steps, z)
        x_hat = diffusion.predict_x_start(schedule, x_t, steps, prediction)
        # A DDPM x_t already has near-unit variance: the discriminator sees it unscaled, as the network does.
        return TrainingOutputs(x_hat=x_hat, kl=kl, prediction=prediction, target=noise, x_t=x_t)

    def regression_loss(self, outputs: TrainingOutputs, images: torch.Tensor, reconstruction: str) -> torch.Tensor:
        return losses.velocity_loss(outputs.prediction, outputs.target)  # ε-MSE, (B,)

    def decode(self, model: "EpsVAE", z: torch.Tensor, noise: torch.Tensor, steps: int, generator: Generators,
               spacing: str | None) -> torch.Tensor:
        """Ancestral DDPM on the linear-β schedule respaced to `steps`; x̂0 clipped at every step (ADM)."""
        from generator import diffusion

        num_steps = model.config.ddpm_num_steps
        schedule = diffusion.respace(_ddpm_schedule(num_steps), str(steps))

        def model_fn(x_t: torch.Tensor, original_steps: torch.Tensor) -> torch.Tensor:
            return model.velocity(x_t, original_steps.float() / num_steps, z)

        return diffusion.ddpm_sample(model_fn, schedule, noise, generator=generator, clip_denoised=True)


class ReconstructionObjective:
    """The baseline VAE: G(z) in one pass, trained with L1/L2 against the images (Eq. 1)."""

    name = "reconstruction"
    iterative = False  # one deterministic pass: the decode-step count and the generator change nothing
    regression_term = "rec"

    def sample_time(self, model: "VAE", batch: int, device: torch.device | str) -> torch.Tensor:
        return torch.zeros(batch, device=device)

    def training_outputs(self, model: "VAE", images: torch.Tensor, z: torch.Tensor, kl: torch.Tensor,
                         noise: torch.Tensor, t: torch.Tensor) -> TrainingOutputs:
        return TrainingOutputs(x_hat=model.decoder(z), kl=kl)  # (B, 3, H, W), unclamped

    def regression_loss(self, outputs: TrainingOutputs, images: torch.Tensor, reconstruction: str) -> torch.Tensor:
        return losses.reconstruction_loss(outputs.x_hat, images, reconstruction)  # (B,)

    def decode(self, model: "VAE", z: torch.Tensor, noise: torch.Tensor | None, steps: int, generator: Generators,
               spacing: str | None) -> torch.Tensor:
        return model.decoder(z)


OBJECTIVES: dict[str, Objective] = {
    "velocity": VelocityObjective(),
    "epsilon": EpsilonObjective(),
    "reconstruction": ReconstructionObjective(),
}
