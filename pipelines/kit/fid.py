"""FID (or FD-EffNetL0), Inception Score and precision/recall of generated samples against a reference set.

The protocol of ADM's evaluator and EDM's `fid.py`: features of every sample → float64 (mu, sigma) → the
Fréchet distance (`pipelines.kit.metrics.frechet_distance`). Samples are a folder of PNGs (what `scripts/sample.py`
writes) or an ADM `.npz` (`arr_0` uint8 N×H×W×3). The reference is one of

- statistics: an `.npz` with `mu`/`sigma` (ours, or ADM's `VIRTUAL_imagenet256_labeled.npz`): FD and IS only,
  precision/recall need reference *features* and are skipped with a note (an ADM reference batch also holds
  its images as `arr_0`; those are used for precision/recall, and for everything when the stored statistics
  come from another feature network);
- images: an `.npz` with `arr_0`, a flat folder of images, or any `data.sources.build_image_dataset` source
  (`offline`, an ImageNet folder with train/ and val/, webdataset shards), centre-cropped to the samples'
  resolution (ADM's evaluation crop).

Image references are reduced once to `mu`, `sigma` and up to `pr_max_images` features, cached as an `.npz`
whose name hashes source + split + resolution + feature network (+ image limit), so later runs skip them.
The Fréchet distance is labelled after the network: "FID" for Inception-v3 only, "FD-EffNetL0" offline; the
Inception Score likewise becomes "IS-EffNetL0" on EfficientNet logits.

Under `accelerate launch` (`evaluate_fid(..., state=evaluation_state(device)[0])`) the batches of samples and of
an uncached reference are dealt round-robin to the processes, and the main one adds their features up in batch
order (`pipelines.kit.metrics.map_in_order`): the numbers of one process with the same batch size.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from pipelines.kit.metrics import (FeatureStats, build_feature_extractor, dataset_batches, frechet_distance,
                                   from_main, inception_score, load_statistics, map_in_order, precision_recall,
                                   to_uint8)
from pipelines.kit.precision import pick_device
from pipelines.kit.sample_files import list_sample_images, temporary_path

CACHE_VERSION = 1
DEFAULT_CACHE_DIR = "~/.cache/epsvae/fid-references"


@dataclass(frozen=True)
class FIDConfig:
    samples: str  # a folder of PNGs or an ADM .npz
    reference: str  # statistics .npz, images .npz, image folder, or a build_image_dataset source
    reference_split: str = "val"  # split of a data-source reference
    reference_num_images: int | None = None  # None: all of the reference source
    features: str = "inception"  # "inception" → FID / IS; "effnet-l0" → FD-EffNetL0 / IS-EffNetL0 (offline)
    feature_weights: str | None = None
    cache_dir: str | None = None  # default ~/.cache/epsvae/fid-references
    use_cache: bool = True  # reuse the reference statistics cached under cache_dir
    batch_size: int = 64
    num_workers: int = 2  # DataLoader worker processes
    pr_k: int = 3  # k-NN radius of improved precision/recall (Kynkäänniemi et al. 2019)
    pr_max_images: int = 10_000  # features kept per set for precision/recall (ADM's reference batch size)
    is_splits: int = 10  # Inception Score splits (the standard 10)
    device: str | None = None
    output: str | None = None  # JSON path; a .md table is written beside it

    def __post_init__(self) -> None:
        for name in ("batch_size", "pr_k", "pr_max_images", "is_splits"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.reference_num_images is not None and self.reference_num_images < 2:
            raise ValueError(f"reference-num-images must be >= 2, got {self.reference_num_images}")


@dataclass
class FIDReport:
    samples: str
    reference: str
    feature_network: str  # "inception" or "effnet-l0"
    fd_label: str  # "FID" or "FD-EffNetL0"
    fd: float
    num_samples: int
    num_reference: int | None  # None when the reference is statistics only
    resolution: int
    is_label: str | None = None  # "IS" or "IS-EffNetL0"
    inception_score: float | None = None
    inception_score_std: float | None = None
    precision: float | None = None
    recall: float | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def markdown(self) -> str:
        def show(value: float | None, digits: int) -> str:
            return "–" if value is None else f"{value:.{digits}f}"

        is_text = show(self.inception_score, 2)
        if self.inception_score_std is not None:
            is_text += f" ± {self.inception_score_std:.2f}"
        lines = [f"| samples | {self.fd_label} ↓ | {self.is_label or 'IS'} ↑ | precision ↑ | recall ↑ |",
                 "|---|---|---|---|---|",
                 f"| {self.num_samples} @ {self.resolution}px | {self.fd:.3f} | {is_text} | "
                 f"{show(self.precision, 4)} | {show(self.recall, 4)} |"]
        lines += [f"\n{note}" for note in self.notes]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Reading image sets as uint8 batches (B, 3, H, W)
# ---------------------------------------------------------------------------------------------------------------


def _npz_keys(path: Path) -> list[str]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return list(data.files)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {path} as an .npz: {error}") from None


def _load_image(path: Path, resolution: int | None) -> np.ndarray:
    from data.images import decode_image
    from data.transforms import center_crop_arr

    image = decode_image(str(path))  # RGB, one-line BadImageError naming the file
    if resolution is None or image.size == (resolution, resolution):
        return np.asarray(image)
    return center_crop_arr(image, resolution)  # (R, R, 3) uint8, ADM's evaluation crop


def _read_npy_header(handle) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(handle)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = reader(handle)
    if fortran_order:
        raise ValueError("Fortran-ordered arr_0 is not supported; save C-ordered images")
    return shape, dtype


def npz_images_shape(path: Path) -> tuple[int, ...]:
    """Shape of `arr_0` read from its .npy header, without loading the images."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as member:
            shape, dtype = _read_npy_header(member)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"cannot read arr_0 of {path}: {error}") from None
    if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
        raise ValueError(f"{path}: arr_0 must be uint8 (N, H, W, 3) as in ADM's format, got {dtype} {shape}")
    return shape


