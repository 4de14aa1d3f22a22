"""Latent shards: write → merge → verify, damage detection, resume, exact stats, two ranks, the reader."""
from __future__ import annotations

import io
import itertools
import json
import os
import tarfile

import pytest
import torch

from data.latent_shards import (
    BadShardError,
    LatentShardDataset,
    LatentShardWriter,
    load_manifest,
    make_latent_loader,
    file_sha256,
    merge_manifests,
    rank_prefix,
    verify_shards,
)

SHAPE = (4, 2, 3)  # (C, h, w)
TOKENIZER = {"name": "tiny-test", "latent_channels": 4}


def _moments(uid: int) -> dict[str, torch.Tensor]:
    """Deterministic moments with per-channel offsets so the stats are non-trivial."""
    g = torch.Generator().manual_seed(uid)
    offset = torch.arange(SHAPE[0], dtype=torch.float32).view(-1, 1, 1)
    return {
        "mean": torch.randn(SHAPE, generator=g) * 2 + offset,
        "logvar": torch.randn(SHAPE, generator=g) - 3,
        "mean_flip": torch.randn(SHAPE, generator=g) * 2 + offset,
        "logvar_flip": torch.randn(SHAPE, generator=g) - 3,
    }


def _write_rank(out_dir, rank: int, uids, per_shard: int = 3) -> LatentShardWriter:
    with LatentShardWriter(str(out_dir), rank_prefix(rank), per_shard) as writer:
        for uid in uids:
            if f"img{uid:05d}" in writer.done_keys:
                continue
            writer.write(f"img{uid:05d}", uid, **_moments(uid))
    return writer


def _merge(out_dir):
    return merge_manifests(
        str(out_dir),
        tokenizer_config=TOKENIZER,
        tokenizer_weights_sha256="ab" * 32,
        class_names=[f"c{i}" for i in range(20)],
    )


def test_two_ranks_round_trip_and_exact_stats(tmp_path):
    w0 = _write_rank(tmp_path, 0, range(0, 7))
    w1 = _write_rank(tmp_path, 1, range(7, 12))
    w1_names = set(w1.shards_written)
    assert not set(w0.shards_written) & w1_names
    assert all(n.startswith("rank00000-") for n in w0.shards_written)
    assert all(n.startswith("rank00001-") for n in w1_names)
    manifest = _merge(tmp_path)
    assert manifest["num_samples"] == 12
    assert manifest["latent_shape"] == list(SHAPE) and manifest["latent_dtype"] == "float32"
    assert manifest["tokenizer"]["weights_sha256"] == "ab" * 32 and manifest["num_classes"] == 20
    assert [s["count"] for s in manifest["shards"]] == [3, 3, 1, 3, 2]
    assert json.load(open(tmp_path / "manifest.json")) == manifest

    # stats: direct float64 torch computation over all means (unflipped and flipped)
    means = torch.stack([_moments(u)[k] for u in range(12) for k in ("mean", "mean_flip")]).double()  # (24, C, h, w)
    per_channel = means.transpose(0, 1).flatten(1)  # (C, 24·h·w)
    torch.testing.assert_close(torch.tensor(manifest["latent_mean"], dtype=torch.float64), per_channel.mean(1))
    torch.testing.assert_close(
        torch.tensor(manifest["latent_std_of_means"], dtype=torch.float64), per_channel.std(1, correction=0)
    )
    # latent_std is the std of posterior samples μ + σ·ε: Var(μ) + E[σ²] (what the DiT trains on)
    logvars = torch.stack([_moments(u)[k] for u in range(12) for k in ("logvar", "logvar_flip")]).double()
    posterior_var = logvars.exp().transpose(0, 1).flatten(1).mean(1)  # (C,)
    torch.testing.assert_close(torch.tensor(manifest["latent_std"], dtype=torch.float64),
                               (per_channel.var(1, correction=0) + posterior_var).sqrt())
    assert manifest["stats_source"].startswith("posterior samples")

    report = verify_shards(str(tmp_path))
    assert report.ok and report.num_samples == 12 and report.num_shards == 5 and not report.unlisted

    # reader, exactly-once mode, no posterior sampling / normalisation: every value is a stored mean or mean_flip
    dataset = LatentShardDataset(str(tmp_path), resampled=False, sample_posterior=False, normalize=False)
    seen = {}
    flips = 0
    for latent, label in dataset:
        stored = _moments(label)
        is_flip = torch.equal(latent, stored["mean_flip"])
        assert is_flip or torch.equal(latent, stored["mean"])
        flips += is_flip
        seen[label] = seen.get(label, 0) + 1
    assert seen == {u: 1 for u in range(12)}
    assert 0 < flips < 12


