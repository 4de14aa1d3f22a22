"""Latent shards (stage-2 storage): write per rank, merge a manifest, verify, and read for DiT training.

Layout of `out_dir`:
    rank00000-000000.tar        webdataset shard: samples {__key__, latent.safetensors, cls}
    rank00000-000000.tar.json   sidecar, written after the shard is renamed into place: count, sha256, keys,
                                latent shape/dtype, streaming stats, input files skipped while filling it
    manifest.json               `merge_manifests`: everything a reader needs (see `merge_manifests`)

Each `latent.safetensors` holds the encoder's posterior moments of the ADM center crop and of its horizontal
flip: `mean`, `logvar`, `mean_flip`, `logvar_flip`, each (C, h, w). DiT trains with random flips (paper C.3),
and flipping a latent is not the same as encoding a flipped image, so both are stored.

Normalisation statistics are per-channel mean and std of what the DiT trains on, posterior *samples*
z = μ + σ·ε (unflipped and flipped, since the reader draws both equally often): E[z] = E[μ] and
Var(z) = Var(μ) + E[σ²], accumulated in float64 as exact sums of μ, μ² and σ² with counts, so per-rank partial
stats merge exactly. The manifest names this in `stats_source` and also records the std of the means alone
(`latent_std_of_means`) and the mean posterior variance per channel. Manifests written before (std of the means
as `latent_std`) are still read unchanged. This replaces a hand-set scale such as SD's 0.18215: the numbers
travel in the manifest.

Atomicity and resume: a shard is written as `<name>.tmp`, flushed, renamed, and only then its sidecar is
written (itself via a temp name). A shard counts as complete iff its sidecar exists. A new writer with the same
prefix skips complete shards (`done_keys`, `samples_done`) and deletes leftover `.tmp` files. Ranks use
distinct prefixes (`rank_prefix(rank)`), so no two processes ever write the same file.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import io
import json
import logging
import mmap
import os
import random
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import webdataset as wds
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from data.images import Skipped
from data.sharding import ShardSource, SkipCounter, keep_my_samples, worker_slot

logger = logging.getLogger(__name__)

MOMENT_KEYS = ("mean", "logvar", "mean_flip", "logvar_flip")
LATENT_FIELD = "latent.safetensors"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "epsvae-latent-shards/1"
BAD_SHARD_POLICIES = ("raise", "skip")
# What `latent_mean` / `latent_std` of a manifest describe. Manifests written before this was the source say
# "float64 sums over posterior means of center crops and their flips": their latent_std is the std of the means
# (smaller than what a reader that samples the posterior sees); they are still read as they are.
STATS_SOURCE = "posterior samples (var(mean) + E[sigma^2]), float64 sums over every stored crop and its flip"


def rank_prefix(rank: int) -> str:
    return f"rank{rank:05d}"


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _naming_disk_full(path: str):
    """A full disk surfaces as `OSError(ENOSPC)` that names the file and says what was kept."""
    try:
        yield
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        raise OSError(errno.ENOSPC, f"disk full while writing {path}; completed shards and their sidecars are "
                                    "kept, free some space and re-run the same command to resume") from error


def _write_json_atomic(path: str, payload: dict) -> None:
    tmp = path + ".tmp"
    try:
        with _naming_disk_full(path), open(tmp, "w") as handle:
            json.dump(payload, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(tmp)  # the previous version of `path` stays as it was
        raise
    os.replace(tmp, path)


# --- statistics ---------------------------------------------------------------------------------------------


@dataclass
class ChannelStats:
    """Exact, mergeable per-channel sums in float64: count (elements per channel), Σx, Σx², Σ exp(logvar)."""

    count: int = 0
    total: list[float] = field(default_factory=list)
    total_sq: list[float] = field(default_factory=list)
    total_var: list[float] = field(default_factory=list)

    def update(self, mean: torch.Tensor, logvar: torch.Tensor) -> None:
        """Add one posterior: mean and logvar are (C, h, w)."""
        mean64 = mean.detach().to(torch.float64).flatten(1)  # (C, h·w)
        var64 = logvar.detach().to(torch.float64).exp().flatten(1)  # (C, h·w)
        if not self.total:
            channels = mean64.shape[0]
            self.total, self.total_sq, self.total_var = [0.0] * channels, [0.0] * channels, [0.0] * channels
        sums, sums_sq, sums_var = mean64.sum(1).tolist(), (mean64**2).sum(1).tolist(), var64.sum(1).tolist()
        self.total = [a + b for a, b in zip(self.total, sums)]
        self.total_sq = [a + b for a, b in zip(self.total_sq, sums_sq)]
        self.total_var = [a + b for a, b in zip(self.total_var, sums_var)]
        self.count += mean64.shape[1]

    def merge(self, other: ChannelStats) -> ChannelStats:
        """Exact combination of two partial sums (e.g. two shards or two ranks)."""
        if not other.total or not self.total:
            source = self if self.total else other
            return ChannelStats(source.count, list(source.total), list(source.total_sq), list(source.total_var))
        if len(other.total) != len(self.total):
            raise ValueError(f"cannot merge stats over {len(self.total)} and {len(other.total)} channels")

        def add(a: list[float], b: list[float]) -> list[float]:
            return [x + y for x, y in zip(a, b)]

        return ChannelStats(
            self.count + other.count,
            add(self.total, other.total),
            add(self.total_sq, other.total_sq),
            add(self.total_var, other.total_var),
        )

    def mean(self) -> list[float]:
        return [s / self.count for s in self.total]

    def std(self) -> list[float]:
        """Population std of the posterior means: sqrt(E[μ²] - E[μ]²), clamped at 0 against rounding."""
        means = self.mean()
        return [max(sq / self.count - m * m, 0.0) ** 0.5 for sq, m in zip(self.total_sq, means)]

    def sample_std(self) -> list[float]:
        """Std of posterior samples z = μ + σ·ε (what the DiT trains on): sqrt(Var(μ) + E[σ²]) per channel.

        E[z] = E[μ], and by the law of total variance Var(z) = Var(μ) + E[σ²].
        """
        return [(s * s + v) ** 0.5 for s, v in zip(self.std(), self.mean_posterior_variance())]

    def mean_posterior_variance(self) -> list[float]:
        return [v / self.count for v in self.total_var]

    def to_dict(self) -> dict:
        return {"count": self.count, "sum": self.total, "sum_sq": self.total_sq, "sum_posterior_var": self.total_var}

    @classmethod
    def from_dict(cls, payload: dict) -> ChannelStats:
        return cls(payload["count"], payload["sum"], payload["sum_sq"], payload["sum_posterior_var"])


# --- writer -------------------------------------------------------------------------------------------------


class LatentShardWriter:
    """Writes one rank's latent shards atomically and resumably (see module docstring).

    Usage: `with LatentShardWriter(out, rank_prefix(rank), 1000) as w:` then for each input not in
    `w.done_keys`, `w.write(key, cls, mean, logvar, mean_flip, logvar_flip)`; `w.add_skipped(path, reason)`
    for inputs that could not be encoded.

    `on_event(name)` is called at the two moments a crash would leave a half-written state behind
    ("shard_write": a sample appended to the open `.tmp` shard; "shard_finish": the shard renamed into place,
    its sidecar not yet written); the fault-injection tests hook in there.
    """

    def __init__(self, out_dir: str, prefix: str, samples_per_shard: int,
                 on_event: Callable[[str], None] | None = None):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        if not prefix or "/" in prefix or "-" in prefix:
            raise ValueError(f"prefix must be a plain name without '/' or '-', got {prefix!r}")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.prefix, self.samples_per_shard = out_dir, prefix, samples_per_shard
        self._on_event = on_event or (lambda name: None)
        for leftover in glob.glob(os.path.join(out_dir, f"{prefix}-*.tmp")):
            logger.warning("discarding partial shard %s from an interrupted run", leftover)
            os.remove(leftover)
        self.done_keys: set[str] = set()
        self.samples_done = 0
        self.next_index = 0
        for sidecar in sorted(glob.glob(os.path.join(out_dir, f"{prefix}-*.tar.json"))):
            with open(sidecar) as handle:
                record = json.load(handle)
            if not os.path.isfile(sidecar[: -len(".json")]):
                raise FileNotFoundError(f"{sidecar} exists but its shard is missing; delete the sidecar to redo it")
            self.done_keys.update(record["keys"])
            self.samples_done += record["count"]
            self.next_index = max(self.next_index, int(record["shard"].rsplit("-", 1)[1].split(".")[0]) + 1)
        self._tar: wds.TarWriter | None = None
        self._keys: list[str] = []
        self._skipped: list[Skipped] = []
        self._stats = ChannelStats()
        self._shape: list[int] | None = None
        self._dtype: str | None = None
        self.shards_written: list[str] = []

    def _shard_name(self) -> str:
        return f"{self.prefix}-{self.next_index:06d}.tar"

    def write(
        self,
        key: str,
        cls: int,
        mean: torch.Tensor,
        logvar: torch.Tensor,
        mean_flip: torch.Tensor,
        logvar_flip: torch.Tensor,
    ) -> bool:
        """Add one sample (moments are (C, h, w), any float dtype); returns False if `key` was already done."""
        if key in self.done_keys:
            return False
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/' (webdataset splits on them)")
        moments = dict(zip(MOMENT_KEYS, (mean, logvar, mean_flip, logvar_flip)))
        shapes = {name: list(t.shape) for name, t in moments.items()}
        if len({tuple(s) for s in shapes.values()}) != 1 or len(shapes["mean"]) != 3:
            raise ValueError(f"{key}: moments must share one (C, h, w) shape, got {shapes}")
        dtype = str(mean.dtype).removeprefix("torch.")
        if self._shape is None:
            self._shape, self._dtype = shapes["mean"], dtype
        elif shapes["mean"] != self._shape or dtype != self._dtype:
            raise ValueError(f"{key}: latent {shapes['mean']} {dtype} differs from {self._shape} {self._dtype}")
        blob = save_safetensors({name: t.detach().cpu().contiguous() for name, t in moments.items()})
        partial_shard = os.path.join(self.out_dir, self._shard_name() + ".tmp")
        with _naming_disk_full(partial_shard):
            if self._tar is None:
                # An integer mtime: a float one makes tarfile add a PAX header to every member, which doubles
                # the headers the reader parses (measured: 25% of its time).
                self._tar = wds.TarWriter(partial_shard, mtime=0)
            self._tar.write({"__key__": key, LATENT_FIELD: blob, "cls": str(int(cls)).encode("ascii")})
        self._on_event("shard_write")
        self._keys.append(key)
        self.done_keys.add(key)
        self._stats.update(mean, logvar)
        self._stats.update(mean_flip, logvar_flip)
        if len(self._keys) == self.samples_per_shard:
            self._finish_shard()
        return True

    def add_skipped(self, path: str, reason: str) -> None:
        """Record an input that could not be encoded; it lands in the current shard's sidecar."""
        self._skipped.append(Skipped(path, reason))

    def _finish_shard(self) -> None:
        name = self._shard_name()
        final = os.path.join(self.out_dir, name)
        if self._tar is not None:
            with _naming_disk_full(final + ".tmp"):
                self._tar.close()
                with open(final + ".tmp", "rb") as handle:
                    os.fsync(handle.fileno())
            os.replace(final + ".tmp", final)
            self._on_event("shard_finish")
            sha = file_sha256(final)
        elif not self._skipped:
            return
        else:  # only skipped inputs since the last shard: an empty sidecar-only record keeps them
            with _naming_disk_full(final):
                tarfile.open(final, "w").close()
            sha = file_sha256(final)
        record = {
            "shard": name,
            "count": len(self._keys),
            "sha256": sha,
            "bytes": os.path.getsize(final),
            "latent_shape": self._shape,
            "latent_dtype": self._dtype,
            "keys": self._keys,
            "stats": self._stats.to_dict(),
            "skipped": [list(s) for s in self._skipped],
        }
        _write_json_atomic(final + ".json", record)
        self.shards_written.append(name)
        self.samples_done += len(self._keys)
        self.next_index += 1
        self._tar, self._keys, self._skipped, self._stats = None, [], [], ChannelStats()

    def close(self) -> None:
        """Complete the last, partly filled shard."""
        self._finish_shard()

    def __enter__(self) -> LatentShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:  # leave the .tmp for the next run to discard; never mark it complete
            self._tar.close()


