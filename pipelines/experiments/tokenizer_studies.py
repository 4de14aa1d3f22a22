"""Tokenizer benchmark studies: the paper's controlled comparisons, rerun at a chosen scale (project issue 9).

    run_study("ladder", "quick", "runs/bench")   →   runs/bench/ladder/{results.json, results.md, *.png}

| study         | paper                    | what varies (everything else is shared)                                |
|---------------|--------------------------|------------------------------------------------------------------------|
| `vae-vs-eps`  | Table 7                  | VAE vs ε-VAE decoder at ≥ 2 widths, grouped by comparable parameters    |
| `ladder`      | Table 4                  | the baseline → (a) … (g) design changes, one added per row              |
| `steps`       | Fig. 3 right             | decode steps 1-10 × uniform / reversed-log spacing (one trained model)  |
| `gamma`       | Fig. 3 middle            | noise scaling γ                                                        |
| `compression` | Fig. 2 middle / right    | latent channels and downsampling factor, VAE vs ε-VAE                  |
| `resolution`  | Table 1 (Table 7 †)      | evaluation resolution (trained at the profile's, evaluated at 1× / 2×) |

Every run of a study shares data, seed, crop size, encoder architecture (and its initial weights), number of
training steps, batch and optimiser; only the studied factor changes. Each evaluation reports rFD-EffNetL0,
PSNR, SSIM and the EffNet-L0 perceptual distance on held-out validation crops, plus decoder parameters, training
images/s and decode images/s. Profiles: `micro` (seconds, for tests), `quick` (each study under ~20 minutes on a
2-core CPU: tiny models, 64² crops, a per-run time cap), `full` (the paper's sizes, for GPUs).

Resumable: run `r` of study `s` lives in `<out>/s/runs/r/`; a finished run (its `result.json`) is reused, a
trained but unevaluated run is only evaluated, and training resumes from its newest checkpoint. Runs whose
training settings are identical (e.g. ladder rows (f) and (g), which differ only at inference) share one model.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pipelines.kit.metrics import FeatureStats
from pipelines.kit.reconstruction import DecodeSetting, evaluate_reconstructions
from pipelines.train_tokenizer import TokenizerTrainConfig
from tokenizer import DEFAULT_DECODE_STEPS
from tokenizer.encoder import ENCODER_PRESETS, EncoderConfig, multipliers_for_downsample
from tokenizer.models import EpsVAEConfig, VAEConfig
from tokenizer.nn import count_parameters
from tokenizer.unet import ADM_PRESETS, ADMConfig
from tokenizer.vae_decoder import VAE_DECODER_PRESETS, VAEDecoderConfig

FD_LABEL = "rFD-EffNetL0"
SPEC_FILE, RESULT_FILE = "spec.json", "result.json"


# ------------------------------------------------------------------------------------------------------ profiles
# What every run of a study trains with: each run then sets only its model, its loss weights and its paths
# (`_train_config`). Profiles override it; `study_training(lr=…)` sets the discriminator's lr along. `perceptual` is
# the training loss's network; the studies' *metric* is always EffNet-L0.
STUDY_TRAINING = TokenizerTrainConfig.from_flat(
    data="offline", discriminator="tiny", perceptual="effnet-l0", batch_size=16, num_workers=0, lr=2e-4, disc_lr=2e-4,
    adam_betas=(0.0, 0.999),  # the paper's (appendix C.2)
    warmup_steps=20, ema_decay=0.98, disc_start=0, max_steps=100, checkpoint_every=1000, keep_last=1, log_every=10,
    image_every=10**9, precision="auto", seed=0, resume="auto", cpu=False)


def study_training(lr: float | None = None, **values: Any) -> TokenizerTrainConfig:
    """STUDY_TRAINING with flat `values` replaced; `lr` is the generator's and the discriminator's."""
    if lr is not None:
        values.update(lr=lr, disc_lr=lr)
    return STUDY_TRAINING.override(**values)


@dataclass(frozen=True)
class StudyProfile:
    """Sizes, budgets and sweep values of one scale. Models are built from these configs directly (not from the
    preset names), so the CPU profiles can use widths the model registries do not carry. Training settings
    (resolution, batch, optimiser, perceptual net, steps, precision, seed, device) are one `TokenizerTrainConfig`,
    `training`; its `max_steps` is the same for every run of a study (with convergence_every: the most a run
    gets)."""

    encoder: EncoderConfig  # its downsample / latent_channels are the default compression setting
    eps_decoders: dict[str, ADMConfig]  # ε-VAE decoder widths by name
    vae_decoders: dict[str, VAEDecoderConfig]  # baseline VAE decoder widths by name
    decoder: str  # the ε-VAE decoder of the single-width studies
    vae_decoder: str  # the VAE decoder of compression / resolution
    width_groups: tuple[tuple[str, str], ...]  # (VAE width, ε-VAE width) pairs of comparable size (Table 7)
    training: TokenizerTrainConfig = STUDY_TRAINING
    # Velocity rows only (the DDPM baseline has no such option): "none" is the paper; "skip" lets a decoder
    # trained for a few hundred steps pass the noise through at t ≈ 1 instead of decoding noise.
    preconditioning: str = "none"
    # Train in segments of this many steps, scoring rFD after each (runs/<name>/convergence.json), and stop once
    # rFD moved by less than convergence_tolerance over the last quarter of the steps trained. None: one segment.
    convergence_every: int | None = None
    convergence_tolerance: float = 0.05
    # With convergence_every: train at least this many steps even once rFD has settled, so runs that settle at
    # different lengths can still be compared at one length (profile `long-equal`).
    min_steps: int = 0
    study_minutes: float | None = None  # wall budget of a study (see `time_cap_minutes`); None = no cap
    train_share: float = 0.7  # of the budget, for training; the rest is start-up and evaluation
    eval_images: int | None = 64  # balanced across classes; None = the whole validation split
    eval_batch: int = 32
    feature_size: int = 224  # EffNet-L0 input side for the FD (224 = its ImageNet size; micro shrinks it)
    decode_steps: int = DEFAULT_DECODE_STEPS  # headline NFE of ε-VAE rows (the paper's final setting, Table 4 (g))
    ladder_nfes: tuple[int, ...] = (1, 2, 3, 5, 10)
    ladder_rows: tuple[str, ...] | None = None  # None = all rows of LADDER
    saturation_tolerance: float = 0.05  # NFE where rFD is within 5% of the row's best (Table 4's NFE column)
    sweep_steps: tuple[int, ...] = (1, 2, 3, 5, 10)
    gammas: tuple[float, ...] = (0.4, 0.6, 0.8, 1.0)
    downsamples: tuple[int, ...] = (4, 8, 16)
    latent_channels: tuple[int, ...] = (4, 8, 16)
    resolution_multipliers: tuple[int, ...] = (1, 2)

    # The training settings the studies read, by their short names.
    resolution = property(lambda self: self.training.data.resolution)
    train_steps = property(lambda self: self.training.optim.max_steps)
    num_workers = property(lambda self: self.training.data.num_workers)
    precision = property(lambda self: self.training.run.precision)
    seed = property(lambda self: self.training.run.seed)
    # Force the CPU (gloo when several processes run under `accelerate launch --multi_gpu`): a CPU machine needs
    # it set before the first process group is made, or each process runs alone.
    cpu = property(lambda self: self.training.run.cpu)

    def with_training(self, **values: Any) -> "StudyProfile":
        """A copy whose training config has these flat fields replaced (`max_steps=3000`, `cpu=True`, ...)."""
        return dataclasses.replace(self, training=self.training.override(**values))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_MICRO_ENCODER = EncoderConfig(kind="lite", base_channels=8, channel_multipliers=(1, 2, 2, 2), num_res_blocks=1,
                               latent_channels=4, mid_attention=False)
_QUICK_ENCODER = dataclasses.replace(ENCODER_PRESETS["tiny-lite"], latent_channels=8,
                                     channel_multipliers=multipliers_for_downsample((1, 2, 2), 16))

PROFILES: dict[str, StudyProfile] = {
    # Tests: 32² crops, 8-channel models, 2 steps, one image per class; two runs where a study has more.
    "micro": StudyProfile(
        encoder=_MICRO_ENCODER,
        eps_decoders={"micro": ADMConfig(base_channels=8, channel_multipliers=(1, 2), num_res_blocks=1,
                                         attention_downsample=(2,), head_channels=8)},
        vae_decoders={"micro": VAEDecoderConfig(base_channels=8, channel_multipliers=(1, 2), num_res_blocks=1)},
        decoder="micro", vae_decoder="micro", width_groups=(("micro", "micro"),),
        training=study_training(resolution=32, batch_size=4, warmup_steps=1, ema_decay=0.5, max_steps=2, log_every=1),
        eval_images=8, eval_batch=8, feature_size=64, decode_steps=2, ladder_nfes=(1, 2), ladder_rows=("baseline", "g"),
        sweep_steps=(1, 2), gammas=(0.6, 1.0), downsamples=(8,), latent_channels=(4,)),
    # 2-core CPU, ~20 min per study: ε-VAE-lite compression (f16, 8 channels) on 64² crops, ~1M-parameter decoders.
    "quick": StudyProfile(
        encoder=_QUICK_ENCODER,
        eps_decoders={"XS": ADM_PRESETS["XS"], "S": ADM_PRESETS["S"]},
        vae_decoders={"w24": VAEDecoderConfig(base_channels=24, num_res_blocks=1),
                      "w32": VAEDecoderConfig(base_channels=32, num_res_blocks=1)},
        decoder="XS", vae_decoder="w24", width_groups=(("w24", "XS"), ("w32", "S")),
        # At the paper's small lr with β1 = 0, a few hundred steps leave every model near the mean image (PSNR 13
        # after 200 steps at 2e-4); 1e-3 with momentum learns faster, for every run alike. Not enough yet: after
        # 100 steps the un-preconditioned velocity decoder still decodes noise (PSNR 7.5, measured), hence skip.
        training=study_training(resolution=64, batch_size=8, lr=1e-3, adam_betas=(0.9, 0.999), warmup_steps=20,
                                disc_start=20, max_steps=100, checkpoint_every=50),
        preconditioning="skip", study_minutes=20.0, train_share=0.7, eval_images=48, eval_batch=48,
        ladder_nfes=(1, 2, 3, 5, 10)),
    # 2-core CPU, an hour or more per study, resumable: the quick sizes (one width group) trained until rFD stops
    # moving (< 5% over the last quarter), with the perceptual and adversarial terms on from step 200.
    "long": StudyProfile(
        encoder=_QUICK_ENCODER, eps_decoders={"XS": ADM_PRESETS["XS"]},
        vae_decoders={"w24": VAEDecoderConfig(base_channels=24, num_res_blocks=1)}, decoder="XS",
        vae_decoder="w24", width_groups=(("w24", "XS"),),
        training=study_training(resolution=64, batch_size=8, lr=1e-3, adam_betas=(0.9, 0.999), warmup_steps=20,
                                disc_start=200, max_steps=4000, checkpoint_every=250),
        preconditioning="skip", convergence_every=250, eval_images=96, eval_batch=48),
    # GPUs, the paper's setting: ε-VAE-lite encoder, Table 5 decoders, 128², 1M steps at batch 256 (appendix C.2).
    "full": StudyProfile(
        encoder=ENCODER_PRESETS["lite"],
        eps_decoders={name: ADM_PRESETS[name] for name in ("B", "M", "L", "XL", "H")},
        vae_decoders={name: VAE_DECODER_PRESETS[name] for name in ("B", "M", "L", "XL", "H")},
        decoder="B", vae_decoder="B", width_groups=(("M", "B"), ("XL", "M"), ("H", "XL")),  # Table 7's groups
        training=study_training(resolution=128, discriminator="default", perceptual="lpips-vgg", batch_size=256,
                                num_workers=8, lr=1e-4, warmup_steps=5000, ema_decay=0.999, max_steps=1_000_000,
                                checkpoint_every=10_000, precision="bf16", log_every=100),
        eval_images=10_000, eval_batch=64, ladder_nfes=(1, 2, 3, 5, 10, 50, 100, 1000), downsamples=(4, 8, 16, 32),
        latent_channels=(4, 8, 16, 32), resolution_multipliers=(1, 2, 4)),
}
# `long` with every run trained exactly 3000 steps (where the ε-VAE settled), scored every 250: the VAE's 5% rule
# stopped it at 1250 on a noisy curve, so `long` alone does not compare the two at equal length.
PROFILES["long-equal"] = dataclasses.replace(PROFILES["long"].with_training(max_steps=3000), min_steps=3000)


# ------------------------------------------------------------------------------------------------------ run specs
@dataclass(frozen=True)
class EvalVariant:
    """One way of decoding the validation crops: resolution × NFE × time spacing (None: the VAE's single pass)."""

    resolution: int
    steps: int | None
    spacing: str | None


@dataclass(frozen=True)
class RunSpec:
    """One trained model and how it is evaluated. `info` carries the study's own labels (group, γ, ...)."""

    name: str
    label: str
    model_type: str  # "eps_vae" | "vae"
    model_config: dict[str, Any]  # EpsVAEConfig / VAEConfig as a dict
    perceptual_weight: float = 0.5
    adversarial_weight: float = 0.5
    variants: tuple[EvalVariant, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)

    def training_key(self) -> str:
        """What training depends on: the spacing of Eq. 13 is inference-only, so runs that differ only in it
        share one model."""
        config = {k: v for k, v in self.model_config.items() if k != "time_spacing"}
        return json.dumps([self.model_type, config, self.perceptual_weight, self.adversarial_weight], sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def encoder_config(profile: StudyProfile, downsample: int | None = None, latent_channels: int | None = None):
    encoder = profile.encoder
    if latent_channels is not None:
        encoder = dataclasses.replace(encoder, latent_channels=latent_channels)
    if downsample is not None:
        encoder = dataclasses.replace(encoder, channel_multipliers=multipliers_for_downsample(
            encoder.channel_multipliers, downsample))
    return encoder


def eps_config(profile: StudyProfile, decoder: str | None = None, downsample: int | None = None,
               latent_channels: int | None = None, **overrides) -> dict[str, Any]:
    """An ε-VAE config (the paper's defaults unless overridden: velocity, logit-normal t, γ = 0.6) as a dict."""
    decoder = decoder or profile.decoder
    if overrides.get("parameterization", "velocity") == "velocity":
        overrides.setdefault("preconditioning", profile.preconditioning)
    config = EpsVAEConfig(encoder=encoder_config(profile, downsample, latent_channels),
                          decoder=profile.eps_decoders[decoder], decoder_preset=decoder, **overrides)
    return config.to_dict()


def vae_config(profile: StudyProfile, decoder: str | None = None, downsample: int | None = None,
               latent_channels: int | None = None) -> dict[str, Any]:
    decoder = decoder or profile.vae_decoder
    return VAEConfig(encoder=encoder_config(profile, downsample, latent_channels),
                     decoder=profile.vae_decoders[decoder], decoder_preset=decoder).to_dict()


def _eps_variants(profile: StudyProfile, steps=None, spacings=("reversed_log",), multipliers=(1,)):
    steps = steps or (profile.decode_steps,)
    return tuple(EvalVariant(profile.resolution * m, s, spacing)
                 for m in multipliers for spacing in spacings for s in steps)


def _vae_variants(profile: StudyProfile, multipliers=(1,)):
    return tuple(EvalVariant(profile.resolution * m, None, None) for m in multipliers)


def vae_vs_eps_runs(profile: StudyProfile) -> list[RunSpec]:
    """Table 7: for each width group, the VAE and the ε-VAE decoder of comparable parameter count."""
    runs = []
    for group, (vae_width, eps_width) in enumerate(profile.width_groups):
        runs.append(RunSpec(f"vae-{vae_width}", f"VAE ({vae_width})", "vae", vae_config(profile, vae_width),
                            variants=_vae_variants(profile), info={"group": group, "width": vae_width}))
        runs.append(RunSpec(f"eps-{eps_width}", f"ε-VAE ({eps_width})", "eps_vae", eps_config(profile, eps_width),
                            variants=_eps_variants(profile, steps=(profile.decode_steps, 1)),
                            info={"group": group, "width": eps_width}))
    return runs


@dataclass(frozen=True)
class LadderRow:
    """A row of Table 4: `change` is applied on top of every earlier row (model fields, loss weights, spacing)."""

    key: str
    description: str
    change: dict[str, Any]
    skipped: str | None = None

    @property
    def short(self) -> str:
        return self.key if self.key == "baseline" else f"({self.key})"


LADDER: tuple[LadderRow, ...] = (
    LadderRow("baseline", "Baseline: DDPM-based diffusion decoder",
              {"parameterization": "epsilon", "time_sampling": "uniform", "gamma": 1.0, "time_spacing": "uniform",
               "perceptual_weight": 0.0, "adversarial_weight": 0.0}),
    LadderRow("a", "(a) Diffusion → Rectified flow parameterization", {"parameterization": "velocity"}),
    LadderRow("b", "(b) Uniform → Logit-normal time step sampling during training", {"time_sampling": "logit_normal"}),
    LadderRow("c", "(c) DDPM UNet → ADM UNet", {},
              skipped="not reproducible here: the project has only the ADM UNet, which every row already uses"),
    LadderRow("d", "(d) Perceptual matching on x̂0_t and x0", {"perceptual_weight": 0.5}),
    LadderRow("e", "(e) Adversarial denoising trajectory matching on (x̂0_t, x_t) and (x0, x_t)",
              {"adversarial_weight": 0.5}),
    LadderRow("f", "(f) Scale x_t by γ = 0.6", {"gamma": 0.6}),
    LadderRow("g", "(g) Uniform → Reversed logarithm time spacing during inference", {"time_spacing": "reversed_log"}),
)
LADDER_BY_KEY = {row.key: row for row in LADDER}


def ladder_settings(rows: tuple[str, ...] | None = None) -> list[tuple[LadderRow, dict[str, Any]]]:
    """Cumulative settings of each row (Table 4 builds each row on the previous one); skipped rows included."""
    wanted = set(rows) if rows is not None else set(LADDER_BY_KEY)
    unknown = wanted - set(LADDER_BY_KEY)
    if unknown:
        raise ValueError(f"unknown ladder rows {sorted(unknown)}; choose from {list(LADDER_BY_KEY)}")
    settings, out = {}, []
    for row in LADDER:
        settings = {**settings, **row.change}
        if row.key in wanted:
            out.append((row, dict(settings)))
    return out


def ladder_runs(profile: StudyProfile) -> list[RunSpec]:
    runs = []
    for row, settings in ladder_settings(profile.ladder_rows):
        if row.skipped:
            continue
        model = {k: v for k, v in settings.items() if k not in ("perceptual_weight", "adversarial_weight")}
        runs.append(RunSpec(
            f"row-{row.key}", row.description, "eps_vae", eps_config(profile, **model),
            perceptual_weight=settings["perceptual_weight"], adversarial_weight=settings["adversarial_weight"],
            variants=_eps_variants(profile, profile.ladder_nfes, (settings["time_spacing"],)),
            info={"row": row.key}))
    return runs


def steps_runs(profile: StudyProfile) -> list[RunSpec]:
    """Fig. 3 right: one trained ε-VAE decoded with each step count under both spacings."""
    return [RunSpec("eps", f"ε-VAE ({profile.decoder})", "eps_vae", eps_config(profile),
                    variants=_eps_variants(profile, profile.sweep_steps, ("uniform", "reversed_log")))]


def gamma_runs(profile: StudyProfile) -> list[RunSpec]:
    return [RunSpec(f"gamma-{gamma:g}", f"γ = {gamma:g}", "eps_vae", eps_config(profile, gamma=gamma),
                    variants=_eps_variants(profile), info={"gamma": gamma}) for gamma in profile.gammas]


def compression_settings(profile: StudyProfile) -> list[tuple[int, int]]:
    """(downsample, channels): the downsampling sweep at the default width, then the width sweep at the default
    downsampling (Fig. 2 right / middle); the shared default setting appears once."""
    default_f, default_c = profile.encoder.downsample, profile.encoder.latent_channels
    settings = [(f, default_c) for f in profile.downsamples] + [(default_f, c) for c in profile.latent_channels]
    return list(dict.fromkeys(settings))


def compression_runs(profile: StudyProfile) -> list[RunSpec]:
    runs = []
    for f, c in compression_settings(profile):
        info = {"downsample": f, "latent_channels": c}
        runs.append(RunSpec(f"vae-f{f}-c{c}", f"VAE f{f} c{c}", "vae", vae_config(profile, None, f, c),
                            variants=_vae_variants(profile), info=info))
        runs.append(RunSpec(f"eps-f{f}-c{c}", f"ε-VAE f{f} c{c}", "eps_vae", eps_config(profile, None, f, c),
                            variants=_eps_variants(profile), info=info))
    return runs


def resolution_runs(profile: StudyProfile) -> list[RunSpec]:
    """Table 1 / Table 7 †: trained at the profile's resolution, evaluated at every multiple of it."""
    m = profile.resolution_multipliers
    return [RunSpec("vae", f"VAE ({profile.vae_decoder})", "vae", vae_config(profile),
                    variants=_vae_variants(profile, m)),
            RunSpec("eps", f"ε-VAE ({profile.decoder})", "eps_vae", eps_config(profile),
                    variants=_eps_variants(profile, multipliers=m))]


# --------------------------------------------------------------------------------------------------- pure helpers
def saturating_nfe(rfd_by_nfe: dict[int, float], tolerance: float = 0.05) -> int:
    """Table 4's NFE: the fewest steps whose rFD is within `tolerance` (relative) of the row's best rFD."""
    if not rfd_by_nfe:
        raise ValueError("need at least one (NFE, rFD) pair")
    best = min(rfd_by_nfe.values())
    return min(nfe for nfe, rfd in rfd_by_nfe.items() if rfd <= best + tolerance * abs(best))


def relative_improvement(reference: float, value: float) -> float:
    """(reference - value) / reference: Table 7's Δ ratio (positive = `value` is better, lower)."""
    return (reference - value) / reference if reference else float("nan")


def time_cap_minutes(budget_minutes: float | None, spent_seconds: float, runs_left: int, total_runs: int,
                     floor_fraction: float = 0.25) -> float | None:
    """A run's training cap: what is left of the study's training budget, shared evenly by the runs still to
    train (fast runs, e.g. the VAE's, leave time to slower ones), but never below `floor_fraction` of an even
    share so a late run is not starved. With the profile's step count every run normally ends before its cap."""
    if budget_minutes is None:
        return None
    left = max(budget_minutes - spent_seconds / 60, 0.0)
    return max(left / max(runs_left, 1), floor_fraction * budget_minutes / max(total_runs, 1))


def balanced_indices(length: int, count: int | None) -> list[int]:
    """`count` evenly spaced indices of a class-ordered split, so every class is represented."""
    if count is None or count >= length:
        return list(range(length))
    return sorted({int(round(i)) for i in np.linspace(0, length - 1, count)})


# ----------------------------------------------------------------------------------------------------- evaluation
class StudyEvaluator:
    """Shared by a study's runs: the EffNet-L0 networks, the validation subset and its FD statistics per
    resolution (computed once), so every run is measured on exactly the same crops."""

    def __init__(self, profile: StudyProfile, data: str, device: torch.device):
        from pipelines.kit.metrics import EffNetFeatures
        from tokenizer.perceptual import build_perceptual

        self.profile, self.data, self.device = profile, data, device
        self.extractor = EffNetFeatures(device=device, size=profile.feature_size)
        self.perceptual = build_perceptual("effnet-l0").to(device)
        self._real_features: dict[int, FeatureStats] = {}  # resolution → the validation crops' features

    def _loader(self, resolution: int):
        from torch.utils.data import DataLoader, IterableDataset, Subset

        from data.sources import build_image_dataset

        dataset = build_image_dataset(self.data, split="val", resolution=resolution, train=False)
        if not isinstance(dataset, IterableDataset):
            dataset = Subset(dataset, balanced_indices(len(dataset), self.profile.eval_images))
        return DataLoader(dataset, batch_size=self.profile.eval_batch, shuffle=False,
                          num_workers=self.profile.num_workers)

    def evaluate(self, tokenizer, variants: tuple[EvalVariant, ...]) -> list[dict[str, Any]]:
        """Metrics of every variant, measured by `pipelines.kit.reconstruction` (one decode generator per image,
        seed + index, as in `pipelines.evaluate`, so numbers do not depend on the batch size)."""
        rows = []
        for resolution in dict.fromkeys(v.resolution for v in variants):
            settings = [DecodeSetting(v.steps, v.spacing) for v in variants if v.resolution == resolution]
            result = evaluate_reconstructions(
                tokenizer, (images for images, _labels in self._loader(resolution)), settings, self.extractor,
                self.perceptual, device=self.device, precision=self.profile.precision, seed=self.profile.seed,
                real=self._real_features.get(resolution), max_images=self.profile.eval_images,
                source=f"the val split of {self.data!r} at {resolution}px")
            self._real_features[resolution] = result.real
            rows += [{"resolution": resolution, "steps": m.setting.steps, "spacing": m.setting.spacing, "rfd": m.rfd,
                      "psnr": m.psnr, "ssim": m.ssim, "perceptual": m.perceptual,
                      "decode_images_per_s": m.decode_images_per_s, "num_images": m.num_images}
                     for m in result.metrics]
        return rows


# ----------------------------------------------------------------------------------------------------- execution
def _write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)


def _train_config(spec: RunSpec, profile: StudyProfile, run_dir: Path, data: str, max_minutes: float | None,
                  perceptual_weights: str | None) -> TokenizerTrainConfig:
    return profile.training.override(
        output_dir=str(run_dir / "train"), model_type=spec.model_type,
        encoder=spec.model_config.get("encoder_preset") or "custom",
        decoder=spec.model_config.get("decoder_preset") or "custom", init_from=str(run_dir / "init"), data=data,
        max_minutes=max_minutes, perceptual_weights=perceptual_weights, perceptual_weight=spec.perceptual_weight,
        adversarial_weight=spec.adversarial_weight)


def _spec_record(spec: RunSpec, train_config) -> dict[str, Any]:
    """What must match for a stored run to be reused (paths and the time cap may change between calls)."""
    settings = {k: v for k, v in train_config.to_flat().items()
                if k not in ("output_dir", "init_from", "max_minutes", "cpu")}
    return json.loads(json.dumps({"run": spec.to_dict(), "training": settings}))


def _write_init(spec: RunSpec, profile: StudyProfile, run_dir: Path) -> None:
    """The run's initial weights, once. Same seed before building: runs sharing an encoder architecture also
    share its initial weights."""
    from tokenizer import EpsVAE, VAE

    init_dir = run_dir / "init"
    if (init_dir / "config.json").is_file():
        return
    torch.manual_seed(profile.seed)
    model_cls, config_cls = (EpsVAE, EpsVAEConfig) if spec.model_type == "eps_vae" else (VAE, VAEConfig)
    model_cls(config_cls.from_dict(spec.model_config)).save_pretrained(init_dir)


def train_run(spec: RunSpec, profile: StudyProfile, run_dir: Path, data: str, max_minutes: float | None,
              perceptual_weights: str | None = None) -> dict[str, Any]:
    """Train (or resume, or reuse) one run; returns its training record (`trained.json`)."""
    from accelerate import PartialState

    from pipelines import train_tokenizer as stage1

    state = PartialState()
    record_path = run_dir / "trained.json"
    if record_path.is_file():
        return json.loads(record_path.read_text())
    if state.is_main_process:
        _write_init(spec, profile, run_dir)
    state.wait_for_everyone()
    config = _train_config(spec, profile, run_dir, data, max_minutes, perceptual_weights)
    started = time.monotonic()
    model_dir = stage1.train_tokenizer(config)
    latest = run_dir / "train" / "checkpoints" / "latest.json"
    steps = json.loads(latest.read_text())["step"] if latest.is_file() else profile.train_steps
    record = {"model_dir": str(model_dir.resolve()), "steps": steps, "target_steps": profile.train_steps,
              "time_capped": steps < profile.train_steps, "seconds": time.monotonic() - started,
              "images_per_s": read_jsonl_rates(run_dir / "train" / "metrics.jsonl")}
    if state.is_main_process:
        _write_json(record_path, record)
    return record


def settled(history: list[dict[str, Any]], tolerance: float) -> bool:
    """rFD moved by less than `tolerance` (relative) between 3/4 of the steps trained and now."""
    if len(history) < 4:
        return False
    last = history[-1]
    earlier = [h for h in history if h["step"] <= 0.75 * last["step"]][-1]
    return abs(last["rfd"] - earlier["rfd"]) <= tolerance * earlier["rfd"]


def keeps_training(history: list[dict[str, Any]], profile: StudyProfile) -> bool:
    """Another segment, unless the run reached `train_steps` or its rFD settled after at least `min_steps`."""
    trained = history[-1]["step"] if history else 0
    if trained >= profile.train_steps:
        return False
    return trained < profile.min_steps or not settled(history, profile.convergence_tolerance)


def train_until_converged(spec: RunSpec, profile: StudyProfile, run_dir: Path, data: str,
                          perceptual_weights: str | None,
                          evaluator_factory: Callable[[], "StudyEvaluator"]) -> dict[str, Any]:
    """Train in segments of `convergence_every` steps (each resumes the last checkpoint exactly), score the EMA
    model's headline rFD after each, stop when `settled` or at `train_steps`. Resumable at every segment."""
    from pipelines import train_tokenizer as stage1
    from tokenizer import load_tokenizer

    record_path, history_path = run_dir / "trained.json", run_dir / "convergence.json"
    if record_path.is_file():
        return json.loads(record_path.read_text())
    history = json.loads(history_path.read_text()) if history_path.is_file() else []
    headline = [v for v in spec.variants if v.resolution == profile.resolution
                and v.steps in (None, profile.decode_steps) and v.spacing in (None, "reversed_log")][:1]
    started = time.monotonic()
    model_dir = None
    while keeps_training(history, profile):
        target = min((history[-1]["step"] if history else 0) + profile.convergence_every, profile.train_steps)
        config = _train_config(spec, profile, run_dir, data, None, perceptual_weights).override(max_steps=target)
        _write_init(spec, profile, run_dir)
        model_dir = stage1.train_tokenizer(config)
        tokenizer = load_tokenizer(model_dir).eval()
        evaluator = evaluator_factory()
        row = evaluator.evaluate(tokenizer.to(evaluator.device), tuple(headline))[0]
        history.append({"step": target, "rfd": row["rfd"], "psnr": row["psnr"], "steps": row["steps"]})
        _write_json(history_path, history)
        print(f"[{run_dir.name}] step {target}: rFD {row['rfd']:.2f}, PSNR {row['psnr']:.2f}", flush=True)
    record = {"model_dir": str((model_dir or run_dir / "train" / "model").resolve()), "steps": history[-1]["step"],
              "target_steps": profile.train_steps, "time_capped": False,
              "converged": settled(history, profile.convergence_tolerance), "history": history,
              "seconds": time.monotonic() - started,
              "images_per_s": read_jsonl_rates(run_dir / "train" / "metrics.jsonl")}
    _write_json(record_path, record)
    return record


def read_jsonl_rates(metrics: Path) -> float | None:
    """Median training images/s over the logging windows (the first one includes start-up)."""
    from pipelines.kit.logging import read_jsonl

    rates = [r["images_per_s"] for r in (read_jsonl(metrics) if metrics.is_file() else []) if "images_per_s" in r]
    return float(np.median(rates[1:] if len(rates) > 1 else rates)) if rates else None


def run_one(spec: RunSpec, profile: StudyProfile, study_dir: Path, data: str, max_minutes: float | None,
            evaluator_factory: Callable[[], StudyEvaluator], shared_training: dict[str, Path],
            perceptual_weights: str | None = None) -> dict[str, Any]:
    """A finished run's `result.json`, reused; otherwise train (or take the model of an identical earlier run),
    evaluate and write it."""
    from tokenizer import load_tokenizer

    run_dir = study_dir / "runs" / spec.name
    record = _spec_record(spec, _train_config(spec, profile, run_dir, data, max_minutes, perceptual_weights))
    spec_path = run_dir / SPEC_FILE
    if spec_path.is_file() and json.loads(spec_path.read_text()) != record:
        raise ValueError(f"{run_dir} was run with other settings (see its {SPEC_FILE}); delete it or choose "
                         "another --out")
    result_path = run_dir / RESULT_FILE
    if result_path.is_file():
        print(f"[{study_dir.name}/{spec.name}] reused {result_path}", flush=True)
        return json.loads(result_path.read_text())
    _write_json(spec_path, record)
    started = time.monotonic()
    key = spec.training_key()
    if key in shared_training:  # e.g. ladder (g) = (f) trained, decoded with another spacing
        training = {**json.loads((shared_training[key] / "trained.json").read_text()),
                    "shared_with": shared_training[key].name}
    elif profile.convergence_every:
        print(f"[{study_dir.name}/{spec.name}] training {spec.label} until rFD settles", flush=True)
        training = train_until_converged(spec, profile, run_dir, data, perceptual_weights, evaluator_factory)
    else:
        print(f"[{study_dir.name}/{spec.name}] training {spec.label}", flush=True)
        training = train_run(spec, profile, run_dir, data, max_minutes, perceptual_weights)
    print(f"[{study_dir.name}/{spec.name}] evaluating {len(spec.variants)} decode setting(s)", flush=True)
    tokenizer = load_tokenizer(training["model_dir"]).eval()
    evaluator = evaluator_factory()
    tokenizer.to(evaluator.device)
    result = {"name": spec.name, "label": spec.label, "model_type": spec.model_type, "info": spec.info,
              "decoder_params": count_parameters(tokenizer.decoder),
              "encoder_params": count_parameters(tokenizer.encoder),
              "training": training, "evaluations": evaluator.evaluate(tokenizer, spec.variants)}
    result["seconds"] = time.monotonic() - started
    _write_json(result_path, result)
    return result


@dataclass(frozen=True)
class Study:
    """A registry entry: its paper reference, its runs for a profile, and its tables / plots."""

    title: str
    build_runs: Callable[[StudyProfile], list[RunSpec]]
    report: Callable[[list[dict[str, Any]], StudyProfile, Path], tuple[dict[str, Any], str]]


def run_study(study: str, profile: str | StudyProfile = "quick", out: str | Path = "runs/bench",
              data: str = "offline", perceptual_weights: str | None = None, cpu: bool = False) -> dict[str, Any]:
    """Run (or resume) `study` and write `<out>/<study>/results.json`, `results.md` and its PNG plots."""
    from accelerate import PartialState

    if study not in STUDIES:
        raise ValueError(f"unknown study {study!r}; choose from {list(STUDIES)}")
    if isinstance(profile, str):
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; choose from {list(PROFILES)}")
        profile_name, profile = profile, PROFILES[profile]
    else:
        profile_name = "custom"
    if cpu:
        profile = profile.with_training(cpu=True)
    entry = STUDIES[study]
    study_dir = Path(out) / study
    runs = entry.build_runs(profile)
    budget = profile.train_share * profile.study_minutes if profile.study_minutes else None
    total_trained = len({spec.training_key() for spec in runs})
    state = PartialState(cpu=profile.cpu)
    if profile.convergence_every and state.num_processes > 1:
        raise ValueError("a profile that trains until rFD settles (convergence_every) runs on one process: rank 0 "
                         "decides when to stop; launch it without accelerate")
    evaluator: list[StudyEvaluator] = []

    def evaluator_factory() -> StudyEvaluator:
        if not evaluator:
            evaluator.append(StudyEvaluator(profile, data, state.device))
        return evaluator[0]

    started = time.monotonic()
    results, shared, spent, caps = [], {}, 0.0, {}
    for index, spec in enumerate(runs):
        key = spec.training_key()
        runs_left = len({s.training_key() for s in runs[index:]} - set(shared))
        max_minutes = caps[spec.name] = time_cap_minutes(budget, spent, runs_left, total_trained)
        if state.is_main_process:
            results.append(run_one(spec, profile, study_dir, data, max_minutes, evaluator_factory, shared,
                                   perceptual_weights))
        elif key not in shared:
            # Under `accelerate launch` the other ranks join DDP training only; rank 0 evaluates and writes.
            train_run(spec, profile, study_dir / "runs" / spec.name, data, max_minutes, perceptual_weights)
        if key not in shared:
            shared[key] = study_dir / "runs" / spec.name
            spent += results[-1]["training"]["seconds"] if results else 0.0
        state.wait_for_everyone()
    if not state.is_main_process:
        return {}
    summary, tables = entry.report(results, profile, study_dir)
    report = {"study": study, "title": entry.title, "profile": profile_name, "settings": profile.to_dict(),
              "data": data, "fd_label": FD_LABEL, "time_cap_minutes": caps, "summary": summary,
              "runs": results, "seconds_this_call": time.monotonic() - started}
    _write_json(study_dir / "results.json", json.loads(json.dumps(report, default=str)))
    (study_dir / "results.md").write_text(_markdown(report, tables, results))
    print(f"[{study}] wrote {study_dir / 'results.md'}", flush=True)
    return report


# --------------------------------------------------------------------------------------------------- reporting
def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _mparams(count: int) -> str:
    return f"{count / 1e6:.2f}"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _headline(result: dict[str, Any], resolution: int | None = None, steps: int | None = None,
              spacing: str | None = None) -> dict[str, Any]:
    """The evaluation shown in a summary table: the first one matching the given fields."""
    for row in result["evaluations"]:
        if all(want is None or row[key] == want for key, want in
               (("resolution", resolution), ("steps", steps), ("spacing", spacing))):
            return row
    raise ValueError(f"run {result['name']} has no evaluation at {resolution}px, {steps} steps, {spacing}")


def _metric_cells(row: dict[str, Any]) -> list[Any]:
    return [row["rfd"], row["psnr"], row["ssim"], row["perceptual"]]


METRIC_HEADER = [f"{FD_LABEL} ↓", "PSNR ↑", "SSIM ↑", "perceptual ↓"]
COST_HEADER = ["G params (M)", "train img/s", "decode img/s"]


def _cost_cells(result: dict[str, Any], row: dict[str, Any]) -> list[Any]:
    return [_mparams(result["decoder_params"]), result["training"]["images_per_s"], row["decode_images_per_s"]]


def _savefig(figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    import matplotlib.pyplot as plt

    plt.close(figure)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def report_vae_vs_eps(results, profile, study_dir):
    plt = _pyplot()
    groups, rows = [], []
    for group in sorted({r["info"]["group"] for r in results}):
        members = {r["model_type"]: r for r in results if r["info"]["group"] == group}
        vae, eps = members["vae"], members["eps_vae"]
        vae_row, eps_row = _headline(vae), _headline(eps)
        delta = vae_row["rfd"] - eps_row["rfd"]
        groups.append({"group": group, "vae": vae["name"], "eps_vae": eps["name"],
                       "vae_params": vae["decoder_params"], "eps_params": eps["decoder_params"],
                       "vae_rfd": vae_row["rfd"], "eps_rfd": eps_row["rfd"], "delta_rfd": delta,
                       "relative_improvement": relative_improvement(vae_row["rfd"], eps_row["rfd"])})
        for result, row, change in ((vae, vae_row, "–"), (eps, eps_row, f"{delta:.3f} "
                                    f"({100 * groups[-1]['relative_improvement']:.1f}%)")):
            rows.append([group + 1, result["label"], row["steps"] or 1, *_metric_cells(row), change,
                         *_cost_cells(result, row)])
    table = _table(["group", "model", "NFE", *METRIC_HEADER, "Δ rFD (rel.)", *COST_HEADER], rows)
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for model_type, name in (("vae", "VAE"), ("eps_vae", "ε-VAE")):
        points = sorted((r["decoder_params"] / 1e6, _headline(r)["rfd"])
                        for r in results if r["model_type"] == model_type)
        axis.plot(*zip(*points), marker="o", label=name)
    axis.set_xscale("log")
    axis.set(xlabel="decoder parameters (M)", ylabel=FD_LABEL, title="VAE vs ε-VAE (Table 7)")
    axis.legend()
    _savefig(figure, study_dir / "rfd_vs_params.png")
    text = ("Groups pair decoders of comparable parameter count; Δ = rFD(VAE) − rFD(ε-VAE), relative to the "
            "VAE (Table 7's Δ).\n\n" + table + "\n![rFD vs decoder parameters](rfd_vs_params.png)\n")
    by_nfe = []
    for group in groups:
        members = {r["name"]: r for r in results}
        vae, eps = members[group["vae"]], members[group["eps_vae"]]
        for nfe in sorted({row["steps"] for row in eps["evaluations"] if row["steps"]}):
            eps_rfd = _headline(eps, steps=nfe)["rfd"]
            by_nfe.append({"group": group["group"], "nfe": nfe, "vae_rfd": group["vae_rfd"], "eps_rfd": eps_rfd,
                           "relative_improvement": relative_improvement(group["vae_rfd"], eps_rfd)})
    text += "\n" + _table(["group", "ε-VAE NFE", f"VAE {FD_LABEL}", f"ε-VAE {FD_LABEL}", "Δ rFD (rel.)"],
                          [[g["group"] + 1, g["nfe"], _fmt(g["vae_rfd"]), _fmt(g["eps_rfd"]),
                            f"{100 * g['relative_improvement']:.1f}%"] for g in by_nfe])
    histories = {r["label"]: r["training"]["history"] for r in results if r["training"].get("history")}
    if histories:  # trained until rFD settled: show the curves and whether each run converged
        figure, axis = plt.subplots(figsize=(5, 3.5))
        for label, history in histories.items():
            axis.plot([h["step"] for h in history], [h["rfd"] for h in history], marker=".", label=label)
        axis.set(xlabel="training step", ylabel=FD_LABEL, title="rFD while training (headline NFE)")
        axis.legend()
        _savefig(figure, study_dir / "rfd_vs_steps.png")
        rows = [[r["label"], r["training"]["steps"], "yes" if r["training"].get("converged") else "no (step cap)",
                 " → ".join(f"{h['rfd']:.1f}" for h in r["training"]["history"])]
                for r in results if r["training"].get("history")]
        text += ("\n" + _table(["model", "steps", f"settled (< {100 * profile.convergence_tolerance:.0f}% over the "
                                "last quarter)", f"{FD_LABEL} every {profile.convergence_every} steps"], rows)
                 + "\n![rFD while training](rfd_vs_steps.png)\n")
    return {"groups": groups, "by_nfe": by_nfe}, text


def report_ladder(results, profile, study_dir):
    plt = _pyplot()
    by_row = {r["info"]["row"]: r for r in results}
    rows, summary, previous = [], [], None
    curves = []
    for row, _settings in ladder_settings(profile.ladder_rows):
        if row.skipped:
            rows.append([row.description, "skipped", *["–"] * 9])
            summary.append({"row": row.key, "description": row.description, "skipped": row.skipped})
            continue
        result = by_row[row.key]
        curve = {e["steps"]: e["rfd"] for e in result["evaluations"]}
        nfe = saturating_nfe(curve, profile.saturation_tolerance)
        best = _headline(result, steps=nfe)
        change = relative_improvement(previous, best["rfd"]) if previous is not None else None
        rows.append([row.description, nfe, *_metric_cells(best),
                     "–" if change is None else f"{100 * change:.1f}%", *_cost_cells(result, best)])
        summary.append({"row": row.key, "description": row.description, "nfe": nfe, "rfd": best["rfd"],
                        "rfd_by_nfe": curve, "relative_to_previous": change})
        curves.append((row.short, curve))
        previous = best["rfd"]
    table = _table(["ablation", "NFE ↓", *METRIC_HEADER, "rFD change vs previous", *COST_HEADER], rows)
    nfes = list(profile.ladder_nfes)
    by_nfe = _table(["ablation", *[f"rFD @ {n}" for n in nfes]],
                    [[label, *[curve.get(n) for n in nfes]] for label, curve in curves])
    figure, axis = plt.subplots(figsize=(5.5, 3.5))
    for label, curve in curves:
        axis.plot(sorted(curve), [curve[n] for n in sorted(curve)], marker="o", label=label)
    axis.set_xscale("log")
    axis.set(xlabel="NFE (decode steps)", ylabel=FD_LABEL, title="Table 4 ladder: rFD vs NFE")
    axis.legend(fontsize=7)
    _savefig(figure, study_dir / "rfd_vs_nfe.png")
    skipped = "\n".join(f"- {row.description}: {row.skipped}" for row in LADDER if row.skipped)
    text = (f"Each row adds one change to the row above (γ = 1 and uniform spacing until (f) and (g)). NFE is the "
            f"fewest decode steps among {nfes} whose rFD is within {100 * profile.saturation_tolerance:g}% of the "
            f"row's best, and the metrics are at that NFE. The baseline decodes by ancestral DDPM respaced to NFE "
            f"steps.\n\n{table}\nrFD at every evaluated NFE:\n\n{by_nfe}\nSkipped:\n{skipped}\n\n"
            "![rFD vs NFE](rfd_vs_nfe.png)\n")
    return {"rows": summary}, text


def report_steps(results, profile, study_dir):
    plt = _pyplot()
    (result,) = results
    spacings = ("uniform", "reversed_log")
    rows, curves = [], {s: {} for s in spacings}
    for steps in profile.sweep_steps:
        cells = [steps]
        for spacing in spacings:
            row = _headline(result, steps=steps, spacing=spacing)
            curves[spacing][steps] = row["rfd"]
            cells += [row["rfd"], row["psnr"], row["ssim"], row["perceptual"]]
        rows.append(cells + [_headline(result, steps=steps)["decode_images_per_s"]])
    header = ["decode steps"] + [f"{m} ({s})" for s in ("uniform", "rev-log")
                                 for m in ("rFD ↓", "PSNR ↑", "SSIM ↑", "perceptual ↓")] + ["decode img/s"]
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for spacing in spacings:
        axis.plot(list(curves[spacing]), list(curves[spacing].values()), marker="o", label=spacing)
    axis.set(xlabel="decode steps (NFE)", ylabel=FD_LABEL, title="Time spacing at inference (Fig. 3 right)")
    axis.legend()
    _savefig(figure, study_dir / "rfd_vs_steps.png")
    text = (f"One trained ε-VAE ({_mparams(result['decoder_params'])}M decoder, {result['training']['steps']} "
            f"steps, {_fmt(result['training']['images_per_s'])} train img/s), decoded with uniform and reversed-log "
            f"(Eq. 13) spacing.\n\n" + _table(header, rows) + "\n![rFD vs steps](rfd_vs_steps.png)\n")
    return {"rfd": curves}, text


def report_gamma(results, profile, study_dir):
    plt = _pyplot()
    rows, curve = [], {}
    for result in sorted(results, key=lambda r: r["info"]["gamma"]):
        row = _headline(result)
        curve[result["info"]["gamma"]] = row["rfd"]
        rows.append([f"{result['info']['gamma']:g}", row["steps"], *_metric_cells(row), *_cost_cells(result, row)])
    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.plot(list(curve), list(curve.values()), marker="o")
    axis.set(xlabel="γ (noise scaling)", ylabel=FD_LABEL, title="Noise scaling γ (Fig. 3 middle)")
    _savefig(figure, study_dir / "rfd_vs_gamma.png")
    best = min(curve, key=curve.get)
    text = (_table(["γ", "NFE", *METRIC_HEADER, *COST_HEADER], rows) +
            f"\nBest γ here: {best:g} (paper: 0.6).\n\n![rFD vs γ](rfd_vs_gamma.png)\n")
    return {"rfd_by_gamma": curve, "best_gamma": best}, text


def report_compression(results, profile, study_dir):
    plt = _pyplot()
    default_f, default_c = profile.encoder.downsample, profile.encoder.latent_channels
    lookup = {(r["model_type"], r["info"]["downsample"], r["info"]["latent_channels"]): r for r in results}
    sweeps = {"latent_channels": [(default_f, c) for c in profile.latent_channels],
              "downsample": [(f, default_c) for f in profile.downsamples]}
    summary, text = {}, ""
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for axis, (sweep, settings) in zip(axes, sweeps.items()):
        rows, points = [], []
        for f, c in settings:
            vae, eps = _headline(lookup["vae", f, c]), _headline(lookup["eps_vae", f, c])
            value = c if sweep == "latent_channels" else f
            gain = relative_improvement(vae["rfd"], eps["rfd"])
            rows.append([value, vae["rfd"], eps["rfd"], f"{100 * gain:.1f}%", vae["psnr"], eps["psnr"], vae["ssim"],
                         eps["ssim"], vae["perceptual"], eps["perceptual"]])
            points.append({"value": value, "vae_rfd": vae["rfd"], "eps_rfd": eps["rfd"], "relative_improvement": gain})
        summary[sweep] = points
        fixed = f"downsample {default_f}" if sweep == "latent_channels" else f"{default_c} latent channels"
        text += (f"### {sweep.replace('_', ' ')} (at {fixed})\n\n" + _table(
            [sweep.replace("_", " "), "VAE rFD ↓", "ε-VAE rFD ↓", "Δ rel.", "VAE PSNR", "ε-VAE PSNR", "VAE SSIM",
             "ε-VAE SSIM", "VAE perc.", "ε-VAE perc."], rows) + "\n")
        for key, name in (("vae_rfd", "VAE"), ("eps_rfd", "ε-VAE")):
            axis.plot([p["value"] for p in points], [p[key] for p in points], marker="o", label=name)
        axis.set_xscale("log", base=2)
        axis.set(xlabel=sweep.replace("_", " "), ylabel=FD_LABEL)
        axis.legend()
    axes[0].set_title("Latent channels (Fig. 2 middle)")
    axes[1].set_title("Downsampling (Fig. 2 right)")
    _savefig(figure, study_dir / "rfd_vs_compression.png")
    return summary, text + "![rFD vs compression](rfd_vs_compression.png)\n"


def report_resolution(results, profile, study_dir):
    plt = _pyplot()
    resolutions = [profile.resolution * m for m in profile.resolution_multipliers]
    rows, summary = [], {}
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for result in results:
        evals = [_headline(result, resolution=r) for r in resolutions]
        summary[result["name"]] = {r: e["rfd"] for r, e in zip(resolutions, evals)}
        rows.append([result["label"], _mparams(result["decoder_params"]),
                     *[e["rfd"] for e in evals], *[e["psnr"] for e in evals], *[e["ssim"] for e in evals]])
        axis.plot(resolutions, [e["rfd"] for e in evals], marker="o", label=result["label"])
    header = ["model", "G params (M)", *[f"rFD {r}² ↓" for r in resolutions], *[f"PSNR {r}²" for r in resolutions],
              *[f"SSIM {r}²" for r in resolutions]]
    axis.set(xlabel="evaluation resolution", ylabel=FD_LABEL, title=f"Trained at {profile.resolution}² (Table 1)")
    axis.legend()
    _savefig(figure, study_dir / "rfd_vs_resolution.png")
    text = (f"Trained at {profile.resolution}², evaluated on validation crops at each resolution with no "
            "fine-tuning.\n\n" + _table(header, rows) + "\n![rFD vs resolution](rfd_vs_resolution.png)\n")
    return {"rfd_by_resolution": summary}, text


STUDIES: dict[str, Study] = {
    "vae-vs-eps": Study("VAE vs ε-VAE at comparable decoder sizes (paper Table 7)", vae_vs_eps_runs,
                        report_vae_vs_eps),
    "ladder": Study("Ablation ladder of the diffusion decoder (paper Table 4)", ladder_runs, report_ladder),
    "steps": Study("Decode steps × time spacing (paper Fig. 3 right)", steps_runs, report_steps),
    "gamma": Study("Noise scaling γ (paper Fig. 3 middle)", gamma_runs, report_gamma),
    "compression": Study("Compression: latent channels and downsampling, VAE vs ε-VAE (paper Fig. 2)",
                         compression_runs, report_compression),
    "resolution": Study("Resolution generalisation (paper Table 1)", resolution_runs, report_resolution),
}


def _markdown(report: dict[str, Any], tables: str, results: list[dict[str, Any]]) -> str:
    settings = report["settings"]
    training = settings["training"]
    steps, batch, resolution, seed = (training["optim"]["max_steps"], training["data"]["batch_size"],
                                      training["data"]["resolution"], training["run"]["seed"])
    capped = [r["name"] for r in results if r["training"].get("time_capped")]
    detail_rows = []
    for result in results:
        training = result["training"]
        for row in result["evaluations"]:
            detail_rows.append([result["name"], result["label"], _mparams(result["decoder_params"]),
                                training["steps"], training["images_per_s"], row["resolution"], row["steps"] or "–",
                                row["spacing"] or "–", *_metric_cells(row), row["decode_images_per_s"],
                                row["num_images"]])
    detail = _table(["run", "model", "G params (M)", "train steps", "train img/s", "eval res", "NFE", "spacing",
                     *METRIC_HEADER, "decode img/s", "images"], detail_rows)
    feature_note = "" if settings["feature_size"] == 224 else \
        f" (features at {settings['feature_size']}² instead of 224²: a smoke-test setting, not comparable)"
    cap_note = (f"\n**Time-capped before {steps} steps:** {', '.join(capped)} — their rows saw "
                "less training than the others.\n") if capped else ""
    caps = {name: cap for name, cap in report["time_cap_minutes"].items() if cap is not None}
    cap_text = (f" Training time caps (minutes): {', '.join(f'{n} {c:.1f}' for n, c in caps.items())}."
                if caps else "")
    return f"""# {report['title']}

Profile `{report['profile']}`, data `{report['data']}`. Every run trains {steps} steps at batch \
{batch} on {resolution}² crops with seed {seed}, the same encoder \
architecture and initial weights and the same optimiser; only the studied factor differs.{cap_text}
{cap_note}
Metrics on {settings['eval_images'] or 'all'} class-balanced validation crops: {FD_LABEL} (Fréchet distance in \
EfficientNet-Lite0 features, **not FID**){feature_note}, PSNR, SSIM and the EffNet-L0 perceptual distance. \
"G params" = decoder parameters; images/s were measured on this machine.

{tables}
## All evaluations

{detail}"""


def run_studies(names: str | list[str], profile: str = "quick", out: str | Path = "runs/bench", data: str = "offline",
                perceptual_weights: str | None = None, threads: int | None = None, cpu: bool = False) -> dict[str, Any]:
    """Run one study, several, or "all" in turn; returns {study: report}."""
    if names == "all":
        names = list(STUDIES)
    elif isinstance(names, str):
        names = [names]
    if threads:
        torch.set_num_threads(threads)
    return {name: run_study(name, profile, out, data=data, perceptual_weights=perceptual_weights, cpu=cpu)
            for name in names}
