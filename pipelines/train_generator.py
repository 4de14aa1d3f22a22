"""Stage 2: train the class-conditional DiT on cached latent shards (paper appendix C.3, DiT defaults).

Each step draws latents from the shards (`data.latent_shards.make_latent_loader`: split by rank and worker,
shuffled, resampled forever), picking the center crop's or the flip's posterior at random and sampling
z = mean + σ·ε, standardised per channel with the manifest's mean/std. The same mean/std are written into the
DiT's config (`latent_mean`/`latent_std`), so `DiT.denormalize_latents` undoes exactly this normalisation at
sampling time. The latent shape and class count come from the manifest too. The loss is the DDPM
ε-prediction MSE at t ~ U{0..999} on the linear-β schedule (`generator.diffusion.epsilon_loss`; fixed variance,
no VLB term), Adam lr 1e-4, β=(0.9, 0.999), no weight decay, EMA 0.9999, label dropout 0.1.

Resume (`--resume auto`) restores model, EMA, optimiser, LR schedule, step and every rank's RNG exactly. The
*data position* of an infinite resampled stream cannot be replayed, so a resumed run restarts the stream with
seed `stream_seed(seed, step)`: it draws fresh samples rather than replaying the ones already seen, and the
run is reproducible given the steps it was resumed at (but not bit-identical to an uninterrupted run).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from generator.diffusion import DiffusionSchedule, epsilon_loss, linear_beta_schedule
from generator.dit import DiT, DiTConfig, DiT_models
from pipelines.kit.checkpoints import CheckpointManager
from pipelines.kit.compiling import compile_modules
from pipelines.kit.ema import EMA, save_final_model, unwrap_model
from pipelines.kit.config import SectionedConfig, require_at_least
from pipelines.kit.loop import (NonFiniteGuard, OptimizedModule, StepOutput, open_metrics_log, plan_of, quartile_losses,
                                 run_training_loop)
from pipelines.kit.optim import OptimizerConfig, TrainingOptimConfig, build_optimizer, warmup_scheduler
from pipelines.kit.run import RunConfig, make_run_accelerator, per_device_batch
from tokenizer import DEFAULT_DECODE_STEPS
from tokenizer.nn import count_parameters

logger = logging.getLogger(__name__)

# DiT architecture fields a run may override on top of the registry preset (tests, ablations).
MODEL_OVERRIDE_FIELDS = ("hidden_size", "depth", "num_heads", "mlp_ratio", "patch_size")


@dataclass(frozen=True)
class GeneratorModelConfig:
    model: str = "DiT-XL/2"  # a key of generator.DiT_models
    model_overrides: dict[str, Any] = field(default_factory=dict)  # MODEL_OVERRIDE_FIELDS only
    learn_sigma: bool = False  # the paper drops the VLB term: ε only
    qk_norm: bool = False  # RMS-normalise queries and keys (stabler attention at scale)
    class_dropout_prob: float = 0.1  # label dropout (keeps CFG possible)
    diffusion_steps: int = 1000  # DDPM training steps T (linear β 1e-4..0.02)
    # Ignore the shards' labels and train without classes (the paper's stage-2 system comparisons, appendix C.3
    # and Table 8, use an unconditional DiT); sampling then takes no classes, only a number of images.
    unconditional: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_overrides", dict(self.model_overrides))
        if self.model not in DiT_models:
            raise ValueError(f"unknown model {self.model!r}; choose from {sorted(DiT_models)}")
        unknown = sorted(set(self.model_overrides) - set(MODEL_OVERRIDE_FIELDS))
        if unknown:
            raise ValueError(f"unknown model override(s) {unknown}; allowed: {list(MODEL_OVERRIDE_FIELDS)}")
        require_at_least(self, 1, "diffusion_steps")


@dataclass(frozen=True)
class LatentDataConfig:
    shards: str = "runs/latents"  # a cache_latents output directory (manifest.json + shards)
    batch_size: int = 256  # global: per_device × processes × grad_accum
    num_workers: int = 4  # DataLoader worker processes per process
    shuffle_buffer: int = 1000  # latents held in the streaming shuffle buffer
    on_bad_shard: str = "raise"  # a damaged shard: "raise" (naming it) or "skip" (counted in the metrics)

    def __post_init__(self) -> None:
        from data.latent_shards import BAD_SHARD_POLICIES

        require_at_least(self, 1, "batch_size")
        require_at_least(self, 0, "num_workers", "shuffle_buffer")
        if self.on_bad_shard not in BAD_SHARD_POLICIES:
            raise ValueError(f"on_bad_shard must be one of {BAD_SHARD_POLICIES}, got {self.on_bad_shard!r}")


@dataclass(frozen=True)
class GeneratorOptimConfig(TrainingOptimConfig):
    weight_decay: float = 0.0  # AdamW weight decay (DiT: 0)

    def __post_init__(self) -> None:
        super().__post_init__()
        require_at_least(self, 0, "weight_decay")


@dataclass(frozen=True)
class SampleGridConfig:
    """Sample grids: EMA weights, respaced DDPM, decoded with the tokenizer; skipped without one."""

    sample_every: int = 10_000  # steps between sample grids
    sample_steps: int = 50  # respaced DDPM steps of the grids
    sample_images: int = 16  # images per grid
    decode_steps: int = DEFAULT_DECODE_STEPS  # ε-VAE decode steps of the grids
    tokenizer: str | None = None  # tokenizer folder that decodes the grids (None: no grids)

    def __post_init__(self) -> None:
        require_at_least(self, 1, "sample_every", "sample_steps", "sample_images", "decode_steps")


@dataclass(frozen=True)
class GeneratorTrainConfig(SectionedConfig):
    """Everything a stage-2 run needs; saved in every checkpoint. Defaults are the paper's (C.3) / DiT's.
    Build it flat with `GeneratorTrainConfig.from_flat(lr=..., shards=...)` (field names are unique)."""

    model: GeneratorModelConfig = field(default_factory=GeneratorModelConfig)
    data: LatentDataConfig = field(default_factory=LatentDataConfig)
    # The shared optim section's defaults are DiT's: lr 1e-4, β=(0.9, 0.999), no warm-up, EMA 0.9999, grad_clip
    # None (measure the norm only: DiT does not clip); one million steps, as the paper trains its DiTs (C.3).
    optim: GeneratorOptimConfig = field(default_factory=GeneratorOptimConfig)
    sample: SampleGridConfig = field(default_factory=SampleGridConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(
        output_dir="runs/generator", checkpoint_every=10_000, keep_last=3, log_every=100))

    def __post_init__(self) -> None:
        if self.sample.sample_steps > self.model.diffusion_steps:
            raise ValueError(f"sample_steps {self.sample.sample_steps} > diffusion_steps {self.model.diffusion_steps}")


@dataclass
class TrainedGenerator:
    """What `train_generator` hands back: the saved directory and this rank's live objects (for tests, notebooks)."""

    model_dir: Path
    step: int
    model: DiT  # raw (not EMA) weights of this rank
    ema: EMA
    num_parameters: int


