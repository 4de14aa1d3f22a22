"""One precision registry for every job, plus the device and parameter-count helpers jobs share.

A precision name says which dtype the networks' matmuls and convolutions run in under `torch.autocast`; weights,
optimiser state, the diffusion/Euler state and every metric stay float32 whatever the name. "no" is accelerate's
spelling of fp32 and is accepted everywhere so existing commands and checkpoints keep working.
"""
from __future__ import annotations

import contextlib

import torch

# name → autocast dtype (None: plain fp32, autocast off)
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    "no": None,
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
PRECISIONS = tuple(AUTOCAST_DTYPES)


def check_precision(name: str) -> str:
    """The name itself, or a one-line ValueError listing the choices."""
    if name not in AUTOCAST_DTYPES:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {name!r}")
    return name


def autocast_dtype(name: str) -> torch.dtype | None:
    return AUTOCAST_DTYPES[check_precision(name)]


def accelerate_mixed_precision(name: str) -> str:
    """The `Accelerator(mixed_precision=...)` value of a precision name ("no" for fp32)."""
    check_precision(name)
    return "no" if AUTOCAST_DTYPES[name] is None else name


def autocast(device: torch.device | str, name: str) -> contextlib.AbstractContextManager:
    """`torch.autocast` in the named dtype on `device`, or a context that turns autocast off for fp32.

    Turning it off (rather than doing nothing) keeps an fp32 evaluation fp32 even inside a caller's autocast.
    """
    device_type = torch.device(device).type
    dtype = autocast_dtype(name)
    if dtype is None:
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=dtype)


def pick_device(name: str | None = None) -> torch.device:
    """The device a user named, else the first CUDA device when there is one, else the CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
