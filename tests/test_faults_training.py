"""Training under faults: `kill -9` at several moments, damaged checkpoints, a full disk, non-finite losses.

Kills run the real scripts in subprocesses and crash them with SIGKILL, either from inside at a deterministic
critical point (`EPSVAE_FAULT`, see `pipelines.kit.faults`) or from outside at a random moment. Restarts run the same
command with `--resume auto` through the script's own `main` in this process (same code path as the CLI, without
paying the start-up again). The reference is always an uninterrupted run of the same command, compared
bit for bit (CPU, one thread everywhere, map-style data: stage 1 replays exactly).
"""
from __future__ import annotations

import errno
import importlib.util
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelines.kit.checkpoints import CheckpointManager, verify_checkpoint
from _cli import run_main
from pipelines.kit.logging import read_jsonl
from support import cache_tiny_latents, one_torch_thread, reset_accelerate

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_ARGS = [
    "--data", "offline", "--encoder", "tiny", "--decoder", "tiny", "--discriminator", "tiny", "--resolution", "32",
    "--global-batch-size", "4", "--perceptual", "none", "--perceptual-weight", "0", "--num-workers", "0",
    "--warmup-steps", "2", "--log-every", "1", "--image-every", "1000", "--keep-last", "10", "--seed", "3",
    "--r1-interval", "2", "--cpu", "--resume", "auto",
]
MAX_STEPS = 6
CHECKPOINT_EVERY = 2


# ---------------------------------------------------------------------------------------------------------------
# Helpers shared by the tests of this file
# ---------------------------------------------------------------------------------------------------------------