# ---------------------------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------------------------


def stream_seed(seed: int, step: int) -> int:
    """Seed of the latent stream started at `step`: a resumed run draws new samples instead of replaying."""
    return (int(seed) * 1_000_003 + int(step)) % 2**31


def read_manifest(shards: str | Path) -> dict[str, Any]:
    """The shard directory's manifest (one-line errors for a missing directory or manifest)."""
    from data.latent_shards import load_manifest

    directory = Path(shards)
    if not directory.is_dir():
        raise FileNotFoundError(f"latent shards directory {str(directory)!r} does not exist; run scripts/cache_latents.py")
    return load_manifest(str(directory))


def dit_config_from_manifest(config: GeneratorTrainConfig, manifest: dict[str, Any]) -> DiTConfig:
    """Registry preset + overrides + the data-dependent fields and normalisation stats of the manifest."""
    channels, height, width = manifest["latent_shape"]
    if height != width:
        raise ValueError(f"DiT needs square latents, the manifest has {height}x{width}")
    std = [float(s) for s in manifest["latent_std"]]
    if min(std) <= 0:
        raise ValueError(f"the manifest's latent_std has a zero channel ({std}): the latents are constant")
    return DiTConfig.from_name(
        config.model.model, input_size=int(height), in_channels=int(channels),
        num_classes=0 if config.model.unconditional else int(manifest["num_classes"]),
        class_dropout_prob=config.model.class_dropout_prob, learn_sigma=config.model.learn_sigma,
        qk_norm=config.model.qk_norm,
        latent_mean=tuple(float(m) for m in manifest["latent_mean"]), latent_std=tuple(std),
        **_provenance_fields(config, manifest), **config.model.model_overrides,
    )


