"""Small, explicit pieces both training loops share (no trainer class: the loop stays in the pipeline).

What lives here:
- `AcceleratorConfig` + `make_accelerator`: mixed precision, gradient accumulation, a collective timeout so a
  dead peer makes the survivors fail in bounded time, TensorBoard only when asked.
- `seed_everything`: python / numpy / torch seeded per rank.
- `OptimizerConfig` + `param_groups` + `build_optimizer`: Adam(W) with the paper's betas (C.2: β=(0, 0.999);
  C.3: DiT defaults, no weight decay), and no decay on norms / biases / embeddings.
- `warmup_scheduler`: linear warmup then constant (C.2: 5k steps), a `LambdaLR` so its state saves.
- `clip_gradients`, `NonFiniteGuard`, `quartile_losses` (ADM-style per-time-bucket loss, reduced over ranks).

How a loop uses them (the test `tests/test_training_kit.py::_train` is the runnable template):

    accelerator = make_accelerator(AcceleratorConfig(mixed_precision="bf16", seed=0))
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-4, betas=(0.0, 0.999)))
    scheduler = warmup_scheduler(optimizer, warmup_steps=5000)   # NOT passed to accelerator.prepare
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    ema = EMA(model, decay=0.999)                                # after prepare (see pipelines.ema)
    ...
    with accelerator.accumulate(model):
        loss = ...
        if guard.skip(loss):           # non-finite: no backward, no step; raises after K in a row
            optimizer.zero_grad(set_to_none=True)
            continue
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            clip_gradients(accelerator, model.parameters(), max_norm)
        optimizer.step(); optimizer.zero_grad(set_to_none=True)
    if accelerator.sync_gradients:
        scheduler.step(); ema.update(model); step += 1
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Iterable

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:  # accelerate is imported lazily: `import pipelines.training` stays cheap for scripts' --help.
    from accelerate import Accelerator

MIXED_PRECISION_CHOICES = ("no", "bf16", "fp16")
TRACKER_CHOICES = (None, "tensorboard")


# ----------------------------------------------------------------------------------------------------------------
# Accelerator set-up and seeding
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AcceleratorConfig:
    """Everything `make_accelerator` needs; saved in the checkpoint's config like any other config."""

    mixed_precision: str = "no"  # one of MIXED_PRECISION_CHOICES
    gradient_accumulation_steps: int = 1
    seed: int = 0
    collective_timeout_s: float = 600.0  # a dead peer → the survivors raise after this long instead of hanging
    log_with: str | None = None  # None or "tensorboard"; TensorBoard must be installed only when asked for
    project_dir: str | None = None  # where trackers write (TensorBoard event files)
    cpu: bool = False  # force CPU even where an accelerator is visible (tests, `accelerate launch --cpu`)

    def __post_init__(self) -> None:
        if self.mixed_precision not in MIXED_PRECISION_CHOICES:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION_CHOICES}, got {self.mixed_precision!r}")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}")
        if not self.collective_timeout_s > 0:
            raise ValueError(f"collective_timeout_s must be > 0, got {self.collective_timeout_s}")
        if self.log_with not in TRACKER_CHOICES:
            raise ValueError(f"log_with must be one of {TRACKER_CHOICES}, got {self.log_with!r}")
        if self.log_with is not None and self.project_dir is None:
            raise ValueError(f"log_with={self.log_with!r} needs project_dir (where the tracker writes)")


def make_accelerator(config: AcceleratorConfig) -> "Accelerator":
    """Build the `Accelerator` and seed this rank (`seed + process_index`).

    The device comes from accelerate only (`accelerator.device`); nothing in the project calls `.cuda()`.
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if config.log_with == "tensorboard":
        from accelerate.utils import is_tensorboard_available

        if not is_tensorboard_available():
            raise ValueError("log_with='tensorboard' needs the `tensorboard` package: pip install tensorboard")

    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=config.log_with,
        project_dir=config.project_dir,
        cpu=config.cpu,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=config.collective_timeout_s))],
    )
    seed_everything(config.seed, rank=accelerator.process_index)
    return accelerator


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed python, numpy and torch (all devices) with `seed + rank`; returns the seed used.

    Per-rank seeds give each rank different dropout / noise / time samples; the data order is seeded separately
    (the DataLoader's own generator) so it is the same on every rank before sharding.
    """
    rank_seed = int(seed) + int(rank)
    random.seed(rank_seed)
    np.random.seed(rank_seed % 2**32)
    torch.manual_seed(rank_seed)  # also seeds every CUDA device
    return rank_seed


