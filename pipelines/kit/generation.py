"""Class ids → images, for every job that generates: DiT latents by ancestral DDPM, then the tokenizer's decoder.

    pipeline = GenerationPipeline.from_pretrained("runs/dit/model", "runs/tok/model", device="cuda")
    images = pipeline([207, 360], generator=0, output_type="pil")       # or class names

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
from typing import Any, Sequence

import numpy as np
import torch

from generator.diffusion import DiffusionSchedule, classifier_free_guidance, ddpm_sample, linear_beta_schedule, respace
from generator.dit import DiT, DiTConfig, load_config
from pipelines.kit.precision import autocast
from tokenizer.image_io import to_output
from tokenizer.tiling import tiled_decode

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
    precision: str = "auto",
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
    if config.unconditional:
        if labels.numel() == 0 or bool((labels != dit.null_class).any()):
            raise ValueError(f"an unconditional DiT takes only null labels ({dit.null_class}), got {labels.tolist()[:8]}")
        if cfg_scale != 1.0:
            raise ValueError("classifier-free guidance needs a class-conditional DiT; this one is unconditional")
    elif labels.numel() == 0 or labels.min() < 0 or labels.max() >= config.num_classes:
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
    """What a generator folder says about the latents it was trained on.

    A folder written by this version carries it in its config (`class_names`, `tokenizer_fingerprint`,
    `downsample`, `image_size`, `latent_mean`/`latent_std`), so a copy works anywhere. Folders of format 1 only
    pointed to their shard manifest through `training.json["shards"]`; that path is followed as a fallback (best
    effort, never raises). Returns a flat dict with whichever of `tokenizer_weights_sha256`, `downsample`,
    `resolution`, `latent_mean`, `latent_std`, `class_names` could be found.
    """
    found = _legacy_provenance(Path(generator_dir))
    try:
        config = load_config(generator_dir)
    except (OSError, ValueError):
        return found
    recorded = {"class_names": list(config.class_names) if config.class_names else None,
                "tokenizer_weights_sha256": config.tokenizer_fingerprint, "downsample": config.downsample,
                "resolution": config.image_size}
    found.update({key: value for key, value in recorded.items() if value is not None})
    return found


def _legacy_provenance(generator_dir: Path) -> dict[str, Any]:
    """Format 1: follow training.json's recorded shard path to the manifest (relative paths resolve from the
    current directory, which is why format 2 records everything in the config)."""
    found: dict[str, Any] = {}
    training = _read_json(generator_dir / "training.json")
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
# The pipeline
# ---------------------------------------------------------------------------------------------------------------


def class_ids(items: Sequence[int | str], num_classes: int, class_names: Sequence[str] | None = None) -> list[int]:
    """Class ids from ids and/or class names (the CLI's `--classes` and the pipeline's `classes`); one-line
    errors for an unknown name or an id out of range."""
    by_name = {name: index for index, name in enumerate(class_names or [])}
    ids = []
    for item in items:
        token = item.strip() if isinstance(item, str) else item
        if token in by_name:
            ids.append(by_name[token])
            continue
        try:
            value = int(token)
        except (TypeError, ValueError):
            known = f" or one of the names {list(by_name)[:5]}…" if by_name else ""
            raise ValueError(f"unknown class {token!r}: expected an id in [0, {num_classes}){known}") from None
        if not 0 <= value < num_classes:
            raise ValueError(f"class {value} is out of range: the generator has classes 0..{num_classes - 1}")
        ids.append(value)
    return ids


GeneratorSpec = int | torch.Generator | Sequence[torch.Generator] | None


def per_image_generators(spec: GeneratorSpec, count: int, device: torch.device | str) -> list[torch.Generator]:
    """One generator per image from what a caller passed: an int seed (image i gets seed + i, as the CLI's
    `--seed`), one generator (per-image seeds drawn from it), a list of `count` generators (used as is), or None
    (fresh random seeds)."""
    if isinstance(spec, (list, tuple)):
        if len(spec) != count:
            raise ValueError(f"got {len(spec)} generators for {count} images")
        return list(spec)
    if spec is None or isinstance(spec, torch.Generator):
        seeds = torch.randint(0, 2**62, (count,), generator=spec, device=spec.device if spec is not None else "cpu")
        return make_generators(seeds.tolist(), device)
    if isinstance(spec, int) and not isinstance(spec, bool):
        return make_generators(range(spec, spec + count), device)
    raise ValueError(f"generator must be None, an int seed, a torch.Generator or a list of them, got {type(spec)}")


class GenerationPipeline:
    """A DiT and the tokenizer whose latents it was trained on: class ids or names in, images out.

        pipe = GenerationPipeline.from_pretrained("runs/dit/model", "runs/tok/model")   # or Hub ids
        images = pipe(["golden retriever", 207], num_images_per_class=2, generator=0, output_type="pil")
    """

    def __init__(self, dit: DiT, tokenizer, class_names: Sequence[str] | None = None,
                 diffusion_steps: int = DIFFUSION_STEPS):
        if tokenizer.latent_channels != dit.config.in_channels:
            raise ValueError(f"DiT expects {dit.config.in_channels} latent channels, the tokenizer gives "
                             f"{tokenizer.latent_channels}")
        self.dit = dit.eval().requires_grad_(False)
        self.tokenizer = tokenizer.eval().requires_grad_(False)
        names = class_names or dit.config.class_names
        self.class_names = list(names) if names else None
        self.diffusion_steps = diffusion_steps

    @classmethod
    def from_pretrained(
        cls,
        generator: str | os.PathLike,
        tokenizer: str | os.PathLike,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        weights: str = "ema",
        tokenizer_weights: str = "ema",
        allow_tokenizer_mismatch: bool = False,
        use_ema: bool | None = None,
        tokenizer_use_ema: bool | None = None,
    ) -> "GenerationPipeline":
        """Load a generator and a tokenizer (local folders or Hub ids) and refuse a pair that does not match
        (`check_compatible`: latent shape, normalisation, and the tokenizer weights the DiT was trained on);
        one-line errors. `device` defaults to the first CUDA device when there is one."""
        from pipelines.kit.precision import pick_device
        from tokenizer import load_tokenizer
        from tokenizer.models import weights_fingerprint
        from tokenizer.pretrained import resolve_model_dir

        device = pick_device(None if device is None else str(device))
        generator_dir = resolve_model_dir(generator, "DiT")
        dit_config = load_config(generator_dir)  # cheap checks first: missing / corrupt config.json
        tokenizer_dir = resolve_model_dir(tokenizer, "tokenizer")
        tokenizer_model = load_tokenizer(tokenizer_dir, weights=tokenizer_weights, use_ema=tokenizer_use_ema)
        provenance = read_provenance(generator_dir)
        trained_on = provenance.get("tokenizer_weights_sha256")
        sha = weights_fingerprint(tokenizer_dir, tokenizer_use_ema, tokenizer_weights) if trained_on else None
        check_compatible(dit_config, tokenizer_model.latent_channels, tokenizer_model.downsample, provenance,
                         str(generator), str(tokenizer), sha, allow_tokenizer_mismatch)
        dit = DiT.from_pretrained(generator_dir, weights=weights, device=device, dtype=dtype, use_ema=use_ema)
        return cls(dit, tokenizer_model.to(device), provenance.get("class_names"))

    @property
    def device(self) -> torch.device:
        return next(self.dit.parameters()).device

    @property
    def num_classes(self) -> int:
        return self.dit.config.num_classes

    @property
    def image_size(self) -> int:
        return self.dit.config.input_size * self.tokenizer.downsample

    def class_ids(self, classes: int | str | Sequence[int | str]) -> list[int]:
        """Class ids from ids and/or names (names need the folder's class names); one-line error otherwise."""
        items = [classes] if isinstance(classes, (int, str)) else list(classes)
        return class_ids(items, self.num_classes, self.class_names)

    @torch.no_grad()
    def sample_latents(
        self,
        labels: torch.Tensor,
        generators: Sequence[torch.Generator],
        ddpm_steps: int | str = 250,
        cfg_scale: float = 1.0,
        variance: str = "fixed_large",
        precision: str = "auto",
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
        decode_steps: int | None = None,
        tile: int | None = None,
        tile_overlap: int = 4,
        precision: str = "auto",
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
        classes: int | str | Sequence[int | str] | torch.Tensor | None,
        generator: GeneratorSpec = None,
        *,
        num_images_per_class: int = 1,
        ddpm_steps: int | str = 250,
        decode_steps: int | None = None,
        cfg_scale: float = 1.0,
        variance: str = "fixed_large",
        tile: int | None = None,
        tile_overlap: int = 4,
        precision: str = "auto",
        output_type: str = "pt",
        progress: bool = False,
    ):
        """Classes (ids or names) → images, `num_images_per_class` of each, in class order.

        generator: an int seed (image i gets seed + i: the same images as `scripts/sample.py --seed`), one
        torch.Generator, one per image, or None (random). decode_steps: None = the paper's 3 (ε-VAE only).
        output_type: "pt" uint8 tensor (B, 3, H, W), "np" uint8 array (B, H, W, 3), "pil" list of PIL images.
        """
        if isinstance(classes, torch.Tensor):
            classes = classes.flatten().tolist()
        if num_images_per_class < 1:
            raise ValueError(f"num_images_per_class must be >= 1, got {num_images_per_class}")
        if self.dit.config.unconditional:  # no classes: images of the null label (its id, 0, may be listed)
            null = self.dit.null_class
            nulls = [null] if classes is None else ([classes] if isinstance(classes, (int, str)) else list(classes))
            if any(str(item) != str(null) for item in nulls):
                raise ValueError("this DiT is unconditional: pass classes=None and the count as num_images_per_class")
            labels = [null for _ in nulls for _ in range(num_images_per_class)]
        else:
            labels = [label for label in self.class_ids(classes) for _ in range(num_images_per_class)]
        generators = per_image_generators(generator, len(labels), self.device)
        latents = self.sample_latents(torch.tensor(labels), generators, ddpm_steps, cfg_scale, variance, precision,
                                      progress)
        return to_output(self.decode(latents, generators, decode_steps, tile, tile_overlap, precision), output_type)
