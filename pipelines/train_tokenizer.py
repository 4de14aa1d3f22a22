"""Stage 1: train the ε-VAE tokenizer (or the baseline VAE) with accelerate (paper Sec. 3, appendix C.2).

One generator step per micro-batch computes
    L = L_score + λ_LPIPS·L_LPIPS(x̂0_t, x0) + λ_adv·L_adv(D(x̂0_t, x_t, t)) + kl_weight·KL          (Eq. 1, 9-12)
and one discriminator step contrasts real trajectories (x0, x_t) with fake ones (x̂0_t, x_t), plus a lazy R1
penalty on the real inputs. The baseline VAE uses the same machinery with L_rec on its single-step output and
an unconditional 3-channel discriminator. KL is the posterior's KL summed over latent dims and, for models with
`kl_normalization="pixels"` (the default), divided by 3·H·W: the SD/LDM balance at any size (`losses.kl_loss`).
Gradient clipping is off unless `grad_clip` is set (C.2 names none); the discriminator's learning-rate warm-up
starts at `disc_start`, its first update.

DDP notes: the whole generator side runs inside `TokenizerTrainingStep.forward` so DDP syncs encoder and
decoder gradients; the adversarial term of the generator step goes through the *unwrapped* discriminator with
its parameters frozen, so no discriminator gradient leaks into the generator step and DDP never sees a
discriminator forward without a backward. The discriminator step goes through the wrapped module.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from pipelines.kit.checkpoints import CheckpointManager
from pipelines.kit.compiling import compile_modules, eager_if
from pipelines.kit.ema import EMA, save_final_model, unwrap_model
from pipelines.kit.config import SectionedConfig, require_at_least
from pipelines.kit.loop import (NonFiniteGuard, OptimizedModule, StepOutput, open_metrics_log, plan_of, quartile_losses,
                                 run_training_loop)
from pipelines.kit.optim import OptimizerConfig, TrainingOptimConfig, build_optimizer, warmup_scheduler
from pipelines.kit.run import RunConfig, make_run_accelerator, per_device_batch
from tokenizer import DEFAULT_DECODE_STEPS, EpsVAE, VAE, losses
from tokenizer.objectives import Objective, TrainingOutputs
from tokenizer.discriminator import DISCRIMINATOR_PRESETS, TrajectoryDiscriminator

logger = logging.getLogger(__name__)

MODEL_CLASSES = {"eps_vae": EpsVAE, "vae": VAE}


@dataclass(frozen=True)
class TokenizerModelConfig:
    """A preset pair plus overrides (gamma, latent_channels, downsample, conditioning, ...), or --init-from."""

    model_type: str = "eps_vae"  # "eps_vae" | "vae"
    encoder: str = "lite"  # encoder preset (tokenizer.encoder.ENCODER_PRESETS)
    decoder: str = "B"  # decoder preset (Table 5; tokenizer.unet.ADM_PRESETS, or VAE_DECODER_PRESETS for the VAE)
    model_overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None  # a save_pretrained dir: multi-stage training (128² then 256², Table 1 †)
    discriminator: str = "default"  # discriminator preset
    # Start the encoder from a diffusers-format AutoencoderKL (folder or Hub id; the `sd` encoder preset), e.g.
    # the SD VAE, and/or keep the encoder fixed: with both, the run trains a few-step diffusion decoder for
    # existing SD latents (the use case of OpenAI's consistency decoder).
    init_encoder_from: str | None = None
    freeze_encoder: bool = False  # keep the encoder's weights fixed

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_CLASSES:
            raise ValueError(f"model_type must be one of {sorted(MODEL_CLASSES)}, got {self.model_type!r}")
        if self.init_from and self.model_overrides:
            raise ValueError(f"--init-from rebuilds the model from {self.init_from}/config.json, so the model "
                             f"overrides {sorted(self.model_overrides)} cannot apply: drop them, or start from "
                             "presets without --init-from")
        if self.init_from and self.init_encoder_from:
            raise ValueError("--init-from and --init-encoder-from both set the encoder's weights: give one")
        if self.discriminator not in DISCRIMINATOR_PRESETS:
            raise ValueError(f"unknown discriminator preset {self.discriminator!r}; choose from {sorted(DISCRIMINATOR_PRESETS)}")


@dataclass(frozen=True)
class TokenizerDataConfig:
    data: str = "offline"  # offline | ImageNet-style folder | webdataset shards (data.sources.build_image_dataset)
    resolution: int = 128  # training image side; must be divisible by the encoder's downsample
    # Train on a random window of this side cut from each resolution² image (None: the whole image). The decoder
    # generalises to larger sizes (paper Table 1), so the model still encodes and decodes resolution² images, at
    # the pixel scale it trained on, for a fraction of the compute per step. A multiple of the downsample.
    train_crop: int | None = None
    batch_size: int = 256  # global: per_device × processes × grad_accum
    num_workers: int = 4  # DataLoader worker processes per process

    def __post_init__(self) -> None:
        require_at_least(self, 1, "resolution", "batch_size")
        if self.train_crop is not None and not 1 <= self.train_crop <= self.resolution:
            raise ValueError(f"train_crop must be between 1 and the resolution ({self.resolution}), "
                             f"got {self.train_crop}")

    @property
    def train_size(self) -> int:
        """The side of the images a training step sees."""
        return self.resolution if self.train_crop is None else self.train_crop


@dataclass(frozen=True)
class TokenizerOptimConfig(TrainingOptimConfig):
    disc_lr: float = 1e-4  # discriminator learning rate

    def __post_init__(self) -> None:
        super().__post_init__()
        require_at_least(self, 0, "disc_lr")


@dataclass(frozen=True)
class TokenizerLossConfig:
    perceptual: str = "lpips-vgg"  # perceptual-loss network (lpips-vgg: the paper; effnet-l0: offline)
    perceptual_weights: str | None = None  # weights file of the perceptual network (default: its package's cache)
    perceptual_weight: float = 0.5  # λ_LPIPS of the perceptual term (paper: 0.5)
    adversarial_weight: float = 0.5  # λ_adv of the adversarial term (paper: 0.5)
    disc_start: int = 0  # generator's adversarial term and discriminator updates start at this step
    r1_weight: float = 0.1  # γ_R1 / 2 in StyleGAN's notation, applied every r1_interval steps (lazy R1)
    r1_interval: int = 4  # steps between lazy R1 penalties
    reconstruction: str = "l1"  # baseline VAE only

    def __post_init__(self) -> None:
        require_at_least(self, 1, "r1_interval")
        require_at_least(self, 0, "perceptual_weight", "adversarial_weight", "r1_weight")


@dataclass(frozen=True)
class TokenizerRunConfig(RunConfig):
    image_every: int = 1000  # steps between reconstruction images
    # NHWC activations and weights for the convolutional nets: faster convolutions on tensor-core GPUs under
    # bf16 and on CPUs with oneDNN; checkpoints and saved weights are the same either way.
    channels_last: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        require_at_least(self, 1, "image_every")


@dataclass(frozen=True)
class TokenizerTrainConfig(SectionedConfig):
    """Everything a stage-1 run needs; saved in every checkpoint. Defaults are the paper's (appendix C.2).
    Build it flat with `TokenizerTrainConfig.from_flat(lr=..., output_dir=...)` (field names are unique)."""

    model: TokenizerModelConfig = field(default_factory=TokenizerModelConfig)
    data: TokenizerDataConfig = field(default_factory=TokenizerDataConfig)
    optim: TokenizerOptimConfig = field(default_factory=lambda: TokenizerOptimConfig(
        lr=1e-4, disc_lr=1e-4, adam_betas=(0.0, 0.999), warmup_steps=5000, max_steps=1_000_000, grad_accum=1,
        grad_clip=None, ema_decay=0.999))  # C.2 names no gradient clipping: None measures the norm only
    loss: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)
    run: TokenizerRunConfig = field(default_factory=lambda: TokenizerRunConfig(
        output_dir="runs/tokenizer", checkpoint_every=1000, keep_last=3, log_every=10))


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


def build_tokenizer(config: TokenizerTrainConfig) -> EpsVAE | VAE:
    """The model to train: from presets + overrides, or from a trained directory (fine-tuning)."""
    model_class = MODEL_CLASSES[config.model.model_type]
    if config.model.init_from:
        tokenizer = model_class.from_pretrained(config.model.init_from)
    else:
        tokenizer = model_class.from_preset(config.model.encoder, config.model.decoder, **config.model.model_overrides)
    if config.model.init_encoder_from:
        from tokenizer.convert import load_diffusers_encoder

        load_diffusers_encoder(tokenizer, config.model.init_encoder_from)
    if config.model.freeze_encoder:  # left out of the optimiser (only trainable parameters are optimised)
        tokenizer.encoder.requires_grad_(False)
    return tokenizer


def build_discriminator(config: TokenizerTrainConfig) -> TrajectoryDiscriminator:
    """6-channel time-conditioned trajectory discriminator for ε-VAE, 3-channel unconditional for the VAE."""
    preset = DISCRIMINATOR_PRESETS[config.model.discriminator]
    trajectory = config.model.model_type == "eps_vae"
    disc_config = dataclasses.replace(preset, in_channels=6 if trajectory else 3, time_conditioned=trajectory)
    return TrajectoryDiscriminator(disc_config)


class TokenizerTrainingStep(nn.Module):
    """The generator side of one training step, as one `forward` so DDP can wrap it: encode, sample the
    posterior, and let the tokenizer's objective build x_t, the prediction and x̂0 (`TrainingOutputs`)."""

    def __init__(self, tokenizer: EpsVAE | VAE):
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, images: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> TrainingOutputs:
        posterior = self.tokenizer.encode_posterior(images)
        z = posterior.sample()  # (B, C, h, w)
        kl = losses.kl_loss(posterior.kl(), images, self.tokenizer.config.kl_normalization)  # (B,)
        return self.tokenizer.objective.training_outputs(self.tokenizer, images, z, kl, noise, t)