# ----------------------------------------------------------------------------------------------------------------
# Optimiser, parameter groups, warmup
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimizerConfig:
    """Adam settings. Paper C.2 (tokenizer): lr 1e-4, β=(0, 0.999); C.3 (DiT): lr 1e-4, β=(0.9, 0.999), wd 0."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    decoupled_weight_decay: bool = False  # True → AdamW (decay not scaled by the adaptive denominator)

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")


OPTIMIZER_PRESETS: dict[str, OptimizerConfig] = {
    "tokenizer": OptimizerConfig(lr=1e-4, betas=(0.0, 0.999)),  # paper C.2
    "dit": OptimizerConfig(lr=1e-4, betas=(0.9, 0.999)),  # paper C.3 / DiT: AdamW, wd 0 (identical to Adam)
}

# Modules whose weights are scales/offsets or lookup tables: decaying them towards 0 only hurts.
_NO_DECAY_MODULES: tuple[type[nn.Module], ...] = (
    nn.Embedding,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._NormBase,
    nn.RMSNorm,
)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed and a non-decayed group.

    No decay for: biases and every other ≤1-D parameter, weights of norm and `nn.Embedding` modules, and
    parameters whose own name contains "embed" (learned positional / class embeddings). With `weight_decay == 0`
    one group holds everything (the split would change nothing). Frozen parameters are left out.
    """
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if weight_decay == 0:
        return [{"params": [p for _, p in trainable], "weight_decay": 0.0}]
    no_decay_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, _NO_DECAY_MODULES):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for name, p in trainable:
        leaf_name = name.rsplit(".", 1)[-1]
        if p.ndim <= 1 or id(p) in no_decay_ids or "embed" in leaf_name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, config: OptimizerConfig) -> torch.optim.Optimizer:
    """Adam (or AdamW) over `param_groups(model, config.weight_decay)`."""
    groups = param_groups(model, config.weight_decay)
    if not groups or not groups[0]["params"]:
        raise ValueError("the model has no trainable parameters")
    optimizer_class = torch.optim.AdamW if config.decoupled_weight_decay else torch.optim.Adam
    return optimizer_class(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps)


def warmup_factor(step: int, warmup_steps: int) -> float:
    """LR multiplier after `step` optimiser updates: linear ramp (step+1)/warmup, then 1 (paper C.2)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def warmup_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup_steps` optimiser updates, then constant.

    A `LambdaLR` over a plain function: its `state_dict()` is ints and floats, so it saves with
    `torch.save` and loads with `weights_only=True`. Call `scheduler.step()` once per *optimiser update* (when
    `accelerator.sync_gradients`), and do not pass it to `accelerator.prepare`: accelerate's wrapper steps it
    `num_processes` times per call, which would shorten the warmup by the number of GPUs.
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")

    def factor(step: int) -> float:
        return warmup_factor(step, warmup_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------------------------------------------
# Step helpers
# ----------------------------------------------------------------------------------------------------------------


def clip_gradients(accelerator: "Accelerator | None", parameters: Iterable[torch.Tensor], max_norm: float | None) -> float:
    """Clip the global gradient norm to `max_norm` (None or ≤0: only measure); returns the norm before clipping.

    With an accelerator it goes through `accelerator.clip_grad_norm_`, which unscales fp16 gradients first;
    call it only when `accelerator.sync_gradients` (gradients are complete).
    """
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    limit = float(max_norm) if max_norm is not None and max_norm > 0 else math.inf
    if accelerator is not None:
        norm = accelerator.clip_grad_norm_(params, limit)
    else:
        norm = torch.nn.utils.clip_grad_norm_(params, limit)
    return float(norm)


class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive non-finite losses: the run has diverged."""