# --- manifest -----------------------------------------------------------------------------------------------


def _read_sidecars(out_dir: str) -> list[dict]:
    records = []
    for sidecar in sorted(glob.glob(os.path.join(out_dir, "*.tar.json"))):
        with open(sidecar) as handle:
            records.append(json.load(handle))
    if not records:
        raise FileNotFoundError(f"{out_dir}: no completed shards (*.tar.json sidecars)")
    return records


def merge_manifests(
    out_dir: str,
    *,
    tokenizer_config: dict,
    tokenizer_weights_sha256: str,
    class_names: Sequence[str],
    extra: dict | None = None,
) -> dict:
    """Merge every rank's sidecars into `out_dir/manifest.json` (main process, after all ranks finished).

    Stats merge exactly (sums, sums of squares, counts). Returns the manifest.
    """
    records = _read_sidecars(out_dir)
    filled = [r for r in records if r["count"] > 0]
    if not filled:
        raise ValueError(f"{out_dir}: every completed shard is empty; nothing was encoded")
    layouts = {(tuple(r["latent_shape"]), r["latent_dtype"]) for r in filled}
    if len(layouts) != 1:
        raise ValueError(f"{out_dir}: shards disagree on latent shape/dtype: {sorted(layouts)}")
    (shape, dtype), = layouts
    stats = ChannelStats()
    for record in filled:
        stats = stats.merge(ChannelStats.from_dict(record["stats"]))
    keys = [k for r in records for k in r["keys"]]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{out_dir}: the same sample key appears in more than one shard")
    if not class_names:
        raise ValueError("class_names must not be empty")
    manifest = {
        "format": MANIFEST_FORMAT,
        "num_samples": len(keys),
        "latent_shape": list(shape),
        "latent_dtype": dtype,
        "moments": list(MOMENT_KEYS),
        "tokenizer": {"config": tokenizer_config, "weights_sha256": tokenizer_weights_sha256},
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "latent_mean": stats.mean(),
        "latent_std": stats.sample_std(),
        "latent_std_of_means": stats.std(),
        "latent_mean_posterior_variance": stats.mean_posterior_variance(),
        "stats_source": STATS_SOURCE,
        "stats": stats.to_dict(),
        "shards": [
            {"name": r["shard"], "count": r["count"], "sha256": r["sha256"], "bytes": r["bytes"]} for r in records
        ],
        "skipped": [{"path": p, "reason": why} for r in records for p, why in r["skipped"]],
        **(extra or {}),
    }
    _write_json_atomic(os.path.join(out_dir, MANIFEST_NAME), manifest)
    return manifest


