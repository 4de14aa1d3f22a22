"""Training metrics: a tqdm bar and a JSONL file on the main process, plus accelerate trackers when configured.

One JSON object per logged step: `{"step": 1200, "time": 1718000000.0, "loss": 0.12, "lr": 1e-4, ...}`.
Non-finite values are written as `null` so every line stays strict JSON. On resume the lines a crashed run wrote
after the resumed step are dropped, so the file reads as one uninterrupted run.

Metrics must already be reduced across ranks (e.g. `training.mean_over_ranks`, `training.quartile_losses`); only
the main process writes.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from accelerate import Accelerator


def _scalar(value: Any) -> float | int | None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metrics must be scalars, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    value = float(value)
    return value if math.isfinite(value) else None


def _flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """TensorBoard's hparams take only flat scalars/strings."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flat_config(value, prefix=f"{name}."))
        elif isinstance(value, (int, float, str, bool)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete line of a metrics file (a final half-written line from a crash is ignored)."""
    records = []
    with open(path) as handle:
        for line in handle:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


class MetricsLogger:
    """tqdm + JSONL (+ accelerate trackers) for one training run.

    jsonl_path: the metrics file; total_steps: the bar's length; initial_step: the resumed step (the bar starts
    there and later lines of the file are dropped); tracker_project: with an accelerator built with `log_with`,
    the run name given to `accelerator.init_trackers`, with `tracker_config` as its hyper-parameters.
    """

    def __init__(
        self,
        jsonl_path: str | os.PathLike,
        *,
        accelerator: "Accelerator | None" = None,
        total_steps: int | None = None,
        initial_step: int = 0,
        description: str = "train",
        tracker_project: str | None = None,
        tracker_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = Path(jsonl_path)
        self.accelerator = accelerator
        self.is_main = accelerator is None or accelerator.is_main_process
        self.use_trackers = accelerator is not None and bool(getattr(accelerator, "log_with", None))
        if self.use_trackers:
            if tracker_project is None:
                raise ValueError("the accelerator has trackers (log_with): pass tracker_project to MetricsLogger")
            accelerator.init_trackers(tracker_project, config=_flat_config(dict(tracker_config or {})))
        self.bar = tqdm(total=total_steps, initial=initial_step, desc=description, disable=not self.is_main,
                        dynamic_ncols=True)
        self._file = None
        if self.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                self._drop_after(initial_step)
            self._file = open(self.path, "a")

    def _drop_after(self, step: int) -> None:
        kept = [r for r in read_jsonl(self.path) if isinstance(r.get("step"), int) and r["step"] <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: Mapping[str, Any], show: bool = True) -> dict[str, Any]:
        """Write one record for `step` (main process), update the bar's postfix, forward to trackers."""
        record = {"step": int(step), "time": time.time(), **{k: _scalar(v) for k, v in metrics.items()}}
        if self.is_main:
            self._file.write(json.dumps(record, allow_nan=False) + "\n")
            self._file.flush()
            if show:
                self.bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v
                                      for k, v in record.items() if k not in ("step", "time")}, refresh=False)
        if self.use_trackers:
            self.accelerator.log({k: v for k, v in record.items() if k not in ("step", "time") and v is not None},
                                 step=int(step))
        return record

    def advance(self, n: int = 1) -> None:
        """Move the bar by `n` optimiser steps."""
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.use_trackers:
            self.accelerator.end_training()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