def _provenance_fields(config: GeneratorTrainConfig, manifest: dict[str, Any]) -> dict[str, Any]:
    """What sampling needs from the shard manifest, copied into the DiT's own config (a folder copied anywhere
    keeps its class names and knows its tokenizer)."""
    names = manifest.get("class_names")
    keep_names = names and len(names) == int(manifest["num_classes"]) and not config.model.unconditional
    fields = {"class_names": tuple(names) if keep_names else None,
              "tokenizer_fingerprint": (manifest.get("tokenizer") or {}).get("weights_sha256")}
    encoder, source = manifest.get("encoder") or {}, manifest.get("source") or {}
    if "downsample" in encoder:
        fields["downsample"] = int(encoder["downsample"])
    if "resolution" in source:
        fields["image_size"] = int(source["resolution"])
    return fields


def schedule_on(schedule: DiffusionSchedule, device: torch.device) -> DiffusionSchedule:
    """The schedule's float64 tables on `device`, so each step's coefficient lookup stays on the device."""
    return DiffusionSchedule(**{f.name: getattr(schedule, f.name).to(device) for f in dataclasses.fields(schedule)})


def _load_grid_tokenizer(config: GeneratorTrainConfig, manifest: dict[str, Any], device: torch.device):
    """The decoder for sample grids, checked against the manifest; None when no tokenizer is given."""
    if config.sample.tokenizer is None:
        return None
    from tokenizer import load_tokenizer
    from tokenizer.models import weights_fingerprint

    tokenizer = load_tokenizer(config.sample.tokenizer)
    if tokenizer.latent_channels != manifest["latent_shape"][0]:
        raise ValueError(f"tokenizer {config.sample.tokenizer} has {tokenizer.latent_channels} latent channels, "
                         f"the shards have {manifest['latent_shape'][0]}")
    if weights_fingerprint(config.sample.tokenizer) != manifest["tokenizer"]["weights_sha256"]:
        logger.warning("tokenizer %s is not the one that encoded %s (weights hash differs): grids may look wrong",
                       config.sample.tokenizer, config.data.shards)
    return tokenizer.to(device).eval().requires_grad_(False)


@torch.no_grad()
def write_sample_grid(dit: DiT, ema: EMA, tokenizer, config: GeneratorTrainConfig, path: Path) -> None:
    """EMA-weight samples of classes 0, 1, 2, ... (seeded, so grids of successive steps are comparable)."""
    from torchvision.utils import save_image

    from pipelines.kit.generation import generate_latents

    device = next(dit.parameters()).device
    labels = torch.arange(config.sample.sample_images, device=device) % max(dit.config.num_classes, 1)  # (N,)
    if dit.config.unconditional:
        labels = torch.full_like(labels, dit.null_class)
    generator = torch.Generator(device=device).manual_seed(config.run.seed)
    with ema.swapped_in(dit):
        latents = generate_latents(dit, labels, config.sample.sample_steps, generator)  # (N, C, h, w)
    images = tokenizer.decode(latents, steps=config.sample.decode_steps, generator=generator)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image((images.float().clamp(-1, 1) + 1) / 2, path, nrow=int(math.ceil(math.sqrt(len(labels)))))


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


