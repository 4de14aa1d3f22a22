"""Stage 1: train the ε-VAE tokenizer (or the baseline VAE) with accelerate (paper Sec. 3, appendix C.2).

One generator step per micro-batch computes
    L = L_score + λ_LPIPS·L_LPIPS(x̂0_t, x0) + λ_adv·L_adv(D(x̂0_t, x_t, t)) + kl_weight·KL          (Eq. 1, 9-12)
and one discriminator step contrasts real trajectories (x0, x_t) with fake ones (x̂0_t, x_t), plus a lazy R1
penalty on the real inputs. The baseline VAE uses the same machinery with L_rec on its single-step output and
an unconditional 3-channel discriminator.

DDP notes: the whole generator side runs inside `TokenizerTrainingStep.forward` so DDP syncs encoder and
decoder gradients; the adversarial term of the generator step goes through the *unwrapped* discriminator with
its parameters frozen, so no discriminator gradient leaks into the generator step and DDP never sees a
discriminator forward without a backward. The discriminator step goes through the wrapped module.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from pipelines.kit.checkpoints import CheckpointManager
from pipelines.kit.ema import EMA, unwrap_model
from pipelines.kit.faults import fault_point
from pipelines.kit.logging import MetricsLogger
from pipelines.kit.loop import NonFiniteGuard, clip_gradients, mean_over_ranks, quartile_losses
from pipelines.kit.optim import OptimizerConfig, build_optimizer, warmup_scheduler
from pipelines.kit.run import AcceleratorConfig, make_accelerator
from tokenizer import EpsVAE, VAE, flow, losses
from tokenizer.discriminator import DISCRIMINATOR_PRESETS, TrajectoryDiscriminator

logger = logging.getLogger(__name__)

MODEL_CLASSES = {"eps_vae": EpsVAE, "vae": VAE}


@dataclass(frozen=True)
class TokenizerTrainConfig:
    """Everything a stage-1 run needs; saved in every checkpoint. Defaults are the paper's (appendix C.2)."""

    output_dir: str = "runs/tokenizer"
    # Model: a preset pair plus overrides (gamma, latent_channels, downsample, conditioning, ...), or --init-from.
    model_type: str = "eps_vae"  # "eps_vae" | "vae"
    encoder: str = "lite"
    decoder: str = "B"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None  # a save_pretrained dir: multi-stage training (128² then 256², Table 1 †)
    discriminator: str = "default"
    # Data.
    data: str = "offline"
    resolution: int = 128
    batch_size: int = 256  # global: per_device × processes × grad_accum
    num_workers: int = 4
    # Optimisation.
    lr: float = 1e-4
    disc_lr: float = 1e-4
    adam_betas: tuple[float, float] = (0.0, 0.999)
    warmup_steps: int = 5000
    max_steps: int = 1_000_000
    max_minutes: float | None = None  # stop (and save) after this much wall time
    grad_accum: int = 1
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    # Losses.
    perceptual: str = "lpips-vgg"
    perceptual_weights: str | None = None
    perceptual_weight: float = 0.5
    adversarial_weight: float = 0.5
    disc_start: int = 0  # generator's adversarial term and discriminator updates start at this step
    r1_weight: float = 0.1  # γ_R1 / 2 in StyleGAN's notation, applied every r1_interval steps (lazy R1)
    r1_interval: int = 4
    reconstruction: str = "l1"  # baseline VAE only
    max_nonfinite: int = 10
    # Run.
    precision: str = "no"
    seed: int = 0
    checkpoint_every: int = 1000
    keep_last: int = 3
    log_every: int = 10
    image_every: int = 1000
    resume: str | None = None  # None | "auto" | a checkpoint dir
    log_with: str | None = None
    collective_timeout_s: float = 600.0
    cpu: bool = False  # force CPU even where a GPU is visible (tests, CPU-only `accelerate launch`)
    # NHWC activations and weights for the convolutional nets: faster convolutions on tensor-core GPUs under
    # bf16 and on CPUs with oneDNN; checkpoints and saved weights are the same either way.
    channels_last: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "adam_betas", tuple(self.adam_betas))
        if self.model_type not in MODEL_CLASSES:
            raise ValueError(f"model_type must be one of {sorted(MODEL_CLASSES)}, got {self.model_type!r}")
        for name in ("resolution", "batch_size", "max_steps", "grad_accum", "checkpoint_every", "log_every",
                     "image_every", "r1_interval", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "disc_lr", "perceptual_weight", "adversarial_weight", "r1_weight", "ema_decay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.discriminator not in DISCRIMINATOR_PRESETS:
            raise ValueError(f"unknown discriminator preset {self.discriminator!r}; choose from {sorted(DISCRIMINATOR_PRESETS)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


def build_tokenizer(config: TokenizerTrainConfig) -> EpsVAE | VAE:
    """The model to train: from presets + overrides, or from a trained directory (fine-tuning)."""
    model_class = MODEL_CLASSES[config.model_type]
    if config.init_from:
        return model_class.from_pretrained(config.init_from)
    return model_class.from_preset(config.encoder, config.decoder, **config.model_overrides)


def build_discriminator(config: TokenizerTrainConfig) -> TrajectoryDiscriminator:
    """6-channel time-conditioned trajectory discriminator for ε-VAE, 3-channel unconditional for the VAE."""
    preset = DISCRIMINATOR_PRESETS[config.discriminator]
    trajectory = config.model_type == "eps_vae"
    disc_config = dataclasses.replace(preset, in_channels=6 if trajectory else 3, time_conditioned=trajectory)
    return TrajectoryDiscriminator(disc_config)


class TokenizerTrainingStep(nn.Module):
    """The generator side of one training step, as one `forward` so DDP can wrap it.

    Returns the tensors the losses need: `x_hat` (x̂0_t, or the VAE's reconstruction), `kl`, and for ε-VAE the
    prediction/target pair, `t` and the network-scaled `x_t` the discriminator sees next to x0.
    """

    def __init__(self, tokenizer: EpsVAE | VAE):
        super().__init__()
        self.tokenizer = tokenizer
        if isinstance(tokenizer, EpsVAE) and tokenizer.config.parameterization == "epsilon":
            from generator.diffusion import linear_beta_schedule

            schedule = linear_beta_schedule(tokenizer.config.ddpm_num_steps)
            self.register_buffer("alphas_cumprod", schedule.alphas_cumprod.float(), persistent=False)

    def forward(self, images: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        posterior = self.tokenizer.encode_posterior(images)
        z = posterior.sample()  # (B, C, h, w)
        out = {"kl": posterior.kl()}
        if isinstance(self.tokenizer, VAE):
            out["x_hat"] = self.tokenizer.decoder(z)  # (B, 3, H, W), unclamped so gradients flow
            return out
        config = self.tokenizer.config
        if config.parameterization == "velocity":
            x_t = flow.interpolate(images, noise, t, config.gamma)
            prediction = self.tokenizer.velocity(x_t, t, z)
            out["target"] = flow.velocity_target(images, noise, config.gamma)
            out["x_hat"] = flow.estimate_x_data(x_t, prediction, t, config.gamma)
            out["x_t_seen"] = x_t * flow.network_input_scale(t, config.gamma, config.data_std)
        else:  # DDPM ε-prediction baseline (Table 4): t is step / T on the discrete linear-β grid.
            steps = (t * config.ddpm_num_steps).long().clamp_(0, config.ddpm_num_steps - 1)
            alpha_bar = self.alphas_cumprod[steps].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
            x_t = alpha_bar.sqrt() * images + (1 - alpha_bar).sqrt() * noise
            prediction = self.tokenizer.velocity(x_t, steps.float() / config.ddpm_num_steps, z)
            out["target"] = noise
            out["x_hat"] = (x_t - (1 - alpha_bar).sqrt() * prediction) / alpha_bar.sqrt()
            out["x_t_seen"] = x_t
        out["prediction"] = prediction
        return out


def sample_training_time(tokenizer: EpsVAE | VAE, batch: int, device: torch.device) -> torch.Tensor:
    """Training t: logit-normal or uniform (continuous) for flow; uniform over DDPM steps for ε-prediction."""
    if isinstance(tokenizer, VAE):
        return torch.zeros(batch, device=device)
    config = tokenizer.config
    if config.parameterization == "epsilon":
        steps = torch.randint(0, config.ddpm_num_steps, (batch,), device=device)
        return steps.float() / config.ddpm_num_steps
    return flow.sample_time(batch, config.time_sampling, device=device, location=config.time_location)


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

    dataset = build_image_dataset(config.data, split="train", resolution=config.resolution, train=True,
                                  rank=rank, world_size=world_size, seed=config.seed)
    if isinstance(dataset, IterableDataset):
        loader = DataLoader(dataset, batch_size=per_device_batch, num_workers=config.num_workers, drop_last=True)
        return loader, None, None
    if len(dataset) < config.batch_size // config.grad_accum:
        raise ValueError(f"the training set has {len(dataset)} images, fewer than one batch ({config.batch_size})")
    augmented = SeededAugmentation(dataset, config.seed)
    sampler = EpochPermutationSampler(len(dataset), config.seed)
    loader = DataLoader(
        augmented,
        batch_size=per_device_batch,
        sampler=sampler,
        num_workers=config.num_workers,
        drop_last=True,
        generator=torch.Generator().manual_seed(config.seed),  # keeps the global RNG out of loader start-up
    )
    return loader, sampler, augmented


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


def _per_device_batch(config: TokenizerTrainConfig, num_processes: int) -> int:
    denominator = num_processes * config.grad_accum
    if config.batch_size % denominator:
        raise ValueError(
            f"batch_size {config.batch_size} is not divisible by processes ({num_processes}) × grad_accum "
            f"({config.grad_accum})"
        )
    return config.batch_size // denominator


def _set_requires_grad(module: nn.Module, flag: bool) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(flag)


def generator_losses(
    config: TokenizerTrainConfig,
    out: dict[str, torch.Tensor],
    images: torch.Tensor,
    t: torch.Tensor,
    perceptual: nn.Module,
    discriminator: nn.Module,
    use_adversarial: bool,
    kl_weight: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 1 with L_rec → L_score for ε-VAE; returns the total and per-sample terms (B,) for logging."""
    terms: dict[str, torch.Tensor] = {}
    if "prediction" in out:
        terms["score"] = losses.velocity_loss(out["prediction"], out["target"])
    else:
        terms["rec"] = losses.reconstruction_loss(out["x_hat"], images, config.reconstruction)
    if config.perceptual_weight > 0:
        terms["perceptual"] = perceptual(out["x_hat"].float(), images.float())
    if use_adversarial and config.adversarial_weight > 0:
        if "x_t_seen" in out:  # trajectory matching on (x̂0_t, x_t), Eq. 12
            logits = discriminator(losses.trajectory_pair(out["x_hat"], out["x_t_seen"]), t)
        else:
            logits = discriminator(out["x_hat"])
        terms["adv"] = losses.generator_adversarial_loss(logits)
    terms["kl"] = out["kl"]
    weights = {"score": 1.0, "rec": 1.0, "perceptual": config.perceptual_weight,
               "adv": config.adversarial_weight, "kl": kl_weight}
    total = sum(weights[name] * value.mean() for name, value in terms.items())
    return total, terms


def discriminator_step_loss(
    config: TokenizerTrainConfig,
    discriminator: nn.Module,
    out: dict[str, torch.Tensor],
    images: torch.Tensor,
    t: torch.Tensor,
    with_r1: bool,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Non-saturating D loss on real vs detached fake, with lazy R1 on the real inputs (one D forward)."""
    fake_start = out["x_hat"].detach()
    if "x_t_seen" in out:
        x_t = out["x_t_seen"].detach()
        real = losses.trajectory_pair(images, x_t)
        fake = losses.trajectory_pair(fake_start, x_t)
        t_both = torch.cat([t, t])
    else:
        real, fake, t_both = images, fake_start, None
    real = real.detach().requires_grad_(with_r1)
    logits = discriminator(torch.cat([real, fake]), t_both) if t_both is not None else discriminator(torch.cat([real, fake]))
    real_logits, fake_logits = logits.chunk(2)
    loss = losses.discriminator_loss(real_logits, fake_logits)
    stats = {"d_real_logit": real_logits.detach().float().mean().item(),
             "d_fake_logit": fake_logits.detach().float().mean().item()}
    if with_r1:
        # Gradient w.r.t. the input only: DDP's parameter hooks fire once, in the backward of the total.
        r1 = losses.r1_from_logits(real_logits, real)
        loss = loss + config.r1_weight * config.r1_interval * r1
        stats["r1"] = r1.detach().item()
    return loss, stats


def train_tokenizer(config: TokenizerTrainConfig) -> Path:
    """Run (or resume) stage-1 training; returns the directory of the final `save_pretrained` model."""
    from tokenizer.perceptual import build_perceptual

    output_dir = Path(config.output_dir)
    accelerator = make_accelerator(AcceleratorConfig(
        mixed_precision=config.precision, gradient_accumulation_steps=config.grad_accum, seed=config.seed,
        log_with=config.log_with, project_dir=str(output_dir / "trackers") if config.log_with else None,
        collective_timeout_s=config.collective_timeout_s, cpu=config.cpu,
    ))
    device = accelerator.device
    per_device_batch = _per_device_batch(config, accelerator.num_processes)
    # Fail on missing perceptual weights before anything expensive happens.
    perceptual = build_perceptual(config.perceptual if config.perceptual_weight > 0 else "none",
                                  config.perceptual_weights).to(device)

    tokenizer = build_tokenizer(config)
    discriminator = build_discriminator(config)
    loader, sampler, augmented = build_train_loader(config, per_device_batch, accelerator.process_index,
                                                    accelerator.num_processes)
    streaming = sampler is None
    step_module = TokenizerTrainingStep(tokenizer)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    for module in (step_module, discriminator, perceptual):
        module.to(memory_format=memory_format)

    opt_g = build_optimizer(step_module, OptimizerConfig(lr=config.lr, betas=config.adam_betas))
    opt_d = build_optimizer(discriminator, OptimizerConfig(lr=config.disc_lr, betas=config.adam_betas))
    sched_g, sched_d = warmup_scheduler(opt_g, config.warmup_steps), warmup_scheduler(opt_d, config.warmup_steps)
    step_module, discriminator, opt_g, opt_d = accelerator.prepare(step_module, discriminator, opt_g, opt_d)
    if not streaming:  # streams are already split by rank inside the dataset
        loader = accelerator.prepare(loader)
    raw_tokenizer: EpsVAE | VAE = unwrap_model(step_module).tokenizer
    raw_discriminator: nn.Module = unwrap_model(discriminator)
    ema = EMA(raw_tokenizer, config.ema_decay)
    guard = NonFiniteGuard(config.max_nonfinite, accelerator)

    manager = CheckpointManager(output_dir / "checkpoints", keep_last=config.keep_last, accelerator=accelerator)
    step, epoch, batches_done = 0, 0, 0
    resume_from = manager.resolve(config.resume)
    if resume_from is not None:
        state = manager.load(resume_from, models={"tokenizer": raw_tokenizer, "discriminator": raw_discriminator},
                             emas={"tokenizer": ema}, optimizers={"generator": opt_g, "discriminator": opt_d},
                             schedulers={"generator": sched_g, "discriminator": sched_d})
        step, epoch, batches_done = state.step, state.data_state["epoch"], state.data_state["batches_in_epoch"]
        guard.load_state_dict(state.extra.get("nonfinite_guard", guard.state_dict()))
        if accelerator.is_main_process:
            logger.info("resumed from %s at step %d", resume_from, step)

    def save_checkpoint() -> Path:
        return manager.save(
            step, models={"tokenizer": raw_tokenizer, "discriminator": raw_discriminator}, emas={"tokenizer": ema},
            optimizers={"generator": opt_g, "discriminator": opt_d},
            schedulers={"generator": sched_g, "discriminator": sched_d},
            data_state={"epoch": epoch, "batches_in_epoch": batches_done}, config=config.to_dict(),
            extra={"nonfinite_guard": guard.state_dict()},
        )

    kl_weight = raw_tokenizer.config.kl_weight
    metrics_log = MetricsLogger(output_dir / "metrics.jsonl", accelerator=accelerator, total_steps=config.max_steps,
                                initial_step=step, description="tokenizer",
                                tracker_project="tokenizer" if config.log_with else None,
                                tracker_config=config.to_dict())
    started = time.monotonic()
    images_seen, window_start = 0, time.monotonic()
    last_checkpoint_step = step if resume_from is not None else -1
    finished = step >= config.max_steps
    while not finished:
        if streaming:
            batches = loader
        else:
            sampler.set_epoch(epoch)
            augmented.epoch = epoch
            batches = accelerator.skip_first_batches(loader, batches_done) if batches_done else loader
        for images, _labels in batches:
            batches_done += 1
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            use_adv = step >= config.disc_start and config.adversarial_weight > 0
            with accelerator.accumulate(step_module, discriminator):
                batch = images.shape[0]
                t = sample_training_time(raw_tokenizer, batch, device)
                # Drawn in logical (NCHW) order, so a channels-last run sees the same noise as a standard one.
                noise = torch.randn(images.shape, device=device, dtype=images.dtype).to(memory_format=memory_format)
                # Generator step: discriminator frozen and used unwrapped (see module docstring).
                _set_requires_grad(raw_discriminator, False)
                with accelerator.autocast():
                    out = step_module(images, noise, t)
                    total_g, terms = generator_losses(config, out, images, t, perceptual, raw_discriminator,
                                                      use_adv, kl_weight)
                _set_requires_grad(raw_discriminator, True)
                skip = guard.skip(total_g)
                d_stats: dict[str, float] = {}
                if not skip:
                    accelerator.backward(total_g)
                    if use_adv:
                        with_r1 = config.r1_weight > 0 and step % config.r1_interval == 0
                        with accelerator.autocast():
                            total_d, d_stats = discriminator_step_loss(config, discriminator, out, images, t, with_r1)
                        accelerator.backward(total_d)
                if accelerator.sync_gradients:
                    grad_norm_g = clip_gradients(accelerator, step_module.parameters(), config.grad_clip)
                    grad_norm_d = clip_gradients(accelerator, discriminator.parameters(), config.grad_clip) if use_adv else 0.0
                opt_g.step()
                opt_d.step()
                opt_g.zero_grad(set_to_none=True)
                opt_d.zero_grad(set_to_none=True)
            images_seen += batch * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            sched_g.step()
            sched_d.step()
            ema.update(raw_tokenizer)
            step += 1
            fault_point("train_step")
            metrics_log.advance()

            if step % config.log_every == 0 or step == config.max_steps:
                elapsed = max(time.monotonic() - window_start, 1e-9)
                record = {name: mean_over_ranks(accelerator, value.detach().float().mean()) for name, value in terms.items()}
                record.update(loss=mean_over_ranks(accelerator, total_g.detach()), grad_norm_g=grad_norm_g,
                              grad_norm_d=grad_norm_d, lr=sched_g.get_last_lr()[0], images_per_s=images_seen / elapsed,
                              nonfinite_skipped=guard.total_skipped, **d_stats)
                if "score" in terms:
                    record.update(quartile_losses(terms["score"], t, accelerator, prefix="score_q"))
                metrics_log.log(step, record)
                images_seen, window_start = 0, time.monotonic()
            if step % config.image_every == 0 and accelerator.is_main_process:
                write_reconstruction_grid(raw_tokenizer, ema, images[:8], output_dir / "images" / f"step_{step:07d}.png")
            out_of_time = config.max_minutes is not None and (time.monotonic() - started) / 60 >= config.max_minutes
            out_of_time = _agree(accelerator, out_of_time)
            if step % config.checkpoint_every == 0 or step >= config.max_steps or out_of_time:
                save_checkpoint()
                last_checkpoint_step = step
            if step >= config.max_steps or out_of_time:
                finished = True
                break
        else:
            epoch, batches_done = epoch + 1, 0
    if last_checkpoint_step != step:
        save_checkpoint()
    metrics_log.close()
    final_dir = output_dir / "model"
    if accelerator.is_main_process:
        save_final_model(raw_tokenizer, ema, final_dir)
    accelerator.wait_for_everyone()
    return final_dir


def _agree(accelerator, flag: bool) -> bool:
    """All ranks stop together when any rank's clock runs out."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="max").item() > 0)


def save_final_model(tokenizer: EpsVAE | VAE, ema: EMA, directory: Path) -> None:
    """save_pretrained with the EMA weights as the model's weights (what users decode with)."""
    with ema.swapped_in(tokenizer):
        tokenizer.save_pretrained(directory)
    (directory / "training.json").write_text(json.dumps({"ema_decay": ema.decay}, indent=2))


@torch.no_grad()
def write_reconstruction_grid(tokenizer: EpsVAE | VAE, ema: EMA, images: torch.Tensor, path: Path) -> None:
    """Rows of input | 1-step decode | 3-step decode with EMA weights (input | reconstruction for the VAE)."""
    from torchvision.utils import save_image

    was_training = tokenizer.training
    tokenizer.eval()
    with ema.swapped_in(tokenizer):
        z = tokenizer.encode(images.float(), sample=False)
        if isinstance(tokenizer, EpsVAE):
            generator = torch.Generator(device=images.device).manual_seed(0)
            columns = [images, tokenizer.decode(z, steps=1, generator=generator),
                       tokenizer.decode(z, steps=3, generator=generator)]
        else:
            columns = [images, tokenizer.decode(z)]
    tokenizer.train(was_training)
    grid = torch.stack(columns, dim=1).flatten(0, 1)  # (B·K, 3, H, W), rows of K
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image((grid.float().clamp(-1, 1) + 1) / 2, path, nrow=len(columns))
