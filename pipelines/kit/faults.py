"""Deterministic crash injection for the fault-tolerance tests: `EPSVAE_FAULT=<point>:<n>[@<rank>][/stop]`.

Writers call `fault_point(name)` once at each critical point (mid-checkpoint, mid-shard, after a training step).
When the environment variable names that point, the n-th call in this process (n counts from 1) kills the
process with SIGKILL: no `finally`, no `atexit`, no flush, exactly like `kill -9` or a lost node. `/stop` sends
SIGSTOP instead: the process stays alive but never answers again (a hung peer, which only a collective timeout
can detect). `@<rank>` restricts the fault to the process whose `RANK` environment variable (set by torchrun /
`accelerate launch`) matches; several faults are joined with commas. Unset (always, outside the tests) the call
is one dict lookup.

    EPSVAE_FAULT=checkpoint_write:2        die while writing the 2nd checkpoint's payload
    EPSVAE_FAULT=train_step:3@1            rank 1 dies after its 3rd optimiser update
    EPSVAE_FAULT=train_step:1@1/stop       rank 1 hangs after its 1st optimiser update
"""
from __future__ import annotations

import os
import signal

FAULT_ENV = "EPSVAE_FAULT"
# Every point a writer calls; a spec naming another one is a typo in a test, not a silent no-op.
FAULT_POINTS = (
    "checkpoint_write",  # CheckpointManager: model weights written into the temporary dir, optimiser not yet
    "checkpoint_publish",  # CheckpointManager: directory renamed into place, latest.json not yet updated
    "shard_write",  # LatentShardWriter: one sample appended to the open `.tmp` shard
    "shard_finish",  # LatentShardWriter: shard renamed into place, its sidecar not yet written
    "train_step",  # train_tokenizer / train_generator: an optimiser update done, before logging/checkpointing
)

_calls: dict[str, int] = {}


FAULT_SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}


def parse_fault_spec(spec: str) -> dict[str, tuple[int, int | None, str]]:
    """`"a:2,b:3@1/stop"` → {"a": (2, None, "kill"), "b": (3, 1, "stop")}; ValueError for a malformed spec."""
    faults: dict[str, tuple[int, int | None, str]] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        item_without_action, _, action = item.partition("/")
        where, _, rank = item_without_action.partition("@")
        name, _, count = where.partition(":")
        action = action or "kill"
        if (name not in FAULT_POINTS or not count.isdigit() or int(count) < 1 or (rank and not rank.isdigit())
                or action not in FAULT_SIGNALS):
            raise ValueError(f"bad {FAULT_ENV} entry {item!r}: expected <point>:<n>[@<rank>][/stop] with point in "
                             f"{FAULT_POINTS} and n >= 1")
        faults[name] = (int(count), int(rank) if rank else None, action)
    return faults


def fault_point(name: str) -> None:
    """SIGKILL (or SIGSTOP) this process if `EPSVAE_FAULT` asks for it at the current call of point `name`."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    wanted = parse_fault_spec(spec).get(name)
    if wanted is None:
        return
    count, rank, action = wanted
    if rank is not None and int(os.environ.get("RANK", "0")) != rank:
        return
    _calls[name] = _calls.get(name, 0) + 1
    if _calls[name] == count:
        os.kill(os.getpid(), FAULT_SIGNALS[action])
