"""Cache tokenizer latents for stage 2: images → posterior moments → webdataset shards + `manifest.json`.

For every input image the encoder's posterior moments (mean, log-variance) of the ADM center crop *and* of its
horizontal flip are stored, with the class index (format: `data.latent_shards`). DiT trains with random flips
(paper C.3); flipping a latent is not the same as encoding the flipped image, so both are encoded once here.
`crop="random"` stores `crops_per_image` ADM random crops per image instead (C.3's "random cropping"), each with
its flip, keyed `<key>_c<j>` and drawn from a generator seeded by (seed, key, j): the same crops on any number of
ranks and after any resume. The crop settings are in cache_info.json (a rerun with others is refused) and in the
manifest's `source`.

Ranks (`accelerate launch`): rank r encodes `indices[r::world]` of a map-style source (offline photos, ImageNet
folders) or its `data.sharding` share of webdataset image shards, and writes only files named
`rank<r>-*.tar` (`rank_prefix`). After a barrier the main process merges every rank's sidecars into the
manifest (exact per-channel stats), so no two processes ever write the same file.

Resume: keys already in a completed shard of *any* rank are not encoded again (the writer discards partial
`.tmp` shards), so a re-run after a crash finishes the rest, and a re-run of a finished cache writes nothing
and merges an identical manifest. `cache_info.json` pins the tokenizer weights and the source: re-running into
the same directory with a different tokenizer or source is refused instead of mixing latents.

Sample keys are the source's own stable identity: the zero-padded dataset index for map-style sources (the
same on any number of ranks), `<shard>_<key>` for webdataset shards.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from data.folder import ImageFolderDataset
from data.images import BadImageError, decode_image
from data.latent_shards import LatentShardWriter, VerifyReport, merge_manifests, rank_prefix, verify_shards
from pipelines.kit.compiling import compile_modules, require_compile_support
from pipelines.kit.faults import fault_point
from pipelines.kit.precision import autocast, check_precision, resolve_precision

logger = logging.getLogger(__name__)

CACHE_INFO_NAME = "cache_info.json"
STORAGE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16,
                                          "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class CacheLatentsConfig:
    """One latent-caching job. `batch_size` is per process; `precision` names the encoder's autocast dtype
    (`pipelines.kit.precision`: "bf16", "fp16", or "no" / "fp32" for plain float32)."""

    tokenizer: str | None = None  # a save_pretrained directory (EpsVAE or VAE); None only with verify
    data: str = "offline"  # see data.sources.build_image_dataset
    output_dir: str = "runs/latents"  # shards, manifest.json, cache_info.json and config.yaml
    split: str = "train"  # split of the data source to encode
    resolution: int = 256  # image side the tokenizer encodes (center crop, then resize)
    batch_size: int = 64
    num_workers: int = 4  # DataLoader worker processes per process
    samples_per_shard: int = 1000  # latents per webdataset .tar shard
    precision: str = "auto"  # encoder autocast: auto | fp32 | bf16 | fp16 (pipelines.kit.precision)
    storage_dtype: str = "float32"  # dtype of the stored moments
    use_ema: bool = False  # load the tokenizer's ema.safetensors instead of model.safetensors
    crops_per_class: int | None = None  # offline source only: crops per photo (default: the source's)
    # Which crops of each image are encoded (data.transforms.CacheCrops): "center" (ADM's, one per image) or
    # "random" (crops_per_image ADM random crops per image, seeded per image by `seed`; paper C.3).
    crop: str = "center"
    crops_per_image: int = 1  # crops encoded per image (see the crop mode)
    seed: int = 0  # seed of the random crops / flips
    verify: bool = False  # re-read every shard afterwards and check counts and checksums
    # torch.compile the encoder (TorchInductor; the first batch compiles, the last partial batch recompiles once);
    # latents equal the eager ones within float tolerance
    compile: bool = False
    cpu: bool = False  # force CPU even where a GPU is visible (CPU-only `accelerate launch`)
    collective_timeout_s: float = 600.0  # a dead peer → the survivors raise after this long instead of hanging

    def __post_init__(self) -> None:
        for name in ("resolution", "batch_size", "samples_per_shard"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        check_precision(self.precision)
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {sorted(STORAGE_DTYPES)}, got {self.storage_dtype!r}")
        self.crops()  # one-line errors for a bad crop / crops_per_image pair
        if self.tokenizer is None and not self.verify:
            raise ValueError("--tokenizer is required (a save_pretrained folder); to check an existing cache run "
                             "`scripts/cache_latents.py --output-dir DIR --verify`")


    def crops(self):
        from data.transforms import CacheCrops

        return CacheCrops(self.resolution, self.crop, self.crops_per_image, self.seed)

    def crop_settings(self) -> dict[str, Any]:
        """What cache_info.json and the manifest record about the crops (the seed only matters for random)."""
        return {"crop": self.crop, "crops_per_image": self.crops_per_image,
                "crop_seed": self.seed if self.crop == "random" else None}


@dataclass(frozen=True)
class CacheResult:
    """What a caching run did: the merged manifest, images encoded now (all ranks) and the throughput."""

    manifest: dict[str, Any]
    encoded: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------------------------------------------------------
# Inputs: each item is (image (3, R, R), label, key, bad_path, reason); bad items carry a zero image
# ---------------------------------------------------------------------------------------------------------------


def sample_key(index: int) -> str:
    """Key of a map-style sample: its dataset index, identical whatever the number of ranks."""
    return f"{index:09d}"


def _webdataset_key(sample: dict) -> str:
    shard = os.path.basename(str(sample.get("__url__", "shard"))).removesuffix(".tar")
    return re.sub(r"[./]", "_", f"{shard}_{sample['__key__']}")


def _pil_from_pm1(image: torch.Tensor):
    """(3, H, W) in [-1, 1] → RGB PIL image: the exact inverse of `to_tensor_pm1` for 8-bit sources."""
    from PIL import Image

    array = ((image.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array, mode="RGB")


class _IndexedImages(Dataset):
    """The listed (dataset index, crop number) items of a map-style source, without the folder source's bad-file
    substitution: a file that cannot be decoded comes back as a record (so it lands in the manifest) instead of
    as a neighbouring image. Random crops of a source that yields tensors (offline photos) are cut from its
    (3, R, R) image; a folder image is cropped from the decoded file."""

    def __init__(self, dataset: Dataset, items: list[tuple[int, int]], resolution: int, crops):
        self.dataset, self.items, self.resolution, self.crops = dataset, items, resolution, crops

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int, str, str, str]:
        index, crop = self.items[position]
        base = sample_key(index)
        key = self.crops.key(base, crop)
        if isinstance(self.dataset, ImageFolderDataset):
            path, label = self.dataset.samples[index]
            try:
                image = decode_image(path, self.resolution, self.dataset.upscale_small, self.dataset.alpha)
            except BadImageError as error:
                return torch.zeros(3, self.resolution, self.resolution), label, key, error.path, error.reason
            if self.crops.mode == "center":
                return self.dataset.transform(image), label, key, "", ""
            return self.crops(image, base, crop), label, key, "", ""
        image, label = self.dataset[index]
        if self.crops.mode != "center":
            image = self.crops(_pil_from_pm1(image), base, crop)
        return image, int(label), key, "", ""


def _keep_image(image):
    return image


def _decode_webdataset_samples(samples: Iterator[dict], crops, resolution: int,
                               done_keys: frozenset[str]) -> Iterator[tuple[torch.Tensor, int, str, str, str]]:
    """One item per crop not yet cached (`crops`: data.transforms.CacheCrops); each image is decoded once."""
    from data.webdataset_images import decode_image_sample

    for sample in samples:
        base = _webdataset_key(sample)
        keys = [crops.key(base, j) for j in range(crops.crops_per_image)]
        if all(key in done_keys for key in keys):
            continue
        try:
            image, label = decode_image_sample(sample, _keep_image, resolution)
        except BadImageError as error:
            yield torch.zeros(3, resolution, resolution), -1, keys[0], error.path, error.reason
            continue
        for j, key in enumerate(keys):
            if key not in done_keys:
                yield crops(image, base, j), label, key, "", ""


def _webdataset_items(location: str, config: CacheLatentsConfig, rank: int, world_size: int,
                      done_keys: frozenset[str]):
    """Iterable of this rank's items from webdataset image shards (shard- or sample-level split, no shuffle)."""
    from functools import partial

    import webdataset as wds

    from data.sharding import ShardSource, SkipCounter, keep_my_samples

    source = ShardSource(location.replace("{split}", config.split), rank, world_size, shuffle=False)
    decode = partial(_decode_webdataset_samples, crops=config.crops(), resolution=config.resolution,
                     done_keys=done_keys)
    # Unreadable tar data cannot be attributed to a sample: it is counted and named in the warning log.
    pipeline = wds.DataPipeline(source, wds.tarfile_to_samples(handler=SkipCounter(what="tar member")),
                                partial(keep_my_samples, source=source), decode)
    return pipeline, source.urls