def test_reader_normalises_and_samples_posterior(tmp_path):
    _write_rank(tmp_path, 0, range(6))
    manifest = _merge(tmp_path)
    shift = torch.tensor(manifest["latent_mean"]).view(-1, 1, 1)
    scale = torch.tensor(manifest["latent_std"]).view(-1, 1, 1)
    plain = LatentShardDataset(str(tmp_path), resampled=False, flip=False, sample_posterior=False)
    for latent, label in plain:
        torch.testing.assert_close(latent, (_moments(label)["mean"] - shift) / scale)
    noisy = LatentShardDataset(str(tmp_path), resampled=False, flip=False, seed=1)
    for latent, label in noisy:
        stored = _moments(label)
        residual = latent * scale + shift - stored["mean"]
        eps = residual / (0.5 * stored["logvar"]).exp()
        assert 0 < residual.abs().max() and eps.abs().max() < 6  # mean + σ·ε with ε ~ N(0, 1)

    loader, dataset = make_latent_loader(str(tmp_path), batch_size=4, seed=0)  # resampled: endless
    batch, labels = next(iter(loader))
    assert batch.shape == (4, *SHAPE) and labels.shape == (4,) and batch.dtype == torch.float32
    assert dataset.num_classes == 20


def test_sampled_latents_have_unit_variance_under_the_manifest_stats(tmp_path):
    """Normalised with the manifest, the reader's posterior samples have per-channel std ≈ 1 even when the
    posterior variance is large (with the std of the means alone they would come out near sqrt(2) here)."""
    channels = SHAPE[0]
    with LatentShardWriter(str(tmp_path), rank_prefix(0), 1000) as writer:
        for uid in range(200):
            g = torch.Generator().manual_seed(uid)
            mean, mean_flip = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
            logvar = torch.zeros(SHAPE)  # σ² = 1 = Var(μ)
            writer.write(f"img{uid:05d}", 0, mean, logvar, mean_flip, logvar.clone())
    manifest = _merge(tmp_path)
    dataset = LatentShardDataset(str(tmp_path), resampled=False, shuffle_buffer=0, seed=3)
    latents = torch.stack([latent for latent, _ in dataset])  # (N, C, h, w), normalised samples
    std = latents.transpose(0, 1).flatten(1).std(1)
    assert torch.allclose(std, torch.ones(channels), atol=0.08), std
    ratio = torch.tensor(manifest["latent_std"]) / torch.tensor(manifest["latent_std_of_means"])
    assert torch.all(ratio > 1.3)


def test_manifests_with_stats_of_the_means_are_still_read(tmp_path):
    """A manifest written before the stats came from posterior samples (std of the means, no
    latent_std_of_means) is read as it is: the reader and the DiT config use its latent_std unchanged."""
    from pipelines.train_generator import GeneratorTrainConfig, dit_config_from_manifest

    _write_rank(tmp_path, 0, range(6))
    manifest = _merge(tmp_path)
    old_std = manifest.pop("latent_std_of_means")
    manifest.update(latent_std=old_std, stats_source="float64 sums over posterior means of center crops and "
                                                      "their flips")
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    shift = torch.tensor(manifest["latent_mean"]).view(-1, 1, 1)
    plain = LatentShardDataset(str(tmp_path), resampled=False, flip=False, sample_posterior=False)
    for latent, label in plain:
        torch.testing.assert_close(latent, (_moments(label)["mean"] - shift) / torch.tensor(old_std).view(-1, 1, 1))
    square = {**load_manifest(str(tmp_path)), "latent_shape": [4, 2, 2]}  # the DiT needs square latents
    dit = dit_config_from_manifest(GeneratorTrainConfig.from_flat(model="DiT-S/2"), square)
    assert dit.latent_std == pytest.approx(tuple(old_std))


