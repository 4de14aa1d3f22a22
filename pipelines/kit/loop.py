"""The one training loop both trainers run (`run_training_loop`), and its step helpers: gradient clipping, the
non-finite guard, ADM-style per-time-bucket losses and rank-mean logging values.

A trainer builds its networks (`OptimizedModule`), a batch iterator and a step body that returns one loss per
network (`StepOutput`); everything between two step bodies (skip, clip, step, EMA, log, checkpoint, clock) is
here, once. `tests/test_training_kit.py` trains a toy model through it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

if TYPE_CHECKING:
    from accelerate import Accelerator

    from pipelines.kit.ema import EMA
    from pipelines.kit.logging import MetricsLogger



def clip_gradients(accelerator: "Accelerator | None", parameters: Iterable[torch.Tensor],
                   max_norm: float | None) -> torch.Tensor:
    """Clip the global gradient norm to `max_norm` (None or ≤0: only measure); returns the norm before clipping.

    With an accelerator it goes through `accelerator.clip_grad_norm_`, which unscales fp16 gradients first;
    call it only when `accelerator.sync_gradients` (gradients are complete). The norm stays a 0-d tensor on the
    gradients' device: reading it (`float(norm)`) waits for the GPU, so the loop does that on log steps only.
    """
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    limit = float(max_norm) if max_norm is not None and max_norm > 0 else math.inf
    if accelerator is not None:
        norm = accelerator.clip_grad_norm_(params, limit)
    else:
        norm = torch.nn.utils.clip_grad_norm_(params, limit)
    return norm.detach() if isinstance(norm, torch.Tensor) else torch.as_tensor(float(norm))


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


# ----------------------------------------------------------------------------------------------------------------
# The loop skeleton both trainers run
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class OptimizedModule:
    """One network the loop updates: its (accelerate-wrapped) module, optimiser, LR schedule and clipping.

    `ema` / `ema_target`: the EMA and the raw module it follows (None: no EMA for this network).
    """

    name: str
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    max_grad_norm: float | None = None
    ema: "EMA | None" = None
    ema_target: nn.Module | None = None


@dataclass
class StepOutput:
    """What a trainer's step body hands the loop for one micro-batch.

    losses: one scalar per `OptimizedModule`, in the same order; None leaves that network without gradient this
    step (e.g. the discriminator before `disc_start`). batch_size: samples this rank saw. scalars: values logged
    every `log_every` steps as means over ranks (tensors are only read then, so the step has no host sync).
    log_extra: called on log steps only, for figures that need a collective (per-time-bucket losses).
    """

    losses: Sequence[torch.Tensor | None]
    batch_size: int
    scalars: Mapping[str, torch.Tensor | float] = field(default_factory=dict)
    log_extra: Callable[[], Mapping[str, float]] | None = None


@dataclass(frozen=True)
class LoopPlan:
    """When the loop stops, logs and checkpoints (counted in optimiser updates)."""

    max_steps: int
    log_every: int
    checkpoint_every: int
    max_minutes: float | None = None  # also stop (and save) after this much wall time


def plan_of(config) -> LoopPlan:
    """The loop plan of a trainer's sectioned config (`optim.max_steps`, `run.log_every` / `checkpoint_every` /
    `max_minutes`)."""
    return LoopPlan(config.optim.max_steps, config.run.log_every, config.run.checkpoint_every, config.run.max_minutes)


def open_metrics_log(accelerator: "Accelerator", config, description: str, start_step: int) -> "MetricsLogger":
    """`<output_dir>/metrics.jsonl` + progress bar (+ the accelerate trackers when `run.log_with` is set)."""
    from pathlib import Path

    from pipelines.kit.logging import MetricsLogger

    return MetricsLogger(Path(config.run.output_dir) / "metrics.jsonl", accelerator=accelerator,
                         total_steps=config.optim.max_steps, initial_step=start_step, description=description,
                         tracker_project=description if config.run.log_with else None,
                         tracker_config=config.to_dict())


@dataclass
class LoopResult:
    step: int
    stopped_by_clock: bool


def run_training_loop(
    accelerator: "Accelerator",
    batches: Iterable[Any],
    step_body: Callable[[Any, int], StepOutput],
    networks: Sequence[OptimizedModule],
    plan: LoopPlan,
    *,
    start_step: int,
    guard: NonFiniteGuard,
    metrics_log: "MetricsLogger",
    save_checkpoint: Callable[[int], Any],
    resumed: bool,
    after_update: Callable[[int], None] | None = None,
    throughput_name: str = "samples_per_s",
) -> LoopResult:
    """Run `step_body` on micro-batches until `plan.max_steps` optimiser updates (or the clock) are reached.

    Per micro-batch, inside `accelerator.accumulate` over every network:
      1. `step_body(batch, step)` runs the forward passes and returns one loss per network;
      2. non-finite policy (both trainers): if any loss is nan/inf on any rank, the micro-batch is skipped on
         every rank: no backward, no optimiser step, the accumulation window's partial gradients are dropped,
         and nothing is counted: the LR schedules, the EMA and the step counter move only on real updates. Too
         many skips in a row raise `NonFiniteLossError` (`NonFiniteGuard`);
      3. backward of each loss, gradient clipping when the window is complete, optimiser steps.
    Per optimiser update: LR schedules, EMAs, step + 1, the crash-injection point, `after_update(step)` (image
    grids), the log record, checkpoints every `checkpoint_every` and at the end, and the wall-clock budget
    (ranks stop together). The last state is always checkpointed, so a finished or stopped run resumes exactly.

    Host syncs: one per micro-batch, the non-finite check of step 2 (one flag read before backward, reduced over
    ranks), which is what lets a poisoned batch change nothing; with `max_minutes` one more per update (the ranks'
    clocks). Losses, gradient norms and other scalars are read on log steps only.

    Logged every `log_every` updates: the body's scalars, `grad_norm` (`grad_norm_<name>` with several networks,
    before clipping), `lr` (of the first network), `steps_per_s`, `<throughput_name>` (samples of all ranks per
    second) and `nonfinite_skipped`.
    """
    from pipelines.kit.faults import fault_point
    from pipelines.kit.run import any_rank

    modules = [network.module for network in networks]
    step = start_step
    started = time.monotonic()
    window_start, window_samples, window_steps = time.monotonic(), 0, 0
    last_checkpoint_step = step if resumed else -1
    grad_norms: dict[str, torch.Tensor | float] = {network.name: 0.0 for network in networks}  # read on log steps
    stopped_by_clock = False
    batch_iterator = iter(batches)
    while step < plan.max_steps:
        batch = next(batch_iterator)
        with accelerator.accumulate(*modules):
            output = step_body(batch, step)
            if len(output.losses) != len(networks):
                raise ValueError(f"step body returned {len(output.losses)} losses for {len(networks)} networks")
            present = [loss for loss in output.losses if loss is not None]
            if guard.skip(torch.stack([loss.detach().float().reshape(()) for loss in present])):
                for network in networks:
                    network.optimizer.zero_grad(set_to_none=True)
                continue
            for loss in present:
                accelerator.backward(loss)
            if accelerator.sync_gradients:
                for network, loss in zip(networks, output.losses):
                    if loss is not None:
                        grad_norms[network.name] = clip_gradients(accelerator, network.module.parameters(),
                                                                  network.max_grad_norm)
            for network in networks:
                network.optimizer.step()
                network.optimizer.zero_grad(set_to_none=True)
        window_samples += output.batch_size * accelerator.num_processes
        if not accelerator.sync_gradients:
            continue
        for network in networks:
            network.scheduler.step()
            if network.ema is not None:
                network.ema.update(network.ema_target)
        step += 1
        window_steps += 1
        fault_point("train_step")
        metrics_log.advance()
        if after_update is not None:
            after_update(step)
        if step % plan.log_every == 0 or step == plan.max_steps:
            elapsed = max(time.monotonic() - window_start, 1e-9)
            record = {name: mean_over_ranks(accelerator, value) for name, value in output.scalars.items()}
            if len(networks) == 1:
                record["grad_norm"] = float(grad_norms[networks[0].name])
            else:
                record.update({f"grad_norm_{name}": float(norm) for name, norm in grad_norms.items()})
            record["lr"] = networks[0].scheduler.get_last_lr()[0]
            record.update({"steps_per_s": window_steps / elapsed, throughput_name: window_samples / elapsed,
                           "nonfinite_skipped": guard.total_skipped})
            if output.log_extra is not None:
                record.update(output.log_extra())
            metrics_log.log(step, record)
            window_start, window_samples, window_steps = time.monotonic(), 0, 0
        # Ranks agree on the clock only when there is one: without `max_minutes` no rank can run out of time, and
        # the agreement is a collective plus a host sync that every step would otherwise pay.
        if plan.max_minutes is not None:
            stopped_by_clock = any_rank(accelerator, (time.monotonic() - started) / 60 >= plan.max_minutes)
        if step % plan.checkpoint_every == 0 or step >= plan.max_steps or stopped_by_clock:
            save_checkpoint(step)
            last_checkpoint_step = step
        if stopped_by_clock:
            break
    if last_checkpoint_step != step:
        save_checkpoint(step)
    metrics_log.close()
    return LoopResult(step=step, stopped_by_clock=stopped_by_clock)