BatchLoader = Callable[[], torch.Tensor]  # loads one uint8 batch (B, 3, H, W) when called


def _npz_batches(path: Path, batch_size: int, limit: int | None) -> Iterator[BatchLoader]:
    """Loaders of `arr_0`'s batches, read from the zip member on demand (a 50k×256² file is 9.8 GB: never loaded
    whole; a process skips the batches it does not extract). Call them in order."""
    import zipfile

    shape = npz_images_shape(path)
    count = shape[0] if limit is None else min(limit, shape[0])
    per_image = int(np.prod(shape[1:]))
    with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as member:
        _read_npy_header(member)
        data_start = member.tell()

        def load(start: int, n: int) -> torch.Tensor:
            member.seek(data_start + start * per_image)
            data = member.read(n * per_image)
            if len(data) != n * per_image:
                raise ValueError(f"{path}: arr_0 is truncated")
            return torch.from_numpy(np.frombuffer(data, np.uint8).reshape(n, *shape[1:]).copy()).permute(0, 3, 1, 2)

        for start in range(0, count, batch_size):
            yield functools.partial(load, start, min(batch_size, count - start))


def _load_folder_batch(paths: list[Path], resolution: int | None) -> torch.Tensor:
    arrays = [_load_image(p, resolution) for p in paths]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"images in {paths[0].parent} differ in size ({sorted(shapes)[:3]}); "
                         "samples must share one resolution")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8


def _folder_batches(paths: list[Path], batch_size: int, resolution: int | None) -> Iterator[BatchLoader]:
    for start in range(0, len(paths), batch_size):
        yield functools.partial(_load_folder_batch, paths[start:start + batch_size], resolution)


def sample_batches(samples: str, batch_size: int) -> tuple[Iterator[BatchLoader], int, int]:
    """(loaders of the uint8 batches, count, resolution) of a sample folder or ADM .npz."""
    path = Path(samples)
    if path.is_dir():
        files = list_sample_images(path)
        if len(files) < 2:
            raise ValueError(f"{path} holds {len(files)} images; need at least 2 samples")
        first = _load_image(files[0], None)
        if first.shape[0] != first.shape[1]:
            raise ValueError(f"samples must be square, {files[0]} is {first.shape[1]}x{first.shape[0]}")
        return _folder_batches(files, batch_size, first.shape[0]), len(files), first.shape[0]
    if path.is_file() and path.suffix == ".npz":
        if "arr_0" not in _npz_keys(path):
            raise ValueError(f"{path} has no arr_0: expected ADM-format samples (arr_0 uint8 N×H×W×3)")
        shape = npz_images_shape(path)
        if shape[1] != shape[2] or shape[0] < 2:
            raise ValueError(f"{path}: arr_0 must hold >= 2 square images (N, H, W, 3), got {shape}")
        return _npz_batches(path, batch_size, None), shape[0], shape[1]
    raise FileNotFoundError(f"samples {samples} not found: expected a folder of PNGs or an .npz with arr_0")


def _dataset_batches(source: str, split: str, resolution: int, batch_size: int, num_workers: int,
                     limit: int | None, state=None) -> Iterator[BatchLoader]:
    from data.sources import build_image_dataset

    dataset = build_image_dataset(source, split=split, resolution=resolution, train=False)
    for _start, load in dataset_batches(dataset, batch_size, num_workers, limit, state):
        yield lambda load=load: to_uint8(load())  # [-1, 1] → uint8 as the samples were written


