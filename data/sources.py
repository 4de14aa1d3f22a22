"""`build_image_dataset`: one entry point from a `--data` string to an image dataset, through a registry.

    --data offline                       bundled photo crops (data.offline)
    --data /path/to/imagenet             folder with train/ and val/ (data.folder)
    --data "shards-{000..009}.tar"       webdataset shards, local / brace pattern / pipe: (data.webdataset_images)

A `kind:` prefix (`folder:/x`, `webdataset:pipe:...`, `offline:`) forces a source; otherwise the first source in
`IMAGE_SOURCES` whose `matches` accepts the string is used. For webdataset sources a literal `{split}` in the
pattern is replaced by the split name (`/data/{split}-{000..099}.tar`). Every dataset returned yields
`(image (3, R, R) float in [-1, 1], class_index int)` and has `class_names`, `num_classes` and `skipped`.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from torch.utils.data import Dataset

from data.folder import ImageFolderDataset
from data.offline import OfflinePhotoDataset
from data.webdataset_images import WebImageDataset


# Map-style sources are split across ranks by the caller's sampler (accelerate), so they ignore these.
_RANK_OPTIONS = ("rank", "world_size")


def _build_offline(
    location: str, split: str, resolution: int, train: bool, *, crops_per_class=None, seed: int = 0, **options
) -> Dataset:
    ignored = (*_RANK_OPTIONS, "strict", "upscale_small")  # bundled photos are never hostile
    options = {k: v for k, v in options.items() if k not in ignored}
    return OfflinePhotoDataset(split, resolution, crops_per_class, seed, random_flip=train, **options)


def _build_folder(location: str, split: str, resolution: int, train: bool, **options) -> Dataset:
    options = {k: v for k, v in options.items() if k not in (*_RANK_OPTIONS, "seed")}
    return ImageFolderDataset(location, split, resolution, train, **options)


def _build_webdataset(location: str, split: str, resolution: int, train: bool, **options) -> Dataset:
    return WebImageDataset(location.replace("{split}", split), resolution, train, **options)


def _looks_like_shards(location: str) -> bool:
    return location.startswith("pipe:") or ".tar" in location


@dataclass(frozen=True)
class ImageSource:
    """A kind of `--data` string: how to recognise it and how to build its dataset."""

    matches: Callable[[str], bool]
    build: Callable[..., Dataset]


# Tried in this order when the string carries no `kind:` prefix.
IMAGE_SOURCES: dict[str, ImageSource] = {
    "offline": ImageSource(lambda location: location == "offline", _build_offline),
    "webdataset": ImageSource(_looks_like_shards, _build_webdataset),
    "folder": ImageSource(os.path.isdir, _build_folder),
}


def resolve_source(source: str) -> tuple[str, str]:
    """`--data` string → (registry kind, location)."""
    kind, sep, rest = source.partition(":")
    if sep and kind in IMAGE_SOURCES:
        return kind, rest
    for kind, entry in IMAGE_SOURCES.items():
        if entry.matches(source):
            return kind, source
    raise ValueError(
        f"cannot tell what data source {source!r} is: expected 'offline', a folder with train/ and val/, "
        f"or webdataset shards (*.tar, brace pattern, pipe:); or prefix one of {list(IMAGE_SOURCES)} and ':'"
    )


def build_image_dataset(
    source: str,
    split: str = "train",
    resolution: int = 256,
    train: bool | None = None,
    **options,
) -> Dataset:
    """Dataset for `source` (see module docstring); `train` defaults to `split == "train"`.

    `options` go to the source: e.g. `rank`, `world_size`, `seed`, `shuffle_buffer`, `resampled` (webdataset),
    `strict`, `upscale_small`, `scan` (folder), `crops_per_class` (offline).
    """
    kind, location = resolve_source(source)
    train = split == "train" if train is None else train
    return IMAGE_SOURCES[kind].build(location, split, resolution, train, **options)
