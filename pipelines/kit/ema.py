"""Exponential moving average of a model's weights (paper C.2: decay 0.999 tokenizer; C.3: 0.9999 DiT).

The average is kept in fp32 whatever the model's dtype (a bf16 model updated with decay 0.9999 would round
every update away), keyed like the *unwrapped* model's `state_dict()`, so `ema.state_dict()` loads straight
into a fresh model (`model.load_state_dict(ema.state_dict())`) and saves as `ema.safetensors`.

Floating-point parameters are averaged; buffers (BatchNorm statistics, fixed positional embeddings, counters)
are copied from the model at each update (floating ones stored in fp32 too), so `copy_to` yields a complete,
consistent model.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel (`.module`) and `torch.compile` (`._orig_mod`) wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


class EMA:
    """fp32 EMA of `model`'s parameters: after `update`, ema ← decay·ema + (1−decay)·param.

    Build it after `accelerator.prepare(model)` (each rank seeds differently, so weights only agree once DDP has
    broadcast rank 0's) and call `update(model)` after each optimiser update (when `accelerator.sync_gradients`),
    on every rank: ranks then hold identical averages and the main process saves it.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        model = unwrap_model(model)
        self._averaged = {name for name, p in model.named_parameters() if p.is_floating_point()}
        self.shadow: dict[str, torch.Tensor] = {
            name: (t.detach().float() if t.is_floating_point() else t.detach()).clone()
            for name, t in model.state_dict().items()
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        state = unwrap_model(model).state_dict()
        self._check_keys(state)
        device = next(iter(state.values())).device if state else None
        if device is not None and next(iter(self.shadow.values())).device != device:
            self.to(device)  # the model moved (e.g. `accelerator.prepare` after the EMA was built): follow it
        # One multi-tensor lerp over all averaged weights: shadow += (1 - decay)·(value - shadow), the EMA in one
        # pass over the shadow instead of a multiply and an add (no Python loop, no kernel launch per tensor).
        averaged = [name for name in state if name in self._averaged]
        shadows = [self.shadow[name] for name in averaged]
        values = [state[name].detach().to(shadows[i].device, torch.float32) for i, name in enumerate(averaged)]
        if shadows:
            torch._foreach_lerp_(shadows, values, 1.0 - self.decay)
        for name, value in state.items():
            if name not in self._averaged:
                self.shadow[name].copy_(value.detach())

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into `model` (cast to the model's dtype and device)."""
        model = unwrap_model(model)
        self._check_keys(model.state_dict())
        model.load_state_dict(self.shadow)

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily evaluate with the EMA weights; the training weights are restored on exit (even on error).

            with ema.swapped_in(model):
                evaluate(model)
        """
        inner = unwrap_model(model)
        backup = {name: t.detach().clone() for name, t in inner.state_dict().items()}
        self.copy_to(inner)
        try:
            yield model
        finally:
            inner.load_state_dict(backup)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (safetensors-ready); the decay lives in the run's config."""
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._check_keys(state)
        for name, value in state.items():
            self.shadow[name].copy_(value)

    def to(self, device: torch.device | str) -> "EMA":
        self.shadow = {name: t.to(device) for name, t in self.shadow.items()}
        return self

    def _check_keys(self, state: dict[str, torch.Tensor]) -> None:
        if state.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - state.keys())[:3]
            unexpected = sorted(state.keys() - self.shadow.keys())[:3]
            raise ValueError(f"EMA and model disagree on weight names: missing {missing}, unexpected {unexpected}")


def save_final_model(model: nn.Module, ema: EMA, directory: Path, training: dict[str, Any]) -> Path:
    """The model folder a trainer hands its users: the EMA weights as `model.safetensors` (what sampling and
    decoding load), the raw weights as `raw.safetensors` (for fine-tuning), and `training` (steps, data, EMA decay)
    both in the model card and in `training.json`."""
    model = unwrap_model(model)
    raw = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    facts = {"ema decay": ema.decay, **training}
    with ema.swapped_in(model):
        model.save_pretrained(directory, raw_state_dict=raw, training=facts)
    (Path(directory) / "training.json").write_text(json.dumps({"ema_decay": ema.decay, **training}, indent=2) + "\n")
    return Path(directory)