# ---------------------------------------------------------------------------------------------------------------
# Bookkeeping shared by all ranks: what earlier runs completed or skipped
# ---------------------------------------------------------------------------------------------------------------


def _completed_sidecars(out_dir: Path) -> list[dict]:
    records = []
    for sidecar in sorted(glob.glob(str(out_dir / "*.tar.json"))):
        with open(sidecar) as handle:
            records.append(json.load(handle))
    return records


def _check_cache_info(out_dir: Path, info: dict[str, Any]) -> None:
    """Refuse to add latents of another tokenizer / source / resolution to an existing cache."""
    path = out_dir / CACHE_INFO_NAME
    if not path.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(info, indent=1, sort_keys=True))
        return
    # Caches made before crops were configurable hold center crops, one per image; caches made before the
    # encoder's precision and compile flag were recorded are taken as made the way this run asks (unknown).
    previous = {"crop": "center", "crops_per_image": 1, "crop_seed": None,
                "encoder_precision": info.get("encoder_precision"), "compile": info.get("compile"),
                **json.loads(path.read_text())}
    changed = sorted(k for k in set(info) | set(previous) if info.get(k) != previous.get(k))
    if changed:
        raise ValueError(f"{out_dir} already holds latents made with different {', '.join(changed)} "
                         f"(see {path}); use a new --output-dir")


