"""Data under faults: `kill -9` of latent caching and of sampling, damaged shards, a full disk while writing shards.

Kills run the real scripts in subprocesses (SIGKILL from a deterministic `EPSVAE_FAULT` point inside the shard
writer, or from outside at a random moment for sampling, whose PNG writes are atomic); the re-run of the same
command happens through the script's `main` in this process and must give exactly what an uninterrupted run gives.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from data.latent_shards import LatentShardDataset, load_manifest
from support import one_torch_thread, save_tiny_tokenizer
from test_faults_training import cli, run_until_killed

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLES_PER_SHARD = 7  # not a multiple of the batch size: a resumed run encodes differently composed batches


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def cache_argv(tokenizer: Path, out: Path, *extra: str) -> list[str]:
    return ["--tokenizer", tokenizer, "--data", "offline", "--resolution", "32", "--crops-per-class", "3",
            "--per-process-batch-size", "5", "--num-workers", "0", "--samples-per-shard", SAMPLES_PER_SHARD, "--cpu",
            "--output-dir", out, *extra]


def snapshot(directory: Path) -> dict[str, str]:
    """sha256 of every file (shards, sidecars, manifest, cache_info): the whole observable result. config.yaml (the
    command's settings, which name its own output directory) is left out."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())
            if p.is_file() and p.name != "config.yaml"}


@pytest.fixture(scope="module")
def reference_cache(tokenizer_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "latents"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli("cache_latents", cache_argv(tokenizer_dir, out)) == 0
    finally:
        torch.set_num_threads(threads)
    assert load_manifest(str(out))["num_samples"] == 24 and len(load_manifest(str(out))["shards"]) == 4
    return out


# ---------------------------------------------------------------------------------------------------------------
# kill -9 of latent caching: mid-shard, then between a shard's rename and its sidecar; re-run → identical cache
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cache_killed_mid_shard_and_mid_commit_finishes_identically(tokenizer_dir, reference_cache, tmp_path):
    out = tmp_path / "latents"
    # 1. Killed after the 10th sample: shard 0 (7 samples) complete, 3 samples in an open .tmp shard.
    run_until_killed("cache_latents", cache_argv(tokenizer_dir, out), tmp_path / "log1.txt", fault="shard_write:10")
    names = sorted(p.name for p in out.iterdir())
    assert "rank00000-000000.tar" in names and "rank00000-000000.tar.json" in names
    assert "rank00000-000001.tar.tmp" in names and "manifest.json" not in names

    # 2. Same command: discards the .tmp, re-encodes from sample 7; killed after shard 1 is renamed into place
    #    but before its sidecar exists (a shard without a sidecar is not complete).
    run_until_killed("cache_latents", cache_argv(tokenizer_dir, out), tmp_path / "log2.txt", fault="shard_finish:1")
    names = sorted(p.name for p in out.iterdir())
    assert "rank00000-000001.tar" in names and "rank00000-000001.tar.json" not in names
    assert not any(n.endswith(".tmp") for n in names) and "manifest.json" not in names

    # 3. Same command, uninterrupted: byte-identical shards, sidecars, manifest.
    assert cli("cache_latents", cache_argv(tokenizer_dir, out, "--verify")) == 0
    assert snapshot(out) == snapshot(reference_cache)


# ---------------------------------------------------------------------------------------------------------------
# Damaged shards: verify names them; training fails naming one, or skips and counts with --on-bad-shard skip
# ---------------------------------------------------------------------------------------------------------------


def _damage(cache: Path) -> tuple[str, str]:
    """Flip one byte inside a latent tensor of shard 1 (still decodes!) and truncate shard 2."""
    manifest = load_manifest(str(cache))
    flipped, truncated = manifest["shards"][1]["name"], manifest["shards"][2]["name"]
    with tarfile.open(cache / flipped) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith(".latent.safetensors"))
    data = bytearray((cache / flipped).read_bytes())
    data[member.offset_data + member.size - 3] ^= 0x40
    (cache / flipped).write_bytes(bytes(data))
    (cache / truncated).write_bytes((cache / truncated).read_bytes()[:3000])
    return flipped, truncated


@pytest.fixture
def damaged_cache(reference_cache, tmp_path) -> tuple[Path, str, str]:
    cache = tmp_path / "damaged"
    shutil.copytree(reference_cache, cache)
    return (cache, *_damage(cache))


