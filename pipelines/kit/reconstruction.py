"""The one reconstruction evaluator: PSNR, SSIM, perceptual distance and rFD of a tokenizer (paper Tables 1, 2, 4,
7). `pipelines.evaluate`, the tokenizer studies and the demo all measure through `evaluate_reconstructions`, so a
number means the same thing wherever it is reported.

    result = evaluate_reconstructions(tokenizer, batches, [DecodeSetting(1), DecodeSetting(3)], extractor,
                                      perceptual, device=device)
    result.metrics[0].rfd, result.metrics[0].decode_images_per_s

Images are encoded once with the posterior mean and decoded under each setting. Decoding noise comes from one
generator per image seeded `seed + index` (index = position in the stream), so the numbers do not depend on the
batch size (EDM's per-image seeds). A tokenizer whose objective is not iterative (the baseline VAE) decodes in
one deterministic pass, so its sweep collapses to the single setting `DecodeSetting()` (steps None).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from pipelines.kit.metrics import FeatureStats, frechet_distance_of_features, psnr, ssim, to_uint8
from pipelines.kit.precision import autocast


@dataclass(frozen=True)
class DecodeSetting:
    """How to decode: `steps` network evaluations (None: the tokenizer's default, DEFAULT_DECODE_STEPS) on the
    time grid `spacing` (None: the one in the tokenizer's config)."""

    steps: int | None = None
    spacing: str | None = None


@dataclass
class DecodeMetrics:
    """Means over the evaluated images of one decode setting; `rfd` against the inputs' features."""

    setting: DecodeSetting
    psnr: float
    ssim: float
    perceptual: float | None  # None without a perceptual network
    rfd: float
    num_images: int
    decode_seconds: float  # decoding alone (not encoding or scoring), summed over batches

    @property
    def decode_images_per_s(self) -> float:
        return self.num_images / max(self.decode_seconds, 1e-9)


@dataclass
class ReconstructionResult:
    real: FeatureStats  # the inputs' features: pass it back as `real` to score other models on the same images
    metrics: list[DecodeMetrics]  # one per distinct setting, in the order given


@dataclass
class _Scores:
    """Per-image scores of one setting, gathered batch by batch."""

    psnr: list[torch.Tensor] = field(default_factory=list)
    ssim: list[torch.Tensor] = field(default_factory=list)
    perceptual: list[torch.Tensor] = field(default_factory=list)
    features: FeatureStats | None = None
    seconds: float = 0.0


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work, so wall-clock timings measure the work and not its launch."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_settings(tokenizer, settings: Iterable[DecodeSetting]) -> list[DecodeSetting]:
    """The distinct settings worth decoding: each given one (order kept) for an iterative decoder, the single
    pass `DecodeSetting()` for one whose objective ignores steps and spacing."""
    if not tokenizer.objective.iterative:
        return [DecodeSetting()]
    return list(dict.fromkeys(settings))


def decode(tokenizer, z: torch.Tensor, setting: DecodeSetting, first_index: int = 0, seed: int = 0) -> torch.Tensor:
    """Latents (B, Z, h, w) → images (B, 3, H, W) in [-1, 1]; image i's noise is seeded `seed + first_index + i`."""
    generators = [torch.Generator(device=z.device).manual_seed(seed + first_index + i) for i in range(z.shape[0])]
    spacing = {} if setting.spacing is None else {"spacing": setting.spacing}  # only ε-VAE grids have a spacing
    return tokenizer.decode(z, steps=setting.steps, generator=generators, **spacing)


@torch.no_grad()
def reconstruct(tokenizer, images: torch.Tensor, setting: DecodeSetting = DecodeSetting(), first_index: int = 0,
                seed: int = 0) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] → their reconstructions through the posterior mean, same shape."""
    return decode(tokenizer, tokenizer.encode(images, sample=False), setting, first_index, seed)


@torch.no_grad()
def evaluate_reconstructions(
    tokenizer,
    batches: Iterable[torch.Tensor],
    settings: Sequence[DecodeSetting],
    extractor,
    perceptual=None,
    *,
    device: torch.device | str,
    precision: str = "auto",
    seed: int = 0,
    real: FeatureStats | None = None,
    max_images: int | None = None,
    source: str = "the evaluation data",
) -> ReconstructionResult:
    """Score `tokenizer`'s reconstructions of `batches` ((B, 3, H, W) in [-1, 1]) under every decode setting.

    extractor: a `pipelines.kit.metrics` feature network (uint8 → {"pool": (B, D) float64}), for the rFD.
    perceptual: a `tokenizer.perceptual` distance on [-1, 1] images, or None (then `perceptual` is None).
    precision: autocast of encoding and decoding (`pipelines.kit.precision`); every score is computed in fp32/64.
    real: the inputs' features from an earlier call on the same images (skips extracting them again).
    max_images: stop before the next batch once this many images were scored (streaming sources; map-style
    callers pass a subset instead). `source` names the data in the error raised for fewer than 2 images.
    """
    device = torch.device(device)
    settings = decode_settings(tokenizer, settings)
    scores = {setting: _Scores() for setting in settings}
    known_real = real is not None
    seen = 0
    for images in batches:
        if max_images is not None and seen >= max_images:
            break
        images = images.to(device)  # (B, 3, H, W) in [-1, 1]
        real_u8 = to_uint8(images)
        if not known_real:
            real = _accumulate(real, extractor(real_u8)["pool"])
        with autocast(device, precision):
            z = tokenizer.encode(images, sample=False)
        for setting in settings:
            synchronize(device)
            started = time.perf_counter()
            with autocast(device, precision):
                recon = decode(tokenizer, z, setting, seen, seed)
            synchronize(device)
            score = scores[setting]
            score.seconds += time.perf_counter() - started
            recon_u8 = to_uint8(recon.float())
            score.psnr.append(psnr(real_u8, recon_u8))
            score.ssim.append(ssim(real_u8, recon_u8))
            if perceptual is not None:
                score.perceptual.append(perceptual(recon_u8.float() / 127.5 - 1, real_u8.float() / 127.5 - 1)
                                        .float().cpu())
            score.features = _accumulate(score.features, extractor(recon_u8)["pool"])
        seen += images.shape[0]
    if seen < 2:
        raise ValueError(f"{source} has {seen} image(s); a Fréchet distance needs at least 2")
    metrics = [DecodeMetrics(
        setting=setting, psnr=float(torch.cat(score.psnr).mean()), ssim=float(torch.cat(score.ssim).mean()),
        perceptual=float(torch.cat(score.perceptual).mean()) if score.perceptual else None,
        rfd=frechet_distance_of_features(real, score.features), num_images=seen, decode_seconds=score.seconds,
    ) for setting, score in scores.items()]
    return ReconstructionResult(real=real, metrics=metrics)


def _accumulate(stats: FeatureStats | None, features: torch.Tensor) -> FeatureStats:
    stats = stats if stats is not None else FeatureStats(features.shape[1])
    stats.update(features)
    return stats