def load_manifest(out_dir: str) -> dict:
    path = os.path.join(out_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} missing: rerun scripts/cache_latents.py with the same flags to finish the cache "
                                f"(it writes manifest.json last)")
    with open(path) as handle:
        manifest = json.load(handle)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    return manifest


@dataclass
class VerifyReport:
    """Result of `verify_shards`: `bad` maps a shard name to what is wrong with it."""

    num_shards: int
    num_samples: int
    bad: dict[str, str]
    unlisted: list[str]

    @property
    def ok(self) -> bool:
        return not self.bad


def _count_samples(path: str) -> int:
    """Decode every sample of a shard (the tar structure and each safetensors blob); raises on damage."""
    keys = set()
    with tarfile.open(path, "r") as archive:
        for member in archive:
            if not member.isfile():
                continue
            key, _, suffix = member.name.partition(".")
            data = archive.extractfile(member).read()
            if suffix == LATENT_FIELD:
                moments = load_safetensors(data)
                if set(moments) != set(MOMENT_KEYS):
                    raise ValueError(f"sample {key} has tensors {sorted(moments)}")
            keys.add(key)
    return len(keys)


def verify_shards(out_dir: str) -> VerifyReport:
    """Re-read every shard in the manifest; check sha256 and sample counts, naming each bad shard."""
    manifest = load_manifest(out_dir)
    bad: dict[str, str] = {}
    total = 0
    for shard in manifest["shards"]:
        path = os.path.join(out_dir, shard["name"])
        if not os.path.isfile(path):
            bad[shard["name"]] = "missing"
            continue
        problems = []
        sha = file_sha256(path)
        if sha != shard["sha256"]:
            problems.append(f"sha256 {sha[:12]}… != manifest {shard['sha256'][:12]}…")
        try:
            count = _count_samples(path)
            total += count
            if count != shard["count"]:
                problems.append(f"{count} samples != manifest {shard['count']}")
        except Exception as exc:
            problems.append(f"unreadable: {type(exc).__name__}: {exc}")
        if problems:
            bad[shard["name"]] = "; ".join(problems)
    listed = {s["name"] for s in manifest["shards"]}
    on_disk = (os.path.basename(p) for p in glob.glob(os.path.join(out_dir, "*.tar")))
    unlisted = sorted(name for name in on_disk if name not in listed)
    return VerifyReport(len(manifest["shards"]), total, bad, unlisted)