def test_verify_names_flipped_byte_and_truncated_shards(tmp_path):
    _write_rank(tmp_path, 0, range(9))
    manifest = _merge(tmp_path)
    names = [s["name"] for s in manifest["shards"]]
    flipped, truncated = os.path.join(tmp_path, names[0]), os.path.join(tmp_path, names[2])
    with tarfile.open(flipped) as archive:  # flip a byte inside the first latent tensor's data, not a header
        member = next(m for m in archive.getmembers() if m.name.endswith(".latent.safetensors"))
    data = bytearray(open(flipped, "rb").read())
    data[member.offset_data + member.size - 5] ^= 0x01
    open(flipped, "wb").write(bytes(data))
    data = open(truncated, "rb").read()
    open(truncated, "wb").write(data[: len(data) // 2])
    report = verify_shards(str(tmp_path))
    assert not report.ok
    assert set(report.bad) == {names[0], names[2]}
    assert "sha256" in report.bad[names[0]] and "unreadable" not in report.bad[names[0]]  # only the hash sees it
    assert "sha256" in report.bad[names[2]]
    assert "samples" in report.bad[names[2]] or "unreadable" in report.bad[names[2]]

    with pytest.raises(RuntimeError, match=names[2]):
        list(LatentShardDataset(str(tmp_path), resampled=False, on_bad_shard="raise"))
    skipping = LatentShardDataset(str(tmp_path), resampled=False, on_bad_shard="skip")
    labels = [label for _, label in skipping]
    assert set(range(3, 6)) <= set(labels) and len(labels) < 9
    assert skipping.bad_shards.count >= 1


def test_resume_skips_complete_shards_and_discards_partial(tmp_path):
    writer = LatentShardWriter(str(tmp_path), rank_prefix(0), 3)
    for uid in range(7):  # two complete shards, one sample in an unfinished .tmp
        writer.write(f"img{uid:05d}", uid, **_moments(uid))
    writer._tar.close()  # simulate a crash: the partial shard is never finished
    assert os.path.exists(tmp_path / "rank00000-000002.tar.tmp")
    complete = {n: os.path.getmtime(tmp_path / n) for n in ("rank00000-000000.tar", "rank00000-000001.tar")}

    resumed = LatentShardWriter(str(tmp_path), rank_prefix(0), 3)
    assert not os.path.exists(tmp_path / "rank00000-000002.tar.tmp")
    assert resumed.samples_done == 6 and resumed.done_keys == {f"img{u:05d}" for u in range(6)}
    assert resumed.write("img00000", 0, **_moments(0)) is False  # already in a complete shard
    for uid in range(6, 10):
        assert resumed.write(f"img{uid:05d}", uid, **_moments(uid))
    resumed.close()
    assert resumed.shards_written == ["rank00000-000002.tar", "rank00000-000003.tar"]
    assert {n: os.path.getmtime(tmp_path / n) for n in complete} == complete  # not rewritten
    manifest = _merge(tmp_path)
    assert manifest["num_samples"] == 10
    assert verify_shards(str(tmp_path)).ok
    labels = sorted(label for _, label in LatentShardDataset(str(tmp_path), resampled=False))
    assert labels == list(range(10))


def test_skipped_inputs_reach_the_manifest(tmp_path):
    with LatentShardWriter(str(tmp_path), rank_prefix(3), 4) as writer:
        writer.write("img00000", 0, **_moments(0))
        writer.add_skipped("/data/bad.JPEG", "cannot decode")
    manifest = _merge(tmp_path)
    assert manifest["skipped"] == [{"path": "/data/bad.JPEG", "reason": "cannot decode"}]
    assert load_manifest(str(tmp_path))["shards"][0]["name"] == "rank00003-000000.tar"


def test_writer_rejects_inconsistent_latents(tmp_path):
    writer = LatentShardWriter(str(tmp_path), "rank00000", 4)
    writer.write("a", 0, **_moments(0))
    bad = {k: v[:2] for k, v in _moments(1).items()}
    with pytest.raises(ValueError, match="differs"):
        writer.write("b", 0, **bad)
    with pytest.raises(ValueError, match="must not contain"):
        writer.write("c.d", 0, **_moments(2))


def test_batched_reader_gives_the_per_sample_values_and_a_partial_last_batch(tmp_path):
    """The loader batches inside the dataset (one posterior draw per batch): the flips and values are the
    per-sample reader's, stacked; exactly-once epochs keep the last partial batch, endless ones never make one."""
    _write_rank(tmp_path, 0, range(7))
    _merge(tmp_path)
    options = dict(resampled=False, shuffle_buffer=0, seed=5, sample_posterior=False)
    single = list(LatentShardDataset(str(tmp_path), **options))
    batches = list(LatentShardDataset(str(tmp_path), batch_size=3, **options))
    assert [b[0].shape[0] for b in batches] == [3, 3, 1]
    torch.testing.assert_close(torch.cat([b[0] for b in batches]), torch.stack([s[0] for s in single]))
    assert torch.cat([b[1] for b in batches]).tolist() == [s[1] for s in single]

    noisy = list(LatentShardDataset(str(tmp_path), batch_size=3, resampled=False, shuffle_buffer=0, seed=5))
    assert (torch.cat([b[0] for b in noisy]) - torch.cat([b[0] for b in batches])).abs().max() > 0

    loader, _ = make_latent_loader(str(tmp_path), batch_size=3, seed=0)  # resampled
    sizes = [latents.shape[0] for latents, _ in itertools.islice(iter(loader), 5)]
    assert sizes == [3] * 5


def _rewrite(path, tar_format: int) -> None:
    """Rewrite a shard in another tar format, keeping its samples (PAX: a header before each member, which a
    float mtime needs; GNU: GNU's magic, whose header reuses the ustar prefix field for other data)."""
    with tarfile.open(path) as archive:
        members = [(m, archive.extractfile(m).read()) for m in archive.getmembers()]
    with tarfile.open(path, "w", format=tar_format) as archive:
        for member, data in members:
            if tar_format == tarfile.PAX_FORMAT:
                member.mtime = 1.5
            archive.addfile(member, io.BytesIO(data))


def _read_back(out_dir) -> dict[int, torch.Tensor]:
    return {label: latent for latent, label in
            LatentShardDataset(str(out_dir), resampled=False, shuffle_buffer=0, flip=False, sample_posterior=False)}


def test_fast_tar_index_matches_tarfile_and_other_tar_formats_still_read(tmp_path):
    """The reader parses the writer's plain ustar headers itself (tarfile's header decoding was a third of its
    time); its index equals tarfile's, and a shard rewritten with PAX headers or in GNU format (another tool's
    rewrite) goes through tarfile and reads the same."""
    from data.latent_shards import _NotPlainUstar, _tarfile_members, _ustar_members

    _write_rank(tmp_path, 0, range(5))
    shard = tmp_path / "rank00000-000000.tar"
    data = shard.read_bytes()
    assert _ustar_members(data, str(shard)) == _tarfile_members(data, str(shard))
    assert [name for name, _, _ in _ustar_members(data, str(shard))] == [
        f"img{u:05d}.{field}" for u in range(3) for field in ("cls", "latent.safetensors")]
    manifest = _merge(tmp_path)
    plain = _read_back(tmp_path)
    assert sorted(plain) == list(range(5))

    for tar_format in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        _rewrite(shard, tar_format)
        with pytest.raises(_NotPlainUstar):
            _ustar_members(shard.read_bytes(), str(shard))
        manifest["shards"][0]["sha256"] = file_sha256(str(shard))
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
        rewritten = _read_back(tmp_path)
        assert sorted(rewritten) == sorted(plain)
        for label, latent in plain.items():
            assert torch.equal(rewritten[label], latent)


def test_broken_archive_behind_a_matching_checksum_is_named_or_skipped(tmp_path):
    """A shard whose manifest checksum was recomputed after it broke (truncated inside a member) still fails
    naming the shard, before any of its samples come out; with on_bad_shard="skip" the rest are read."""
    _write_rank(tmp_path, 0, range(6))
    manifest = _merge(tmp_path)
    broken = tmp_path / manifest["shards"][0]["name"]
    broken.write_bytes(broken.read_bytes()[:2000])  # inside the first latent's data
    manifest["shards"][0]["sha256"] = file_sha256(str(broken))
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BadShardError, match=f"bad latent shard .*{manifest['shards'][0]['name']}.*truncated"):
        list(LatentShardDataset(str(tmp_path), resampled=False, shuffle_buffer=0))
    skipping = LatentShardDataset(str(tmp_path), resampled=False, shuffle_buffer=0, on_bad_shard="skip")
    assert sorted(label for _, label in skipping) == [3, 4, 5]
    assert skipping.bad_shards.count == 1
