"""Stage 2 pipelines: cache latents → verify → train the DiT → save → load, on the offline photos with tiny models.

References are independent of the code under test: latents are re-encoded directly with the tokenizer, stats
recomputed in float64, normalisation checked against the un-normalised reader.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors

from data.latent_shards import LatentShardDataset, file_sha256, load_manifest
from data.sources import build_image_dataset
from generator.dit import DiT
from pipelines.cache_latents import CacheLatentsConfig, cache_latents, sample_key
from pipelines.kit.checkpoints import CheckpointManager
from pipelines.kit.generation import generate_latents
from pipelines.kit.logging import read_jsonl
from pipelines.train_generator import GeneratorTrainConfig, stream_seed, train_generator
from support import reset_accelerate, save_tiny_tokenizer
from tokenizer import EpsVAE, load_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
RESOLUTION = 32  # tiny tokenizer: f=4 → 8×8×4 latents
CROPS_PER_CLASS = 3  # 8 photos → 24 images
TINY_DIT = {"depth": 2, "hidden_size": 64, "num_heads": 2}


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps process-wide state; reset it so each run builds its accelerator from scratch."""
    yield
    reset_accelerate()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def _cache_config(tokenizer_dir: Path, output_dir: Path, **changes) -> CacheLatentsConfig:
    values = dict(tokenizer=str(tokenizer_dir), data="offline", output_dir=str(output_dir), resolution=RESOLUTION,
                  crops_per_class=CROPS_PER_CLASS, batch_size=5, num_workers=0, samples_per_shard=10, verify=True,
                  cpu=True)
    return CacheLatentsConfig(**{**values, **changes})


