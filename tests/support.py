"""Helpers shared by several test modules (imported as `support`: pytest puts tests/ on sys.path)."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch


def boxes_overlap(a, b) -> bool:
    """Whether two (left, top, right, bottom) boxes share any pixel."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def reset_accelerate() -> None:
    """accelerate keeps process-wide state; reset it so the next run builds its accelerator from scratch."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@contextmanager
def one_torch_thread():
    """Single-threaded kernels, as in subprocesses started with OMP_NUM_THREADS=1, then accelerate reset."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        reset_accelerate()


def save_tiny_tokenizer(directory: Path) -> Path:
    """The seeded tiny ε-VAE (f=4, 4 channels) the pipeline tests encode with."""
    from tokenizer import EpsVAE

    torch.manual_seed(0)
    EpsVAE.from_preset("tiny", "tiny").save_pretrained(directory)
    return directory


def cache_tiny_latents(tmp_path_factory, samples_per_shard: int) -> Path:
    """Offline 32² crops (2 per class) encoded by the tiny tokenizer into latent shards."""
    from pipelines.cache_latents import CacheLatentsConfig, cache_latents

    tokenizer = save_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    out = tmp_path_factory.mktemp("latents")
    cache_latents(CacheLatentsConfig(tokenizer=str(tokenizer), data="offline", output_dir=str(out), resolution=32,
                                     crops_per_class=2, batch_size=8, num_workers=0,
                                     samples_per_shard=samples_per_shard, cpu=True))
    reset_accelerate()
    return out
