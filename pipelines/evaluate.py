"""Evaluation jobs. `evaluate_reconstruction`: rFID (or rFD-EffNetL0 offline), PSNR, SSIM and perceptual
distance of a tokenizer on a validation set, at several decode step counts and resolutions (paper Tables 1, 2, 7).

The measuring is `pipelines.kit.reconstruction`'s (`score_batch`, `ScoreTotals`, as `evaluate_reconstructions`
does it): decoding noise comes from one generator per image seeded with `seed + index`, so the numbers do not
depend on batch size, and real-image statistics are computed once per resolution and reused for every step count.
Under `accelerate launch` the batches are dealt to the processes and the main one adds up their scores in image
order: the same numbers as one process.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from pipelines.kit.metrics import build_feature_extractor, dataset_batches, evaluation_state, map_in_order
from pipelines.kit.precision import check_precision
from pipelines.kit.reconstruction import BatchScores, DecodeSetting, ScoreTotals, decode_settings, score_batch
from tokenizer import load_tokenizer


@dataclass(frozen=True)
class ReconstructionEvalConfig:
    tokenizer: str  # ε-VAE / VAE save_pretrained folder or Hub id
    data: str = "offline"  # offline | ImageNet-style folder | webdataset shards (data.sources.build_image_dataset)
    split: str = "val"  # split of the data source
    resolution: int = 128  # image side at 1× (the training resolution)
    resolution_multipliers: tuple[int, ...] = (1, 2)  # 2× = resolution generalisation (Table 1)
    decode_steps: tuple[int, ...] = (1, 2, 3)
    features: str = "inception"  # "inception" → rFID; "effnet-l0" → rFD-EffNetL0 (offline)
    feature_weights: str | None = None
    perceptual: str = "lpips-vgg"  # network of the LPIPS-style score
    perceptual_weights: str | None = None  # weights file of the perceptual network (default: its package's cache)
    num_images: int | None = None  # None: the whole split
    batch_size: int = 32
    seed: int = 0  # seed of the decoder noise (same images, same numbers)
    use_ema: bool = False  # save_pretrained already stores EMA weights as the default
    precision: str = "auto"  # encode/decode autocast: auto | fp32 | bf16 | fp16; every score is fp32/64
    device: str | None = None
    num_workers: int = 2  # DataLoader worker processes
    output: str | None = None  # JSON path; a .md table is written beside it

    def __post_init__(self) -> None:
        for name in ("resolution_multipliers", "decode_steps"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if any(s < 1 for s in self.decode_steps):
            raise ValueError(f"decode steps must be >= 1, got {self.decode_steps}")
        if self.resolution < 8 or self.batch_size < 1 or any(m < 1 for m in self.resolution_multipliers):
            raise ValueError("resolution, batch size and resolution multipliers must be positive")
        check_precision(self.precision)


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


def evaluate_reconstruction(config: ReconstructionEvalConfig) -> ReconstructionReport | None:
    """The report on the main process (None on the others). Under `accelerate launch` the images are split into
    batches of `batch_size` consecutive indices, dealt round-robin to the processes; each scores its batches
    (`score_batch`, image i decoded with seed `seed + i`) and the main process adds them up in index order
    (`ScoreTotals`), so every number is the one a single process with the same batch size gives."""
    from data.sources import build_image_dataset, resolve_source
    from tokenizer.perceptual import build_perceptual

    started = time.monotonic()
    state, device = evaluation_state(config.device)
    # Cheap checks first (the model folder, the data source, the sizes), then the metric networks' weights.
    tokenizer = load_tokenizer(config.tokenizer, use_ema=config.use_ema).to(device).eval()
    resolve_source(config.data)
    for multiplier in config.resolution_multipliers:
        if config.resolution * multiplier % tokenizer.downsample:
            raise ValueError(f"resolution {config.resolution * multiplier} is not divisible by the tokenizer's "
                             f"downsample factor {tokenizer.downsample}")
    extractor = build_feature_extractor(config.features, config.feature_weights, device=device)
    perceptual = build_perceptual(config.perceptual, config.perceptual_weights).to(device) \
        if config.perceptual != "none" else None
    report = ReconstructionReport(
        tokenizer=str(config.tokenizer), model_type=tokenizer.model_type,
        fd_label="rFID" if extractor.name == "FID" else "r" + extractor.name,
        perceptual_label=config.perceptual if perceptual is not None else None,
    )
    settings = decode_settings(tokenizer, [DecodeSetting(steps) for steps in config.decode_steps])

    for multiplier in config.resolution_multipliers:
        resolution = config.resolution * multiplier
        resolution_started = time.monotonic()
        dataset = build_image_dataset(config.data, split=config.split, resolution=resolution, train=False)
        total = min(len(dataset), config.num_images or len(dataset)) if hasattr(dataset, "__len__") \
            else config.num_images  # a stream's length is unknown
        batches = dataset_batches(dataset, config.batch_size, config.num_workers, config.num_images, state)
        totals = ScoreTotals(settings)

        def score(batch: tuple[int, Any]) -> BatchScores:
            first_index, load = batch
            return score_batch(tokenizer, load(), first_index, settings, extractor, perceptual, device=device,
                               precision=config.precision, seed=config.seed)

        with tqdm(total=total, desc=f"recon {resolution}px", unit="img", disable=not state.is_main_process) as bar:
            for scores in map_in_order(score, batches, state):
                totals.add(scores)
                bar.update(scores.num_images)
        if not state.is_main_process:
            continue
        result = totals.result(f"the {config.split} split of {config.data!r} at {resolution}px")
        report.rows += [ReconstructionRow(
            resolution=resolution, decode_steps=m.setting.steps, psnr=m.psnr, ssim=m.ssim,
            perceptual=m.perceptual, rfd=m.rfd, num_images=m.num_images,
        ) for m in result.metrics]
        print(f"recon {resolution}px: {totals.seen} images x {len(settings)} decode setting(s) on "
              f"{state.num_processes} process(es) in {time.monotonic() - resolution_started:.1f} s", file=sys.stderr)
    if not state.is_main_process:
        return None
    report.seconds = time.monotonic() - started
    if config.output:
        write_report(report, Path(config.output))
    return report


def write_report(report: ReconstructionReport, json_path: Path) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report.to_dict(), indent=2))
    json_path.with_suffix(".md").write_text(report.markdown())