def sample_training_time(tokenizer: EpsVAE | VAE, batch: int, device: torch.device) -> torch.Tensor:
    """Training t of the tokenizer's objective (logit-normal for flow, DDPM steps / T, zeros for the VAE)."""
    return tokenizer.objective.sample_time(tokenizer, batch, device)


# ---------------------------------------------------------------------------------------------------------------
# Data: exact resume needs the epoch's order and every sample's augmentation to be functions of (seed, epoch, i)
# ---------------------------------------------------------------------------------------------------------------


class EpochPermutationSampler(Sampler[int]):
    """A shuffled order that depends only on (seed, epoch), so a resumed run replays the same epoch."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class SeededAugmentation(Dataset):
    """Runs each item's random crop/flip under a torch seed derived from (seed, epoch, index).

    Augmentation then does not depend on which worker loads an item or how many batches were skipped on
    resume, and it leaves the training RNG streams (noise, t, dropout) untouched.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
            return self.dataset[index]


def build_train_loader(config: TokenizerTrainConfig, per_device_batch: int, rank: int, world_size: int):
    """Map-style sources (folders, offline photos) replay exactly on resume; webdataset streams are split by
    (rank, worker) inside the dataset and restart from a fresh shuffle on resume (their position is not saved)."""
    from torch.utils.data import IterableDataset

    from data.sources import build_image_dataset
    from data.transforms import RandomWindows, RandomWindowStream

    dataset = build_image_dataset(config.data.data, split="train", resolution=config.data.resolution, train=True,
                                  rank=rank, world_size=world_size, seed=config.run.seed)
    if config.data.train_size != config.data.resolution:
        window = RandomWindowStream if isinstance(dataset, IterableDataset) else RandomWindows
        dataset = window(dataset, config.data.train_size)
    if isinstance(dataset, IterableDataset):
        loader = DataLoader(dataset, batch_size=per_device_batch, num_workers=config.data.num_workers, drop_last=True)
        return loader, None, None
    if len(dataset) < config.data.batch_size // config.optim.grad_accum:
        raise ValueError(f"the training set has {len(dataset)} images, fewer than one batch ({config.data.batch_size})")
    augmented = SeededAugmentation(dataset, config.run.seed)
    sampler = EpochPermutationSampler(len(dataset), config.run.seed)
    loader = DataLoader(
        augmented,
        batch_size=per_device_batch,
        sampler=sampler,
        num_workers=config.data.num_workers,
        drop_last=True,
        generator=torch.Generator().manual_seed(config.run.seed),  # keeps the global RNG out of loader start-up
    )
    return loader, sampler, augmented


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