@pytest.fixture(scope="module")
def latent_dir(tokenizer_dir, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("latents")
    cache_latents(_cache_config(tokenizer_dir, output_dir))
    reset_accelerate()
    return output_dir


def _dataset():
    return build_image_dataset("offline", "train", RESOLUTION, train=False, crops_per_class=CROPS_PER_CLASS)


def _train_config(latent_dir: Path, output_dir: Path, **changes) -> GeneratorTrainConfig:
    values = dict(shards=str(latent_dir), output_dir=str(output_dir), model="DiT-S/2", model_overrides=TINY_DIT,
                  batch_size=4, num_workers=0, shuffle_buffer=8, max_steps=3, checkpoint_every=100, log_every=1,
                  sample_every=100, sample_steps=4, sample_images=4, ema_decay=0.9, cpu=True)
    values.update(changes)
    return GeneratorTrainConfig.from_flat(**values)


def _read_shard(path: Path) -> dict[str, dict]:
    """key → {"moments": {...}, "cls": int}, read with tarfile (not the project's reader)."""
    samples: dict[str, dict] = {}
    with tarfile.open(path) as archive:
        for member in archive:
            key, _, suffix = member.name.partition(".")
            data = archive.extractfile(member).read()
            entry = samples.setdefault(key, {})
            if suffix == "latent.safetensors":
                entry["moments"] = load_safetensors(data)
            elif suffix == "cls":
                entry["cls"] = int(data.decode())
    return samples


# ---------------------------------------------------------------------------------------------------------------
# Caching
# ---------------------------------------------------------------------------------------------------------------


def test_cache_stores_center_crop_and_flip_moments_and_a_complete_manifest(tokenizer_dir, latent_dir):
    dataset = _dataset()
    tokenizer = load_tokenizer(tokenizer_dir).eval()
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])  # (N, 3, R, R)
    labels = [dataset[i][1] for i in range(len(dataset))]
    with torch.no_grad():
        plain = tokenizer.encode_posterior(images)
        flipped = tokenizer.encode_posterior(images.flip(-1))

    manifest = load_manifest(str(latent_dir))
    assert manifest["num_samples"] == len(dataset) == 8 * CROPS_PER_CLASS
    assert manifest["latent_shape"] == [4, RESOLUTION // 4, RESOLUTION // 4] and manifest["latent_dtype"] == "float32"
    assert manifest["class_names"] == dataset.class_names and manifest["num_classes"] == 8
    assert manifest["tokenizer"]["weights_sha256"] == hashlib.sha256(
        (tokenizer_dir / "model.safetensors").read_bytes()).hexdigest()
    assert manifest["tokenizer"]["config"]["model_type"] == "eps_vae"
    assert [s["count"] for s in manifest["shards"]] == [10, 10, 4] and manifest["skipped"] == []
    for shard in manifest["shards"]:
        assert shard["sha256"] == file_sha256(str(latent_dir / shard["name"]))

    seen = {}
    for shard in manifest["shards"]:
        seen.update(_read_shard(latent_dir / shard["name"]))
    assert sorted(seen) == [sample_key(i) for i in range(len(dataset))]
    for index in (0, 7, len(dataset) - 1):
        entry = seen[sample_key(index)]
        assert entry["cls"] == labels[index]
        torch.testing.assert_close(entry["moments"]["mean"], plain.mean[index], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(entry["moments"]["logvar"], plain.logvar[index], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(entry["moments"]["mean_flip"], flipped.mean[index], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(entry["moments"]["logvar_flip"], flipped.logvar[index], atol=1e-5, rtol=1e-4)

    # Per-channel stats of posterior samples of crops and flips, recomputed in float64: mean of the means,
    # variance = Var(mean) + E[σ²] (what the DiT trains on).
    both = torch.cat([plain.mean, flipped.mean]).double()  # (2N, C, h, w)
    variances = torch.cat([plain.logvar, flipped.logvar]).double().exp()  # (2N, C, h, w)
    expected_mean = both.mean(dim=(0, 2, 3))
    expected_std = (both.transpose(0, 1).flatten(1).var(dim=1, unbiased=False) + variances.mean(dim=(0, 2, 3))).sqrt()
    torch.testing.assert_close(torch.tensor(manifest["latent_mean"], dtype=torch.float64), expected_mean,
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(manifest["latent_std"], dtype=torch.float64), expected_std,
                               atol=1e-5, rtol=1e-4)
    assert manifest["stats_source"].startswith("posterior samples")
    assert manifest["source"]["crop"] == "center" and manifest["source"]["crops_per_image"] == 1


def test_random_crops_are_seeded_per_image_resumable_and_pinned(tokenizer_dir, latent_dir, tmp_path):
    """--crop random: crops_per_image seeded crops per image (with their flips), the same whatever the batch
    size; a lost shard is redone identically; cache_info refuses a rerun with another crop mode or seed."""
    from data.transforms import CacheCrops
    from pipelines.cache_latents import _pil_from_pm1

    config = _cache_config(tokenizer_dir, tmp_path / "random", crop="random", crops_per_image=2, seed=5)
    manifest = cache_latents(config).manifest
    dataset = _dataset()
    assert manifest["num_samples"] == 2 * len(dataset)
    assert manifest["source"]["crop"] == "random" and manifest["source"]["crops_per_image"] == 2
    assert manifest["source"]["crop_seed"] == 5
    info = json.loads((tmp_path / "random" / "cache_info.json").read_text())
    assert (info["crop"], info["crops_per_image"], info["crop_seed"]) == ("random", 2, 5)
    seen = {}
    for shard in manifest["shards"]:
        seen.update(_read_shard(tmp_path / "random" / shard["name"]))
    assert sorted(seen) == sorted(f"{sample_key(i)}_c{j}" for i in range(len(dataset)) for j in range(2))

    # Crop j of image i is CacheCrops' seeded crop of that image: re-encode two of them directly.
    crops, tokenizer = CacheCrops(RESOLUTION, "random", 2, seed=5), load_tokenizer(tokenizer_dir).eval()
    base = sample_key(7)
    pil = _pil_from_pm1(dataset[7][0])
    images = torch.stack([crops(pil, base, 0), crops(pil, base, 1)])
    assert not torch.equal(images[0], images[1])
    with torch.no_grad():
        posterior = tokenizer.encode_posterior(images)
    for j in range(2):
        torch.testing.assert_close(seen[f"{base}_c{j}"]["moments"]["mean"], posterior.mean[j], atol=1e-5, rtol=1e-4)

    # Another batch size gives the same crops; a lost shard is redone with the same contents.
    reset_accelerate()
    other = cache_latents(_cache_config(tokenizer_dir, tmp_path / "random_b3", crop="random", crops_per_image=2,
                                        seed=5, batch_size=3)).manifest
    torch.testing.assert_close(torch.tensor(other["latent_std"]), torch.tensor(manifest["latent_std"]))
    lost = tmp_path / "random" / manifest["shards"][1]["name"]
    lost.unlink()
    Path(str(lost) + ".json").unlink()
    reset_accelerate()
    redone = cache_latents(config)
    assert redone.encoded == 10 and redone.manifest["num_samples"] == manifest["num_samples"]
    torch.testing.assert_close(torch.tensor(redone.manifest["latent_std"]), torch.tensor(manifest["latent_std"]))

    # The crop settings and the encoder's precision are pinned in cache_info.json, also for a cache made before
    # they existed.
    for changes, name in (({"crop": "center", "crops_per_image": 1}, "crop"), ({"seed": 6}, "crop_seed"),
                          ({"precision": "fp16"}, "encoder_precision")):
        reset_accelerate()
        with pytest.raises(ValueError, match=name):
            cache_latents(dataclasses.replace(config, **changes))
    legacy = tmp_path / "legacy"
    shutil.copytree(latent_dir, legacy)
    info = json.loads((legacy / "cache_info.json").read_text())
    for key in ("crop", "crops_per_image", "crop_seed", "encoder_precision", "compile"):
        info.pop(key)
    (legacy / "cache_info.json").write_text(json.dumps(info))
    reset_accelerate()
    assert cache_latents(_cache_config(tokenizer_dir, legacy)).encoded == 0  # center crops: accepted
    reset_accelerate()
    with pytest.raises(ValueError, match="crop"):
        cache_latents(_cache_config(tokenizer_dir, legacy, crop="random", crops_per_image=2))
    with pytest.raises(ValueError, match="crop='random'"):
        CacheLatentsConfig(tokenizer="x", crops_per_image=2)
    with pytest.raises(ValueError, match="crop must be"):
        CacheLatentsConfig(tokenizer="x", crop="five")


def test_compiled_encoder_caches_the_eager_latents(tokenizer_dir, latent_dir, tmp_path, monkeypatch):
    """`--compile` runs the encoder through torch.compile (traced with `aot_eager`: the same graphs without C++
    code generation) and stores what the eager encoder stored, within float tolerance."""
    import pipelines.kit.compiling as compiling
    from torch._dynamo.utils import counters

    monkeypatch.setattr(compiling, "COMPILE_BACKEND", "aot_eager")
    before = int(counters["stats"]["unique_graphs"])
    cache_latents(_cache_config(tokenizer_dir, tmp_path / "compiled", compile=True))
    assert int(counters["stats"]["unique_graphs"]) > before
    with pytest.raises(ValueError, match="compile"):  # an eager rerun never adds latents to the compiled cache
        cache_latents(_cache_config(tokenizer_dir, tmp_path / "compiled"))
    eager, compiled = {}, {}
    for folder, found in ((latent_dir, eager), (tmp_path / "compiled", compiled)):
        for shard in sorted(folder.glob("*.tar")):
            found.update(_read_shard(shard))
    assert compiled.keys() == eager.keys() and len(eager) > 0
    for key, entry in eager.items():
        assert compiled[key]["cls"] == entry["cls"]
        for name, value in entry["moments"].items():
            torch.testing.assert_close(compiled[key]["moments"][name], value, rtol=1e-4, atol=1e-5)


def test_rerun_skips_complete_shards_and_redoes_only_missing_ones(tokenizer_dir, latent_dir, tmp_path):
    work = tmp_path / "latents"
    shutil.copytree(latent_dir, work)
    before = (work / "manifest.json").read_text()
    mtimes = {p.name: p.stat().st_mtime_ns for p in work.glob("*.tar")}

    result = cache_latents(_cache_config(tokenizer_dir, work))
    assert result.encoded == 0
    assert (work / "manifest.json").read_text() == before
    assert {p.name: p.stat().st_mtime_ns for p in work.glob("*.tar")} == mtimes

    # Lose one completed shard (and its sidecar): only its 10 samples are encoded again.
    (work / "rank00000-000001.tar").unlink()
    (work / "rank00000-000001.tar.json").unlink()
    reset_accelerate()
    result = cache_latents(_cache_config(tokenizer_dir, work))
    old, new = json.loads(before), result.manifest
    assert result.encoded == 10 and new["num_samples"] == old["num_samples"]
    assert sorted(s["count"] for s in new["shards"]) == [4, 10, 10]
    for name in ("latent_mean", "latent_std"):
        torch.testing.assert_close(torch.tensor(new[name]), torch.tensor(old[name]), atol=1e-6, rtol=1e-5)


def test_rerun_with_another_tokenizer_is_refused(tokenizer_dir, latent_dir, tmp_path):
    work = tmp_path / "latents"
    shutil.copytree(latent_dir, work)
    other = tmp_path / "other_tokenizer"
    torch.manual_seed(1)
    EpsVAE.from_preset("tiny", "tiny").save_pretrained(other)
    with pytest.raises(ValueError, match="tokenizer_weights_sha256"):
        cache_latents(_cache_config(other, work))


def _run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, f"scripts/{script}", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_verify_names_the_damaged_shard_and_exits_2(latent_dir, tmp_path):
    work = tmp_path / "latents"
    shutil.copytree(latent_dir, work)
    ok = _run_script("cache_latents.py", "--output-dir", str(work), "--verify")
    assert ok.returncode == 0, ok.stderr
    shard = work / "rank00000-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # inside the first member's payload
    shard.write_bytes(bytes(data))
    bad = _run_script("cache_latents.py", "--output-dir", str(work), "--verify")
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "rank00000-000001.tar" in bad.stderr and "sha256" in bad.stderr


def test_cli_bad_tokenizer_dir_and_missing_shards_dir_exit_2(tmp_path):
    missing = str(tmp_path / "nope")
    result = _run_script("cache_latents.py", "--tokenizer", missing, "--output-dir", str(tmp_path / "out"),
                         "--cpu")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and missing in result.stderr
    result = _run_script("train_generator.py", "--shards", missing, "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and missing in result.stderr
    result = _run_script("train_generator.py", "--shards", missing, "--model", "DiT-Q/2")
    assert result.returncode == 2 and result.stderr.startswith("error:")


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


def test_train_save_load_round_trip_and_normalisation(tokenizer_dir, latent_dir, tmp_path):
    config = _train_config(latent_dir, tmp_path / "run", max_steps=3, sample_every=3, tokenizer=str(tokenizer_dir))
    trained = train_generator(config)
    manifest = load_manifest(str(latent_dir))
    assert trained.step == 3
    assert trained.num_parameters == sum(p.numel() for p in trained.model.parameters())
    assert (tmp_path / "run" / "samples" / "step_0000003.png").is_file()
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["loss"] > 0 for r in records) and any(k.startswith("loss_q") for k in records[-1])

    loaded = DiT.from_pretrained(trained.model_dir)
    # The stored config carries the manifest's shape, classes and normalisation stats.
    assert (loaded.config.input_size, loaded.config.in_channels, loaded.config.num_classes) == (8, 4, 8)
    assert loaded.config.latent_mean == tuple(manifest["latent_mean"])
    assert loaded.config.latent_std == tuple(manifest["latent_std"])
    # model.safetensors holds the EMA weights; the raw weights differ after training.
    ema_state = trained.ema.state_dict()
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, ema_state[name].to(value.dtype), rtol=0, atol=0)
    assert any(not torch.equal(trained.model.state_dict()[n].cpu(), ema_state[n].cpu()) for n in ema_state)

    # Normalise → denormalise is the identity, and the reader's normalised latents are the DiT's normalisation.
    options = dict(resampled=False, shuffle_buffer=0, seed=5)
    raw = next(iter(LatentShardDataset(str(latent_dir), normalize=False, **options)))[0][None]  # (1, C, h, w)
    normed = next(iter(LatentShardDataset(str(latent_dir), normalize=True, **options)))[0][None]
    torch.testing.assert_close(loaded.normalize_latents(raw), normed, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loaded.denormalize_latents(loaded.normalize_latents(raw)), raw, atol=1e-5, rtol=1e-5)

    # Sampling: per-sample seeds give the same latent whatever the batch.
    generators = [torch.Generator().manual_seed(s) for s in (11, 12)]
    pair = generate_latents(loaded, torch.tensor([0, 5]), 4, generators)
    alone = generate_latents(loaded, torch.tensor([5]), 4, [torch.Generator().manual_seed(12)])
    assert pair.shape == (2, 4, 8, 8) and torch.isfinite(pair).all()
    torch.testing.assert_close(pair[1:], alone, atol=1e-5, rtol=1e-5)


def test_resumed_run_continues_from_the_checkpoint_step(latent_dir, tmp_path):
    run = tmp_path / "run"
    train_generator(_train_config(latent_dir, run, max_steps=2, checkpoint_every=1))
    reset_accelerate()
    first_checkpoint = CheckpointManager(run / "checkpoints").resolve("auto")
    first_weights = (first_checkpoint / "model_dit.safetensors").read_bytes()
    resumed = train_generator(_train_config(latent_dir, run, max_steps=4, checkpoint_every=1, resume="auto"))
    assert resumed.step == 4
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3, 4]
    final = CheckpointManager(run / "checkpoints").resolve("auto")
    meta = json.loads((final / "meta.json").read_text())
    assert meta["step"] == 4 and meta["data_state"]["stream_seed"] == stream_seed(0, 2)
    # Adam's step counter went on from 2 (the optimiser state was restored, not rebuilt).
    optimizer_state = torch.load(final / "optimizer_dit.pt", weights_only=True)
    assert {int(s["step"]) for s in optimizer_state["state"].values()} == {4}
    assert (final / "model_dit.safetensors").read_bytes() != first_weights


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown model"):
        GeneratorTrainConfig.from_flat(model="DiT-Q/2")
    with pytest.raises(ValueError, match="override"):
        GeneratorTrainConfig.from_flat(model_overrides={"dropout": 0.1})
    with pytest.raises(ValueError, match="tokenizer"):
        CacheLatentsConfig(tokenizer=None)
    assert dataclasses.asdict(GeneratorTrainConfig())["optim"]["adam_betas"] == (0.9, 0.999)


# ---------------------------------------------------------------------------------------------------------------
# Two processes under `accelerate launch` (gloo on CPU)
# ---------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_two(*args: str) -> None:
    accelerate_bin = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    # `--cpu --num_processes 2` starts ONE process in accelerate 1.x; --multi_gpu goes through torchrun and the
    # script's cpu=True picks gloo.
    command = [str(accelerate_bin), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), *args]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_two_process_cache_writes_disjoint_shards_and_merges_the_same_stats(tokenizer_dir, latent_dir, tmp_path):
    out = tmp_path / "latents2"
    _launch_two("scripts/cache_latents.py", "--tokenizer", str(tokenizer_dir), "--data", "offline",
                "--resolution", str(RESOLUTION), "--crops-per-class", str(CROPS_PER_CLASS), "--per-process-batch-size", "5",
                "--num-workers", "0", "--samples-per-shard", "10", "--output-dir", str(out), "--cpu",
                "--verify")
    manifest, single = load_manifest(str(out)), load_manifest(str(latent_dir))
    names = [s["name"] for s in manifest["shards"]]
    by_rank = [{n for n in names if n.startswith(f"rank0000{r}-")} for r in (0, 1)]
    assert by_rank[0] and by_rank[1] and not by_rank[0] & by_rank[1] and len(names) == len(set(names))
    keys = []
    for name in names:
        keys += list(_read_shard(out / name))
    assert sorted(keys) == [sample_key(i) for i in range(single["num_samples"])]  # every image exactly once
    assert manifest["num_samples"] == single["num_samples"]
    for name in ("latent_mean", "latent_std"):
        torch.testing.assert_close(torch.tensor(manifest[name]), torch.tensor(single[name]), atol=1e-5, rtol=1e-4)


_TWO_RANK_TRAIN = textwrap.dedent(
    """
    import hashlib, sys
    from pathlib import Path
    import torch
    from pipelines.train_generator import GeneratorTrainConfig, train_generator

    shards, out = sys.argv[1], Path(sys.argv[2])
    config = GeneratorTrainConfig.from_flat(shards=shards, output_dir=str(out), model="DiT-S/2",
                                  model_overrides={"depth": 2, "hidden_size": 64, "num_heads": 2}, batch_size=8,
                                  num_workers=0, shuffle_buffer=8, max_steps=2, log_every=1, ema_decay=0.9,
                                  cpu=True, collective_timeout_s=120)
    trained = train_generator(config)
    digest = hashlib.sha256()
    for name, tensor in sorted(trained.model.state_dict().items()):
        digest.update(name.encode()); digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    rank = torch.distributed.get_rank()
    (out / f"weights_rank{rank}.txt").write_text(f"{trained.step} {digest.hexdigest()}")
    """
)


@pytest.mark.slow
def test_two_process_training_keeps_ranks_identical(latent_dir, tmp_path):
    script = tmp_path / "two_rank_train.py"
    script.write_text(_TWO_RANK_TRAIN)
    out = tmp_path / "run"
    out.mkdir()
    _launch_two(str(script), str(latent_dir), str(out))
    ranks = [(out / f"weights_rank{r}.txt").read_text().split() for r in (0, 1)]
    assert ranks[0][0] == ranks[1][0] == "2"
    assert ranks[0][1] == ranks[1][1]  # DDP kept both ranks' weights identical
    initial = DiT.from_pretrained(out / "model").config
    assert initial.latent_std == tuple(load_manifest(str(latent_dir))["latent_std"])
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]


