"""Resume checkpoints: one self-describing, checksummed directory per step, written atomically (STYLE.md, Borrow 8).

Layout under `root_dir`:

    latest.json                    {"dir": "step_000012000", "step": 12000}  pointer, replaced atomically
    step_000012000/
        meta.json                  step, world size, data position, extra, sha256 of every other file
        config.json                the run's config (rebuilds everything with no flags to remember)
        model_<name>.safetensors   weights of each model (unwrapped from DDP)
        ema_<name>.safetensors     fp32 EMA of each model
        optimizer_<name>.pt        optimizer.state_dict()   } plain tensors / numbers only:
        scheduler_<name>.pt        scheduler.state_dict()   } `torch.load(weights_only=True)`
        scaler.pt                  fp16 GradScaler state (only with mixed_precision="fp16")
        rng_rank<r>.json           python / numpy / torch / CUDA RNG of rank r, written by rank r itself

A save writes everything into `.tmp-step_…`, checksums it, writes `meta.json` last, renames the directory, then
replaces `latest.json`. `resolve("auto")` follows `latest.json`, falls back to scanning every directory's own
`meta.json` (highest step first; no file name is parsed), and returns the first one whose checksums match;
a damaged one is reported with its path and skipped. With several ranks `root_dir` must be on storage that all
ranks share (each rank writes its own RNG file into the temporary directory).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import nn

from pipelines.kit.ema import EMA, unwrap_model
from pipelines.kit.faults import fault_point

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)

FORMAT_NAME = "epsvae-checkpoint"
FORMAT_VERSION = 1
META_FILE = "meta.json"
CONFIG_FILE = "config.json"
LATEST_FILE = "latest.json"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What `CheckpointManager.load` hands back besides the restored objects."""

    path: Path
    step: int
    data_state: dict[str, Any]
    config: dict[str, Any]
    extra: dict[str, Any]


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (every rank raises it, so none is left waiting)."""


# ----------------------------------------------------------------------------------------------------------------
# Pure helpers: hashing, verification, RNG state <-> JSON
# ----------------------------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_meta(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's `meta.json`; raises `FileNotFoundError` / `ValueError` with the path when unusable."""
    path = Path(checkpoint_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a complete checkpoint directory")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from error
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME or not isinstance(meta.get("step"), int):
        raise ValueError(f"{path} is not a {FORMAT_NAME} meta file")
    if not isinstance(meta.get("files"), dict):
        raise ValueError(f"{path} has no file checksums")
    return meta


def verify_checkpoint(checkpoint_dir: str | os.PathLike) -> list[str]:
    """Problems found in a checkpoint directory (empty list: every file is present and matches its sha256)."""
    checkpoint_dir = Path(checkpoint_dir)
    try:
        meta = read_meta(checkpoint_dir)
    except (FileNotFoundError, ValueError) as error:
        return [str(error)]
    problems = []
    for name, expected in meta["files"].items():
        file = checkpoint_dir / name
        if not file.is_file():
            problems.append(f"{file} is missing")
        elif sha256_file(file) != expected:
            problems.append(f"{file} does not match its sha256 in {META_FILE} (truncated or corrupted)")
    return problems


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states as JSON-able values (python, numpy global, torch CPU, every CUDA device)."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_kind, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None,
    }
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np.asarray(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") is not None and torch.cuda.is_available():
        saved = state["cuda"]
        if len(saved) != torch.cuda.device_count():
            logger.warning("checkpoint has CUDA RNG for %d devices, this process sees %d: CUDA RNG not restored",
                           len(saved), torch.cuda.device_count())
        else:
            torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in saved])


@contextlib.contextmanager
def _loading(file: Path):
    """Turn a file that will not load into a one-line `ValueError` naming it.

    A checksum only proves the file is the one that was saved; a planted or foreign file (a pickle of objects
    under a `.pt` or `.safetensors` name, tensors of another model) is refused here, never unpickled.
    """
    try:
        yield
    except (pickle.UnpicklingError, safetensors.SafetensorError, RuntimeError, EOFError, OSError) as error:
        if isinstance(error, pickle.UnpicklingError):
            reason = "it holds Python objects, not only tensors and numbers (refused: weights_only=True)"
        else:
            text = str(error).strip()
            reason = f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
        raise ValueError(f"cannot load {file}: {reason}") from error


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _to_jsonable(value: Any, what: str) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as error:
        raise ValueError(f"checkpoint {what} must be JSON-serialisable: {error}") from error