# ---------------------------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class FeatureSet:
    """What one pass of the feature network over an image set leaves: statistics, kept features, logits."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    features: np.ndarray | None  # (min(count, max_kept), D) float32, for precision/recall
    logits: np.ndarray | None = None  # (count, K) for the Inception Score


def extract_features(extractor, batches: Iterable[BatchLoader], max_kept: int, keep_logits: bool, state=None,
                     total: int | None = None, desc: str = "features") -> FeatureSet | None:
    """The features of every batch (loaders, in order). With several processes (`state`), the batches are dealt
    round-robin and their features gathered to the main process, which adds them up in batch order: the
    statistics one process gives. Returns the set on the main process, None on the others."""
    from tqdm.auto import tqdm

    main = state is None or state.is_main_process
    started = time.monotonic()
    stats: FeatureStats | None = None
    kept: list[np.ndarray] = []
    logits: list[np.ndarray] = []

    def features(load: BatchLoader) -> dict[str, torch.Tensor]:
        out = extractor(load())
        return {"pool": out["pool"], "logits": out["logits"] if keep_logits else None}  # (B, D) float64, (B, K)

    with tqdm(total=total, desc=desc, unit="img", disable=not main) as bar:
        for out in map_in_order(features, batches, state):
            pool = out["pool"]
            if stats is None:
                stats = FeatureStats(pool.shape[1])
            stats.update(pool)
            room = max_kept - sum(len(k) for k in kept)
            if room > 0:
                kept.append(pool[:room].numpy().astype(np.float32))
            if keep_logits:
                logits.append(out["logits"].numpy())
            bar.update(pool.shape[0])
    if not main:
        return None
    if stats is None or stats.count < 2:
        raise ValueError("need at least 2 images for a Fréchet distance")
    processes = 1 if state is None else state.num_processes
    print(f"{desc}: {stats.count} images on {processes} process(es) in {time.monotonic() - started:.1f} s",
          file=sys.stderr)
    mu, sigma = stats.mean_cov()
    return FeatureSet(mu, sigma, stats.count, np.concatenate(kept),
                      np.concatenate(logits) if keep_logits else None)


def reference_cache_key(config: FIDConfig, resolution: int) -> dict[str, Any]:
    """What identifies a reference's statistics: the resolved source, split, resolution and network."""
    source = config.reference
    if os.path.exists(source):
        source = os.path.abspath(source)
    return {"version": CACHE_VERSION, "source": source, "split": config.reference_split, "resolution": resolution,
            "features": config.features, "num_images": config.reference_num_images,
            "pr_max_images": config.pr_max_images}


def reference_cache_path(config: FIDConfig, resolution: int) -> Path:
    key = reference_cache_key(config, resolution)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    stem = "".join(c if c.isalnum() else "-" for c in Path(str(key["source"]).rstrip("/")).name)[:40] or "ref"
    directory = Path(os.path.expanduser(config.cache_dir or DEFAULT_CACHE_DIR))
    return directory / f"{stem}-{resolution}px-{config.features}-{digest}.npz"