def test_folder_source_records_bad_files_once_and_webdataset_source_matches(tokenizer_dir, tmp_path):
    import webdataset as wds

    from data.offline import export_offline_photos

    root = Path(export_offline_photos(str(tmp_path / "folder"), resolution=RESOLUTION, train_crops_per_class=2,
                                      val_crops_per_class=1))
    class_dir = sorted((root / "train").iterdir())[0]
    (class_dir / "zero_bytes.png").write_bytes(b"")  # caught by the folder's index-time scan
    good_png = next(class_dir.glob("*.png")).read_bytes()
    (class_dir / "truncated.png").write_bytes(good_png[: len(good_png) // 2])  # valid header, broken pixels
    config = _cache_config(tokenizer_dir, tmp_path / "from_folder", data=str(root), crops_per_class=None)
    manifest = cache_latents(config).manifest
    assert manifest["num_samples"] == 16
    skipped = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == {"zero_bytes.png", "truncated.png"} and "empty" in skipped["zero_bytes.png"]
    reset_accelerate()
    rerun = cache_latents(config)
    assert rerun.encoded == 0 and rerun.manifest == manifest  # skips are not recorded twice

    # The same crops as webdataset image shards (two shards, classes.txt beside them) give the same latents.
    shard_dir = tmp_path / "image_shards"
    shard_dir.mkdir()
    dataset = build_image_dataset(str(root), "train", RESOLUTION, train=False)
    for shard_index in range(2):
        with wds.TarWriter(str(shard_dir / f"train-{shard_index:03d}.tar")) as sink:
            for index in range(shard_index, len(dataset), 2):
                path, label = dataset.samples[index]
                sink.write({"__key__": Path(path).stem, "png": Path(path).read_bytes(), "cls": str(label).encode()})
    (shard_dir / "classes.txt").write_text("\n".join(dataset.class_names) + "\n")
    reset_accelerate()
    from_shards = cache_latents(_cache_config(tokenizer_dir, tmp_path / "from_shards",
                                              data=str(shard_dir / "train-{000..001}.tar"), crops_per_class=None))
    assert from_shards.manifest["num_samples"] == 16 and from_shards.manifest["class_names"] == dataset.class_names
    for name in ("latent_mean", "latent_std"):
        torch.testing.assert_close(torch.tensor(from_shards.manifest[name]), torch.tensor(manifest[name]),
                                   atol=1e-5, rtol=1e-4)
