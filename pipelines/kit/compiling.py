"""`--compile`: `torch.compile` of the networks a job runs, in place, so weights, EMA and checkpoints never see it.

Each network is compiled with `nn.Module.compile()` on its *unwrapped* module (after `accelerator.prepare`, inside
any DDP wrapper): the module keeps its class and its parameters, so `state_dict()` keys carry no `_orig_mod.`
prefix and a compiled run's checkpoint loads into an eager run and back. DDP still sees the same parameters and
fires its gradient hooks.

Shapes: `dynamic=None` (PyTorch's default) compiles for the first shape seen and, when a second batch size
appears (a last partial batch, the discriminator's real+fake batch of 2B), recompiles once with a symbolic batch
dimension instead of once per size. Other guards (train/eval, grad mode, requires_grad) add a fixed handful of
graphs in the first steps, never one per step.

On a CPU this is TorchInductor's C++ backend (a C++ compiler on PATH); on CUDA, Triton. Jobs call
`compile_modules(...)` where they build their networks; sampling and latent caching can take `--compile` the same
way (compile the DiT / decoder / encoder they load, in place, before the first batch).
"""
from __future__ import annotations

import contextlib
import os
import shutil

import torch
from torch import nn

from pipelines.kit.ema import unwrap_model

COMPILE_BACKEND = "inductor"  # tests may swap in "aot_eager" to exercise the plumbing without code generation
CXX_CANDIDATES = ("g++", "c++", "clang++")


def compile_unavailable_reason(device: torch.device | str) -> str | None:
    """Why `torch.compile` cannot run on `device` here (None when it can)."""
    if COMPILE_BACKEND != "inductor":
        return None
    device = torch.device(device)
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "--compile on CUDA needs Triton (pip install triton)"
    compiler = os.environ.get("CXX") or next((c for c in CXX_CANDIDATES if shutil.which(c)), None)
    if compiler is None or shutil.which(compiler.split()[0]) is None:
        return (f"--compile needs a C++ compiler on PATH for TorchInductor (none of {', '.join(CXX_CANDIDATES)} "
                "found; install gcc/g++ or run without --compile)")
    return None


def require_compile_support(device: torch.device | str) -> None:
    """One-line ValueError when `--compile` cannot work on `device` here."""
    reason = compile_unavailable_reason(device)
    if reason is not None:
        raise ValueError(reason)


def compile_modules(*modules: nn.Module | None, device: torch.device | str) -> None:
    """Compile each module in place (its unwrapped inner module); None entries are skipped."""
    require_compile_support(device)
    for module in modules:
        if module is not None:
            unwrap_model(module).compile(backend=COMPILE_BACKEND, dynamic=None)


def eager_if(condition: bool) -> contextlib.AbstractContextManager:
    """Run compiled modules eagerly inside the block when `condition` holds (a no-op for eager modules): for the
    double backward of an R1 penalty, which compiled (AOTAutograd) graphs do not support."""
    return torch.compiler.set_stance("force_eager") if condition else contextlib.nullcontext()
