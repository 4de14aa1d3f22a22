"""One precision registry for every job, plus the device and parameter-count helpers jobs share.

A precision name says which dtype the networks' matmuls and convolutions run in under `torch.autocast`; weights,
optimiser state, the diffusion/Euler state and every metric stay float32 whatever the name.

- `auto` (the default everywhere) resolves per run (`resolve_precision`): the setting of `accelerate launch
  --mixed_precision` / `accelerate config` when one is given (accelerate exports it as ACCELERATE_MIXED_PRECISION);
  else bf16 autocast on a CUDA device that supports bf16 (TF32 matmuls on as well); fp32 on every CPU. On a CPU
  without native bf16 (AVX2, AVX512 without AVX512_BF16 / AMX) bf16 matmuls are emulated and run 100-500× slower
  than fp32; where it is native the gain is under 2× on convolutions and the numbers change, so fp32 stays the
  CPU default and bf16 there is asked for explicitly.
- `fp32`, `bf16`, `fp16` are taken as asked; an explicit bf16 on a CPU without native bf16 warns once, with the
  measured fp32/bf16 matmul speed ratio.
- `no` is accelerate's spelling of fp32, kept as an alias so existing commands and checkpoints keep working.
"""
from __future__ import annotations

import contextlib
import os
import time
import warnings

import torch

# name → autocast dtype (None: plain fp32, autocast off); "auto" is resolved to one of the others first.
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
PRECISIONS = ("auto", *AUTOCAST_DTYPES)  # what every script's --precision offers
PRECISION_ALIASES = {"no": "fp32"}  # accepted everywhere, not offered
DEFAULT_PRECISION = "auto"
ACCELERATE_ENV = "ACCELERATE_MIXED_PRECISION"  # set by `accelerate launch --mixed_precision` / `accelerate config`
NATIVE_BF16_CPU_CAPABILITIES = ("AVX512_BF16", "AMX")  # torch.backends.cpu.get_cpu_capability() prefixes
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags

_warned: set[str] = set()


def check_precision(name: str) -> str:
    """The name itself, or a one-line ValueError listing the choices."""
    if name not in PRECISIONS and name not in PRECISION_ALIASES:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {name!r}")
    return name


def canonical_precision(name: str) -> str:
    """`no` → `fp32`; the other names unchanged (checked)."""
    return PRECISION_ALIASES.get(check_precision(name), name)


def cpu_has_native_bf16() -> bool:
    """True on CPUs whose vector units do bf16 arithmetic (AVX512_BF16, AMX); AVX2 / plain AVX512 emulate it.

    PyTorch's dispatch level (`get_cpu_capability()`) says "AVX512" on CPUs with and without AVX512_BF16, so
    oneDNN's own check decides where it is available, then the CPU flags."""
    capability = torch.backends.cpu.get_cpu_capability().upper()
    if capability.startswith(NATIVE_BF16_CPU_CAPABILITIES):
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        pass
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:
        return False
    return any(flag in flags.split() for flag in NATIVE_BF16_CPU_FLAGS)


def cuda_supports_bf16(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def measured_bf16_slowdown(size: int = 256) -> float:
    """How many times slower a bf16 matmul is than an fp32 one on this CPU (one n×n product each, n=`size`)."""
    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b  # warm-up
        start = time.perf_counter()
        a @ b
        seconds[dtype] = time.perf_counter() - start
    return seconds[torch.bfloat16] / max(seconds[torch.float32], 1e-9)


def _warn_slow_cpu_bf16() -> None:
    if "cpu-bf16" in _warned:
        return
    _warned.add("cpu-bf16")
    warnings.warn(
        f"precision bf16 on a CPU without native bf16 ({torch.backends.cpu.get_cpu_capability()}): a bf16 matmul "
        f"measured {measured_bf16_slowdown():.0f}× slower than fp32 here; use --precision auto or fp32",
        RuntimeWarning, stacklevel=3)


def resolve_precision(name: str, device: torch.device | str = "cpu") -> str:
    """The concrete precision (fp32 / bf16 / fp16) a run on `device` uses for `name`; see the module docstring.

    Resolving `auto` on a CUDA device that supports bf16 also turns TF32 matmuls on.
    """
    name = canonical_precision(name)
    device = torch.device(device)
    if name == "auto":
        launched = os.environ.get(ACCELERATE_ENV)
        if launched:
            name = canonical_precision(launched.lower())
        elif cuda_supports_bf16(device):
            name = "bf16"
        else:
            name = "fp32"
    if device.type == "cuda" and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (weights, metrics) on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    if name == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        _warn_slow_cpu_bf16()
    return name


def autocast_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype | None:
    return AUTOCAST_DTYPES[resolve_precision(name, device)]


def accelerate_mixed_precision(name: str, cpu: bool = False) -> str:
    """The `Accelerator(mixed_precision=...)` value of a precision name ("no" for fp32); `auto` is resolved for
    the device accelerate will pick (the CPU when `cpu`, else the first CUDA device if any)."""
    device = torch.device("cpu" if cpu or not torch.cuda.is_available() else "cuda")
    resolved = resolve_precision(name, device)
    return "no" if AUTOCAST_DTYPES[resolved] is None else resolved


def autocast(device: torch.device | str, name: str) -> contextlib.AbstractContextManager:
    """`torch.autocast` in the named dtype on `device`, or a context that turns autocast off for fp32.

    Turning it off (rather than doing nothing) keeps an fp32 evaluation fp32 even inside a caller's autocast.
    """
    device_type = torch.device(device).type
    dtype = autocast_dtype(name, device)
    if dtype is None:
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=dtype)


def pick_device(name: str | None = None) -> torch.device:
    """The device a user named, else the first CUDA device when there is one, else the CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