# --- reader -------------------------------------------------------------------------------------------------


class BadShardError(RuntimeError, ValueError):
    """A latent shard that cannot be trusted (checksum mismatch, broken tar, undecodable sample).

    Also a `ValueError`: damaged input data, so the CLIs report it in one line naming the shard (exit 2).
    """


class _BadShardPolicy(SkipCounter):
    """Tar/decode/checksum failures in latent shards: raise naming the shard, or skip and count."""

    def __init__(self, policy: str):
        if policy not in BAD_SHARD_POLICIES:
            raise ValueError(f"unknown on_bad_shard {policy!r}; choose from {BAD_SHARD_POLICIES}")
        super().__init__(strict=False, what="latent shard data")
        self.policy = policy

    def __call__(self, exn: Exception) -> bool:
        if self.policy == "raise":
            where = next((str(a) for a in reversed(exn.args) if isinstance(a, str) and ".tar" in a), "?")
            raise BadShardError(f"bad latent shard {where}: {type(exn).__name__}: {exn.args[0] if exn.args else exn}")
        return super().__call__(exn)


_TAR_BLOCK = 512
_POSIX_USTAR_MAGIC = b"ustar\x0000"  # magic and version
_REGULAR_FILE_TYPES = (b"0", b"\0")
_DIRECTORY_TYPE = b"5"


