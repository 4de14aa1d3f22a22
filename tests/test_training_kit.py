"""Shared training kit: resume equivalence, crash/corruption/disk-full safety, EMA math, warmup, guard, logging.

`_train` below is the template the real training loops follow: accelerator → model/EMA/optimiser/scheduler →
prepare → resolve + load → epoch loop with the data position restored → save every few steps.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipelines.kit.checkpoints import (
    LATEST_FILE,
    META_FILE,
    TMP_PREFIX,
    CheckpointError,
    CheckpointManager,
    read_meta,
)
from pipelines.kit.ema import EMA
from pipelines.kit.logging import MetricsLogger, read_jsonl
from pipelines.kit.loop import (LoopPlan, NonFiniteGuard, NonFiniteLossError, OptimizedModule, StepOutput, clip_gradients,
                                 quartile_losses, run_training_loop)
from pipelines.kit.optim import OptimizerConfig, build_optimizer, param_groups, warmup_factor, warmup_scheduler
from pipelines.kit.run import AcceleratorConfig, make_accelerator

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps process-wide state; reset it so each test builds its accelerator from scratch."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


# ----------------------------------------------------------------------------------------------------------------
# The toy run (template for pipelines/train_*.py)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToyConfig:
    seed: int = 0
    total_steps: int = 11
    batch_size: int = 4
    dataset_size: int = 18  # 4 batches per epoch (drop_last): epochs end mid-run and a resume lands mid-epoch
    warmup_steps: int = 4
    lr: float = 3e-2
    weight_decay: float = 1e-3
    ema_decay: float = 0.9
    grad_clip: float = 0.5
    checkpoint_every: int = 3
    keep_last: int = 2


class ToyDataset(Dataset):
    """Map-style, fully determined by its seed."""

    def __init__(self, size: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(size, 6, generator=g)  # (N, 6)
        self.y = (self.x[:, :1] * 2 - self.x[:, 1:2]).sin()  # (N, 1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]


class ToyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(3, 6)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU(), nn.Dropout(0.3), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 6) → (B, 1)
        return self.net(x + self.embed.weight[0])


class _Killed(Exception):
    """Raised inside the loop to simulate `kill -9` right after an optimiser update."""


def _train(workdir: Path, config: ToyConfig, stop_after: int | None = None, resume: str | None = "auto") -> dict:
    """Train `config.total_steps` optimiser steps through the trainers' loop (`run_training_loop`);
    `stop_after=k` dies right after update k, before its log line and checkpoint (a simulated kill)."""
    accelerator = make_accelerator(AcceleratorConfig(seed=config.seed, cpu=True))
    model = ToyMLP()
    optimizer = build_optimizer(model, OptimizerConfig(lr=config.lr, betas=(0.0, 0.999),
                                                       weight_decay=config.weight_decay))
    scheduler = warmup_scheduler(optimizer, config.warmup_steps)  # stepped by the loop, not prepared
    data_generator = torch.Generator()  # data order depends on (seed, epoch) only, reseeded every epoch
    loader = DataLoader(ToyDataset(config.dataset_size, seed=123), batch_size=config.batch_size, shuffle=True,
                        drop_last=True, generator=data_generator)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    ema = EMA(model, config.ema_decay)  # after prepare: starts from the weights DDP broadcast from rank 0
    manager = CheckpointManager(workdir / "checkpoints", keep_last=config.keep_last, accelerator=accelerator)
    guard = NonFiniteGuard(max_consecutive=3, accelerator=accelerator)
    parts = dict(models={"model": model}, emas={"model": ema}, optimizers={"model": optimizer},
                 schedulers={"model": scheduler})

    step, position = 0, {"epoch": 0, "batches_in_epoch": 0}
    checkpoint = manager.resolve(resume)
    if checkpoint is not None:
        state = manager.load(checkpoint, **parts)
        step, position = state.step, dict(state.data_state)
        guard.load_state_dict(state.extra["guard"])

    def batches():
        while True:
            data_generator.manual_seed(config.seed * 100_003 + position["epoch"])
            skipped = position["batches_in_epoch"]
            for batch in (accelerator.skip_first_batches(loader, skipped) if skipped else loader):
                position["batches_in_epoch"] += 1
                yield batch
            position["epoch"], position["batches_in_epoch"] = position["epoch"] + 1, 0

    def body(batch, _step: int) -> StepOutput:
        x, y = batch
        loss = (model(x) - y).pow(2).mean()
        return StepOutput(losses=[loss], batch_size=x.shape[0], scalars={"loss": loss.detach()})

    def die_if_asked(update: int) -> None:
        if update == stop_after:
            raise _Killed

    def save(update: int) -> None:
        manager.save(update, **parts, data_state=dict(position), config=asdict(config),
                     extra={"guard": guard.state_dict()})

    metrics = MetricsLogger(workdir / "metrics.jsonl", accelerator=accelerator, total_steps=config.total_steps,
                            initial_step=step)
    try:
        result = run_training_loop(
            accelerator, batches(), body, [OptimizedModule("model", model, optimizer, scheduler, config.grad_clip,
                                                           ema, model)],
            LoopPlan(max_steps=config.total_steps, log_every=1, checkpoint_every=config.checkpoint_every),
            start_step=step, guard=guard, metrics_log=metrics, save_checkpoint=save, resumed=checkpoint is not None,
            after_update=die_if_asked)
        step = result.step
    except _Killed:
        metrics.close()
        step = stop_after

    unwrapped = accelerator.unwrap_model(model)
    return {
        "step": step,
        "params": {k: v.detach().clone() for k, v in unwrapped.state_dict().items()},
        "ema": {k: v.clone() for k, v in ema.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "lr": scheduler.get_last_lr(),
        "manager": manager,
    }


def _assert_optimizer_states_equal(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for index in a["state"]:
        for key, value in a["state"][index].items():
            assert torch.equal(value, b["state"][index][key]), (index, key)


def test_resume_is_bit_identical_to_a_straight_run(tmp_path):
    config = ToyConfig()
    straight = _train(tmp_path / "straight", config)
    _train(tmp_path / "resumed", config, stop_after=7)  # last checkpoint at step 6: steps 7 are replayed
    resumed = _train(tmp_path / "resumed", config)  # everything rebuilt from scratch, resume="auto"

    assert straight["step"] == resumed["step"] == config.total_steps
    for name, value in straight["params"].items():
        assert torch.equal(value, resumed["params"][name]), name
    for name, value in straight["ema"].items():
        assert torch.equal(value, resumed["ema"][name]), name
    _assert_optimizer_states_equal(straight["optimizer"], resumed["optimizer"])
    assert straight["lr"] == resumed["lr"]
    # The run really moved and the EMA lags behind it.
    assert not torch.equal(straight["params"]["net.0.weight"], ToyMLP().state_dict()["net.0.weight"])
    assert not torch.equal(straight["params"]["net.0.weight"], straight["ema"]["net.0.weight"])
    # The metrics file reads as one run: one line per step, the replayed steps not duplicated.
    records = read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, config.total_steps + 1))
    straight_records = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    assert [r["loss"] for r in records] == [r["loss"] for r in straight_records]


def test_resume_without_rng_restore_diverges(tmp_path):
    """Guards the test above against passing vacuously: dropout makes the RNG matter."""
    config = ToyConfig(total_steps=5, checkpoint_every=2)
    straight = _train(tmp_path / "a", config)
    _train(tmp_path / "b", config, stop_after=3)  # dies before its checkpoint: resumes from step 2
    original_load = CheckpointManager.load

    def load_without_rng(self, path, **kwargs):
        return original_load(self, path, restore_rng=False, **kwargs)

    CheckpointManager.load = load_without_rng
    try:
        resumed = _train(tmp_path / "b", config)
    finally:
        CheckpointManager.load = original_load
    assert not torch.equal(straight["params"]["net.0.weight"], resumed["params"]["net.0.weight"])


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint safety
# ----------------------------------------------------------------------------------------------------------------


def _tiny_objects():
    model = nn.Linear(3, 2)
    ema = EMA(model, 0.9)
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-2))
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return model, ema, optimizer


def _save(manager: CheckpointManager, step: int, model, ema, optimizer) -> Path:
    return manager.save(step, models={"model": model}, emas={"model": ema}, optimizers={"model": optimizer},
                        data_state={"epoch": 0, "batches_in_epoch": step}, config={"name": "tiny"})


def test_checkpoint_layout_and_roundtrip(tmp_path):
    model, ema, optimizer = _tiny_objects()
    manager = CheckpointManager(tmp_path, keep_last=3)
    path = _save(manager, 5, model, ema, optimizer)
    assert not any(p.name.startswith(TMP_PREFIX) for p in tmp_path.iterdir())
    meta = read_meta(path)
    assert meta["step"] == 5 and meta["world_size"] == 1
    assert set(meta["files"]) == {"model_model.safetensors", "ema_model.safetensors", "optimizer_model.pt",
                                  "config.json", "rng_rank0.json"}
    assert json.loads((tmp_path / LATEST_FILE).read_text())["dir"] == path.name
    # Optimizer state is plain tensors/numbers.
    torch.load(path / "optimizer_model.pt", weights_only=True)

    fresh = nn.Linear(3, 2)
    fresh_ema = EMA(fresh, 0.9)
    fresh_optimizer = build_optimizer(fresh, OptimizerConfig(lr=1e-2))
    state = CheckpointManager(tmp_path).load(CheckpointManager(tmp_path).resolve("auto"), models={"model": fresh},
                                             emas={"model": fresh_ema}, optimizers={"model": fresh_optimizer})
    assert state.step == 5 and state.data_state == {"epoch": 0, "batches_in_epoch": 5}
    assert state.config == {"name": "tiny"}
    assert torch.equal(fresh.weight, model.weight)
    assert torch.equal(fresh_ema.shadow["weight"], ema.shadow["weight"])
    _assert_optimizer_states_equal(fresh_optimizer.state_dict(), optimizer.state_dict())


def test_resolve_none_and_empty_root(tmp_path):
    manager = CheckpointManager(tmp_path / "nothing-yet")
    assert manager.resolve(None) is None
    assert manager.resolve("none") is None
    assert manager.resolve("auto") is None
    with pytest.raises(FileNotFoundError, match="meta.json"):
        manager.resolve(tmp_path / "missing")


def test_crash_during_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, ema, optimizer = _tiny_objects()
    manager = CheckpointManager(tmp_path, keep_last=3)
    good = _save(manager, 1, model, ema, optimizer)
    original = safetensors.torch.save_file

    def save_half_then_crash(tensors, filename, metadata=None):
        original(tensors, filename, metadata=metadata)
        size = os.path.getsize(filename)
        with open(filename, "r+b") as handle:
            handle.truncate(size // 2)
        raise RuntimeError("simulated crash in the middle of a write")

    monkeypatch.setattr(safetensors.torch, "save_file", save_half_then_crash)
    with pytest.raises(CheckpointError, match="previous checkpoint .*step_000000001.* is kept"):
        _save(manager, 2, model, ema, optimizer)
    monkeypatch.undo()
    assert CheckpointManager(tmp_path).resolve("auto") == good
    # A kill leaves the temporary directory behind (with a meta.json even): it is never picked.
    stale = tmp_path / (TMP_PREFIX + "step_000000009")
    stale.mkdir()
    (stale / META_FILE).write_text(json.dumps({"format": "epsvae-checkpoint", "step": 9, "files": {}}))
    (tmp_path / LATEST_FILE).unlink()  # force the fallback scan
    assert CheckpointManager(tmp_path).resolve("auto") == good
    # The next save cleans the leftovers up.
    _save(manager, 3, model, ema, optimizer)
    assert not any(p.name.startswith(TMP_PREFIX) for p in tmp_path.iterdir())


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_checkpoint_is_reported_and_previous_used(tmp_path, caplog, damage):
    model, ema, optimizer = _tiny_objects()
    manager = CheckpointManager(tmp_path, keep_last=3)
    good = _save(manager, 1, model, ema, optimizer)
    good_weight = model.weight.detach().clone()
    model.weight.data.add_(1.0)
    bad = _save(manager, 2, model, ema, optimizer)
    target = bad / "model_model.safetensors"
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[len(data) - 3] ^= 0x01  # inside the tensor bytes: safetensors itself would load it silently
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(bytes(data[: len(data) // 2]))
    else:
        target.unlink()

    with caplog.at_level(logging.WARNING, logger="pipelines.kit.checkpoints"):
        chosen = CheckpointManager(tmp_path).resolve("auto")
    assert chosen == good
    assert str(target) in caplog.text
    with pytest.raises(ValueError, match="damaged"):
        CheckpointManager(tmp_path).resolve(bad)
    fresh = nn.Linear(3, 2)
    state = CheckpointManager(tmp_path).load(chosen, models={"model": fresh})
    assert state.step == 1 and torch.equal(fresh.weight, good_weight)


def test_disk_full_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, ema, optimizer = _tiny_objects()
    manager = CheckpointManager(tmp_path, keep_last=3)
    good = _save(manager, 1, model, ema, optimizer)
    original_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError) as caught:
        _save(manager, 2, model, ema, optimizer)
    monkeypatch.setattr(torch, "save", original_save)
    assert caught.value.errno == errno.ENOSPC
    message = str(caught.value)
    assert "disk full" in message and str(good) in message and "is kept" in message
    assert TMP_PREFIX + "step_000000002" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST_FILE, good.name]
    assert CheckpointManager(tmp_path).resolve("auto") == good


def test_keep_last_prunes_oldest_never_newest(tmp_path):
    model, ema, optimizer = _tiny_objects()
    manager = CheckpointManager(tmp_path, keep_last=2)
    paths = [_save(manager, step, model, ema, optimizer) for step in (10, 20, 30, 40)]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [paths[2].name, paths[3].name]
    # Re-saving an older step (replay after a damaged newer checkpoint) never deletes what was just written.
    replay = _save(manager, 35, model, ema, optimizer)
    assert replay.is_dir() and paths[3].is_dir() and not paths[2].exists()
    assert CheckpointManager(tmp_path).resolve("auto") == replay  # latest.json wins over a higher step
    manager_one = CheckpointManager(tmp_path / "one", keep_last=1)
    kept = [_save(manager_one, step, model, ema, optimizer) for step in (1, 2)][-1]
    assert [p for p in (tmp_path / "one").iterdir() if p.is_dir()] == [kept]


def test_same_step_saved_twice_replaces_directory(tmp_path):
    model, ema, optimizer = _tiny_objects()
    manager = CheckpointManager(tmp_path, keep_last=3)
    first = _save(manager, 7, model, ema, optimizer)
    model.weight.data.zero_()
    second = _save(manager, 7, model, ema, optimizer)
    assert first == second
    fresh = nn.Linear(3, 2)
    CheckpointManager(tmp_path).load(second, models={"model": fresh})
    assert torch.count_nonzero(fresh.weight) == 0


def test_bad_inputs_fail_with_clear_messages(tmp_path):
    model, ema, optimizer = _tiny_objects()
    manager = CheckpointManager(tmp_path)
    with pytest.raises(ValueError, match="JSON"):
        manager.save(1, models={"model": model}, data_state={"sampler": object()})
    with pytest.raises(ValueError, match="name"):
        manager.save(1, models={"../evil": model})
    path = manager.save(1, models={"model": model})
    with pytest.raises(FileNotFoundError, match="model_disc.safetensors"):
        manager.load(path, models={"disc": nn.Linear(3, 2)})
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


# ----------------------------------------------------------------------------------------------------------------
# EMA
# ----------------------------------------------------------------------------------------------------------------


def test_ema_update_matches_formula_and_stays_fp32_for_bf16_model():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).to(torch.bfloat16)
    decay = 0.999
    ema = EMA(model, decay)
    assert all(v.dtype == torch.float32 for k, v in ema.shadow.items() if "num_batches" not in k)
    assert ema.shadow["1.num_batches_tracked"].dtype == torch.int64
    before = {k: v.clone().double() for k, v in ema.shadow.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.train()(torch.randn(5, 4, dtype=torch.bfloat16))  # moves the BatchNorm buffers
    ema.update(model)
    for name, p in model.named_parameters():
        expected = decay * before[name] + (1 - decay) * p.detach().double()
        torch.testing.assert_close(ema.shadow[name].double(), expected, rtol=0, atol=1e-6)
        assert not torch.equal(ema.shadow[name].to(torch.bfloat16), p.detach())  # a real average, not a copy
    # Buffers are copied, not averaged.
    assert torch.equal(ema.shadow["1.running_mean"], model[1].running_mean.float())
    assert ema.shadow["1.num_batches_tracked"].item() == 1


def test_ema_with_ddp_style_wrapper_copy_to_and_swap():
    class Wrapper(nn.Module):  # what DDP looks like from the outside: the real model under `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

    inner = nn.Linear(3, 3)
    ema = EMA(inner, 0.5)
    wrapped = torch.compile(inner, backend="eager") if hasattr(torch, "compile") else inner
    with torch.no_grad():
        inner.weight.add_(2.0)
    ema.update(wrapped)
    expected = ema.shadow["weight"].clone()
    training_weight = inner.weight.detach().clone()
    with ema.swapped_in(wrapped):
        assert torch.equal(inner.weight, expected)
    assert torch.equal(inner.weight, training_weight)
    with pytest.raises(RuntimeError):
        with ema.swapped_in(inner):
            raise RuntimeError("evaluation failed")
    assert torch.equal(inner.weight, training_weight)  # restored even on error
    fresh = nn.Linear(3, 3)
    ema.copy_to(fresh)
    assert torch.equal(fresh.weight, expected)
    reloaded = EMA(nn.Linear(3, 3), 0.5)
    reloaded.load_state_dict(ema.state_dict())
    assert torch.equal(reloaded.shadow["weight"], expected)
    with pytest.raises(ValueError, match="disagree"):
        ema.update(Wrapper(nn.Linear(3, 3)))  # keys "module.weight" ≠ "weight": not a DDP wrapper
    with pytest.raises(ValueError, match="decay"):
        EMA(inner, 1.0)


def test_foreach_ema_equals_the_per_tensor_lerp():
    """The multi-tensor update gives exactly the per-tensor `lerp_(p, 1 - decay)`, and the textbook
    `decay·ema + (1 - decay)·p` to float rounding, for fp32 and bf16 models, with BatchNorm buffers (float and int)
    copied."""
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 2)).to(dtype)
        decay = 0.9
        ema = EMA(model, decay)
        reference = {k: v.clone() for k, v in ema.shadow.items()}
        textbook = {k: v.clone() for k, v in ema.shadow.items()}
        averaged = {name for name, p in model.named_parameters()}
        for _ in range(4):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p))
            model.train()(torch.randn(7, 6, dtype=dtype))
            ema.update(model)
            for name, value in model.state_dict().items():
                if name in averaged:
                    reference[name].lerp_(value.float(), 1 - decay)
                    textbook[name].mul_(decay).add_(value.float(), alpha=1 - decay)
                else:
                    reference[name].copy_(value)
                    textbook[name].copy_(value)
            for name in reference:
                assert torch.equal(ema.shadow[name], reference[name]), name
                torch.testing.assert_close(ema.shadow[name], textbook[name], rtol=1e-6, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------------------------------------------
# Optimiser, warmup, clipping, guard, quartiles, metrics
# ----------------------------------------------------------------------------------------------------------------


def test_param_groups_exclude_norms_biases_embeddings():
    model = ToyMLP()
    groups = param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in groups[0]["params"])
    not_decayed = sorted(names[id(p)] for p in groups[1]["params"])
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert decayed == ["net.0.weight", "net.4.weight"]
    assert not_decayed == ["embed.weight", "net.0.bias", "net.1.bias", "net.1.weight", "net.4.bias"]
    assert len(param_groups(model, weight_decay=0.0)) == 1
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-4, betas=(0.0, 0.999), weight_decay=0.1))
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["betas"] == (0.0, 0.999)
    with pytest.raises(ValueError, match="betas"):
        OptimizerConfig(betas=(0.9, 1.0))


def test_warmup_schedule_values():
    model = nn.Linear(2, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = warmup_scheduler(optimizer, warmup_steps=4)
    lrs = []
    for _ in range(7):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [1e-3 * min(1.0, (k + 1) / 4) for k in range(7)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert warmup_factor(0, 0) == 1.0
    # The state survives a weights_only round trip and continues the ramp.
    state = scheduler.state_dict()
    torch.save(state, buffer := __import__("io").BytesIO())
    buffer.seek(0)
    other_optimizer = torch.optim.Adam(nn.Linear(2, 2).parameters(), lr=1e-3)
    other = warmup_scheduler(other_optimizer, warmup_steps=4)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert other.get_last_lr() == scheduler.get_last_lr()


def test_clip_gradients_returns_norm_and_clips():
    model = nn.Linear(4, 1, bias=False)
    model.weight.grad = torch.full_like(model.weight, 3.0)  # norm 6
    assert clip_gradients(None, model.parameters(), max_norm=None) == pytest.approx(6.0)
    assert clip_gradients(None, model.parameters(), max_norm=1.5) == pytest.approx(6.0)
    assert model.weight.grad.norm().item() == pytest.approx(1.5, rel=1e-5)
    # The norm stays a tensor (no host-device sync per step); the loop reads it on log steps only.
    assert isinstance(clip_gradients(None, model.parameters(), max_norm=None), torch.Tensor)


def test_optimizer_is_multi_tensor_and_matches_plain_adam():
    """Fused Adam on the CPU and CUDA (foreach on a device without a fused kernel); the same updates as the
    per-parameter loop, to float rounding."""
    from pipelines.kit.optim import multi_tensor_options

    assert multi_tensor_options("cuda") == {"fused": True} and multi_tensor_options("cpu") == {"fused": True}
    assert multi_tensor_options("meta") == {"foreach": True}
    for config in (OptimizerConfig(lr=1e-2, betas=(0.0, 0.999)),
                   OptimizerConfig(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)):
        torch.manual_seed(0)
        model = ToyMLP().eval()  # no dropout: both models see the same function
        plain_model = ToyMLP().eval()
        plain_model.load_state_dict(model.state_dict())
        optimizer = build_optimizer(model, config)
        assert optimizer.defaults["fused"] is True
        plain_class = torch.optim.AdamW if config.decoupled_weight_decay else torch.optim.Adam
        plain = plain_class(param_groups(plain_model, config.weight_decay), lr=config.lr, betas=config.betas,
                            eps=config.eps, foreach=False)
        for _ in range(5):
            x = torch.randn(8, 6)
            for net, opt in ((model, optimizer), (plain_model, plain)):
                opt.zero_grad()
                net(x).square().mean().backward()
                opt.step()
        for (name, a), b in zip(model.state_dict().items(), plain_model.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_non_finite_guard_counts_skips_and_stops():
    guard = NonFiniteGuard(max_consecutive=3)
    assert guard.skip(torch.tensor(1.0)) is False
    assert guard.skip(torch.tensor(float("nan"))) is True
    assert guard.skip(torch.tensor(float("inf"))) is True
    assert guard.skip(torch.tensor(0.5)) is False  # a finite loss resets the streak, not the total
    assert guard.state_dict() == {"consecutive": 0, "total_skipped": 2}
    guard.skip(torch.tensor(float("nan")))
    guard.skip(torch.tensor(float("-inf")))
    with pytest.raises(NonFiniteLossError, match="non-finite for 3 steps in a row"):
        guard.skip(torch.tensor(float("nan")))
    assert guard.total_skipped == 5


def test_quartile_losses_match_manual_buckets():
    t = torch.tensor([0.05, 0.2, 0.3, 0.55, 0.6, 0.99, 1.0])
    loss = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0])
    result = quartile_losses(loss, t)
    assert result == {"loss_q0": 1.5, "loss_q1": 4.0, "loss_q2": 12.0, "loss_q3": 48.0}
    ddpm = quartile_losses(torch.tensor([1.0, 3.0]), torch.tensor([10, 990]), t_max=1000)
    assert ddpm == {"loss_q0": 1.0, "loss_q3": 3.0}


def test_metrics_logger_writes_valid_jsonl(tmp_path):
    path = tmp_path / "logs" / "metrics.jsonl"
    with MetricsLogger(path, total_steps=3) as metrics:
        for step in (1, 2, 3):
            metrics.advance()
            metrics.log(step, {"loss": torch.tensor(0.5 / step), "lr": 1e-4, "skipped": 0,
                               "bad": float("nan")})
    lines = path.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # strict JSON: NaN would not parse in other readers
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[1]["loss"] == pytest.approx(0.25) and records[0]["bad"] is None
    assert "NaN" not in path.read_text()
    # Resuming at step 2 drops what a crashed run wrote after it (and a half-written last line).
    with open(path, "a") as handle:
        handle.write('{"step": 4, "lo')
    with MetricsLogger(path, initial_step=2) as metrics:
        metrics.log(3, {"loss": 9.0})
    assert [(r["step"], r["loss"]) for r in read_jsonl(path)] == [(1, 0.5), (2, 0.25), (3, 9.0)]


def test_accelerator_config_validation_and_no_tensorboard_needed(tmp_path):
    with pytest.raises(ValueError, match="mixed_precision"):
        AcceleratorConfig(mixed_precision="fp8")
    with pytest.raises(ValueError, match="project_dir"):
        AcceleratorConfig(log_with="tensorboard")
    accelerator = make_accelerator(AcceleratorConfig(cpu=True, collective_timeout_s=5))
    assert accelerator.device.type == "cpu" and not accelerator.log_with
    from accelerate.utils import is_tensorboard_available

    if not is_tensorboard_available():
        with pytest.raises(ValueError, match="pip install tensorboard"):
            make_accelerator(AcceleratorConfig(cpu=True, log_with="tensorboard", project_dir=str(tmp_path)))


# ----------------------------------------------------------------------------------------------------------------
# Two processes under `accelerate launch`
# ----------------------------------------------------------------------------------------------------------------

_TWO_RANK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from torch import nn
    from pipelines.kit.checkpoints import CheckpointManager
    from pipelines.kit.ema import EMA
    from pipelines.kit.optim import OptimizerConfig, build_optimizer
    from pipelines.kit.run import AcceleratorConfig, close_process_group, make_accelerator
    from pipelines.kit.loop import quartile_losses
    from pipelines.kit.optim import warmup_scheduler

    phase, root = sys.argv[1], Path(sys.argv[2])
    accelerator = make_accelerator(AcceleratorConfig(cpu=True, seed=7, collective_timeout_s=60))
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 1))
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-2))
    scheduler = warmup_scheduler(optimizer, 2)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = EMA(model, 0.9)  # of the DDP-wrapped model, built after prepare
    manager = CheckpointManager(root / "ckpt", keep_last=2, accelerator=accelerator)
    step = 0
    path = manager.resolve("auto")
    if path is not None:
        step = manager.load(path, models={"m": model}, emas={"m": ema}, optimizers={"m": optimizer},
                            schedulers={"m": scheduler}).step
        draw = torch.rand(2).tolist()  # ... must equal what it gives right after the load
    for _ in range(3):
        x = torch.randn(4, 4)  # (B, 4): different on each rank (per-rank seeds)
        loss = model(x).pow(2).mean()
        accelerator.backward(loss)
        optimizer.step(); optimizer.zero_grad(); scheduler.step(); ema.update(model)
        step += 1
    buckets = quartile_losses(torch.full((2,), float(accelerator.process_index)),
                              torch.tensor([0.1, 0.9]), accelerator)
    if phase == "first":
        manager.save(step, models={"m": model}, emas={"m": ema}, optimizers={"m": optimizer},
                     schedulers={"m": scheduler}, data_state={"step": step})
        draw = torch.rand(2).tolist()  # what this rank's RNG gives right after the save ...
    weights = accelerator.unwrap_model(model)[0].weight.detach().flatten()[:3].tolist()
    out = {"step": step, "rank": accelerator.process_index, "draw": draw, "weights": weights, "buckets": buckets,
           "ema": ema.state_dict()["0.weight"].flatten()[:3].tolist()}
    (root / f"{phase}_rank{accelerator.process_index}.json").write_text(json.dumps(out))
    close_process_group()  # what run_main does after every script: no rank aborts in gloo's teardown
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_accelerate_launch_saves_rng_per_rank_and_resumes(tmp_path):
    script = tmp_path / "two_rank.py"
    script.write_text(_TWO_RANK_SCRIPT)
    accelerate_bin = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}

    def launch(phase: str) -> None:
        # `accelerate launch --cpu --num_processes 2` starts ONE process unless an MPI hostfile is given
        # (accelerate 1.x); `--multi_gpu` goes through torchrun, and the script's `cpu=True` picks gloo on CPU.
        command = [str(accelerate_bin), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
                   str(script), phase, str(tmp_path)]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]

    launch("first")
    checkpoint = CheckpointManager(tmp_path / "ckpt").resolve("auto")
    assert checkpoint is not None and read_meta(checkpoint)["world_size"] == 2
    assert {p.name for p in checkpoint.glob("rng_rank*.json")} == {"rng_rank0.json", "rng_rank1.json"}
    first = [json.loads((tmp_path / f"first_rank{r}.json").read_text()) for r in (0, 1)]
    assert first[0]["weights"] == first[1]["weights"]  # DDP kept the ranks in sync
    assert first[0]["ema"] == first[1]["ema"] != first[0]["weights"]
    assert first[0]["draw"] != first[1]["draw"]  # ... while their RNG streams differ
    assert first[0]["buckets"] == {"loss_q0": 0.5, "loss_q3": 0.5}  # mean over both ranks' samples

    launch("second")
    second = [json.loads((tmp_path / f"second_rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["step"] for s in second] == [6, 6]
    assert second[0]["weights"] == second[1]["weights"] and second[0]["ema"] == second[1]["ema"]
    assert second[0]["weights"] != first[0]["weights"]
    # Each rank restored its own RNG: phase 2 continues exactly where phase 1's RNG stood at the save.
    assert [s["draw"] for s in second] == [f["draw"] for f in first]


# ----------------------------------------------------------------------------------------------------------------
# The loop's non-finite policy (the one both trainers use)
# ----------------------------------------------------------------------------------------------------------------


def test_loop_skips_a_non_finite_batch_without_counting_it(tmp_path):
    accelerator = make_accelerator(AcceleratorConfig(seed=0, cpu=True))
    model = nn.Linear(3, 1)
    optimizer = build_optimizer(model, OptimizerConfig(lr=0.1))
    scheduler = warmup_scheduler(optimizer, warmup_steps=10)
    ema = EMA(model, 0.5)
    guard = NonFiniteGuard(max_consecutive=2)
    calls, weights_seen, saved = [], [], []

    def body(batch, step):
        calls.append(step)
        weights_seen.append(model.weight.detach().clone())
        loss = model(batch).pow(2).mean()
        return StepOutput(losses=[loss * float("nan") if len(calls) == 2 else loss], batch_size=batch.shape[0])

    batches = iter(torch.randn(100, 4, 3))
    metrics = MetricsLogger(tmp_path / "metrics.jsonl", accelerator=accelerator, total_steps=3)
    result = run_training_loop(accelerator, batches, body, [OptimizedModule("m", model, optimizer, scheduler, None,
                                                                            ema, model)],
                               LoopPlan(max_steps=3, log_every=1, checkpoint_every=100), start_step=0, guard=guard,
                               metrics_log=metrics, save_checkpoint=saved.append, resumed=False)
    assert result.step == 3 and calls == [0, 1, 1, 2]  # the poisoned batch did not count: step 1 was redone
    assert torch.equal(weights_seen[1], weights_seen[2])  # ... and changed no weight
    assert scheduler.last_epoch == 3  # the LR schedule moved once per real update
    assert saved == [3] and guard.total_skipped == 1
    assert [r["nonfinite_skipped"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [0, 1, 1]

    poisoned = iter(torch.randn(100, 4, 3))
    with pytest.raises(NonFiniteLossError):  # too many in a row: the run stops with a clear error
        run_training_loop(accelerator, poisoned,
                          lambda b, s: StepOutput(losses=[model(b).sum() * float("nan")], batch_size=4),
                          [OptimizedModule("m", model, optimizer, scheduler)],
                          LoopPlan(max_steps=6, log_every=1, checkpoint_every=100), start_step=3, guard=guard,
                          metrics_log=MetricsLogger(tmp_path / "m2.jsonl", accelerator=accelerator),
                          save_checkpoint=saved.append, resumed=True)


def test_ranks_agree_on_the_clock_only_when_there_is_one(tmp_path, monkeypatch):
    """Without `max_minutes` the loop pays no per-step collective (nor its host sync) for the clock; with one it
    checks after every update, and a clock that has run out stops the run after one update, checkpointed."""
    import pipelines.kit.run as run_module

    agreements = []
    real_any_rank = run_module.any_rank
    monkeypatch.setattr(run_module, "any_rank", lambda accelerator, flag: agreements.append(flag)
                        or real_any_rank(accelerator, flag))
    accelerator = make_accelerator(AcceleratorConfig(seed=0, cpu=True))
    model = nn.Linear(3, 1)
    optimizer = build_optimizer(model, OptimizerConfig(lr=0.1))
    network = OptimizedModule("m", model, optimizer, warmup_scheduler(optimizer, warmup_steps=1))

    def body(batch, step):
        return StepOutput(losses=[model(batch).pow(2).mean()], batch_size=batch.shape[0])

    for max_minutes, expected, steps in ((None, [], 4), (1000.0, [False] * 4, 4), (0.0, [True], 1)):
        agreements.clear()
        saved = []
        result = run_training_loop(accelerator, iter(torch.randn(10, 4, 3)), body, [network],
                                   LoopPlan(max_steps=4, log_every=2, checkpoint_every=100, max_minutes=max_minutes),
                                   start_step=0, guard=NonFiniteGuard(), resumed=False,
                                   save_checkpoint=saved.append,
                                   metrics_log=MetricsLogger(tmp_path / f"{max_minutes}.jsonl",
                                                             accelerator=accelerator))
        assert (result.step, result.stopped_by_clock, saved) == (steps, max_minutes == 0.0, [steps])
        assert agreements == expected
