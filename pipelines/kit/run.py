"""Run set-up: the `Accelerator` (mixed precision, accumulation, collective timeout, trackers), per-rank seeding,
and the two facts every rank must agree on (its share of the global batch, whether to stop).

    accelerator = make_accelerator(AcceleratorConfig(mixed_precision="bf16", seed=0))
    per_device = per_device_batch(global_batch=256, num_processes=accelerator.num_processes, grad_accum=1)
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipelines.kit.config import require_at_least

if TYPE_CHECKING:  # accelerate is imported lazily: `import pipelines.kit.run` stays cheap for scripts' --help.
    from accelerate import Accelerator

MIXED_PRECISION_CHOICES = ("no", "bf16", "fp16")
# The trackers accelerate supports (accelerate.utils.LoggerType) → the package each needs.
TRACKER_PACKAGES: dict[str, str] = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow",
                                    "aim": "aim", "comet_ml": "comet_ml", "clearml": "clearml",
                                    "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}
TRACKER_CHOICES = (None, *TRACKER_PACKAGES)


@dataclass(frozen=True)
class RunConfig:
    """The `run` section both trainers share: where outputs go, precision, seeds, checkpoint/log cadence, resume,
    the wall-time cap and the non-finite policy. Each trainer sets its own defaults in its config's
    `default_factory`."""

    output_dir: str = "runs/train"  # checkpoints, metrics.jsonl, the final model folder and config.yaml
    precision: str = "auto"  # autocast dtype: auto | fp32 | bf16 | fp16 (pipelines.kit.precision; "no" = fp32)
    seed: int = 0  # base seed; each rank uses seed + rank
    checkpoint_every: int = 1000  # steps between resumable checkpoints
    keep_last: int = 3  # complete checkpoints kept (older ones deleted)
    log_every: int = 10  # steps between metric lines
    resume: str | None = None  # None | "auto" | a checkpoint dir
    log_with: str | None = None  # experiment tracker accelerate logs to (tensorboard, wandb, mlflow, aim, ...)
    collective_timeout_s: float = 600.0  # a dead peer → the survivors raise after this long instead of hanging
    cpu: bool = False  # force CPU even where a GPU is visible (tests, CPU-only `accelerate launch`)
    max_minutes: float | None = None  # stop (and save) after this much wall time
    max_nonfinite: int = 10  # consecutive non-finite losses (steps skipped) before the run stops
    compile: bool = False  # torch.compile the networks (inductor; the first steps compile, later ones run faster)

    def __post_init__(self) -> None:
        require_at_least(self, 1, "checkpoint_every", "keep_last", "log_every")


@dataclass(frozen=True)
class AcceleratorConfig:
    """Everything `make_accelerator` needs; saved in the checkpoint's config like any other config."""

    mixed_precision: str = "no"  # one of MIXED_PRECISION_CHOICES
    gradient_accumulation_steps: int = 1
    seed: int = 0
    collective_timeout_s: float = 600.0  # a dead peer → the survivors raise after this long instead of hanging
    log_with: str | None = None  # None or one of TRACKER_PACKAGES; its package must be installed only when asked for
    project_dir: str | None = None  # where trackers write (TensorBoard event files)
    cpu: bool = False  # force CPU even where an accelerator is visible (tests, `accelerate launch --cpu`)

    def __post_init__(self) -> None:
        if self.mixed_precision not in MIXED_PRECISION_CHOICES:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION_CHOICES}, got {self.mixed_precision!r}")
        require_at_least(self, 1, "gradient_accumulation_steps")
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

    if config.log_with is not None:
        import importlib.util

        package = TRACKER_PACKAGES[config.log_with]
        if importlib.util.find_spec(package) is None and not (
                package == "tensorboard" and importlib.util.find_spec("tensorboardX") is not None):
            raise ValueError(f"--log-with {config.log_with} needs the `{package}` package: pip install {package}")

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


def make_run_accelerator(run: RunConfig, grad_accum: int) -> "Accelerator":
    """A trainer's `Accelerator` from its `run` section (trackers write under `output_dir/trackers`)."""
    from pipelines.kit.precision import accelerate_mixed_precision

    return make_accelerator(AcceleratorConfig(
        mixed_precision=accelerate_mixed_precision(run.precision, cpu=run.cpu), gradient_accumulation_steps=grad_accum,
        seed=run.seed, log_with=run.log_with,
        project_dir=str(Path(run.output_dir) / "trackers") if run.log_with else None,
        collective_timeout_s=run.collective_timeout_s, cpu=run.cpu,
    ))


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



def per_device_batch(global_batch: int, num_processes: int, grad_accum: int) -> int:
    """The micro-batch of one process: `global_batch` = micro-batch × processes × accumulation steps."""
    denominator = num_processes * grad_accum
    if global_batch % denominator:
        raise ValueError(f"batch_size {global_batch} is not divisible by processes ({num_processes}) × grad_accum "
                         f"({grad_accum})")
    return global_batch // denominator


def any_rank(accelerator: "Accelerator", flag: bool) -> bool:
    """True on every rank when it is True on any (e.g. one rank's clock ran out: all stop together)."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="max").item() > 0)


def close_process_group() -> None:
    """Tear the process group down after a job that finished on every rank.

    Left to the interpreter's exit, gloo's worker threads are destroyed in no particular order and a rank can
    abort with "terminate called without an active exception" after its work is done (exit -6), which a launcher
    reports as a failed run. A barrier first, so no rank tears down while a peer still talks to it."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()