def _check_names(kind: str, objects: Mapping[str, Any] | None) -> dict[str, Any]:
    objects = dict(objects or {})
    for name in objects:
        if not _NAME_PATTERN.match(name):
            raise ValueError(f"{kind} name {name!r} must match {_NAME_PATTERN.pattern}")
    return objects


# ----------------------------------------------------------------------------------------------------------------
# Manager
# ----------------------------------------------------------------------------------------------------------------


class CheckpointManager:
    """Save / find / load resume checkpoints under `root_dir`, keeping the newest `keep_last` (None: keep all).

    Every rank calls `save`, `resolve` and `load`; with an accelerator the main process writes the shared files,
    each rank writes and restores its own RNG state, and ranks agree on success through one collective.
    """

    def __init__(self, root_dir: str | os.PathLike, keep_last: int | None = 3,
                 accelerator: "Accelerator | None" = None) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
        self.root = Path(root_dir)
        self.keep_last = keep_last
        self.accelerator = accelerator
        self._verified: set[Path] = set()

    # -- ranks ---------------------------------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return 0 if self.accelerator is None else self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return 1 if self.accelerator is None else self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _all_ok(self, ok: bool) -> bool:
        """Collective AND of `ok` over ranks (also a barrier)."""
        if self.world_size == 1:
            return ok
        flag = torch.tensor([1.0 if ok else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() == self.world_size)

    def _broadcast(self, value: Any) -> Any:
        if self.world_size == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]

    def _unwrap(self, model: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(model) if self.accelerator is not None else unwrap_model(model)

    # -- save ----------------------------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        *,
        models: Mapping[str, nn.Module] | None = None,
        emas: Mapping[str, EMA] | None = None,
        optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
        schedulers: Mapping[str, Any] | None = None,
        data_state: Mapping[str, Any] | None = None,
        config: Any = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write the checkpoint for `step` (all ranks call this) and return its directory.

        data_state: JSON-able data position (e.g. {"epoch": 3, "batches_in_epoch": 120}); config: JSON-able dict
        or dataclass; extra: anything else JSON-able (counters, guard state). On failure the temporary directory
        is removed, the previous checkpoint stays the one `resolve("auto")` picks, and the error is re-raised
        (disk full: `OSError(ENOSPC)` saying which path and that the previous checkpoint is kept).
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        parts = {kind: _check_names(kind, objects) for kind, objects in
                 (("model", models), ("ema", emas), ("optimizer", optimizers), ("scheduler", schedulers))}
        meta_payload = {
            "data_state": _to_jsonable(dict(data_state or {}), "data_state"),
            "extra": _to_jsonable(dict(extra or {}), "extra"),
        }
        config_json = json.dumps(_to_jsonable(config if config is not None else {}, "config"), indent=2)
        name = f"step_{step:09d}"  # for people listing the folder; never parsed back
        final, tmp = self.root / name, self.root / (TMP_PREFIX + name)
        previous = self._latest_pointer()

        error: BaseException | None = None
        if self.is_main:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                for stale in self.root.glob(TMP_PREFIX + "*"):  # left by a killed run; never a candidate
                    shutil.rmtree(stale, ignore_errors=True)
                tmp.mkdir()
            except OSError as caught:
                error = caught
        self._raise_if_failed(error, tmp, previous, stage="creating")

        try:  # every rank: its own RNG; main: everything else
            _write_text(tmp / f"rng_rank{self.rank}.json", json.dumps(capture_rng_state()))
            if self.is_main:
                self._write_payload(tmp, parts, config_json)
        except Exception as caught:  # noqa: BLE001 - reported to all ranks, then re-raised
            error = caught
        self._raise_if_failed(error, tmp, previous, stage="writing")

        if self.is_main:
            try:
                self._finalise(tmp, final, step, meta_payload)
            except Exception as caught:  # noqa: BLE001
                error = caught
        self._raise_if_failed(error, tmp, previous, stage="finalising")
        return final

    def _write_payload(self, tmp: Path, parts: dict[str, dict[str, Any]], config_json: str) -> None:
        for name, model in parts["model"].items():
            safetensors.torch.save_model(self._unwrap(model), str(tmp / f"model_{name}.safetensors"))
        for name, ema in parts["ema"].items():
            tensors = {k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}
            safetensors.torch.save_file(tensors, str(tmp / f"ema_{name}.safetensors"))
        fault_point("checkpoint_write")
        for name, optimizer in parts["optimizer"].items():
            torch.save(optimizer.state_dict(), tmp / f"optimizer_{name}.pt")
        for name, scheduler in parts["scheduler"].items():
            torch.save(scheduler.state_dict(), tmp / f"scheduler_{name}.pt")
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        _write_text(tmp / CONFIG_FILE, config_json)

    def _finalise(self, tmp: Path, final: Path, step: int, meta_payload: dict[str, Any]) -> None:
        missing = [r for r in range(self.world_size) if not (tmp / f"rng_rank{r}.json").is_file()]
        if missing:
            raise CheckpointError(f"RNG files of ranks {missing} are missing in {tmp}: the checkpoint directory "
                                  "must be on storage that every rank shares")
        files = {}
        for file in sorted(tmp.iterdir()):
            with open(file, "rb") as handle:  # data must be on disk before the rename makes it "complete"
                os.fsync(handle.fileno())
            files[file.name] = sha256_file(file)
        meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "step": step, "world_size": self.world_size,
                "saved_at": time.time(), **meta_payload, "files": files}
        _write_text(tmp / META_FILE, json.dumps(meta, indent=2))
        _fsync_dir(tmp)
        if final.exists():  # same step saved again (e.g. replaying after a corrupt newer checkpoint)
            trash = self.root / (TRASH_PREFIX + final.name)
            shutil.rmtree(trash, ignore_errors=True)
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(self.root)
        fault_point("checkpoint_publish")
        self._verified.add(final.resolve())
        pointer_tmp = self.root / (TMP_PREFIX + LATEST_FILE)
        _write_text(pointer_tmp, json.dumps({"dir": final.name, "step": step}))
        os.replace(pointer_tmp, self.root / LATEST_FILE)
        _fsync_dir(self.root)
        self._prune(keep=final)

    def _raise_if_failed(self, error: BaseException | None, tmp: Path, previous: Path | None, stage: str) -> None:
        if self._all_ok(error is None):
            return
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = f"the previous checkpoint {previous} is kept" if previous else "no earlier checkpoint exists"
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"disk full while {stage} checkpoint {tmp}; the partial checkpoint was "
                                        f"removed and {kept}") from error
        if error is None:
            raise CheckpointError(f"another rank failed while {stage} checkpoint {tmp}; {kept}")
        raise CheckpointError(f"failed while {stage} checkpoint {tmp} ({type(error).__name__}: {error}); "
                              f"{kept}") from error

    def _prune(self, keep: Path) -> None:
        if self.keep_last is None:
            return
        checkpoints = self._scan()  # newest first
        keep_resolved = keep.resolve()
        kept = {keep_resolved}
        for path, _ in checkpoints:
            if len(kept) >= self.keep_last:
                break
            kept.add(path.resolve())
        for path, _ in checkpoints:
            if path.resolve() not in kept:
                shutil.rmtree(path, ignore_errors=True)
                self._verified.discard(path.resolve())

    # -- find ----------------------------------------------------------------------------------------------------

    def _latest_pointer(self) -> Path | None:
        try:
            pointer = json.loads((self.root / LATEST_FILE).read_text())
            path = self.root / str(pointer["dir"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return path if path.is_dir() else None

    def _scan(self) -> list[tuple[Path, int]]:
        """Complete checkpoint directories (their own meta.json readable), highest step / newest save first."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            if not path.is_dir() or path.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
                continue
            try:
                meta = read_meta(path)
            except (FileNotFoundError, ValueError):
                continue
            found.append((path, meta["step"], float(meta.get("saved_at", 0.0))))
        found.sort(key=lambda item: (item[1], item[2]), reverse=True)
        return [(path, step) for path, step, _ in found]

    def _find_valid(self) -> Path | None:
        candidates: list[Path] = []
        pointer = self._latest_pointer()
        if pointer is not None:
            candidates.append(pointer)
        candidates += [path for path, _ in self._scan() if pointer is None or path.resolve() != pointer.resolve()]
        for path in candidates:
            problems = verify_checkpoint(path)
            if not problems:
                return path
            logger.warning("skipping damaged checkpoint %s: %s", path, "; ".join(problems))
        return None

    def resolve(self, resume: str | os.PathLike | None) -> Path | None:
        """Which checkpoint to resume from: None/"none" → None; "auto" → newest valid one under root (or None);
        a path → that checkpoint, which must be valid (`ValueError` naming the damaged files otherwise).

        With several ranks the main process searches and verifies, and every rank gets its answer.
        """
        if resume is None or str(resume).lower() in ("", "none", "no"):
            return None
        if str(resume) == "auto":
            found = self._find_valid() if self.is_main else None
            found = self._broadcast(None if found is None else str(found))
            if found is None:
                return None
            path = Path(found)
            self._verified.add(path.resolve())
            return path
        path = Path(resume)
        self._verify_or_raise(path)
        return path

    def _verify_or_raise(self, path: Path) -> None:
        if path.resolve() in self._verified:
            return
        if not (path / META_FILE).is_file():
            raise FileNotFoundError(f"{path / META_FILE} not found: pass a checkpoint directory or 'auto'")
        problems = verify_checkpoint(path) if self.is_main else None
        problems = self._broadcast(problems)
        if problems:
            raise ValueError(f"checkpoint {path} is damaged: {'; '.join(problems)}")
        self._verified.add(path.resolve())

    # -- load ----------------------------------------------------------------------------------------------------

    def load(
        self,
        path: str | os.PathLike,
        *,
        models: Mapping[str, nn.Module] | None = None,
        emas: Mapping[str, EMA] | None = None,
        optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
        schedulers: Mapping[str, Any] | None = None,
        restore_rng: bool = True,
    ) -> LoadedCheckpoint:
        """Restore the given objects in place from `path` (verified first unless `resolve` already did) and,
        unless `restore_rng=False`, this rank's RNG state. Names must match those passed to `save`; objects
        not passed are left alone (e.g. load only `models` for evaluation).
        """
        path = Path(path)
        self._verify_or_raise(path)
        meta = read_meta(path)

        def need(file_name: str) -> Path:
            file = path / file_name
            if not file.is_file():
                raise FileNotFoundError(f"{file} not found: the checkpoint has no such part")
            return file

        for name, model in _check_names("model", models).items():
            file = need(f"model_{name}.safetensors")
            with _loading(file):
                safetensors.torch.load_model(self._unwrap(model), file, strict=True)
        for name, ema in _check_names("ema", emas).items():
            file = need(f"ema_{name}.safetensors")
            with _loading(file):
                ema.load_state_dict(safetensors.torch.load_file(file, device="cpu"))
        for name, optimizer in _check_names("optimizer", optimizers).items():
            file = need(f"optimizer_{name}.pt")
            with _loading(file):
                optimizer.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
        for name, scheduler in _check_names("scheduler", schedulers).items():
            file = need(f"scheduler_{name}.pt")
            with _loading(file):
                scheduler.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and (path / "scaler.pt").is_file():
            with _loading(path / "scaler.pt"):
                scaler.load_state_dict(torch.load(path / "scaler.pt", map_location="cpu", weights_only=True))
        if restore_rng:
            rng_file = path / f"rng_rank{self.rank}.json"
            if rng_file.is_file():
                restore_rng_state(json.loads(rng_file.read_text()))
            else:
                logger.warning("%s not found (checkpoint saved with %s ranks): rank %d keeps its fresh seed",
                               rng_file, meta.get("world_size"), self.rank)
        config = json.loads((path / CONFIG_FILE).read_text()) if (path / CONFIG_FILE).is_file() else {}
        return LoadedCheckpoint(path=path, step=meta["step"], data_state=meta.get("data_state", {}),
                                config=config, extra=meta.get("extra", {}))