def _set_requires_grad(module: nn.Module, flag: bool) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(flag)


def generator_losses(
    config: TokenizerTrainConfig,
    objective: Objective,
    out: TrainingOutputs,
    images: torch.Tensor,
    t: torch.Tensor,
    perceptual: nn.Module,
    discriminator: nn.Module,
    use_adversarial: bool,
    kl_weight: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 1 with L_rec → L_score for ε-VAE; returns the total and per-sample terms (B,) for logging.

    The regression term is the objective's own (`objective.regression_term`: "score" or "rec").
    """
    terms = {objective.regression_term: objective.regression_loss(out, images, config.loss.reconstruction)}
    if config.loss.perceptual_weight > 0:
        terms["perceptual"] = perceptual(out.x_hat.float(), images.float())
    if use_adversarial and config.loss.adversarial_weight > 0:
        if out.x_t is not None:  # trajectory matching on (x̂0_t, x_t), Eq. 12
            logits = discriminator(losses.trajectory_pair(out.x_hat, out.x_t), t)
        else:
            logits = discriminator(out.x_hat)
        terms["adv"] = losses.generator_adversarial_loss(logits)
    terms["kl"] = out.kl
    weights = {"score": 1.0, "rec": 1.0, "perceptual": config.loss.perceptual_weight,
               "adv": config.loss.adversarial_weight, "kl": kl_weight}
    total = sum(weights[name] * value.mean() for name, value in terms.items())
    return total, terms


def discriminator_step_loss(
    config: TokenizerTrainConfig,
    discriminator: nn.Module,
    out: TrainingOutputs,
    images: torch.Tensor,
    t: torch.Tensor,
    with_r1: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Non-saturating D loss on real vs detached fake, with lazy R1 on the real inputs, in one D forward.

    A trajectory discriminator (`out.x_t` set) sees (x0, x_t) as real and (x̂0_t, x_t) as fake at time t; the
    VAE's sees images alone. Stats are tensors, read only on log steps.
    """
    x_t = out.x_t.detach() if out.x_t is not None else None
    real = images if x_t is None else losses.trajectory_pair(images, x_t)
    fake = out.x_hat.detach() if x_t is None else losses.trajectory_pair(out.x_hat.detach(), x_t)
    real = real.detach().requires_grad_(with_r1)
    condition = () if x_t is None else (torch.cat([t, t]),)
    real_logits, fake_logits = discriminator(torch.cat([real, fake]), *condition).chunk(2)
    loss = losses.discriminator_loss(real_logits, fake_logits)
    stats = {"d_real_logit": real_logits.detach().float().mean(), "d_fake_logit": fake_logits.detach().float().mean()}
    if with_r1:
        # Gradient w.r.t. the input only: DDP's parameter hooks fire once, in the backward of the total.
        r1 = losses.r1_from_logits(real_logits, real)
        loss = loss + config.loss.r1_weight * config.loss.r1_interval * r1
        stats["r1"] = r1.detach()
    return loss, stats


def encoder_downsample(model: TokenizerModelConfig) -> int:
    """The downsample factor of the tokenizer `build_tokenizer` will build, from the encoder preset and the
    `downsample` override, or from the `init_from` folder's config.json, without building a network."""
    from tokenizer import pretrained
    from tokenizer.encoder import ENCODER_PRESETS, multipliers_for_downsample

    model_class = MODEL_CLASSES[model.model_type]
    if model.init_from:
        directory = pretrained.resolve_model_dir(model.init_from)
        _, fields = pretrained.read_config(directory, {model.model_type: model_class.__name__})
        try:
            return model_class.config_cls.from_dict(fields).encoder.downsample
        except (TypeError, ValueError) as error:
            raise ValueError(f"config.json in {str(directory)!r} does not describe a {model_class.__name__}: "
                             f"{error}") from None
    if model.encoder not in ENCODER_PRESETS:
        raise ValueError(f"unknown encoder preset {model.encoder!r}; choose from {sorted(ENCODER_PRESETS)}")
    downsample = model.model_overrides.get("downsample")
    if downsample is None:
        return ENCODER_PRESETS[model.encoder].downsample
    multipliers_for_downsample(ENCODER_PRESETS[model.encoder].channel_multipliers, int(downsample))  # power of 2
    return int(downsample)


def check_inputs(config: TokenizerTrainConfig) -> None:
    """The cheap checks, before the metric networks' weights are looked for and before any file is written (one
    line each, issue 18): the data source, the folders named, the resolution against the downsample factor."""
    from data.sources import resolve_source

    resolve_source(config.data.data)
    resume = config.run.resume
    if resume is not None and str(resume).lower() not in ("", "none", "no", "auto") and not Path(resume).exists():
        raise FileNotFoundError(f"--resume {resume} does not exist: pass a checkpoint directory or 'auto'")
    downsample = encoder_downsample(config.model)
    if config.data.resolution % downsample:
        raise ValueError(f"resolution {config.data.resolution} is not divisible by the encoder's downsample factor "
                         f"{downsample}: use a multiple of {downsample}")
    if config.data.train_size % downsample:
        raise ValueError(f"train_crop {config.data.train_crop} is not divisible by the encoder's downsample factor "
                         f"{downsample}: use a multiple of {downsample}")


def train_tokenizer(config: TokenizerTrainConfig) -> Path:
    """Run (or resume) stage-1 training; returns the directory of the final `save_pretrained` model."""
    from tokenizer.perceptual import build_perceptual

    check_inputs(config)
    output_dir = Path(config.run.output_dir)
    accelerator = make_run_accelerator(config.run, config.optim.grad_accum)
    device = accelerator.device
    micro_batch = per_device_batch(config.data.batch_size, accelerator.num_processes, config.optim.grad_accum)
    # Fail on missing perceptual weights before anything expensive happens.
    perceptual = build_perceptual(config.loss.perceptual if config.loss.perceptual_weight > 0 else "none",
                                  config.loss.perceptual_weights).to(device)

    # --- networks, optimisers, EMA
    tokenizer = build_tokenizer(config)
    discriminator = build_discriminator(config)
    loader, sampler, augmented = build_train_loader(config, micro_batch, accelerator.process_index,
                                                    accelerator.num_processes)
    step_module = TokenizerTrainingStep(tokenizer)
    memory_format = torch.channels_last if config.run.channels_last else torch.contiguous_format
    for module in (step_module, discriminator, perceptual):
        module.to(memory_format=memory_format)
    opt_g = build_optimizer(step_module, OptimizerConfig(lr=config.optim.lr, betas=config.optim.adam_betas), device)
    opt_d = build_optimizer(discriminator, OptimizerConfig(lr=config.optim.disc_lr, betas=config.optim.adam_betas),
                            device)
    sched_g = warmup_scheduler(opt_g, config.optim.warmup_steps)
    # The discriminator's warm-up counts from its first update (disc_start), not from step 0.
    sched_d = warmup_scheduler(opt_d, config.optim.warmup_steps, start=config.loss.disc_start)
    step_module, discriminator, opt_g, opt_d = accelerator.prepare(step_module, discriminator, opt_g, opt_d)
    if sampler is not None:  # webdataset streams are already split by rank inside the dataset
        loader = accelerator.prepare(loader)
    raw_tokenizer: EpsVAE | VAE = unwrap_model(step_module).tokenizer
    raw_discriminator: nn.Module = unwrap_model(discriminator)
    # In place, after prepare: weights, EMA and checkpoint keys stay the eager modules'. The frozen perceptual net
    # stays eager: compiled, EffNet-L0's depthwise convolutions measured 0.8-0.9× eager speed on the CPU.
    if config.run.compile:
        compile_modules(raw_tokenizer.encoder, raw_tokenizer.decoder, raw_discriminator, device=device)
    objective = raw_tokenizer.objective
    ema = EMA(raw_tokenizer, config.optim.ema_decay)
    guard = NonFiniteGuard(config.run.max_nonfinite, accelerator)
    networks = [OptimizedModule("g", step_module, opt_g, sched_g, config.optim.grad_clip, ema, raw_tokenizer),
                OptimizedModule("d", discriminator, opt_d, sched_d, config.optim.grad_clip)]

    # --- resume
    manager = CheckpointManager(output_dir / "checkpoints", keep_last=config.run.keep_last, accelerator=accelerator)
    parts = dict(models={"tokenizer": raw_tokenizer, "discriminator": raw_discriminator}, emas={"tokenizer": ema},
                 optimizers={"generator": opt_g, "discriminator": opt_d},
                 schedulers={"generator": sched_g, "discriminator": sched_d})
    start_step, position = 0, {"epoch": 0, "batches_in_epoch": 0}
    resume_from = manager.resolve(config.run.resume)
    if resume_from is not None:
        config.check_resume(resume_from)  # one line if the stored run had other settings
        state = manager.load(resume_from, **parts)
        start_step = state.step
        position = {"epoch": state.data_state["epoch"], "batches_in_epoch": state.data_state["batches_in_epoch"]}
        guard.load_state_dict(state.extra.get("nonfinite_guard", guard.state_dict()))
        if accelerator.is_main_process:
            logger.info("resumed from %s at step %d", resume_from, start_step)

    def save_checkpoint(step: int) -> Path:
        return manager.save(step, **parts, data_state=dict(position), config=config.to_dict(),
                            extra={"nonfinite_guard": guard.state_dict()})

    def batches():
        """Map-style data replays (epoch, batch) exactly on resume; a stream restarts with a fresh shuffle."""
        while True:
            if sampler is None:
                yield from loader
                continue
            sampler.set_epoch(position["epoch"])
            augmented.epoch = position["epoch"]
            skipped = position["batches_in_epoch"]
            for batch in (accelerator.skip_first_batches(loader, skipped) if skipped else loader):
                position["batches_in_epoch"] += 1
                yield batch
            position["epoch"], position["batches_in_epoch"] = position["epoch"] + 1, 0

    # --- the step body: generator forward and losses, then the discriminator's loss on the same trajectories
    kl_weight = raw_tokenizer.config.kl_weight
    latest_images: list[torch.Tensor] = []

    def step_body(batch, step: int) -> StepOutput:
        images = batch[0].to(device, non_blocking=True, memory_format=memory_format)
        latest_images[:] = [images]
        use_adv = step >= config.loss.disc_start and config.loss.adversarial_weight > 0
        t = sample_training_time(raw_tokenizer, images.shape[0], device)
        # Drawn in logical (NCHW) order, so a channels-last run sees the same noise as a standard one.
        noise = torch.randn(images.shape, device=device, dtype=images.dtype).to(memory_format=memory_format)
        # Generator losses: the discriminator frozen and used unwrapped (see module docstring).
        _set_requires_grad(raw_discriminator, False)
        with accelerator.autocast():
            out = step_module(images, noise, t)
            total_g, terms = generator_losses(config, objective, out, images, t, perceptual, raw_discriminator,
                                              use_adv, kl_weight)
        _set_requires_grad(raw_discriminator, True)
        total_d, d_stats = None, {}
        if use_adv:
            with_r1 = config.loss.r1_weight > 0 and step % config.loss.r1_interval == 0
            # R1 differentiates the logits' gradient again (create_graph): compiled graphs cannot, so a compiled
            # discriminator runs eagerly on those (every r1_interval-th) steps.
            with accelerator.autocast(), eager_if(with_r1):
                total_d, d_stats = discriminator_step_loss(config, discriminator, out, images, t, with_r1)
        scalars = {name: value.detach().float().mean() for name, value in terms.items()}
        scalars.update(loss=total_g.detach(), **d_stats)
        log_extra = None
        if objective.iterative:  # ADM-style loss per time quartile
            score = terms["score"]
            log_extra = lambda: quartile_losses(score, t, accelerator, prefix="score_q")  # noqa: E731
        return StepOutput(losses=[total_g, total_d], batch_size=images.shape[0], scalars=scalars,
                          log_extra=log_extra)

    def write_images(step: int) -> None:
        if step % config.run.image_every == 0 and accelerator.is_main_process:
            write_reconstruction_grid(raw_tokenizer, ema, latest_images[0][:8],
                                      output_dir / "images" / f"step_{step:07d}.png")

    result = run_training_loop(
        accelerator, batches(), step_body, networks, plan_of(config), start_step=start_step, guard=guard,
        metrics_log=open_metrics_log(accelerator, config, "tokenizer", start_step), save_checkpoint=save_checkpoint,
        resumed=resume_from is not None, after_update=write_images, throughput_name="images_per_s",
    )
    final_dir = output_dir / "model"
    if accelerator.is_main_process:
        save_final_model(raw_tokenizer, ema, final_dir, {
            "step": result.step,
            "data": str(config.data.data), "resolution": config.data.resolution,
            **({"train_crop": config.data.train_crop} if config.data.train_crop is not None else {}),
            "global_batch_size": config.data.batch_size})
    accelerator.wait_for_everyone()
    return final_dir


@torch.no_grad()
def write_reconstruction_grid(tokenizer: EpsVAE | VAE, ema: EMA, images: torch.Tensor, path: Path) -> None:
    """Rows of input | 1-step decode | 3-step decode with EMA weights (input | reconstruction for the VAE)."""
    from torchvision.utils import save_image

    was_training = tokenizer.training
    tokenizer.eval()
    step_counts = (1, DEFAULT_DECODE_STEPS) if tokenizer.objective.iterative else (None,)
    with ema.swapped_in(tokenizer):
        z = tokenizer.encode(images.float(), sample=False)
        generator = torch.Generator(device=images.device).manual_seed(0)
        columns = [images] + [tokenizer.decode(z, steps=steps, generator=generator) for steps in step_counts]
    tokenizer.train(was_training)
    grid = torch.stack(columns, dim=1).flatten(0, 1)  # (B·K, 3, H, W), rows of K
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image((grid.float().clamp(-1, 1) + 1) / 2, path, nrow=len(columns))
