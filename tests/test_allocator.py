"""`keep_freed_memory`: CPU training reuses freed activation memory instead of faulting fresh pages in."""
import json
import os
import subprocess
import sys

import pytest

from pipelines.kit.allocator import keep_freed_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocates and frees three 8 MB tensors per round (what a training step does with its activations) and prints the
# page faults of each round.
ROUNDS = """
import json, resource, sys, torch
from pipelines.kit.allocator import keep_freed_memory
print(keep_freed_memory())
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.empty(2 << 20).fill_(1.0) for _ in range(3)]
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
    # 8 MB blocks are 6144 pages a round when they are faulted in afresh (glibc's default here: 4064 a round for
    # good); kept, the heap settles within a few rounds and the last ones touch only pages it already has.
    assert sum(faults[-3:]) < 100, faults


def test_a_users_own_malloc_settings_are_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert keep_freed_memory() is False
    applied, _ = _rounds(MALLOC_MMAP_THRESHOLD_="131072")
    assert applied == "False"