class _NotPlainUstar(Exception):
    """A header the fast path does not read (PAX or GNU extensions, base-256 sizes): tarfile reads the shard."""


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:
        raise _NotPlainUstar("base-256 number")
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _ustar_members(data, url: str) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of each regular file in a plain ustar archive, from its headers alone.

    What `LatentShardWriter` writes (short ASCII names, integer mtime) is plain ustar. Python's tarfile spends
    most of the reader's time decoding every header field (measured: 36% of reading a 4×32×32 shard); the
    shard's sha256 has already been checked against the manifest, so only name, size and type are needed here.
    """
    members, offset, end = [], 0, len(data)
    while offset + _TAR_BLOCK <= end:
        header = data[offset:offset + _TAR_BLOCK]
        if header.count(0) == _TAR_BLOCK:  # end-of-archive marker
            break
        if header[257:265] != _POSIX_USTAR_MAGIC:  # GNU's "ustar  \0" reuses the prefix field: tarfile reads it
            raise _NotPlainUstar("not a POSIX ustar header")
        kind = header[156:157]
        size = _octal(header[124:136])
        if kind in _REGULAR_FILE_TYPES:
            name = header[0:100].split(b"\0", 1)[0]
            prefix = header[345:500].split(b"\0", 1)[0]
            full = (prefix + b"/" + name if prefix else name).decode("utf-8")
            if offset + _TAR_BLOCK + size > end:
                raise ValueError(f"member {full} runs past the end of the archive (truncated shard)", url)
            members.append((full, offset + _TAR_BLOCK, size))
        elif kind != _DIRECTORY_TYPE:
            raise _NotPlainUstar(f"member type {kind!r}")
        offset += _TAR_BLOCK + (size + _TAR_BLOCK - 1) // _TAR_BLOCK * _TAR_BLOCK
    return members


def _tarfile_members(data, url: str) -> list[tuple[str, int, int]]:
    """The same index through Python's tarfile, for any archive the fast path does not read."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
            return [(m.name, m.offset_data, m.size) for m in archive.getmembers() if m.isfile()]
    except tarfile.TarError as error:
        raise ValueError(f"broken tar: {error}", url) from error


