"""Every script under `accelerate launch` with two CPU processes (the torchrun path, gloo) gives what one
process gives.

`accelerate launch --cpu --num_processes 2` starts a single process in accelerate 1.x; `--multi_gpu` goes through
torchrun, and the scripts' CPU flag makes both ranks use gloo on the CPU. Every process runs one OpenMP thread,
as do the one-process references, so kernels reduce in the same order and results can be compared exactly.

| script | compared | tolerance and why |
|---|---|---|
| sample.py | every PNG, byte for byte; world_size recorded | none: per-image seeds |
| cache_latents.py | every sample's moments by key; manifest statistics | moments exact; statistics 1e-6 relative: the ranks' float64 sums are added in another order |
| train_tokenizer.py | a run resumed with another process count | loads and finishes (checkpoints hold every rank's RNG) |
| train_generator.py | losses of the same global batch size | finite, within 30%: each rank draws its own noise and time |
| evaluate.py recon / fid / pipeline | the reports | none (tests/test_evaluate_distributed.py and here) |
| benchmark.py tokenizer (studies) | each run's rFD | 5%: as training, per-rank noise |
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.kit.logging import read_jsonl
from support import cache_tiny_latents

REPO_ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(script: str, args: list, processes: int, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run scripts/<script> with `processes` ranks (1: plain python), one thread each; raises on failure."""
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'scripts'}", "OMP_NUM_THREADS": "1"}
    env.pop("EPSVAE_FAULT", None)
    args = [str(a) for a in args]
    if processes == 1:
        command = [sys.executable, f"scripts/{script}", *args]
    else:
        command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(_free_port()), f"scripts/{script}", *args]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    return done


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny tokenizer, its cached latents and a 2-step DiT trained on them."""
    from pipelines.train_generator import GeneratorTrainConfig, train_generator
    from support import reset_accelerate

    latents = cache_tiny_latents(tmp_path_factory, samples_per_shard=4)
    tokenizer = json.loads((latents / "manifest.json").read_text())["tokenizer"]
    run = tmp_path_factory.mktemp("dit")
    train_generator(GeneratorTrainConfig.from_flat(
        shards=str(latents), output_dir=str(run), model="DiT-S/2",
        model_overrides={"depth": 1, "hidden_size": 32, "num_heads": 2}, batch_size=4, num_workers=0,
        shuffle_buffer=8, max_steps=2, sample_every=1000, cpu=True))
    reset_accelerate()
    tokenizer_dir = next(p for p in tmp_path_factory.getbasetemp().glob("tokenizer*") if p.is_dir())
    assert tokenizer["weights_sha256"]
    return {"tokenizer": tokenizer_dir, "generator": run / "model", "latents": latents}


def test_sampling_two_processes_writes_the_same_pngs(models, tmp_path):
    args = ["--generator", models["generator"], "--tokenizer", models["tokenizer"], "--classes", "0,1,2",
            "--per-class", "2", "--ddpm-steps", "5", "--per-process-batch-size", "2", "--cpu"]
    _run("sample.py", [*args, "--output-dir", tmp_path / "one"], 1)
    _run("sample.py", [*args, "--output-dir", tmp_path / "two"], 2)
    one = {p.name: p.read_bytes() for p in (tmp_path / "one").glob("0*.png")}
    two = {p.name: p.read_bytes() for p in (tmp_path / "two").glob("0*.png")}
    assert len(one) == 6 and one == two
    assert json.loads((tmp_path / "two" / "sampling.json").read_text())["world_size"] == 2
    with np.load(tmp_path / "one" / "samples.npz") as a, np.load(tmp_path / "two" / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])


def _latents_by_key(directory: Path) -> dict[str, dict[str, torch.Tensor]]:
    """key → moments of every sample in every shard, read with tarfile (whatever rank wrote it)."""
    import tarfile

    from safetensors.torch import load as load_safetensors

    found = {}
    for shard in sorted(directory.glob("*.tar")):
        with tarfile.open(shard) as archive:
            for member in archive.getmembers():
                key, _, field = member.name.partition(".")
                if field.startswith("latent"):
                    found[key] = load_safetensors(archive.extractfile(member).read())
    return found


def test_caching_two_processes_stores_the_same_latents(models, tmp_path):
    args = ["--tokenizer", models["tokenizer"], "--data", "offline", "--resolution", "32", "--crops-per-class", "2",
            "--per-process-batch-size", "4", "--num-workers", "0", "--samples-per-shard", "3", "--cpu"]
    _run("cache_latents.py", [*args, "--output-dir", tmp_path / "one"], 1)
    _run("cache_latents.py", [*args, "--output-dir", tmp_path / "two"], 2)
    one, two = _latents_by_key(tmp_path / "one"), _latents_by_key(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) == 16
    for key, moments in one.items():
        for name, value in moments.items():
            assert torch.equal(value, two[key][name]), (key, name)
    manifest_one = json.loads((tmp_path / "one" / "manifest.json").read_text())
    manifest_two = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest_one["num_samples"] == manifest_two["num_samples"] == 16
    for stat in ("latent_mean", "latent_std"):
        np.testing.assert_allclose(manifest_two[stat], manifest_one[stat], rtol=1e-6)


def test_training_two_processes_same_global_batch_and_resume_across_process_counts(models, tmp_path):
    common = ["--shards", models["latents"], "--model", "DiT-S/2", "--depth", "1", "--hidden-size", "32",
              "--num-heads", "2", "--global-batch-size", "8", "--num-workers", "0", "--shuffle-buffer", "4",
              "--log-every", "1", "--checkpoint-every", "1", "--cpu", "--resume", "auto"]
    _run("train_generator.py", [*common, "--output-dir", tmp_path / "one", "--max-steps", "2"], 1)
    _run("train_generator.py", [*common, "--output-dir", tmp_path / "two", "--max-steps", "2"], 2)
    losses_one = [r["loss"] for r in read_jsonl(tmp_path / "one" / "metrics.jsonl")]
    losses_two = [r["loss"] for r in read_jsonl(tmp_path / "two" / "metrics.jsonl")]
    assert len(losses_one) == len(losses_two) == 2
    assert all(np.isfinite(losses_two)) and np.allclose(losses_two, losses_one, rtol=0.3)
    meta = json.loads((tmp_path / "two" / "checkpoints" / "step_000000002" / "meta.json").read_text())
    assert meta["world_size"] == 2

    # Two processes wrote it; one process resumes it and finishes.
    _run("train_generator.py", [*common, "--output-dir", tmp_path / "two", "--max-steps", "3"], 1)
    assert [r["step"] for r in read_jsonl(tmp_path / "two" / "metrics.jsonl")] == [1, 2, 3]
    assert json.loads((tmp_path / "two" / "model" / "training.json").read_text())["step"] == 3

    tokenizer_args = ["--encoder", "tiny", "--decoder", "tiny", "--discriminator", "tiny", "--data", "offline",
                      "--resolution", "32", "--global-batch-size", "4", "--num-workers", "0", "--perceptual", "none",
                      "--perceptual-weight", "0", "--checkpoint-every", "1", "--log-every", "1", "--cpu",
                      "--resume", "auto", "--output-dir", tmp_path / "tok"]
    _run("train_tokenizer.py", [*tokenizer_args, "--max-steps", "1"], 2)
    _run("train_tokenizer.py", [*tokenizer_args, "--max-steps", "2"], 1)
    assert [r["step"] for r in read_jsonl(tmp_path / "tok" / "metrics.jsonl")] == [1, 2]


def test_a_missing_file_is_one_line_per_rank_in_bounded_time(models, tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'scripts'}", "OMP_NUM_THREADS": "1"}
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(_free_port()), "scripts/sample.py", "--generator", str(tmp_path / "nope"), "--tokenizer",
               str(models["tokenizer"]), "--output-dir", str(tmp_path / "s"), "--cpu"]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 2 and all("does not exist" in line for line in ours), done.stderr[-2000:]
    # The launcher prints its own failure summary; nothing of ours raised a traceback.
    assert not any(f"{REPO_ROOT}/scripts" in line or f"{REPO_ROOT}/pipelines" in line
                   for line in done.stderr.splitlines() if line.strip().startswith("File "))


def test_pipeline_evaluation_two_processes_scores_like_one(models, tmp_path):
    """`evaluate.py pipeline`: every rank samples its share and extracts features of its share of the samples."""
    args = ["pipeline", "--generator", models["generator"], "--tokenizer", models["tokenizer"], "--classes", "0,1,2",
            "--per-class", "2", "--ddpm-steps", "4", "--per-process-batch-size", "2", "--reference", "offline",
            "--reference-num-images", "8", "--features", "effnet-l0", "--no-use-cache", "--num-workers", "0",
            "--cpu"]
    _run("evaluate.py", [*args, "--output-dir", tmp_path / "one"], 1)
    _run("evaluate.py", [*args, "--output-dir", tmp_path / "two"], 2)
    one = json.loads((tmp_path / "one" / "pipeline.json").read_text())["metrics"]
    two = json.loads((tmp_path / "two" / "pipeline.json").read_text())["metrics"]
    for report in (one, two):
        report.pop("seconds"), report.pop("samples")  # wall time and the folder differ, nothing else
    assert one["num_samples"] == 6 and one == two


def test_a_study_runs_on_two_processes_with_rank_zero_reporting(tmp_path):
    """The micro γ study: the other rank joins training only; rank 0 evaluates and writes one report. rFD within
    5%: each rank draws its own noise and time (as in training), so the trained weights differ slightly."""
    args = ["tokenizer", "--study", "gamma", "--profile", "micro", "--cpu"]
    _run("benchmark.py", [*args, "--output-dir", tmp_path / "one"], 1)
    done = _run("benchmark.py", [*args, "--output-dir", tmp_path / "two"], 2)
    assert done.stdout.count("wrote") == 1
    one = json.loads((tmp_path / "one" / "gamma" / "results.json").read_text())["runs"]
    two = json.loads((tmp_path / "two" / "gamma" / "results.json").read_text())["runs"]
    assert [r["name"] for r in one] == [r["name"] for r in two]
    for first, second in zip(one, two):
        assert first["training"]["steps"] == second["training"]["steps"]
        np.testing.assert_allclose([e["rfd"] for e in second["evaluations"]], [e["rfd"] for e in first["evaluations"]],
                                   rtol=0.05)