class NonFiniteGuard:
    """Skip optimiser steps whose loss is nan/inf; stop the run after `max_consecutive` of them in a row.

    `skip(loss)` returns True when the step must be skipped (call it before `backward`). Pass `accelerator` when
    each rank computes its own loss: the verdict is then global (one tiny all-reduce), so no rank steps while
    another skips and DDP never waits on a missing backward. Call `optimizer.zero_grad()` when skipping: with
    gradient accumulation that drops the window's partial gradients instead of carrying them into the next one.
    """

    def __init__(self, max_consecutive: int = 10, accelerator: "Accelerator | None" = None) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.accelerator = accelerator
        self.consecutive = 0
        self.total_skipped = 0

    def skip(self, loss: torch.Tensor) -> bool:
        finite = torch.isfinite(loss.detach()).all()
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            flag = finite.to(device=self.accelerator.device, dtype=torch.float32).reshape(1)
            finite = self.accelerator.reduce(flag, reduction="sum") == self.accelerator.num_processes
        if bool(finite):
            self.consecutive = 0
            return False
        self.consecutive += 1
        self.total_skipped += 1
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"loss was non-finite for {self.consecutive} steps in a row ({self.total_skipped} skipped in total): "
                "the run diverged; lower the learning rate or resume from an earlier checkpoint"
            )
        return True

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "total_skipped": self.total_skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive = int(state["consecutive"])
        self.total_skipped = int(state["total_skipped"])


def quartile_losses(
    per_sample_loss: torch.Tensor,
    t: torch.Tensor,
    accelerator: "Accelerator | None" = None,
    num_buckets: int = 4,
    t_max: float = 1.0,
    prefix: str = "loss_q",
) -> dict[str, float]:
    """Mean loss per time bucket, ADM-style (`loss_q0` = smallest t … `loss_q3` = largest), over all ranks.

    per_sample_loss: (B,) loss of each sample; t: (B,) its time, in [0, t_max] (t_max=1 for rectified flow,
    T for DDPM integer steps). Sums and counts are reduced across ranks before dividing, so a bucket's mean is
    the global mean, not a mean of rank means. Buckets no sample fell in are left out of the result.
    """
    if per_sample_loss.ndim != 1 or per_sample_loss.shape != t.shape:
        raise ValueError(f"expected per_sample_loss and t of the same (B,) shape, got {per_sample_loss.shape} and {t.shape}")
    loss = per_sample_loss.detach().float()  # (B,)
    bucket = (t.detach().float() / t_max * num_buckets).long().clamp_(0, num_buckets - 1)  # (B,)
    sums = torch.zeros(num_buckets, device=loss.device).index_add_(0, bucket, loss)  # (K,)
    counts = torch.zeros(num_buckets, device=loss.device).index_add_(0, bucket, torch.ones_like(loss))  # (K,)
    stacked = torch.stack([sums, counts])  # (2, K)
    if accelerator is not None and accelerator.num_processes > 1:
        stacked = accelerator.reduce(stacked.to(accelerator.device), reduction="sum")
    sums, counts = stacked.cpu().double()
    return {f"{prefix}{k}": float(sums[k] / counts[k]) for k in range(num_buckets) if counts[k] > 0}


def mean_over_ranks(accelerator: "Accelerator | None", value: torch.Tensor | float) -> float:
    """Mean of a scalar over all ranks (for logging the loss every rank computed on its own shard)."""
    tensor = torch.as_tensor(value, dtype=torch.float32).detach().reshape(1)
    if accelerator is not None and accelerator.num_processes > 1:
        tensor = accelerator.reduce(tensor.to(accelerator.device), reduction="mean")
    return float(tensor.item())
