"""Class ids → images, for every job that generates: DiT latents by ancestral DDPM, then the tokenizer's decoder.

    pipeline = GenerationPipeline.from_pretrained("runs/dit/model", "runs/tok/model", device="cuda")
    images = pipeline(labels, make_generators(seeds, device))  # uint8 (B, 3, H, W)

The DiT samples in the per-channel standardised latent space it was trained in (paper C.3: DDPM, linear β,
T=1000, 250 respaced steps, no CFG: `cfg_scale=1` is the default); `DiT.denormalize_latents` maps back with the
mean/std stored in its config, then the tokenizer decodes with `tokenizer.decode(z, steps, generator)` (ε-VAE:
1-3 Euler steps, Eq. 7 with the Eq. 13 time grid; the baseline VAE: one pass that ignores both).

Per-image seeds (EDM's `StackedRandomGenerator`): every image owns one `torch.Generator` seeded with its seed,
and that one stream draws, in this order, the DiT's initial noise x_T, the noise of every ancestral DDPM step
and the decoder's noise (ε-VAE's x_1, and its DDPM noise for the ε-parameterised baseline). So the same seed
list gives the same images whatever the batch size or the number of processes.

Training grids call `generate_latents` directly; `scripts/sample.py` (`pipelines.sample`) and the demo use the
whole `GenerationPipeline`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from generator.diffusion import DiffusionSchedule, classifier_free_guidance, ddpm_sample, linear_beta_schedule, respace
from generator.dit import DiT, DiTConfig, load_config
from pipelines.kit.metrics import to_uint8
from pipelines.kit.precision import autocast
from tokenizer import DEFAULT_DECODE_STEPS

DIFFUSION_STEPS = 1000  # T of the training process (paper C.3)


def sampling_schedule(num_steps: int | str, diffusion_steps: int = DIFFUSION_STEPS) -> DiffusionSchedule:
    """The training schedule (linear β, T steps) respaced to `num_steps` (ADM spacing: "250", "ddim50", ...)."""
    return respace(linear_beta_schedule(diffusion_steps), str(num_steps))


def make_generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per image (EDM-style per-image seeds)."""
    return [torch.Generator(device=torch.device(device)).manual_seed(int(seed)) for seed in seeds]


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
    precision: str = "no",
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
        with autocast(device, precision):  # the DiT in bf16 / fp16 if asked; the DDPM state stays float32
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


# ---------------------------------------------------------------------------------------------------------------
# Generator / tokenizer compatibility
# ---------------------------------------------------------------------------------------------------------------


def read_provenance(generator_dir: str | os.PathLike) -> dict[str, Any]:
    """What the generator directory says about the latents it was trained on (best effort, never raises).

    Stage-2 training writes `training.json` (with `shards` and `tokenizer_weights_sha256`); the shard
    `manifest.json` it points to holds the encoder's downsample factor, the source resolution, the latent
    mean/std and the class names. Returns a flat dict with whichever of `tokenizer_weights_sha256`,
    `downsample`, `resolution`, `latent_mean`, `latent_std`, `class_names` could be found.
    """
    found: dict[str, Any] = {}
    training = _read_json(Path(generator_dir) / "training.json")
    manifest: dict[str, Any] = {}
    if training.get("shards"):
        manifest = _read_json(Path(training["shards"]) / "manifest.json")
    if isinstance(manifest.get("encoder"), dict) and "downsample" in manifest["encoder"]:
        found["downsample"] = int(manifest["encoder"]["downsample"])
    if isinstance(manifest.get("source"), dict) and "resolution" in manifest["source"]:
        found["resolution"] = int(manifest["source"]["resolution"])
    for key in ("latent_mean", "latent_std", "class_names"):
        if key in manifest:
            found[key] = manifest[key]
    sha = training.get("tokenizer_weights_sha256") or (manifest.get("tokenizer") or {}).get("weights_sha256")
    if sha:
        found["tokenizer_weights_sha256"] = sha
    for key in ("class_names", "downsample"):  # stated in training.json itself wins over the manifest
        if key in training:
            found[key] = training[key]
    return found


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def check_compatible(
    dit_config: DiTConfig,
    latent_channels: int,
    downsample: int,
    provenance: dict[str, Any],
    generator_dir: str = "generator",
    tokenizer_dir: str = "tokenizer",
    tokenizer_sha256: str | None = None,
    allow_other_weights: bool = False,
) -> int:
    """Refuse a tokenizer whose latents are not the ones the DiT was trained on; returns the image size.

    Channels must equal the DiT's `in_channels`; where the training manifest is reachable its downsample
    factor must equal the tokenizer's (so `input_size × downsample` is the training resolution), its latent
    mean/std must be the ones stored in the DiT config (the normalisation the DiT learned), and its tokenizer
    weights hash must match unless `allow_other_weights` (e.g. a fine-tuned decoder on the same encoder).
    """
    size = dit_config.input_size
    trained_downsample = int(provenance.get("downsample", downsample))
    resolution = size * trained_downsample
    expected = (dit_config.in_channels, size, size)
    tokenizer_size = resolution // downsample if resolution % downsample == 0 else resolution / downsample
    got = (latent_channels, tokenizer_size, tokenizer_size)
    if expected != got or trained_downsample != downsample:
        raise ValueError(
            f"generator {generator_dir} was trained on latents of shape {expected} ({trained_downsample}x "
            f"downsampling of {resolution}px images) but tokenizer {tokenizer_dir} gives {got} "
            f"({latent_channels} channels, {downsample}x downsampling) at that resolution: not a matching pair")
    for key, stored in (("latent_mean", dit_config.latent_mean), ("latent_std", dit_config.latent_std)):
        manifest_value = provenance.get(key)
        if manifest_value is not None and stored is not None and not np.allclose(manifest_value, stored, rtol=1e-4):
            raise ValueError(f"generator {generator_dir} stores {key} {list(stored)} but its training shards say "
                             f"{list(manifest_value)}: the latent normalisation does not match")
    trained_sha = provenance.get("tokenizer_weights_sha256")
    if trained_sha and tokenizer_sha256 and trained_sha != tokenizer_sha256 and not allow_other_weights:
        raise ValueError(
            f"generator {generator_dir} was trained on latents of tokenizer weights sha256 {trained_sha[:12]}…, "
            f"tokenizer {tokenizer_dir} has {tokenizer_sha256[:12]}… (same shape {got}, but its latent "
            "normalisation may differ); pass --allow-tokenizer-mismatch to sample anyway")
    return resolution


