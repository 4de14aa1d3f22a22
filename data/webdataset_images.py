"""Webdataset image shards: samples `{__key__, jpg|jpeg|png|webp, cls}` in `.tar` files.

Shards are local paths, brace patterns (`/data/train-{000000..001023}.tar`) or `pipe:` URLs
(`pipe:aws s3 cp s3://bucket/train-000000.tar -`). Splitting across ranks and DataLoader workers, and the
shard-count requirement for exactly-once epochs, are described in `data.sharding`. Bad samples (undecodable or
too-small images, missing or malformed `.cls`, truncated tars) are skipped and counted by a `SkipCounter`
handler (`dataset.skip_counter`), or raise with the sample's `url:key` when `strict=True`; the policy for
colour modes and small images is the one in `data.images`.

Class names: pass `class_names`, or put a `classes.txt` (one name per line, line i = class i) beside local
shards; otherwise `class_names` is None and labels are whatever the `.cls` files hold.
"""
from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from functools import partial

import torch
import webdataset as wds

from data.images import BadImageError, Skipped, decode_image
from data.sharding import ShardSource, SkipCounter, expand_shards, keep_my_samples, worker_slot
from data.transforms import make_transform

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def read_classes_txt(shards: list[str]) -> list[str] | None:
    """Class names from `classes.txt` next to the first shard, when that shard is a local file."""
    first = shards[0]
    if first.startswith("pipe:") or "://" in first:
        return None
    path = os.path.join(os.path.dirname(os.path.abspath(first)), "classes.txt")
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return [line.strip() for line in handle if line.strip()]


def decode_image_sample(
    sample: dict, transform: Callable, min_size: int, upscale_small: bool = False, alpha: str = "white"
) -> tuple[torch.Tensor, int]:
    """Raw webdataset sample → (image (3, H, W) in [-1, 1], class index); raises `BadImageError`."""
    name = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise BadImageError(name, f"no image ({'/'.join(IMAGE_KEYS)}) in sample with keys {sorted(sample)}")
    if "cls" not in sample:
        raise BadImageError(name, "no .cls in sample")
    try:
        label = int(bytes(sample["cls"]).decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise BadImageError(name, f"malformed .cls {bytes(sample['cls'])[:20]!r}") from None
    image = decode_image(sample[key], min_size, upscale_small, alpha, name=name)
    return transform(image), label


def _shuffle_per_slot(samples, buffer: int, source: ShardSource):
    """Sample-level shuffle buffer, seeded by (seed, epoch, slot) so runs repeat exactly."""
    slot, _ = worker_slot(source.rank, source.world_size)
    rng = random.Random(f"{source.seed}-{source.epoch}-{slot}-samples")
    return wds.shuffle(buffer, initial=buffer, rng=rng)(samples)


class WebImageDataset(wds.DataPipeline):
    """Iterable dataset of `(image (3, R, R) float in [-1, 1], class_index int)` from webdataset shards."""

    def __init__(
        self,
        urls: str | Sequence[str],
        resolution: int = 256,
        train: bool = True,
        *,
        rank: int = 0,
        world_size: int = 1,
        split: str = "auto",
        shuffle_buffer: int | None = None,
        resampled: bool = False,
        seed: int = 0,
        strict: bool = False,
        upscale_small: bool = False,
        alpha: str = "white",
        class_names: Sequence[str] | None = None,
        transform: Callable | None = None,
    ):
        shards = expand_shards(urls)
        shuffle_buffer = (1000 if train else 0) if shuffle_buffer is None else shuffle_buffer
        self.source = ShardSource(
            shards, rank, world_size, split=split, shuffle=train, resampled=resampled, seed=seed
        )
        self.skip_counter = SkipCounter(strict=strict, what="image sample")
        transform = transform if transform is not None else make_transform(resolution, train)
        decode = partial(
            decode_image_sample, transform=transform, min_size=resolution, upscale_small=upscale_small, alpha=alpha
        )
        stages = [
            self.source,
            wds.tarfile_to_samples(handler=self.skip_counter),
            partial(keep_my_samples, source=self.source),
        ]
        if shuffle_buffer > 0:
            stages.append(partial(_shuffle_per_slot, buffer=shuffle_buffer, source=self.source))
        stages.append(wds.map(decode, handler=self.skip_counter))
        super().__init__(*stages)
        names = list(class_names) if class_names is not None else read_classes_txt(shards)
        self.class_names = names
        self.resolution = resolution

    @property
    def num_classes(self) -> int | None:
        return len(self.class_names) if self.class_names is not None else None

    @property
    def skipped(self) -> list[Skipped]:
        """Bad samples seen in this process (each DataLoader worker keeps its own)."""
        return self.skip_counter.records

    def set_epoch(self, epoch: int) -> None:
        self.source.set_epoch(epoch)