def _samples_of_shard(data, url: str) -> Iterator[dict]:
    """Group the archive's members into webdataset samples: `{__key__, __url__, <suffix>: bytes, ...}`.

    Keys and suffixes split as webdataset's `group_by_keys` does: the key is the path up to the first dot of the
    file name, consecutive members with the same key form one sample; names without a dot are ignored."""
    try:
        members = _ustar_members(data, url)
    except _NotPlainUstar:
        members = _tarfile_members(data, url)
    sample: dict | None = None
    for name, start, size in members:
        dot = name.find(".", name.rfind("/") + 1)
        if dot < 0:
            continue
        key, suffix = name[:dot], name[dot + 1:].lower()
        if sample is None or sample["__key__"] != key:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        if suffix in sample:
            raise ValueError(f"sample {key} holds {suffix} twice", url)
        sample[suffix] = data[start:start + size]
    if sample is not None:
        yield sample


def _checked_shard_samples(sources: Iterator[dict], expected_sha256: dict[str, str],
                           policy: _BadShardPolicy) -> Iterator[dict]:
    """The samples of each shard whose sha256 matches the manifest's.

    A flipped byte inside a tensor still decodes, so without the check a damaged shard would train silently. Each
    process hashes each shard once, the first time it is drawn; a bad one is reported through `policy` once (raise
    naming it, or skip and count) and never read again.
    """
    verdicts: dict[str, str | None] = {}  # url → None (good) or what is wrong with it
    for source in sources:
        url = source["url"]
        if verdicts.get(url, None) is None:
            try:
                yield from _verified_samples(url, expected_sha256[url], check=url not in verdicts)
                verdicts[url] = None
            except (OSError, ValueError) as error:
                verdicts[url] = str(error)
                policy(error if isinstance(error, ValueError) else ValueError(f"unreadable: {error}", url))
        if verdicts[url] is not None and len(verdicts) == len(expected_sha256) and all(
                v is not None for v in verdicts.values()):
            raise BadShardError(f"every latent shard is damaged ({len(verdicts)} of them); run "
                                "scripts/cache_latents.py --verify true to list them")


def _verified_samples(url: str, expected_sha256: str, check: bool) -> Iterator[dict]:
    """The shard's samples, its sha256 checked first when `check`. The file is memory-mapped: hashing and reading
    share its pages (and, across DataLoader workers, the page cache), and the whole member index is read before
    the first sample is passed on, so a broken archive yields nothing."""
    with open(url, "rb") as handle, _mapped(handle) as data:
        if check:
            actual = hashlib.sha256(data).hexdigest()
            if actual != expected_sha256:
                raise ValueError(f"checksum mismatch (sha256 {actual[:12]}… != manifest {expected_sha256[:12]}…)",
                                 url)
        yield from _samples_of_shard(data, url)


@contextlib.contextmanager
def _mapped(handle) -> Iterator[Any]:
    """The file's bytes, memory-mapped read-only (an empty file, which mmap refuses, as b"")."""
    if os.fstat(handle.fileno()).st_size == 0:
        yield b""
        return
    with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        yield data


def _decode_latent(sample: dict) -> tuple[dict[str, torch.Tensor], int, str]:
    where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
    try:
        moments = load_safetensors(bytes(sample[LATENT_FIELD]))
        label = int(bytes(sample["cls"]).decode("ascii"))
    except Exception as exc:
        raise ValueError(f"cannot decode sample: {type(exc).__name__}: {exc}", where) from exc
    return moments, label, where


def _moments_stage(
    samples: Iterator[dict],
    source: ShardSource,
    policy: _BadShardPolicy,
    flip: bool,
    sample_posterior: bool,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, int]]:
    """Decode each sample and pick its flipped or unflipped moments: (mean, logvar or None, label), float32."""
    slot, _ = worker_slot(source.rank, source.world_size)
    coin = random.Random(f"{source.seed}-{source.epoch}-{slot}-flip")
    for sample in samples:
        try:
            moments, label, _ = _decode_latent(sample)
        except ValueError as exn:
            policy(exn)  # raises (naming the shard) or counts
            continue
        suffix = "_flip" if flip and coin.random() < 0.5 else ""
        logvar = moments["logvar" + suffix].float() if sample_posterior else None
        yield moments["mean" + suffix].float(), logvar, label


def _stack_moments(items: list[tuple[torch.Tensor, torch.Tensor | None, int]]):
    means, logvars, labels = zip(*items)
    logvar = None if logvars[0] is None else torch.stack(logvars)
    return torch.stack(means), logvar, torch.tensor(labels)


