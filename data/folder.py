"""ImageNet-style folder datasets: `root/train/<wnid>/*.JPEG`, and a val split as a tree or a labelled file list.

Class index = position of the class folder name in the sorted list of the *train* split's folders (standard
ImageNet-1k indexing, which DiT checkpoints use), so val indices always agree with train indices. Any number of
classes works; names are whatever the folders are called.

Val split, in the order tried:
1. `root/val/<class>/...` folder tree (e.g. after the usual valprep.sh);
2. a labels file: `labels_file=` or `root/val_labels.txt` with lines `relative/path.JPEG <label>` (paths
   relative to `root/val`; `<label>` is a class folder name or a 0-based index in sorted-wnid order, as in
   Caffe's val.txt — *not* the devkit's 1-based ILSVRC2012_ID), or `root/LOC_val_solution.csv` (Kaggle format,
   first wnid of PredictionString is the label, images at `root/val/<ImageId>.JPEG`).

Hostile files (see `data.images`): at construction a cheap header scan (`scan=True`) drops zero-byte files,
non-images, unreadable headers and too-small images, recording each in `skipped`. Files whose header is fine but
whose pixels are broken are found lazily: `__getitem__` substitutes the next good index (deterministic) and
records the file, so an epoch never crashes. Lazy records live in the process that hit them (a DataLoader
worker's copy); the warning log is the cross-process record. `scan=False` skips the up-front scan, which costs
roughly one file open per image (minutes for ImageNet on network storage), and leaves everything to the lazy
path. `strict=True` raises `BadImageError` naming the file instead of skipping.
"""
from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import Dataset

from data.images import BadImageError, Skipped, decode_image, is_image_file, peek_image, record_skip
from data.transforms import make_transform


def list_class_folders(directory: str) -> list[str]:
    """Sorted names of the sub-folders of `directory` (hidden ones excluded)."""
    return sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))


def _find_labels_file(root: str, split: str) -> str | None:
    for candidate in (f"{split}_labels.txt", f"LOC_{split}_solution.csv"):
        path = os.path.join(root, candidate)
        if os.path.isfile(path):
            return path
    return None


def _parse_label(token: str, class_to_idx: dict[str, int], num_classes: int, where: str) -> int:
    if token in class_to_idx:
        return class_to_idx[token]
    try:
        index = int(token)
    except ValueError:
        raise ValueError(f"{where}: unknown class {token!r}") from None
    if not 0 <= index < num_classes:
        raise ValueError(f"{where}: class index {index} outside [0, {num_classes})")
    return index


def read_labels_file(
    path: str, split_dir: str, class_to_idx: dict[str, int]
) -> list[tuple[str, int]]:
    """(absolute path, class index) pairs from a `path label` text file or a LOC_*_solution.csv."""
    num_classes = len(class_to_idx)
    samples: list[tuple[str, int]] = []
    if path.lower().endswith(".csv"):
        with open(path, newline="") as handle:
            for line_no, row in enumerate(csv.DictReader(handle), start=2):
                where = f"{path}:{line_no}"
                if "ImageId" not in row or "PredictionString" not in row:
                    raise ValueError(f"{where}: expected columns ImageId,PredictionString")
                wnid = row["PredictionString"].split()[0]
                label = _parse_label(wnid, class_to_idx, num_classes, where)
                samples.append((os.path.join(split_dir, row["ImageId"] + ".JPEG"), label))
        return samples
    with open(path) as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.strip().rsplit(None, 1)
            if len(parts) != 2:
                raise ValueError(f"{path}:{line_no}: expected 'relative/path <label>', got {line.strip()!r}")
            label = _parse_label(parts[1], class_to_idx, num_classes, f"{path}:{line_no}")
            samples.append((os.path.join(split_dir, parts[0]), label))
    return samples


