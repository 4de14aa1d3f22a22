"""Where a process's CPU memory comes from: glibc's malloc set to reuse freed tensor memory (see
`keep_freed_memory`). Standard library only, so the scripts can call it before anything heavy is imported.
"""
from __future__ import annotations

import ctypes
import os
import sys

# glibc's mallopt parameters (malloc.h) and the largest mmap threshold it accepts on 64-bit (HEAP_MAX_SIZE / 2).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_LARGEST_MMAP_THRESHOLD = 32 << 20
_NEVER_TRIM = 2**31 - 1  # mallopt takes a C int
_USER_MALLOC_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed blocks up to 32 MB for reuse instead of handing them back to the OS.

    By default glibc maps large blocks with mmap and unmaps them on free, and trims the top of its heap. A CPU
    training step frees and reallocates the same multi-MB activations every step, so each reallocation is faulted
    in again page by page. Measured on 2 cores (a VM, A/B in one process, 5 rounds): the demo's tokenizer step
    1.11-1.44× faster, with the perceptual loss 1.23-1.41×. Only where memory comes from changes, never a result;
    the process keeps its peak heap instead of shrinking after it. Linux with glibc only (elsewhere: False, and
    nothing happens); a user's own MALLOC_* / GLIBC_TUNABLES settings are left alone. The scripts call it first.
    """
    if sys.platform != "linux" or any(name in os.environ for name in _USER_MALLOC_SETTINGS):
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return False
        libc = ctypes.CDLL("libc.so.6")
    except (OSError, ValueError, AttributeError):  # musl, or no confstr name: not glibc's allocator
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _LARGEST_MMAP_THRESHOLD)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))