# ---------------------------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------------------------


def verify_cache(out_dir: str | os.PathLike) -> VerifyReport:
    """Re-read every shard of `out_dir`; `ValueError` naming each bad shard when one does not match the manifest."""
    report = verify_shards(str(out_dir))
    if not report.ok:
        details = "; ".join(f"{name}: {why}" for name, why in sorted(report.bad.items()))
        raise ValueError(f"latent cache {out_dir} failed verification: bad shard {details}")
    if report.unlisted:
        logger.warning("%s holds shards the manifest does not list: %s", out_dir, report.unlisted)
    return report


def record_latent_statistics(tokenizer_dir: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Write the measured latent mean/std into the tokenizer's own config.json (what `encode(normalize=True)`
    and a diffusion model on its latents need), so the folder carries them wherever it is copied.

    A read-only folder or a Hub cache snapshot (symlinked files) is left untouched, with a warning: the
    statistics are in the shard manifest either way.
    """
    from tokenizer.pretrained import CONFIG_NAME, update_config

    path = Path(tokenizer_dir) / CONFIG_NAME
    stats = {"latent_mean": [float(v) for v in manifest["latent_mean"]],
             "latent_std": [float(v) for v in manifest["latent_std"]]}
    if path.is_symlink() or not os.access(path.parent, os.W_OK):
        logger.warning("tokenizer folder %s is not writable: latent statistics stay in the manifest only",
                       tokenizer_dir)
        return
    update_config(path.parent, **stats)


def cache_latents(config: CacheLatentsConfig) -> CacheResult:
    """Encode `config.data` with the tokenizer into `config.output_dir` (every rank calls this); see module doc."""
    from tqdm.auto import tqdm

    from data.sources import build_image_dataset, resolve_source
    from pipelines.kit.run import AcceleratorConfig, make_accelerator
    from tokenizer import load_tokenizer
    from tokenizer.models import weights_fingerprint

    out_dir = Path(config.output_dir)
    if config.tokenizer is None:  # verification only
        verify_cache(out_dir)
        from data.latent_shards import load_manifest

        return CacheResult(load_manifest(str(out_dir)), 0, 0.0)

    tokenizer = load_tokenizer(config.tokenizer, use_ema=config.use_ema)  # one-line errors for a bad directory
    accelerator = make_accelerator(AcceleratorConfig(cpu=config.cpu, collective_timeout_s=config.collective_timeout_s))
    rank, world_size, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    if config.compile:
        require_compile_support(device)  # before anything is written
    tokenizer.eval().requires_grad_(False)
    if config.resolution % tokenizer.downsample:
        raise ValueError(f"resolution {config.resolution} is not divisible by the tokenizer's downsample "
                         f"factor {tokenizer.downsample}")
    weights_sha = weights_fingerprint(config.tokenizer, config.use_ema)
    kind, location = resolve_source(config.data)
    info = {"tokenizer_weights_sha256": weights_sha, "data": config.data, "split": config.split,
            "resolution": config.resolution, "crops_per_class": config.crops_per_class,
            "storage_dtype": config.storage_dtype, **config.crop_settings(),
            # How the encoder ran: latents of another precision (or compiled vs eager) must not join this cache.
            "encoder_precision": resolve_precision(config.precision, device), "compile": config.compile}
    if accelerator.is_main_process:
        _check_cache_info(out_dir, info)
    accelerator.wait_for_everyone()

    previous = _completed_sidecars(out_dir)
    done_keys = frozenset(k for record in previous for k in record["keys"])
    known_skipped = {path for record in previous for path, _ in record["skipped"]}

    index_skips: list = []
    if kind == "webdataset":
        items, shard_urls = _webdataset_items(location, config, rank, world_size, done_keys)
        from data.webdataset_images import read_classes_txt

        class_names = read_classes_txt(shard_urls)
        if class_names is None:
            raise ValueError(f"{location}: webdataset image shards need a classes.txt beside them "
                             "(one class name per line, line i = class i) for the manifest's class names")
        total_todo = None
    else:
        options = {"crops_per_class": config.crops_per_class} if kind == "offline" and config.crops_per_class else {}
        dataset = build_image_dataset(config.data, config.split, config.resolution, train=False, **options)
        class_names = list(dataset.class_names)
        index_skips = list(getattr(dataset, "skipped", []))  # found while indexing: the same on every rank
        samples = getattr(dataset, "samples", None)
        crops = config.crops()
        todo = [(i, j) for i in range(len(dataset))[rank::world_size] for j in range(crops.crops_per_image)
                if crops.key(sample_key(i), j) not in done_keys
                and (samples is None or samples[i][0] not in known_skipped)]
        items = _IndexedImages(dataset, todo, config.resolution, crops)
        total_todo = len(todo)
    loader = DataLoader(items, batch_size=config.batch_size, num_workers=config.num_workers, shuffle=False)

    tokenizer.encoder.to(device)  # only the encoder runs here; the decoder stays where it was loaded
    if config.compile:
        compile_modules(tokenizer.encoder, device=device)
    store_dtype = STORAGE_DTYPES[config.storage_dtype]
    encoded = 0
    started = time.monotonic()
    bar = tqdm(total=total_todo, desc=f"cache latents (rank {rank})", unit="img", disable=not accelerator.is_main_process,
               dynamic_ncols=True)
    with LatentShardWriter(str(out_dir), rank_prefix(rank), config.samples_per_shard,
                           on_event=fault_point) as writer:
        if accelerator.is_main_process:
            for skipped in index_skips:
                if skipped.path not in known_skipped:
                    writer.add_skipped(skipped.path, skipped.reason)
                    known_skipped.add(skipped.path)
        for images, labels, keys, bad, reasons in loader:
            good = [i for i, reason in enumerate(reasons) if not reason]
            for i, reason in enumerate(reasons):
                if reason and bad[i] not in known_skipped:
                    writer.add_skipped(bad[i], reason)
                    known_skipped.add(bad[i])
            if good:
                x = images[good].to(device, non_blocking=True)  # (B, 3, R, R)
                with torch.no_grad(), autocast(device, config.precision):
                    posterior = tokenizer.encode_posterior(torch.cat([x, x.flip(-1)]))  # 2B
                mean = posterior.mean.to("cpu", store_dtype)  # (2B, C, h, w)
                logvar = posterior.logvar.to("cpu", store_dtype)
                batch = len(good)
                for j, i in enumerate(good):
                    writer.write(keys[i], int(labels[i]), mean[j], logvar[j], mean[batch + j], logvar[batch + j])
                encoded += batch
            bar.update(len(reasons))
    bar.close()
    seconds = time.monotonic() - started

    encoded_all, seconds_all = encoded, seconds
    if world_size > 1:
        encoded_all = int(accelerator.reduce(torch.tensor([float(encoded)], device=device), reduction="sum").item())
        seconds_all = float(accelerator.reduce(torch.tensor([seconds], device=device), reduction="max").item())
    accelerator.wait_for_everyone()  # every rank's sidecars are on disk

    manifest: dict[str, Any] = {}
    if accelerator.is_main_process:
        # The architecture only: the latent statistics this job writes into the folder are the manifest's own.
        tokenizer_config = {key: value for key, value in
                            json.loads((Path(config.tokenizer) / "config.json").read_text()).items()
                            if key not in ("latent_mean", "latent_std")}
        manifest = merge_manifests(
            str(out_dir), tokenizer_config=tokenizer_config, tokenizer_weights_sha256=weights_sha,
            class_names=class_names,
            extra={"source": {"data": config.data, "split": config.split, "resolution": config.resolution,
                              **config.crop_settings()},
                   "encoder": {"downsample": tokenizer.downsample, "latent_channels": tokenizer.latent_channels},
                   "storage_dtype": config.storage_dtype},
        )
        record_latent_statistics(config.tokenizer, manifest)
        if config.verify:
            verify_cache(out_dir)
        logger.info("cached %d new latents in %.1f s (%.1f images/s); manifest holds %d", encoded_all, seconds_all,
                    encoded_all / max(seconds_all, 1e-9), manifest["num_samples"])
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        from data.latent_shards import load_manifest

        manifest = load_manifest(str(out_dir))
    return CacheResult(manifest, encoded_all, seconds_all)