# ---------------------------------------------------------------------------------------------------------------
# Tiled decoding
# ---------------------------------------------------------------------------------------------------------------


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` cells covering `length` cells, consecutive tiles sharing >= `overlap`."""
    if tile >= length:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, {tile}), got {overlap}")
    starts = list(range(0, length - tile, tile - overlap))
    return starts + [length - tile]


def _ramp(size: int, ramp: int, rising: bool, falling: bool, device: torch.device) -> torch.Tensor:
    """1-D blending weights: linear ramps of `ramp` pixels at the interior edges, strictly positive. (size,)"""
    weight = torch.ones(size, device=device, dtype=torch.float32)
    if ramp > 0:
        edge = (torch.arange(ramp, device=device, dtype=torch.float32) + 0.5) / ramp  # (0, 1)
        if rising:
            weight[:ramp] = torch.minimum(weight[:ramp], edge)
        if falling:
            weight[-ramp:] = torch.minimum(weight[-ramp:], edge.flip(0))
    return weight


def tiled_decode(
    decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, tile: int, overlap: int, downsample: int
) -> torch.Tensor:
    """Decode (B, C, h, w) latents as overlapping `tile`×`tile` latent tiles, each decoded independently, blended
    with linear ramps over the overlaps (normalised by the summed weights). Memory grows with the tile, not the
    image, which is what lets the attention layers of the U-Net decoder handle images above the training size.
    """
    _, _, height, width = z.shape
    rows, cols = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    if len(rows) == 1 and len(cols) == 1:
        return decode(z)
    ramp = overlap * downsample
    out: torch.Tensor | None = None
    total = torch.zeros(1, 1, height * downsample, width * downsample, device=z.device)
    for top in rows:
        for left in cols:
            piece = decode(z[:, :, top:top + tile, left:left + tile]).float()  # (B, 3, t·f, t·f)
            th, tw = piece.shape[-2:]
            wy = _ramp(th, ramp, top > 0, top + tile < height, z.device)
            wx = _ramp(tw, ramp, left > 0, left + tile < width, z.device)
            weight = (wy[:, None] * wx[None, :])[None, None]  # (1, 1, t·f, t·f)
            if out is None:
                out = torch.zeros(piece.shape[0], piece.shape[1], height * downsample, width * downsample,
                                  device=z.device)
            y, x = top * downsample, left * downsample
            out[:, :, y:y + th, x:x + tw] += weight * piece
            total[:, :, y:y + th, x:x + tw] += weight
    return out / total  # (B, 3, H, W)


# ---------------------------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------------------------


class GenerationPipeline:
    """A DiT and the tokenizer whose latents it was trained on; `__call__` turns class ids into uint8 images."""

    def __init__(self, dit: DiT, tokenizer, class_names: Sequence[str] | None = None,
                 diffusion_steps: int = DIFFUSION_STEPS):
        if tokenizer.latent_channels != dit.config.in_channels:
            raise ValueError(f"DiT expects {dit.config.in_channels} latent channels, the tokenizer gives "
                             f"{tokenizer.latent_channels}")
        self.dit = dit.eval().requires_grad_(False)
        self.tokenizer = tokenizer.eval().requires_grad_(False)
        self.class_names = list(class_names) if class_names else None
        self.diffusion_steps = diffusion_steps

    @classmethod
    def from_pretrained(
        cls,
        generator_dir: str | os.PathLike,
        tokenizer_dir: str | os.PathLike,
        device: torch.device | str = "cpu",
        use_ema: bool = False,
        tokenizer_use_ema: bool = False,
        allow_tokenizer_mismatch: bool = False,
    ) -> "GenerationPipeline":
        """Load both directories and refuse a pair that does not match (`check_compatible`); one-line errors."""
        from safetensors import SafetensorError

        from tokenizer import load_tokenizer
        from tokenizer.models import weights_fingerprint

        dit_config = load_config(generator_dir)  # cheap checks first: missing / corrupt config.json
        tokenizer = load_tokenizer(tokenizer_dir, use_ema=tokenizer_use_ema)  # unreadable weights: a ValueError
        provenance = read_provenance(generator_dir)
        trained_on = provenance.get("tokenizer_weights_sha256")
        sha = weights_fingerprint(tokenizer_dir, tokenizer_use_ema) if trained_on else None
        check_compatible(dit_config, tokenizer.latent_channels, tokenizer.downsample, provenance,
                         str(generator_dir), str(tokenizer_dir), sha, allow_tokenizer_mismatch)
        try:
            dit = DiT.from_pretrained(generator_dir, use_ema=use_ema, device=device)
        except SafetensorError as error:
            raise ValueError(f"cannot read the DiT weights in {generator_dir}: {error}") from None
        return cls(dit, tokenizer.to(device), provenance.get("class_names"))

    @property
    def device(self) -> torch.device:
        return next(self.dit.parameters()).device

    @property
    def num_classes(self) -> int:
        return self.dit.config.num_classes

    @property
    def image_size(self) -> int:
        return self.dit.config.input_size * self.tokenizer.downsample

    @torch.no_grad()
    def sample_latents(
        self,
        labels: torch.Tensor,
        generators: Sequence[torch.Generator],
        ddpm_steps: int | str = 250,
        cfg_scale: float = 1.0,
        variance: str = "fixed_large",
        precision: str = "no",
        progress: bool = False,
    ) -> torch.Tensor:
        """Tokenizer-space latents (B, C, h, w): x_T and every DDPM step's noise come from each image's generator."""
        return generate_latents(self.dit, labels, ddpm_steps, list(generators), cfg_scale=cfg_scale,
                                diffusion_steps=self.diffusion_steps, variance=variance, precision=precision,
                                progress=progress)  # (B, C, h, w)

    @torch.no_grad()
    def decode(
        self,
        latents: torch.Tensor,
        generators: Sequence[torch.Generator],
        decode_steps: int = DEFAULT_DECODE_STEPS,
        tile: int | None = None,
        tile_overlap: int = 4,
        precision: str = "no",
    ) -> torch.Tensor:
        """Latents (B, C, h, w) → images (B, 3, H, W) in [-1, 1]; decoder noise from the per-image generators."""

        def decode_fn(z: torch.Tensor) -> torch.Tensor:
            with autocast(self.device, precision):
                return self.tokenizer.decode(z, steps=decode_steps, generator=list(generators)).float()

        if tile is None:
            return decode_fn(latents)
        return tiled_decode(decode_fn, latents, tile, tile_overlap, self.tokenizer.downsample).clamp(-1, 1)

    def __call__(
        self,
        labels: torch.Tensor | Sequence[int],
        generators: Sequence[torch.Generator],
        ddpm_steps: int | str = 250,
        decode_steps: int = DEFAULT_DECODE_STEPS,
        cfg_scale: float = 1.0,
        variance: str = "fixed_large",
        tile: int | None = None,
        tile_overlap: int = 4,
        precision: str = "no",
        progress: bool = False,
    ) -> torch.Tensor:
        """Class ids (B,) → uint8 images (B, 3, H, W)."""
        latents = self.sample_latents(torch.as_tensor(labels), generators, ddpm_steps, cfg_scale, variance,
                                      precision, progress)
        return to_uint8(self.decode(latents, generators, decode_steps, tile, tile_overlap, precision))
