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
from dataclasses import dataclass
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
class SettingScores:
    """Per-image scores of one batch under one decode setting."""

    psnr: torch.Tensor  # (B,) float64
    ssim: torch.Tensor  # (B,) float64
    perceptual: torch.Tensor | None  # (B,) float32, None without a perceptual network
    features: torch.Tensor  # (B, D) float64 on the CPU: the reconstructions' features
    seconds: float  # decoding alone


@dataclass
class BatchScores:
    """What `score_batch` measures on one batch of consecutive images: small CPU tensors, so a process can send
    them to the main one, which adds them up in image order (`ScoreTotals`)."""

    num_images: int
    real: torch.Tensor | None  # (B, D) float64 features of the inputs; None when they were known already
    settings: list[SettingScores]  # in the order of `decode_settings`


class ScoreTotals:
    """Adds up `BatchScores` in image order: per-image scores kept, features reduced to `FeatureStats` batch by
    batch, so the numbers depend on the batches' contents and order only, not on which process scored them."""

    def __init__(self, settings: Sequence[DecodeSetting], real: FeatureStats | None = None):
        self.settings = list(settings)
        self.real, self.known_real = real, real is not None
        self.seen = 0
        self._scores: list[list[SettingScores]] = [[] for _ in self.settings]
        self._features: list[FeatureStats | None] = [None for _ in self.settings]

    def add(self, batch: BatchScores) -> None:
        if not self.known_real:
            self.real = _accumulate(self.real, batch.real)
        for index, scores in enumerate(batch.settings):
            self._scores[index].append(scores)
            self._features[index] = _accumulate(self._features[index], scores.features)
        self.seen += batch.num_images

    def result(self, source: str = "the evaluation data") -> ReconstructionResult:
        """Means and rFD of every setting; `source` names the data in the error raised for fewer than 2 images."""
        if self.seen < 2:
            raise ValueError(f"{source} has {self.seen} image(s); a Fréchet distance needs at least 2")
        metrics = []
        for setting, scores, features in zip(self.settings, self._scores, self._features):
            perceptual = [s.perceptual for s in scores if s.perceptual is not None]
            metrics.append(DecodeMetrics(
                setting=setting, psnr=float(torch.cat([s.psnr for s in scores]).mean()),
                ssim=float(torch.cat([s.ssim for s in scores]).mean()),
                perceptual=float(torch.cat(perceptual).mean()) if perceptual else None,
                rfd=frechet_distance_of_features(self.real, features), num_images=self.seen,
                decode_seconds=sum(s.seconds for s in scores)))
        return ReconstructionResult(real=self.real, metrics=metrics)


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
def score_batch(tokenizer, images: torch.Tensor, first_index: int, settings: Sequence[DecodeSetting], extractor,
                perceptual=None, *, device: torch.device | str, precision: str = "auto", seed: int = 0,
                with_real: bool = True) -> BatchScores:
    """Encode `images` (B, 3, H, W) in [-1, 1] (image `first_index` first) once, decode them under each of
    `settings` (already `decode_settings`) and score every image; see `evaluate_reconstructions`."""
    device = torch.device(device)
    images = images.to(device)  # (B, 3, H, W) in [-1, 1]
    real_u8 = to_uint8(images)
    real = extractor(real_u8)["pool"] if with_real else None  # (B, D) float64
    with autocast(device, precision):
        z = tokenizer.encode(images, sample=False)
    measured = []
    for setting in settings:
        synchronize(device)
        started = time.perf_counter()
        with autocast(device, precision):
            recon = decode(tokenizer, z, setting, first_index, seed)
        synchronize(device)
        seconds = time.perf_counter() - started
        recon_u8 = to_uint8(recon.float())
        distance = None if perceptual is None else \
            perceptual(recon_u8.float() / 127.5 - 1, real_u8.float() / 127.5 - 1).float().cpu()
        measured.append(SettingScores(psnr=psnr(real_u8, recon_u8).cpu(), ssim=ssim(real_u8, recon_u8).cpu(),
                                      perceptual=distance, features=extractor(recon_u8)["pool"], seconds=seconds))
    return BatchScores(num_images=images.shape[0], real=real, settings=measured)


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
    Several processes: `pipelines.evaluate` scores batches with `score_batch` on each and adds them up in
    image order on the main one (`ScoreTotals`), which gives the numbers of this one-process loop.
    """
    settings = decode_settings(tokenizer, settings)
    totals = ScoreTotals(settings, real)
    for images in batches:
        if max_images is not None and totals.seen >= max_images:
            break
        totals.add(score_batch(tokenizer, images, totals.seen, settings, extractor, perceptual, device=device,
                               precision=precision, seed=seed, with_real=real is None))
    return totals.result(source)


def _accumulate(stats: FeatureStats | None, features: torch.Tensor) -> FeatureStats:
    stats = stats if stats is not None else FeatureStats(features.shape[1])
    stats.update(features)
    return stats
