"""Evaluation jobs. `evaluate_reconstruction`: rFID (or rFD-EffNetL0 offline), PSNR, SSIM and perceptual
distance of a tokenizer on a validation set, at several decode step counts and resolutions (paper Tables 1, 2, 7).

Decoding noise comes from one generator per image seeded with `seed + index`, so the numbers do not depend on
batch size. Real-image statistics are computed once per resolution and reused for every step count.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from pipelines.kit.metrics import FeatureStats, build_feature_extractor, frechet_distance, psnr, ssim, to_uint8
from tokenizer import EpsVAE, load_tokenizer


@dataclass(frozen=True)
class ReconstructionEvalConfig:
    tokenizer: str
    data: str = "offline"
    split: str = "val"
    resolution: int = 128
    resolution_multipliers: tuple[int, ...] = (1, 2)  # 2× = resolution generalisation (Table 1)
    decode_steps: tuple[int, ...] = (1, 2, 3)
    features: str = "inception"  # "inception" → rFID; "effnet-l0" → rFD-EffNetL0 (offline)
    feature_weights: str | None = None
    perceptual: str = "lpips-vgg"
    perceptual_weights: str | None = None
    num_images: int | None = None  # None: the whole split
    batch_size: int = 32
    seed: int = 0
    use_ema: bool = False  # save_pretrained already stores EMA weights as the default
    precision: str = "no"
    device: str | None = None
    num_workers: int = 2
    output: str | None = None  # JSON path; a .md table is written beside it

    def __post_init__(self) -> None:
        for name in ("resolution_multipliers", "decode_steps"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if any(s < 1 for s in self.decode_steps):
            raise ValueError(f"decode steps must be >= 1, got {self.decode_steps}")
        if self.resolution < 8 or self.batch_size < 1 or any(m < 1 for m in self.resolution_multipliers):
            raise ValueError("resolution, batch size and resolution multipliers must be positive")


@dataclass
class ReconstructionRow:
    resolution: int
    decode_steps: int | None  # None for the single-step baseline VAE
    psnr: float
    ssim: float
    perceptual: float | None
    rfd: float
    num_images: int


@dataclass
class ReconstructionReport:
    tokenizer: str
    model_type: str
    fd_label: str  # "rFID" or "rFD-EffNetL0"
    perceptual_label: str | None
    rows: list[ReconstructionRow] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def markdown(self) -> str:
        perceptual = self.perceptual_label or "perceptual"
        lines = [f"| resolution | decode steps | {self.fd_label} ↓ | PSNR ↑ | SSIM ↑ | {perceptual} ↓ | images |",
                 "|---|---|---|---|---|---|---|"]
        for row in self.rows:
            p = "–" if row.perceptual is None else f"{row.perceptual:.4f}"
            steps = "–" if row.decode_steps is None else str(row.decode_steps)
            lines.append(f"| {row.resolution} | {steps} | {row.rfd:.3f} | {row.psnr:.2f} | {row.ssim:.4f} | {p} "
                         f"| {row.num_images} |")
        return "\n".join(lines) + "\n"


def _pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _autocast(device: torch.device, precision: str):
    if precision == "no":
        return torch.autocast(device.type, enabled=False)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def reconstruct(tokenizer, images: torch.Tensor, steps: int | None, first_index: int, seed: int) -> torch.Tensor:
    """Encode with the posterior mean and decode; ε-VAE noise from per-image generators (seed + index)."""
    z = tokenizer.encode(images, sample=False)
    if not isinstance(tokenizer, EpsVAE):
        return tokenizer.decode(z)
    generators = [torch.Generator(device=images.device).manual_seed(seed + first_index + i)
                  for i in range(images.shape[0])]
    return tokenizer.decode(z, steps=steps, generator=generators)


def evaluate_reconstruction(config: ReconstructionEvalConfig) -> ReconstructionReport:
    from data.sources import build_image_dataset
    from tokenizer.perceptual import build_perceptual

    started = time.monotonic()
    device = _pick_device(config.device)
    # Fail on missing metric weights before loading data or models.
    extractor = build_feature_extractor(config.features, config.feature_weights, device=device)
    perceptual = build_perceptual(config.perceptual, config.perceptual_weights).to(device) \
        if config.perceptual != "none" else None
    tokenizer = load_tokenizer(config.tokenizer, use_ema=config.use_ema).to(device).eval()
    is_eps = isinstance(tokenizer, EpsVAE)
    report = ReconstructionReport(
        tokenizer=str(config.tokenizer), model_type="eps_vae" if is_eps else "vae",
        fd_label="rFID" if extractor.name == "FID" else "r" + extractor.name,
        perceptual_label=config.perceptual if perceptual is not None else None,
    )
    step_counts: list[int | None] = list(config.decode_steps) if is_eps else [None]

    for multiplier in config.resolution_multipliers:
        resolution = config.resolution * multiplier
        dataset = build_image_dataset(config.data, split=config.split, resolution=resolution, train=False)
        if config.num_images is not None and hasattr(dataset, "__len__"):
            dataset = Subset(dataset, range(min(config.num_images, len(dataset))))
        loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=False, num_workers=config.num_workers)
        real_stats = None
        per_steps = {s: {"psnr": [], "ssim": [], "perceptual": [], "stats": None} for s in step_counts}
        progress = tqdm(loader, desc=f"recon {resolution}px", unit="batch")
        seen = 0
        for images, _labels in progress:
            images = images.to(device)
            real_u8 = to_uint8(images)
            real_features = extractor(real_u8)["pool"]
            if real_stats is None:
                real_stats = FeatureStats(real_features.shape[1])
            real_stats.update(real_features)
            for steps in step_counts:
                with _autocast(device, config.precision):
                    recon = reconstruct(tokenizer, images, steps, seen, config.seed).float()
                recon_u8 = to_uint8(recon)
                bucket = per_steps[steps]
                bucket["psnr"].append(psnr(real_u8, recon_u8))
                bucket["ssim"].append(ssim(real_u8, recon_u8))
                if perceptual is not None:
                    with torch.no_grad():
                        bucket["perceptual"].append(perceptual(recon_u8.float() / 127.5 - 1, real_u8.float() / 127.5 - 1).cpu())
                features = extractor(recon_u8)["pool"]
                if bucket["stats"] is None:
                    bucket["stats"] = FeatureStats(features.shape[1])
                bucket["stats"].update(features)
            seen += images.shape[0]
        if seen < 2:
            raise ValueError(f"the {config.split} split of {config.data!r} has {seen} images at {resolution}px; "
                             "need at least 2 for a Fréchet distance")
        mu_real, sigma_real = real_stats.mean_cov()
        for steps in step_counts:
            bucket = per_steps[steps]
            mu, sigma = bucket["stats"].mean_cov()
            report.rows.append(ReconstructionRow(
                resolution=resolution, decode_steps=steps,
                psnr=float(torch.cat(bucket["psnr"]).mean()), ssim=float(torch.cat(bucket["ssim"]).mean()),
                perceptual=float(torch.cat(bucket["perceptual"]).mean()) if bucket["perceptual"] else None,
                rfd=frechet_distance(mu_real, sigma_real, mu, sigma), num_images=seen,
            ))
    report.seconds = time.monotonic() - started
    if config.output:
        write_report(report, Path(config.output))
    return report


def write_report(report: ReconstructionReport, json_path: Path) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report.to_dict(), indent=2))
    json_path.with_suffix(".md").write_text(report.markdown())