def _walk_tree(split_dir: str, class_to_idx: dict[str, int]) -> tuple[list[tuple[str, int]], list[Skipped]]:
    """Image files under `split_dir/<class>/` (recursively, sorted) and non-image files found on the way."""
    samples: list[tuple[str, int]] = []
    ignored: list[Skipped] = []
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            ignored.append(Skipped(entry.path, "outside any class folder"))
            continue
        if entry.name not in class_to_idx:
            raise ValueError(f"{entry.path}: class folder {entry.name!r} is not among the train classes")
        label = class_to_idx[entry.name]
        for dirpath, dirnames, filenames in os.walk(entry.path, followlinks=True):
            dirnames.sort()
            for filename in sorted(filenames):
                path = os.path.join(dirpath, filename)
                if is_image_file(filename):
                    samples.append((path, label))
                else:
                    ignored.append(Skipped(path, "not an image file"))
    return samples, ignored


class ImageFolderDataset(Dataset):
    """Map-style dataset of `(image (3, H, W) float in [-1, 1], class_index int)` from an ImageNet-style tree."""

    def __init__(
        self,
        root: str,
        split: str = "train",
        resolution: int = 256,
        train: bool | None = None,
        *,
        transform: Callable | None = None,
        class_names: Sequence[str] | None = None,
        labels_file: str | None = None,
        scan: bool = True,
        strict: bool = False,
        upscale_small: bool = False,
        alpha: str = "white",
        max_substitutions: int = 64,
    ):
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            raise FileNotFoundError(f"no {split!r} split: {split_dir} is not a directory")
        train = split == "train" if train is None else train
        self.root, self.split, self.resolution = root, split, resolution
        self.transform = transform if transform is not None else make_transform(resolution, train)
        self.strict, self.upscale_small, self.alpha = strict, upscale_small, alpha
        self.max_substitutions = max_substitutions

        if class_names is None:
            train_dir = os.path.join(root, "train")
            class_names = list_class_folders(train_dir if os.path.isdir(train_dir) else split_dir)
        self.class_names = list(class_names)
        if not self.class_names:
            raise ValueError(f"{root}: no class folders found (expected {root}/train/<class>/...)")
        class_to_idx = {name: i for i, name in enumerate(self.class_names)}

        self.skipped: list[Skipped] = []
        if labels_file is None and not list_class_folders(split_dir):
            labels_file = _find_labels_file(root, split)
            if labels_file is None:
                raise FileNotFoundError(
                    f"{split_dir} has no class folders and {root} has no {split}_labels.txt or "
                    f"LOC_{split}_solution.csv"
                )
        if labels_file is not None:
            listed = read_labels_file(labels_file, split_dir, class_to_idx)
            candidates = []
            for path, label in listed:
                if os.path.isfile(path):
                    candidates.append((path, label))
                else:
                    record_skip(self.skipped, BadImageError(path, f"listed in {labels_file} but missing"), strict)
        else:
            candidates, ignored = _walk_tree(split_dir, class_to_idx)
            for item in ignored:
                record_skip(self.skipped, BadImageError(item.path, item.reason), strict)

        self.samples: list[tuple[str, int]] = []
        for path, label in candidates:
            if scan:
                try:
                    peek_image(path, resolution, upscale_small)
                except BadImageError as error:
                    record_skip(self.skipped, error, strict)
                    continue
            self.samples.append((path, label))
        if not self.samples:
            raise ValueError(f"{split_dir}: no usable images ({len(self.skipped)} skipped)")
        self._bad: set[int] = set()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        # A file that fails to decode is replaced by the next index: deterministic, and the epoch goes on.
        for offset in range(min(self.max_substitutions, len(self.samples))):
            position = (index + offset) % len(self.samples)
            if position in self._bad:
                continue
            path, label = self.samples[position]
            try:
                image = decode_image(path, self.resolution, self.upscale_small, self.alpha)
            except BadImageError as error:
                self._bad.add(position)
                record_skip(self.skipped, error, self.strict)
                continue
            return self.transform(image), label  # (3, H, W), int
        raise RuntimeError(
            f"{self.root}/{self.split}: {self.max_substitutions} consecutive undecodable images from index {index}"
        )
