"""Splitting webdataset shards across ranks and DataLoader workers, and counting bad samples.

Rank and world size are arguments (callers pass accelerate's `process_index` / `num_processes`); the DataLoader
worker comes from `torch.utils.data.get_worker_info()`. Nothing reads torch.distributed or environment variables.

Exactly-once epochs (`resampled=False`): the R ranks × W workers form S = R·W slots, slot = rank·W + worker.
- shard-level (`split="shard"`, or `"auto"` when #shards ≥ S): slot s reads shards s, s+S, s+2S, ... of the
  (optionally shuffled, identically on every rank) shard list. Every sample is read exactly once per epoch.
  Requirement: at least S shards, ideally a multiple of S with equal sizes so ranks see equal sample counts
  (unequal counts make DDP ranks finish at different steps; callers bound steps per epoch).
- sample-level (`split="sample"`, or `"auto"` fallback with a warning when #shards < S): every slot reads every
  shard and keeps samples whose running index ≡ slot (mod S). Still exactly once, but each byte is read S times.
  `split="shard"` with too few shards raises instead.
Resampled (`resampled=True`, multi-epoch training): each slot draws shards with replacement from its own seeded
stream forever; no epoch boundary, so the caller fixes the number of steps.
"""
from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import IterableDataset
from webdataset.shardlists import expand_urls

from data.images import BadImageError, Skipped

logger = logging.getLogger(__name__)

SPLIT_MODES = ("auto", "shard", "sample")


def expand_shards(urls: str | Sequence[str]) -> list[str]:
    """Brace patterns (`shards-{000..009}.tar`), `::`-joined lists or a list of paths / `pipe:` URLs → list."""
    if isinstance(urls, str):
        expanded = expand_urls(urls)
    else:
        expanded = [u for pattern in urls for u in expand_urls(pattern)]
    if not expanded:
        raise ValueError(f"no shards in {urls!r}")
    return list(expanded)


def worker_slot(rank: int, world_size: int) -> tuple[int, int]:
    """(slot, num_slots) of the calling DataLoader worker among all ranks × workers."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    info = torch.utils.data.get_worker_info()
    worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * num_workers + worker, world_size * num_workers


class SkipCounter:
    """webdataset `handler`: count and log an exception, and continue (or re-raise when `strict`).

    Counts live in the process that saw the failure (each DataLoader worker has its own copy); the warning log is
    the cross-process record.
    """

    max_records = 10_000  # keep memory bounded on a badly broken data set; `count` keeps counting

    def __init__(self, strict: bool = False, what: str = "sample"):
        self.strict, self.what = strict, what
        self.count = 0
        self.records: list[Skipped] = []

    def __call__(self, exn: Exception) -> bool:
        if self.strict:
            raise exn
        self.count += 1
        if isinstance(exn, BadImageError):
            record = Skipped(exn.path, exn.reason)
        else:
            where = next((str(a) for a in exn.args[1:] if isinstance(a, str)), "<stream>")
            record = Skipped(where, f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}")
        if len(self.records) < self.max_records:
            self.records.append(record)
        logger.warning("skipping bad %s %s (%s)", self.what, record.path, record.reason)
        return True


class ShardSource(IterableDataset):
    """First pipeline stage: yields `{"url": shard}` for this rank/worker (see module docstring)."""

    def __init__(
        self,
        urls: str | Sequence[str],
        rank: int = 0,
        world_size: int = 1,
        *,
        split: str = "auto",
        shuffle: bool = False,
        resampled: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        if split not in SPLIT_MODES:
            raise ValueError(f"unknown split mode {split!r}; choose from {SPLIT_MODES}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        self.urls = expand_shards(urls)
        self.rank, self.world_size = rank, world_size
        self.split, self.shuffle, self.resampled, self.seed = split, shuffle, resampled, seed
        self.epoch = 0
        self.sample_slot: tuple[int, int] | None = None  # set per iteration when splitting by sample

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle shard order for a new epoch (the same order on every rank, so the split stays exact)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        slot, num_slots = worker_slot(self.rank, self.world_size)
        if self.resampled:
            rng = random.Random(f"{self.seed}-{self.epoch}-{slot}")
            while True:
                yield {"url": rng.choice(self.urls)}
        urls = list(self.urls)
        if self.shuffle:
            random.Random(f"{self.seed}-{self.epoch}").shuffle(urls)
        mode = self.resolve_mode(num_slots)
        if mode == "shard":
            self.sample_slot = None
            yield from ({"url": url} for url in urls[slot::num_slots])
        else:
            self.sample_slot = (slot, num_slots)
            yield from ({"url": url} for url in urls)

    def resolve_mode(self, num_slots: int) -> str:
        if len(self.urls) >= num_slots:
            return "sample" if self.split == "sample" else "shard"
        message = (
            f"{len(self.urls)} shards < {self.world_size} ranks x {num_slots // self.world_size} workers; "
            "shard-level splitting needs at least one shard per rank and worker"
        )
        if self.split == "shard":
            raise ValueError(message)
        if self.split == "auto":
            logger.warning("%s: falling back to sample-level splitting (each shard is read by every worker)", message)
        return "sample"


def keep_my_samples(samples: Iterator[dict], source: ShardSource) -> Iterator[dict]:
    """Pipeline stage after tar reading: under sample-level splitting keep every S-th sample for this slot."""
    index = 0
    for sample in samples:
        slot = source.sample_slot
        if slot is None or index % slot[1] == slot[0]:
            yield sample
        index += 1