def train_generator(config: GeneratorTrainConfig) -> TrainedGenerator:
    """Run (or resume) stage-2 training; the final EMA model is saved to `output_dir/model`."""
    from data.latent_shards import make_latent_loader

    output_dir = Path(config.run.output_dir)
    manifest = read_manifest(config.data.shards)  # before anything expensive: one-line error for a bad directory
    dit_config = dit_config_from_manifest(config, manifest)
    accelerator = make_run_accelerator(config.run, config.optim.grad_accum)
    device = accelerator.device
    micro_batch = per_device_batch(config.data.batch_size, accelerator.num_processes, config.optim.grad_accum)
    grid_tokenizer = _load_grid_tokenizer(config, manifest, device) if accelerator.is_main_process else None

    # --- network, optimiser, EMA
    dit = DiT(dit_config)
    num_parameters = count_parameters(dit)
    optimizer = build_optimizer(dit, OptimizerConfig(lr=config.optim.lr, betas=config.optim.adam_betas,
                                                     weight_decay=config.optim.weight_decay), device)
    scheduler = warmup_scheduler(optimizer, config.optim.warmup_steps)
    model, optimizer = accelerator.prepare(dit, optimizer)  # the loader is already split by rank: not prepared
    raw_dit: DiT = unwrap_model(model)
    if config.run.compile:  # in place, after prepare: weights, EMA and checkpoint keys stay the eager module's
        compile_modules(raw_dit, device=device)
    ema = EMA(raw_dit, config.optim.ema_decay)
    guard = NonFiniteGuard(config.run.max_nonfinite, accelerator)
    schedule = schedule_on(linear_beta_schedule(config.model.diffusion_steps), device)
    networks = [OptimizedModule("dit", model, optimizer, scheduler, config.optim.grad_clip, ema, raw_dit)]

    # --- resume
    manager = CheckpointManager(output_dir / "checkpoints", keep_last=config.run.keep_last, accelerator=accelerator)
    parts = dict(models={"dit": raw_dit}, emas={"dit": ema}, optimizers={"dit": optimizer},
                 schedulers={"dit": scheduler})
    start_step = 0
    resume_from = manager.resolve(config.run.resume)
    if resume_from is not None:
        config.check_resume(resume_from)  # one line if the stored run had other settings
        state = manager.load(resume_from, **parts)
        start_step = state.step
        guard.load_state_dict(state.extra.get("nonfinite_guard", guard.state_dict()))
        if accelerator.is_main_process:
            logger.info("resumed from %s at step %d", resume_from, start_step)
    data_seed = stream_seed(config.run.seed, start_step)
    loader, latent_dataset = make_latent_loader(
        config.data.shards, micro_batch, accelerator.process_index, accelerator.num_processes,
        num_workers=config.data.num_workers, resampled=True, shuffle_buffer=config.data.shuffle_buffer, seed=data_seed,
        flip=True, sample_posterior=True, normalize=True, on_bad_shard=config.data.on_bad_shard,
    )
    if accelerator.is_main_process:
        logger.info("%s: %s parameters, latents %s, %d classes", config.model.model, f"{num_parameters:,}",
                    manifest["latent_shape"], manifest["num_classes"])

    def save_checkpoint(step: int) -> Path:
        return manager.save(
            step, **parts, config=config.to_dict(), extra={"nonfinite_guard": guard.state_dict()},
            data_state={"stream_seed": data_seed, "stream": "resampled; a resume restarts it with "
                                                            "stream_seed(seed, step)"},
        )

    # --- the step body: DDPM ε-prediction loss at t ~ U{0..T-1}
    def step_body(batch, step: int) -> StepOutput:
        latents, labels = batch
        latents = latents.to(device, non_blocking=True)  # (B, C, h, w), normalised
        labels = labels.to(device, non_blocking=True)  # (B,)
        t = torch.randint(0, config.model.diffusion_steps, (latents.shape[0],), device=device)  # (B,)
        with accelerator.autocast():
            per_sample = epsilon_loss(model, schedule, latents, t, model_kwargs={"y": labels})  # (B,)
            loss = per_sample.mean()
        return StepOutput(
            losses=[loss], batch_size=latents.shape[0],
            # bad shards / samples skipped by this process (DataLoader workers count in their own copy and name
            # each one in a warning)
            scalars={"loss": loss.detach(), "bad_shards_skipped": latent_dataset.bad_shards.count},
            log_extra=lambda: quartile_losses(per_sample, t, accelerator, t_max=config.model.diffusion_steps),
        )

    def write_grid(step: int) -> None:
        if step % config.sample.sample_every == 0 and grid_tokenizer is not None:
            write_sample_grid(raw_dit, ema, grid_tokenizer, config, output_dir / "samples" / f"step_{step:07d}.png")

    result = run_training_loop(
        accelerator, loader, step_body, networks, plan_of(config), start_step=start_step, guard=guard,
        metrics_log=open_metrics_log(accelerator, config, "generator", start_step), save_checkpoint=save_checkpoint,
        resumed=resume_from is not None, after_update=write_grid, throughput_name="latents_per_s",
    )
    final_dir = output_dir / "model"
    if accelerator.is_main_process:
        save_final_model(raw_dit, ema, final_dir, {
            "step": result.step, "num_parameters": num_parameters, "shards": str(config.data.shards),
            "num_samples": manifest["num_samples"], "tokenizer_weights_sha256": manifest["tokenizer"]["weights_sha256"],
            "global_batch_size": config.data.batch_size, "bad_shards_skipped": latent_dataset.bad_shards.count,
        })
    accelerator.wait_for_everyone()
    return TrainedGenerator(final_dir, result.step, raw_dit, ema, num_parameters)