def _latents_stage(
    items: Iterator[tuple[torch.Tensor, torch.Tensor | None, Any]],
    source: ShardSource,
    shift: torch.Tensor,
    scale: torch.Tensor,
) -> Iterator[tuple[torch.Tensor, Any]]:
    """z = mean + exp(logvar/2)·ε (when a logvar comes), normalised: one sample (C, h, w) or a batch (B, C, h, w)
    at a time; a batch costs one random draw and one pass of each elementwise op instead of B."""
    slot, _ = worker_slot(source.rank, source.world_size)
    generator = torch.Generator().manual_seed((source.seed * 1_000_003 + source.epoch) * 100_003 + slot)
    for mean, logvar, label in items:
        if logvar is not None:
            mean = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator)
        yield (mean - shift) / scale, label


class LatentShardDataset(wds.DataPipeline):
    """Iterable dataset of `(latent (C, h, w) float32, normalised; class_index int)` from a shard directory.

    Split by rank and worker as in `data.sharding`; `resampled=True` (default, for multi-epoch training) draws
    shards with replacement forever, `resampled=False` gives exactly-once epochs (evaluation, tests).
    Every shard's sha256 is checked against the manifest before it is read; a damaged shard (or sample) raises
    `BadShardError` naming it (`on_bad_shard="raise"`) or is skipped and counted in `bad_shards.count` ("skip").
    """

    def __init__(
        self,
        out_dir: str,
        rank: int = 0,
        world_size: int = 1,
        *,
        resampled: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        flip: bool = True,
        sample_posterior: bool = True,
        normalize: bool = True,
        on_bad_shard: str = "raise",
        batch_size: int | None = None,
        partial_batches: bool = True,
    ):
        self.manifest = load_manifest(out_dir)
        urls = [os.path.join(out_dir, s["name"]) for s in self.manifest["shards"] if s["count"] > 0]
        self.source = ShardSource(urls, rank, world_size, shuffle=True, resampled=resampled, seed=seed)
        self.bad_shards = _BadShardPolicy(on_bad_shard)
        channels = self.manifest["latent_shape"][0]
        shift = torch.tensor(self.manifest["latent_mean"] if normalize else [0.0] * channels).view(-1, 1, 1)
        scale = torch.tensor(self.manifest["latent_std"] if normalize else [1.0] * channels).view(-1, 1, 1)
        expected_sha256 = {os.path.join(out_dir, s["name"]): s["sha256"] for s in self.manifest["shards"]
                           if s["count"] > 0}
        stages = [
            self.source,
            partial(_checked_shard_samples, expected_sha256=expected_sha256, policy=self.bad_shards),
            partial(keep_my_samples, source=self.source),
        ]
        if shuffle_buffer > 0:
            stages.append(partial(_shuffle_stage, buffer=shuffle_buffer, source=self.source))
        stages.append(partial(_moments_stage, source=self.source, policy=self.bad_shards, flip=flip,
                              sample_posterior=sample_posterior))
        if batch_size is not None:
            stages.append(wds.batched(batch_size, collation_fn=_stack_moments, partial=partial_batches))
        stages.append(partial(_latents_stage, source=self.source, shift=shift.float(),
                              scale=scale.float().clamp_min(1e-8)))
        super().__init__(*stages)

    @property
    def num_classes(self) -> int:
        return self.manifest["num_classes"]

    @property
    def class_names(self) -> list[str]:
        return self.manifest["class_names"]

    def set_epoch(self, epoch: int) -> None:
        self.source.set_epoch(epoch)


def _shuffle_stage(samples, buffer: int, source: ShardSource):
    slot, _ = worker_slot(source.rank, source.world_size)
    rng = random.Random(f"{source.seed}-{source.epoch}-{slot}-latents")
    return wds.shuffle(buffer, initial=buffer, rng=rng)(samples)


def make_latent_loader(
    out_dir: str,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    *,
    num_workers: int = 0,
    **dataset_options,
) -> tuple[torch.utils.data.DataLoader, LatentShardDataset]:
    """DataLoader over `LatentShardDataset` (batches of (B, C, h, w) latents and (B,) labels) and the dataset.

    The dataset batches (and samples the posterior batch-wise) itself, so the loader only moves batches."""
    resampled = dataset_options.get("resampled", True)
    dataset = LatentShardDataset(out_dir, rank, world_size, batch_size=batch_size, partial_batches=not resampled,
                                 **dataset_options)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
    return loader, dataset
