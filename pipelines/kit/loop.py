"""Step helpers both trainers share: gradient clipping, the non-finite guard, ADM-style per-time-bucket losses,
and rank-mean logging values.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterable

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator



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