def test_verify_names_every_damaged_shard_in_one_line(damaged_cache, capsys):
    cache, flipped, truncated = damaged_cache
    before = snapshot(cache)
    capsys.readouterr()
    assert cli("cache_latents", ["--output-dir", cache, "--verify"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and flipped in err[0] and truncated in err[0], err
    good = [s["name"] for s in load_manifest(str(cache))["shards"] if s["name"] not in (flipped, truncated)]
    assert not any(name in err[0] for name in good)
    assert snapshot(cache) == before  # verification writes nothing


def generator_argv(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["--shards", shards, "--output-dir", out, "--model", "DiT-S/2", "--depth", "1", "--hidden-size", "32",
            "--num-heads", "2", "--global-batch-size", "4", "--num-workers", "0", "--shuffle-buffer", "4",
            "--max-steps", "8", "--checkpoint-every", "100", "--log-every", "1", "--cpu", *extra]


def test_training_over_a_damaged_shard_fails_naming_it_or_skips_and_counts(damaged_cache, tmp_path, capsys, caplog):
    cache, flipped, truncated = damaged_cache
    capsys.readouterr()
    assert cli("train_generator", generator_argv(cache, tmp_path / "strict")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "bad latent shard" in err[-1], err[-3:]
    assert flipped in err[-1] or truncated in err[-1]
    assert not (tmp_path / "strict" / "model").exists()

    with caplog.at_level(logging.WARNING, logger="data.sharding"):
        assert cli("train_generator", generator_argv(cache, tmp_path / "lenient", "--on-bad-shard", "skip")) == 0
    named = " ".join(r.getMessage() for r in caplog.records)
    assert flipped in named and truncated in named  # 8 steps × 4 latents from 4 shards: both were drawn
    records = [json.loads(line) for line in (tmp_path / "lenient" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 8 and records[-1]["bad_shards_skipped"] == 2  # each bad shard counted once
    assert json.loads((tmp_path / "lenient" / "model" / "training.json").read_text())["bad_shards_skipped"] == 2


def test_reader_never_yields_latents_from_a_shard_whose_checksum_fails(damaged_cache):
    cache, flipped, truncated = damaged_cache
    manifest = load_manifest(str(cache))
    keys_by_shard = {s["name"]: s["count"] for s in manifest["shards"]}
    good = sum(count for name, count in keys_by_shard.items() if name not in (flipped, truncated))
    dataset = LatentShardDataset(str(cache), resampled=False, on_bad_shard="skip", shuffle_buffer=0)
    assert len(list(dataset)) == good  # the flipped shard decodes fine, yet none of its latents come out
    assert dataset.bad_shards.count == 2


# ---------------------------------------------------------------------------------------------------------------
# Disk full while writing a shard or the manifest
# ---------------------------------------------------------------------------------------------------------------


def test_disk_full_while_writing_a_shard_keeps_completed_shards_and_says_so(tokenizer_dir, reference_cache,
                                                                            tmp_path, monkeypatch, capsys):
    import webdataset

    real_write = webdataset.TarWriter.write
    calls = {"n": 0}

    def write_until_full(self, sample):
        calls["n"] += 1
        if calls["n"] == 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, sample)

    monkeypatch.setattr(webdataset.TarWriter, "write", write_until_full)
    out = tmp_path / "latents"
    capsys.readouterr()
    assert cli("cache_latents", cache_argv(tokenizer_dir, out)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "disk full while writing" in err[-1], err[-3:]
    assert "rank00000-000001.tar" in err[-1] and "kept" in err[-1]
    complete = snapshot(out)
    assert "manifest.json" not in complete
    reference = snapshot(reference_cache)
    for name in ("rank00000-000000.tar", "rank00000-000000.tar.json"):  # the completed shard is intact
        assert complete[name] == reference[name]

    monkeypatch.undo()  # space freed: the same command finishes the cache
    assert cli("cache_latents", cache_argv(tokenizer_dir, out)) == 0
    assert snapshot(out) == reference


def test_disk_full_while_writing_the_manifest_keeps_the_previous_manifest(tokenizer_dir, reference_cache, tmp_path,
                                                                          monkeypatch, capsys):
    import data.latent_shards as shards

    out = tmp_path / "latents"
    shutil.copytree(reference_cache, out)
    before = snapshot(out)

    def dump_until_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards.json, "dump", dump_until_full)
    capsys.readouterr()
    assert cli("cache_latents", cache_argv(tokenizer_dir, out)) == 1  # nothing to encode, then the merge fails
    err = capsys.readouterr().err.strip().splitlines()
    assert "disk full while writing" in err[-1] and "manifest.json" in err[-1], err[-3:]
    assert snapshot(out) == before  # old manifest untouched, no temporary file left


# ---------------------------------------------------------------------------------------------------------------
# kill -9 of a long sampling run at a random moment; re-run → the same images
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generator_dir(tokenizer_dir, reference_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("generator")
    assert cli("train_generator", generator_argv(reference_cache, out, "--max-steps", "1")) == 0
    return out / "model"


def sample_argv(generator: Path, tokenizer: Path, out: Path) -> list[str]:
    # 16 images in batches of 2 with 100 DDPM steps each: long enough to be killed mid-run.
    return ["--generator", generator, "--tokenizer", tokenizer, "--classes", "all", "--per-class", "2",
            "--ddpm-steps", "100", "--decode-steps", "2", "--per-process-batch-size", "2", "--cpu", "--output-dir", out]


@pytest.mark.slow
def test_sampling_killed_at_a_random_moment_reruns_to_the_same_images(generator_dir, tokenizer_dir, tmp_path):
    assert (REPO_ROOT / "scripts" / "sample.py").is_file()
    reference = tmp_path / "reference"
    assert cli("sample", sample_argv(generator_dir, tokenizer_dir, reference)) == 0
    expected = {name: digest for name, digest in snapshot(reference).items() if name.endswith(".png")}
    assert len(expected) == 17  # 16 samples + grid.png

    out = tmp_path / "samples"
    wanted = random.Random(os.getpid()).randint(2, 8)

    def some_images_written() -> bool:
        return out.is_dir() and len(list(out.glob("0*.png"))) >= wanted

    run_until_killed("sample", sample_argv(generator_dir, tokenizer_dir, out), tmp_path / "log.txt",
                     kill_when=some_images_written, kill_delay_s=random.Random(os.getpid()).uniform(0.0, 0.3))
    done = sorted(p.name for p in out.glob("0*.png"))
    assert wanted <= len(done) < 16 and not (out / "grid.png").exists() and not (out / "samples.npz").exists()

    assert cli("sample", sample_argv(generator_dir, tokenizer_dir, out)) == 0
    result = {name: digest for name, digest in snapshot(out).items() if name.endswith(".png")}
    assert result == expected  # every PNG, including those written before the kill, and the grid
    import numpy as np

    with np.load(out / "samples.npz") as ours, np.load(reference / "samples.npz") as theirs:
        assert np.array_equal(ours["arr_0"], theirs["arr_0"]) and np.array_equal(ours["arr_1"], theirs["arr_1"])
