"""Tokenizer losses (paper Eq. 1, 9, 10, 12), as small callables beside the networks.

Each returns a per-sample tensor (B,) or a scalar as documented, so training code can weight, average and
log them (e.g. by time quartile) without reaching into the networks.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)  # (B,)


def velocity_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Score/velocity matching ‖G(x_t, t, z) − (ε − γ·x)‖² (Eq. 9), mean over pixels: (B,)."""
    return _per_sample_mean((prediction.float() - target.float()) ** 2)


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """The baseline VAE's L_rec (Eq. 1): L1 or L2 per sample, (B,)."""
    difference = reconstruction.float() - target.float()
    if kind == "l1":
        return _per_sample_mean(difference.abs())
    if kind == "l2":
        return _per_sample_mean(difference**2)
    raise ValueError(f"unknown reconstruction loss {kind!r}; choose 'l1' or 'l2'")


KL_NORMALIZATIONS = ("pixels", "sum")


def kl_loss(kl_sum: torch.Tensor, images: torch.Tensor, normalization: str = "pixels") -> torch.Tensor:
    """The KL term of Eq. 1 from the posterior's KL summed over latent dims (B,), on the score loss's scale: (B,).

    "pixels": divided by the number of image values 3·H·W. The SD/LDM recipe that kl_weight = 1e-6 comes from
    (latent-diffusion's LPIPSWithDiscriminator) *sums* its reconstruction term over the 3·H·W image values and
    adds 1e-6·ΣKL; our score/reconstruction losses are *means* over those values, so dividing that whole loss
    by 3·H·W gives mean_rec + 1e-6·ΣKL/(3·H·W): the same balance, and a KL strength that does not depend on the
    image size. "sum": the summed KL as it is (models trained before this convention): 3·H·W times stronger
    than the LDM recipe (≈4.9·10⁴ at 128², ≈2·10⁵ at 256²) and growing with the resolution.
    """
    if normalization == "pixels":
        return kl_sum / images[0].numel()
    if normalization == "sum":
        return kl_sum
    raise ValueError(f"unknown KL normalization {normalization!r}; choose from {KL_NORMALIZATIONS}")


def trajectory_pair(x_start: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """Discriminator input for trajectory matching (Eq. 11-12): the start point next to x_t, (B, 6, H, W)."""
    return torch.cat([x_start, x_t], dim=1)


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss −log D(fake) = softplus(−logit), mean over patches: (B,)."""
    return _per_sample_mean(F.softplus(-fake_logits.float()))


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """−log D(real) − log(1 − D(fake)) (Eq. 12 from the discriminator's side), scalar."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def r1_from_logits(real_logits: torch.Tensor, real_inputs: torch.Tensor) -> torch.Tensor:
    """R1 = E‖∇_x D(x)‖² (Mescheder et al. 2018) of the per-image logit, scalar, differentiable for the D update.

    A PatchGAN's per-image logit is the mean of its patch logits (what the loss averages), as StyleGAN's scalar
    D. Summing the patches instead scales the penalty by patches² (about 4e4 at 64²), which holds a fresh
    discriminator flat for good (measured: real and fake logits equal after 450 steps).
    """
    per_image = real_logits.float().flatten(1).mean(dim=1)  # (B,)
    (gradient,) = torch.autograd.grad(per_image.sum(), real_inputs, create_graph=True)
    return gradient.pow(2).flatten(1).sum(dim=1).mean()


def r1_penalty(
    discriminator: Callable[..., torch.Tensor], real_inputs: torch.Tensor, *disc_args, **disc_kwargs
) -> torch.Tensor:
    """`r1_from_logits` for a discriminator called on the real inputs alone.

    Only the discriminator's input image gets a gradient penalty; time or other conditioning args are passed
    through unchanged.
    """
    real_inputs = real_inputs.detach().requires_grad_(True)
    return r1_from_logits(discriminator(real_inputs, *disc_args, **disc_kwargs), real_inputs)