def _save_reference(path: Path, reference: FeatureSet, key: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    with open(tmp, "wb") as handle:  # a handle keeps numpy from appending a second .npz
        np.savez(handle, mu=reference.mu, sigma=reference.sigma, features=reference.features,
                 count=np.int64(reference.count), key=np.asarray(json.dumps(key, sort_keys=True)))
    os.replace(tmp, path)


def _load_cached_reference(path: Path) -> FeatureSet:
    with np.load(path, allow_pickle=False) as data:
        return FeatureSet(data["mu"], data["sigma"], int(data["count"]), data["features"])


def reference_features(config: FIDConfig, extractor, resolution: int, dim: int,
                       state=None) -> tuple[FeatureSet | None, list[str]]:
    """Reference statistics (and features where images exist); cached for image references. (set, notes); the
    set is None on processes other than the main one of `state` (they help extract the features)."""
    path = Path(config.reference)
    notes: list[str] = []
    images_npz = False
    if path.is_file() and path.suffix == ".npz":
        keys = _npz_keys(path)
        if "mu" in keys and "sigma" in keys:
            mu, sigma = load_statistics(path)
            if mu.shape == (dim,):
                if "arr_0" not in keys:
                    notes.append(f"precision/recall skipped: {path.name} holds statistics (mu/sigma) only, "
                                 "not reference features")
                    return FeatureSet(mu, sigma, 0, None), notes
                images = _cached_or_computed(config, extractor, resolution, _npz_batches(
                    path, config.batch_size, config.reference_num_images), state)
                if images is None:
                    return None, notes
                return FeatureSet(mu, sigma, images.count, images.features), notes  # stored stats, our features
            if "arr_0" not in keys:
                raise ValueError(f"{path} holds {mu.shape[0]}-d statistics but the {config.features} network gives "
                                 f"{dim}-d features; use statistics of the same network or a reference with images")
            notes.append(f"{path.name}: stored {mu.shape[0]}-d statistics ignored (not {config.features}); "
                         "recomputed from its arr_0 images")
        elif "arr_0" not in keys:
            raise ValueError(f"{path} holds neither mu/sigma statistics nor arr_0 images (keys {keys})")
        images_npz = True
    if images_npz:
        batches = _npz_batches(path, config.batch_size, config.reference_num_images)
    elif path.is_dir() and list_sample_images(path) and not (path / "train").is_dir() and not (path / "val").is_dir():
        files = list_sample_images(path)[: config.reference_num_images]
        batches = _folder_batches(files, config.batch_size, resolution)
    else:
        batches = _dataset_batches(config.reference, config.reference_split, resolution, config.batch_size,
                                   config.num_workers, config.reference_num_images, state)
    return _cached_or_computed(config, extractor, resolution, batches, state), notes


def _cached_or_computed(config: FIDConfig, extractor, resolution: int, batches: Iterator[BatchLoader],
                        state=None) -> FeatureSet | None:
    main = state is None or state.is_main_process
    cache = reference_cache_path(config, resolution)
    if from_main(state, config.use_cache and cache.is_file()):  # every process takes the main one's way
        return _load_cached_reference(cache) if main else None
    reference = extract_features(extractor, batches, config.pr_max_images, keep_logits=False, state=state,
                                 desc="reference features")
    if config.use_cache and main:
        _save_reference(cache, reference, reference_cache_key(config, resolution))
    return reference


# ---------------------------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------------------------


def check_reference(reference: str) -> None:
    """One-line error for a reference that is neither a file, a folder nor a known data source."""
    if not os.path.exists(reference):
        from data.sources import resolve_source

        if reference.endswith(".npz"):
            raise FileNotFoundError(f"reference {reference} does not exist")
        resolve_source(reference)


def evaluate_fid(config: FIDConfig, extractor=None, state=None) -> FIDReport | None:
    """FD (+ IS, precision/recall) of `config.samples` against `config.reference`; see the module docstring.

    state: accelerate's `PartialState` to split the feature extraction over its processes (`evaluation_state`;
    every process must call), the same numbers as one process; the report on the main process, None on the
    others. None: this process alone (what `sample_and_score` does on the main process).
    """
    started = time.monotonic()
    batches, count, resolution = sample_batches(config.samples, config.batch_size)  # cheap checks first
    check_reference(config.reference)
    if extractor is None:  # missing Inception weights → MissingWeightsError naming the file, before any work
        device = pick_device(config.device) if state is None or state.num_processes == 1 else state.device
        extractor = build_feature_extractor(config.features, config.feature_weights, device=device)
    # The reference first: its checks (statistics of another network, no images) fail before any extraction.
    reference, notes = reference_features(config, extractor, resolution, extractor.dim, state)
    samples = extract_features(extractor, batches, config.pr_max_images, keep_logits=True, state=state,
                               total=count, desc="sample features")
    if samples is None:
        return None
    is_label = "IS" if extractor.name == "FID" else "IS-" + extractor.name.removeprefix("FD-")
    report = FIDReport(
        samples=str(config.samples), reference=str(config.reference), feature_network=config.features,
        fd_label=extractor.name, fd=frechet_distance(reference.mu, reference.sigma, samples.mu, samples.sigma),
        num_samples=samples.count, num_reference=reference.count or None, resolution=resolution, notes=notes,
        is_label=is_label,
    )
    splits = min(config.is_splits, samples.count)
    report.inception_score, report.inception_score_std = inception_score(samples.logits, splits=splits)
    if splits < config.is_splits:
        notes.append(f"{is_label} over {splits} splits (only {samples.count} samples)")
    if reference.features is not None:
        if min(len(reference.features), len(samples.features)) > config.pr_k:
            report.precision, report.recall = precision_recall(reference.features, samples.features, k=config.pr_k)
        else:
            notes.append(f"precision/recall skipped: needs more than k={config.pr_k} images per set")
    report.seconds = time.monotonic() - started
    if config.output:
        write_report(report.to_dict(), report.markdown(), Path(config.output))
    return report


def write_report(payload: dict[str, Any], markdown: str, json_path: Path) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    json_path.with_suffix(".md").write_text(markdown)
