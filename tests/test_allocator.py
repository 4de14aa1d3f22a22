"""`keep_freed_memory`: CPU training reuses freed activation memory instead of faulting fresh pages in."""
import json
import os
import subprocess
import sys

import pytest

from pipelines.kit.allocator import keep_freed_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocates and frees three 8 MB tensors and one 64 MB tensor per round (what a training step or a batched encode
# does with its activations) and prints the page faults of each round.
ROUNDS = """
import json, resource, sys, torch
from pipelines.kit.allocator import keep_freed_memory
print(keep_freed_memory())
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.empty(2 << 20).fill_(1.0) for _ in range(3)] + [torch.empty(16 << 20).fill_(1.0)]
    del blocks
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""


def _rounds(**env: str) -> tuple[str, list[int]]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    result = subprocess.run([sys.executable, "-c", ROUNDS], cwd=ROOT, env={**clean, **env}, capture_output=True,
                            text=True, check=True)
    applied, faults = result.stdout.strip().splitlines()
    return applied, json.loads(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"),
                    reason="the setting is glibc's")
def test_freed_blocks_are_reused_without_new_page_faults():
    applied, faults = _rounds()
    assert applied == "True"
    # The blocks are 22,528 pages a round when they are faulted in afresh (glibc's default maps the 64 MB one anew
    # every round, and so would any mmap threshold, capped at 32 MB); kept, the heap settles and rounds touch only
    # pages it already has. Not every round: this VM's memory daemon may page out a long-free heap range.
    assert min(faults[2:]) < 100, faults


def test_a_users_own_malloc_settings_are_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert keep_freed_memory() is False
    applied, _ = _rounds(MALLOC_MMAP_THRESHOLD_="131072")
    assert applied == "False"