def load_script(name: str):
    """scripts/<name>.py as a module (scripts/ is not a package); its `main` is what the CLI runs."""
    spec = importlib.util.spec_from_file_location(f"_script_{name}", REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli(script: str, argv: list[str]) -> int:
    """Run a script's `main` the way `sys.exit(run_main(main))` does; returns the exit code (argparse exits)."""
    try:
        return run_main(load_script(script).main, [str(a) for a in argv])
    except SystemExit as exit_:
        return exit_.code
    finally:
        reset_accelerate()


def subprocess_env(fault: str | None = None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    env.pop("EPSVAE_FAULT", None)
    if fault:
        env["EPSVAE_FAULT"] = fault
    return env


def run_until_killed(script: str, argv: list[str], log: Path, fault: str | None = None, kill_when=None,
                     kill_delay_s: float = 0.0, timeout: float = 240) -> None:
    """Start scripts/<script>.py; it must die by SIGKILL (its own fault point, or ours once `kill_when()`)."""
    with open(log, "w") as output:
        process = subprocess.Popen([sys.executable, f"scripts/{script}.py", *map(str, argv)], cwd=REPO_ROOT,
                                   env=subprocess_env(fault), stdout=output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        try:
            while kill_when is not None and process.poll() is None and time.monotonic() < deadline:
                if kill_when():
                    time.sleep(kill_delay_s)
                    process.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.02)
            process.wait(timeout=max(deadline - time.monotonic(), 1))
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.returncode == -signal.SIGKILL, f"expected a SIGKILL death, got {process.returncode}:\n" + \
        log.read_text()[-3000:]


@pytest.fixture(autouse=True)
def _one_thread():
    """The killed subprocesses run with OMP_NUM_THREADS=1; the in-process runs must use the same kernels."""
    with one_torch_thread():
        yield


def tokenizer_argv(out: Path, max_steps: int = MAX_STEPS, *extra: str) -> list[str]:
    return [*TOKENIZER_ARGS, "--output-dir", out, "--max-steps", max_steps, "--checkpoint-every", CHECKPOINT_EVERY,
            *extra]


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


def assert_same_run(run: Path, reference: Path, step: int = MAX_STEPS) -> None:
    """Final model and the last checkpoint (weights, EMA, both optimisers) equal the reference bit for bit."""
    assert_same_tensors(load_file(run / "model" / "model.safetensors"),
                        load_file(reference / "model" / "model.safetensors"), "final model")
    name = f"step_{step:09d}"
    for part in ("model_tokenizer", "model_discriminator", "ema_tokenizer"):
        assert_same_tensors(load_file(run / "checkpoints" / name / f"{part}.safetensors"),
                            load_file(reference / "checkpoints" / name / f"{part}.safetensors"), part)
    for part in ("optimizer_generator", "optimizer_discriminator"):
        ours = torch.load(run / "checkpoints" / name / f"{part}.pt", weights_only=True)
        theirs = torch.load(reference / "checkpoints" / name / f"{part}.pt", weights_only=True)
        for index, state in theirs["state"].items():
            for key, value in state.items():
                assert torch.equal(ours["state"][index][key], value), f"{part} state {index}.{key} differs"
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(1, step + 1))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli("train_tokenizer", tokenizer_argv(out)) == 0
    finally:
        torch.set_num_threads(threads)
    return out


# ---------------------------------------------------------------------------------------------------------------
# kill -9 of stage-1 training, three times at three kinds of moments, then finish: bit-identical
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tokenizer_killed_three_times_resumes_to_the_uninterrupted_result(reference_run, tmp_path):
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"

    # 1. Killed while writing the step-4 checkpoint's payload: a partial temporary directory, never a candidate.
    run_until_killed("train_tokenizer", tokenizer_argv(run), tmp_path / "log1.txt", fault="checkpoint_write:2")
    partial = checkpoints / ".tmp-step_000000004"
    assert (partial / "model_tokenizer.safetensors").is_file() and not (partial / "meta.json").exists()
    assert CheckpointManager(checkpoints).resolve("auto") == checkpoints / "step_000000002"

    # 2. Same command: resumes at step 2, killed after the step-4 directory is renamed into place but before
    #    latest.json moved. The pointer still names step 2, and `auto` follows it (the pointer is what says which
    #    checkpoint belongs to the current run), so the next attempt replays steps 3-4 and re-saves step 4.
    run_until_killed("train_tokenizer", tokenizer_argv(run), tmp_path / "log2.txt", fault="checkpoint_publish:1")
    assert not (checkpoints / ".tmp-step_000000004").exists()  # the stale partial directory was cleared
    assert verify_checkpoint(checkpoints / "step_000000004") == []
    assert json.loads((checkpoints / "latest.json").read_text())["dir"] == "step_000000002"

    # 3. Same command: killed from outside at a random moment once this attempt has logged step 4 or later.
    started = time.time()

    def trained_past_step_4() -> bool:
        path = run / "metrics.jsonl"
        return path.is_file() and any(r["step"] >= 4 and r["time"] > started for r in read_jsonl(path))

    run_until_killed("train_tokenizer", tokenizer_argv(run), tmp_path / "log3.txt", kill_when=trained_past_step_4,
                     kill_delay_s=random.Random(os.getpid()).uniform(0.0, 0.4))
    assert not (run / "model").exists()

    # 4. Same command, uninterrupted: finishes, and equals the run that was never killed.
    assert cli("train_tokenizer", tokenizer_argv(run)) == 0
    assert_same_run(run, reference_run)


# ---------------------------------------------------------------------------------------------------------------
# Damaged checkpoints through the real training CLI
# ---------------------------------------------------------------------------------------------------------------


def _copy_checkpoints_up_to(reference: Path, run: Path, last_step: int) -> Path:
    """A run directory holding the reference's checkpoints up to `last_step`, as if it had stopped there."""
    checkpoints = run / "checkpoints"
    checkpoints.mkdir(parents=True)
    for step in range(CHECKPOINT_EVERY, last_step + 1, CHECKPOINT_EVERY):
        shutil.copytree(reference / "checkpoints" / f"step_{step:09d}", checkpoints / f"step_{step:09d}")
    (checkpoints / "latest.json").write_text(json.dumps({"dir": f"step_{last_step:09d}", "step": last_step}))
    return checkpoints


def _flip_byte(path: Path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _delete(path: Path) -> None:  # a directory cut short: one of its files never made it
    path.unlink()


@pytest.mark.parametrize("damage,part", [(_flip_byte, "model_tokenizer.safetensors"),
                                         (_truncate, "optimizer_generator.pt"), (_delete, "rng_rank0.json")])
def test_damaged_newest_checkpoint_is_reported_and_the_previous_one_is_used(reference_run, tmp_path, caplog,
                                                                            damage, part):
    run = tmp_path / "run"
    checkpoints = _copy_checkpoints_up_to(reference_run, run, last_step=4)
    damaged = checkpoints / "step_000000004"
    damage(damaged / part)
    assert any(part in problem for problem in verify_checkpoint(damaged))

    with caplog.at_level(logging.WARNING, logger="pipelines.kit.checkpoints"):
        assert cli("train_tokenizer", tokenizer_argv(run)) == 0
    warnings = [r.getMessage() for r in caplog.records if "damaged checkpoint" in r.getMessage()]
    assert warnings and str(damaged) in warnings[0] and part in warnings[0]
    # Resumed from step 2 (the last good one), replayed 3..6 and overwrote the damaged step 4: same result.
    assert verify_checkpoint(damaged) == []
    name = "step_000000006"
    for file in ("model_tokenizer.safetensors", "ema_tokenizer.safetensors", "model_discriminator.safetensors"):
        assert_same_tensors(load_file(checkpoints / name / file),
                            load_file(reference_run / "checkpoints" / name / file), file)
    assert_same_tensors(load_file(run / "model" / "model.safetensors"),
                        load_file(reference_run / "model" / "model.safetensors"), "final model")


def test_explicitly_named_damaged_checkpoint_is_refused_in_one_line(reference_run, tmp_path, capsys):
    run = tmp_path / "run"
    checkpoints = _copy_checkpoints_up_to(reference_run, run, last_step=4)
    damaged = checkpoints / "step_000000004"
    _flip_byte(damaged / "ema_tokenizer.safetensors")
    capsys.readouterr()
    code = cli("train_tokenizer", [*tokenizer_argv(run), "--resume", damaged])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error:") and str(damaged) in err[0] and "ema_tokenizer.safetensors" in err[0]
    assert not (run / "model").exists() and not (run / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------------------------
# Disk full while writing a checkpoint
# ---------------------------------------------------------------------------------------------------------------


def test_disk_full_during_a_checkpoint_keeps_the_previous_one_and_says_so(reference_run, tmp_path, monkeypatch,
                                                                          capsys):
    import safetensors.torch

    real_save_model = safetensors.torch.save_model
    calls = {"n": 0}

    def save_model_until_full(model, filename, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # two models per checkpoint: the step-4 checkpoint's first file hits a full disk
            real_save_model(model, filename, *args, **kwargs)
            Path(filename).write_bytes(Path(filename).read_bytes()[:10])  # what a full disk leaves behind
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real_save_model(model, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_model", save_model_until_full)
    run = tmp_path / "run"
    capsys.readouterr()
    code = cli("train_tokenizer", tokenizer_argv(run))
    err = capsys.readouterr().err.strip().splitlines()
    checkpoints = run / "checkpoints"
    assert code == 1 and err[-1].startswith("error:") and "disk full" in err[-1], err[-3:]
    assert "step_000000002" in err[-1] and "kept" in err[-1]  # names the checkpoint that is still good
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest.json", "step_000000002"]  # no partial dir
    assert verify_checkpoint(checkpoints / "step_000000002") == []
    assert CheckpointManager(checkpoints).resolve("auto") == checkpoints / "step_000000002"
    assert not (run / "model").exists()

    monkeypatch.setattr(safetensors.torch, "save_model", real_save_model)  # space freed: the same command finishes
    assert cli("train_tokenizer", tokenizer_argv(run)) == 0
    assert_same_run(run, reference_run)


# ---------------------------------------------------------------------------------------------------------------
# Non-finite losses
# ---------------------------------------------------------------------------------------------------------------


def _nan_at(monkeypatch, module, function: str, calls: set[int] | None = None, from_call: int | None = None):
    """Make `module.function`'s loss NaN at the given call numbers (1-based) or from one on."""
    real = getattr(module, function)
    counter = {"n": 0}

    def patched(*args, **kwargs):
        counter["n"] += 1
        result = real(*args, **kwargs)
        poisoned = (calls is not None and counter["n"] in calls) or (from_call is not None and counter["n"] >= from_call)
        if not poisoned:
            return result
        if isinstance(result, tuple):  # generator_losses: (total, terms)
            return (result[0] * float("nan"),) + tuple(result[1:])
        return result * float("nan")

    monkeypatch.setattr(module, function, patched)


def test_tokenizer_skips_a_nan_step_without_counting_it(tmp_path, monkeypatch):
    """The one non-finite policy of `pipelines.kit.loop`: the poisoned micro-batch changes no weight, no LR
    schedule, no EMA and no step count; the next batch makes the update (as in stage 2)."""
    import pipelines.train_tokenizer as stage1

    _nan_at(monkeypatch, stage1, "generator_losses", calls={2})
    run = tmp_path / "run"
    assert cli("train_tokenizer", tokenizer_argv(run, 3, "--checkpoint-every", "1")) == 0
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["nonfinite_skipped"] for r in records] == [0, 1, 1]
    assert all(r["loss"] is not None for r in records)  # every logged update came from a finite batch
    assert [r["lr"] for r in records] == sorted(r["lr"] for r in records)  # warm-up advanced once per update
    step = {s: run / "checkpoints" / f"step_{s:09d}" for s in (1, 2, 3)}
    for part in ("model_tokenizer", "model_discriminator"):  # every counted step changed the weights
        for before, after in ((1, 2), (2, 3)):
            old = load_file(step[before] / f"{part}.safetensors")
            assert any(not torch.equal(v, old[k]) for k, v in load_file(step[after] / f"{part}.safetensors").items())
    assert all(torch.isfinite(v).all() for v in load_file(run / "model" / "model.safetensors").values())


def test_too_many_nans_in_a_row_stop_with_a_clear_message_and_a_usable_checkpoint(tmp_path, monkeypatch, capsys):
    import pipelines.train_tokenizer as stage1

    _nan_at(monkeypatch, stage1, "generator_losses", from_call=3)
    run = tmp_path / "run"
    argv = tokenizer_argv(run, 8, "--checkpoint-every", "1", "--max-nonfinite", "3")
    capsys.readouterr()
    code = cli("train_tokenizer", argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("error:") and "non-finite for 3 steps in a row" in err[-1], err[-3:]
    assert not (run / "model").exists()
    checkpoints = run / "checkpoints"
    last = CheckpointManager(checkpoints).resolve("auto")
    assert last is not None and verify_checkpoint(last) == []
    assert json.loads((last / "meta.json").read_text())["step"] == 2  # batches 3-5 were skipped, then it stopped
    assert all(torch.isfinite(v).all() for v in load_file(last / "model_tokenizer.safetensors").values())

    monkeypatch.undo()  # the cause is gone (e.g. a lower learning rate): the same command resumes and finishes
    assert cli("train_tokenizer", argv) == 0
    assert json.loads((run / "model" / "training.json").read_text())["ema_decay"] > 0
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9)) and records[-1]["loss"] is not None


# ---------------------------------------------------------------------------------------------------------------
# Stage 2: kill -9 during a checkpoint write, NaN steps
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory) -> Path:
    return cache_tiny_latents(tmp_path_factory, samples_per_shard=8)


def generator_argv(shards: Path, out: Path, max_steps: int = 6, *extra: str) -> list[str]:
    return ["--shards", shards, "--output-dir", out, "--model", "DiT-S/2", "--depth", "1", "--hidden-size", "32",
            "--num-heads", "2", "--global-batch-size", "4", "--num-workers", "0", "--shuffle-buffer", "8",
            "--max-steps", max_steps, "--checkpoint-every", "2", "--log-every", "1", "--ema-decay", "0.9",
            "--cpu", "--resume", "auto", *extra]


@pytest.mark.slow
def test_generator_killed_during_a_checkpoint_resumes_to_a_valid_model(latent_dir, tmp_path):
    """Stage 2 streams from *resampled* shards: the stream's position is not saved, so a resumed run restarts it
    with `stream_seed(seed, step)` and draws different latents than the uninterrupted run would have. Model,
    EMA, optimiser, schedule and RNG are restored exactly, but the data differs, so the weights are not expected
    to be bit-identical to an uninterrupted run: the test asks for a finished, loadable, finite model."""
    from generator.dit import DiT

    run = tmp_path / "run"
    run_until_killed("train_generator", generator_argv(latent_dir, run), tmp_path / "log.txt",
                     fault="checkpoint_write:2")
    checkpoints = run / "checkpoints"
    assert (checkpoints / ".tmp-step_000000004").is_dir() and not (run / "model").exists()
    assert CheckpointManager(checkpoints).resolve("auto") == checkpoints / "step_000000002"

    assert cli("train_generator", generator_argv(latent_dir, run)) == 0
    assert not list(checkpoints.glob(".tmp-*"))
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    training = json.loads((run / "model" / "training.json").read_text())
    assert training["step"] == 6
    dit = DiT.from_pretrained(run / "model")
    assert all(torch.isfinite(p).all() for p in dit.parameters())
    resumed_from = load_file(checkpoints / "step_000000002" / "model_dit.safetensors")
    assert any(not torch.equal(p, resumed_from[k]) for k, p in load_file(checkpoints / "step_000000006" /
                                                                         "model_dit.safetensors").items())


def test_generator_skips_and_counts_nan_steps_then_stops_after_too_many(latent_dir, tmp_path, monkeypatch, capsys):
    import pipelines.train_generator as stage2

    _nan_at(monkeypatch, stage2, "epsilon_loss", calls={2})
    run = tmp_path / "run"
    assert cli("train_generator", generator_argv(latent_dir, run, 2)) == 0
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and records[-1]["nonfinite_skipped"] == 1  # the step was redone

    monkeypatch.undo()
    _nan_at(monkeypatch, stage2, "epsilon_loss", from_call=2)
    run = tmp_path / "diverged"
    capsys.readouterr()
    code = cli("train_generator", generator_argv(latent_dir, run, 6, "--max-nonfinite", "2", "--checkpoint-every",
                                                 "1"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "non-finite for 2 steps in a row" in err[-1]
    last = CheckpointManager(run / "checkpoints").resolve("auto")
    assert last is not None and json.loads((last / "meta.json").read_text())["step"] == 1
    assert not (run / "model").exists()


def test_fault_spec_is_parsed_strictly_and_does_nothing_when_unset(monkeypatch):
    from pipelines.kit.faults import FAULT_ENV, fault_point, parse_fault_spec

    assert parse_fault_spec("checkpoint_write:2, train_step:3@1/stop") == {
        "checkpoint_write": (2, None, "kill"), "train_step": (3, 1, "stop")}
    for bad in ("checkpoint_write", "checkpoint_write:0", "chekpoint_write:1", "train_step:1@x", "train_step:1/pause"):
        with pytest.raises(ValueError, match=FAULT_ENV):
            parse_fault_spec(bad)
    monkeypatch.delenv(FAULT_ENV, raising=False)
    fault_point("checkpoint_write")  # unset: returns, this process lives on
    monkeypatch.setenv(FAULT_ENV, "train_step:1@7")
    fault_point("train_step")  # another rank's fault
