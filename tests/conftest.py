"""Shared pytest set-up: no network, deterministic CPU runs."""
import os
import sys

# The scripts' shared CLI helpers (`_cli`) live beside the scripts, as they do when a script runs.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))

# Any accidental hub access fails fast instead of hanging on the closed network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TORCH_HOME", os.path.join(os.path.dirname(__file__), ".torch-home-unused"))

import pytest  # noqa: E402
import torch  # noqa: E402

from pipelines.kit.allocator import keep_freed_memory  # noqa: E402

keep_freed_memory()  # as every script does (`run_main`): the in-process tests train on the CPU the same way


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
