"""Hostile input to every CLI in scripts/: one line on stderr, exit code 2, nothing written that looks like a result.

Each case runs the script's `main` through `run_main`, exactly what `sys.exit(run_main(main))` does at the bottom
of every script (a few cases also run as real subprocesses to pin the process exit status). Inputs: wrong types,
out-of-range values, missing paths, files where directories belong, directories that are not models, models of
the wrong kind (a DiT passed as a tokenizer and vice versa), a pickle disguised as `model.safetensors`, a garbage
`config.json`. Then: no code path unpickles a user-supplied file, shown with pickles whose `__reduce__` would
create a marker file, planted as model weights, checkpoint parts and reference statistics.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from support import reset_accelerate
from test_faults_training import cli, subprocess_env

REPO_ROOT = Path(__file__).resolve().parents[1]
MARKER_NAME = "PWNED"


class Planted:
    """Unpickling this creates a directory: proof that someone unpickled a user-supplied file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def plant_pickle(path: Path, marker: Path, torch_format: bool = True) -> None:
    """A malicious pickle under a trusted name: torch.save's zip format (like a real `.pt`) or a raw pickle."""
    payload = {"state": {0: {"exp_avg": Planted(marker)}}, "param_groups": [], "weight": Planted(marker)}
    if torch_format:
        torch.save(payload, path)
    else:
        import pickle

        path.write_bytes(pickle.dumps(payload))


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, Path]:
    """Inputs shared by the cases: real models of both kinds and hostile look-alikes."""
    from generator.dit import DiT
    from pipelines.cache_latents import CacheLatentsConfig, cache_latents
    from tokenizer import EpsVAE

    root = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    found = {"tok": root / "tokenizer", "dit": root / "dit", "notmodel": root / "notmodel",
             "missing": root / "does-not-exist", "file": root / "a_file.txt", "marker": root / MARKER_NAME}
    EpsVAE.from_preset("tiny", "tiny").save_pretrained(found["tok"])  # 32px → (4, 8, 8) latents
    DiT.from_name("DiT-S/2", input_size=8, in_channels=4, num_classes=8, depth=1, hidden_size=32,
                  num_heads=2).save_pretrained(found["dit"])
    found["notmodel"].mkdir()
    (found["notmodel"] / "README.txt").write_text("holiday photos\n")
    found["file"].write_text("not a directory\n")
    for kind in ("tok", "dit"):
        pickled = found[kind].with_name(f"pickled_{kind}")
        shutil.copytree(found[kind], pickled)
        plant_pickle(pickled / "model.safetensors", found["marker"], torch_format=kind == "tok")
        found[f"pickled_{kind}"] = pickled
    for kind in ("tok", "dit"):  # weights that cannot be read as a file (a directory in their place)
        unreadable = found[kind].with_name(f"unreadable_{kind}")
        shutil.copytree(found[kind], unreadable)
        (unreadable / "model.safetensors").unlink()
        (unreadable / "model.safetensors").mkdir()
        found[f"unreadable_{kind}"] = unreadable
    garbage = root / "garbage_config"
    shutil.copytree(found["tok"], garbage)
    (garbage / "config.json").write_bytes(b"\x80\x04\x95 not json \xff")
    found["garbage"] = garbage
    found["shards"] = root / "shards"
    cache_latents(CacheLatentsConfig(tokenizer=str(found["tok"]), data="offline", output_dir=str(found["shards"]),
                                     resolution=32, crops_per_class=1, batch_size=8, num_workers=0, cpu=True))
    reset_accelerate()
    found["pngs"] = root / "pngs"
    found["pngs"].mkdir()
    from PIL import Image

    for index in range(4):
        Image.fromarray(np.full((32, 32, 3), 60 * index, dtype=np.uint8)).save(found["pngs"] / f"{index:06d}.png")
    found["pickled_npz"] = root / "reference_stats.npz"
    np.savez(found["pickled_npz"], mu=np.array([Planted(found["marker"])], dtype=object), sigma=np.eye(2))
    return found


TOKENIZER_BASE = ["--data", "offline", "--encoder", "tiny", "--decoder", "tiny", "--discriminator", "tiny",
                  "--resolution", "32", "--global-batch-size", "4", "--perceptual", "none", "--perceptual-weight", "0",
                  "--num-workers", "0", "--max-steps", "1", "--cpu", "--output-dir", "{out}"]
CACHE_BASE = ["--data", "offline", "--resolution", "32", "--crops-per-class", "1", "--num-workers", "0",
              "--cpu", "--output-dir", "{out}"]
GENERATOR_BASE = ["--model", "DiT-S/2", "--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--global-batch-size",
                  "4", "--num-workers", "0", "--max-steps", "1", "--cpu", "--output-dir", "{out}"]
SAMPLE_BASE = ["--per-class", "1", "--ddpm-steps", "2", "--decode-steps", "1", "--cpu", "--output-dir", "{out}"]
# Metric networks whose weights are certainly missing: looked for only after the cheap checks.
LPIPS = ["--perceptual", "lpips-vgg", "--perceptual-weight", "0.5", "--perceptual-weights", "{out}-weights/vgg.pth"]
INCEPTION = ["--features", "inception", "--inception-weights", "{out}-weights/inception.pth"]
RECON_BASE = ["recon", "--data", "offline", "--resolution", "32", "--features", "effnet-l0", "--perceptual", "none",
              "--num-images", "2", "--per-process-batch-size", "2", "--num-workers", "0", "--cpu",
              "--output-dir", "{out}"]

# (id, script, argv, regex the one error line must match). "{name}" is replaced by the fixture path of that name.
CASES = [
    # --- stage 1 -------------------------------------------------------------------------------------------
    ("tok-type", "train_tokenizer", [*TOKENIZER_BASE, "--global-batch-size", "four"], r"batch.size.*four"),
    ("tok-float-steps", "train_tokenizer", [*TOKENIZER_BASE, "--max-steps", "1.5"], r"max.steps.*1\.5"),
    ("tok-zero-batch", "train_tokenizer", [*TOKENIZER_BASE, "--global-batch-size", "0"], r"batch_size must be >= 1"),
    ("tok-negative-lr", "train_tokenizer", [*TOKENIZER_BASE, "--lr", "-1"], r"lr must be >= 0"),
    ("tok-bool", "train_tokenizer", [*TOKENIZER_BASE, "--cpu", "maybe"], r"true/false"),
    ("tok-choice", "train_tokenizer", [*TOKENIZER_BASE, "--model-type", "gan"], r"invalid choice"),
    ("tok-override-type", "train_tokenizer", [*TOKENIZER_BASE, "--gamma", "abc"], r"gamma.*abc"),
    ("tok-missing-data", "train_tokenizer", [*TOKENIZER_BASE, "--data", "{missing}"], r"does-not-exist"),
    ("tok-file-data", "train_tokenizer", [*TOKENIZER_BASE, "--data", "{file}"], r"a_file\.txt"),
    ("tok-init-dit", "train_tokenizer", [*TOKENIZER_BASE, "--init-from", "{dit}"], r"dit"),
    ("tok-init-notmodel", "train_tokenizer", [*TOKENIZER_BASE, "--init-from", "{notmodel}"], r"config\.json"),
    ("tok-init-pickle", "train_tokenizer", [*TOKENIZER_BASE, "--init-from", "{pickled_tok}"], r"model\.safetensors"),
    ("tok-init-garbage", "train_tokenizer", [*TOKENIZER_BASE, "--init-from", "{garbage}"], r"config\.json"),
    ("tok-init-unreadable", "train_tokenizer", [*TOKENIZER_BASE, "--init-from", "{unreadable_tok}"],
     r"model\.safetensors"),
    ("tok-init-missing", "train_tokenizer", [*TOKENIZER_BASE, "--init-from", "{missing}"], r"does-not-exist"),
    ("tok-resume-missing", "train_tokenizer", [*TOKENIZER_BASE, "--resume", "{missing}"], r"does-not-exist"),
    ("tok-resume-model", "train_tokenizer", [*TOKENIZER_BASE, "--resume", "{tok}"], r"meta\.json"),
    ("tok-resume-file", "train_tokenizer", [*TOKENIZER_BASE, "--resume", "{file}"], r"a_file\.txt"),
    ("tok-missing-lpips", "train_tokenizer",
     [*TOKENIZER_BASE, "--perceptual", "lpips-vgg", "--perceptual-weight", "0.5", "--perceptual-weights",
      "{missing}"], r"does-not-exist|weights"),
    # Cheap checks come before the metric networks' weights (issue 18): the message names the real problem.
    ("tok-data-before-weights", "train_tokenizer", [*TOKENIZER_BASE, *LPIPS, "--data", "{missing}"],
     r"does-not-exist"),
    ("tok-resolution-before-weights", "train_tokenizer",
     [*TOKENIZER_BASE, *LPIPS, "--resolution", "40", "--downsample", "16"], r"resolution 40 .*divisible.* 16"),
    ("tok-resolution-init-from", "train_tokenizer", [*TOKENIZER_BASE, *LPIPS, "--init-from", "{tok}", "--resolution",
                                                     "30"], r"resolution 30 .*divisible.* 4"),
    ("tok-train-crop-divisible", "train_tokenizer", [*TOKENIZER_BASE, *LPIPS, "--train-crop", "10"],
     r"train_crop 10 .*divisible.* 4"),
    ("tok-train-crop-too-big", "train_tokenizer", [*TOKENIZER_BASE, "--train-crop", "64"],
     r"train_crop must be between 1 and the resolution \(32\)"),
    ("tok-resume-before-weights", "train_tokenizer", [*TOKENIZER_BASE, *LPIPS, "--resume", "{missing}"],
     r"does-not-exist"),
    ("tok-bad-downsample", "train_tokenizer", [*TOKENIZER_BASE, "--downsample", "12"], r"power of two"),
    # --- latent caching ------------------------------------------------------------------------------------
    ("cache-no-tokenizer", "cache_latents", [*CACHE_BASE], r"--tokenizer is required"),
    ("cache-dit", "cache_latents", [*CACHE_BASE, "--tokenizer", "{dit}"], r"dit"),
    ("cache-notmodel", "cache_latents", [*CACHE_BASE, "--tokenizer", "{notmodel}"], r"config\.json"),
    ("cache-pickle", "cache_latents", [*CACHE_BASE, "--tokenizer", "{pickled_tok}"], r"model\.safetensors"),
    ("cache-garbage", "cache_latents", [*CACHE_BASE, "--tokenizer", "{garbage}"], r"config\.json"),
    ("cache-missing", "cache_latents", [*CACHE_BASE, "--tokenizer", "{missing}"], r"does-not-exist"),
    ("cache-file", "cache_latents", [*CACHE_BASE, "--tokenizer", "{file}"], r"a_file\.txt"),
    ("cache-batch", "cache_latents", [*CACHE_BASE, "--tokenizer", "{tok}", "--per-process-batch-size", "-3"], r"batch_size"),
    ("cache-type", "cache_latents", [*CACHE_BASE, "--tokenizer", "{tok}", "--samples-per-shard", "x"],
     r"samples.per.shard"),
    ("cache-resolution", "cache_latents", [*CACHE_BASE, "--tokenizer", "{tok}", "--resolution", "30"],
     r"divisible"),
    ("cache-missing-data", "cache_latents", [*CACHE_BASE, "--tokenizer", "{tok}", "--data", "{missing}"],
     r"does-not-exist"),
    ("cache-verify-notcache", "cache_latents", ["--output-dir", "{notmodel}", "--verify"],
     r"manifest\.json"),
    ("cache-verify-missing", "cache_latents", ["--output-dir", "{missing}", "--verify"], r"does-not-exist"),
    # --- stage 2 -------------------------------------------------------------------------------------------
    ("gen-missing-shards", "train_generator", [*GENERATOR_BASE, "--shards", "{missing}"], r"does-not-exist"),
    ("gen-notmodel-shards", "train_generator", [*GENERATOR_BASE, "--shards", "{notmodel}"], r"manifest\.json"),
    ("gen-model-as-shards", "train_generator", [*GENERATOR_BASE, "--shards", "{tok}"], r"manifest\.json"),
    ("gen-file-shards", "train_generator", [*GENERATOR_BASE, "--shards", "{file}"], r"a_file\.txt"),
    ("gen-dit-tokenizer", "train_generator", [*GENERATOR_BASE, "--shards", "{shards}", "--tokenizer", "{dit}"],
     r"dit"),
    ("gen-pickle-tokenizer", "train_generator",
     [*GENERATOR_BASE, "--shards", "{shards}", "--tokenizer", "{pickled_tok}"], r"model\.safetensors"),
    ("gen-resume-model", "train_generator", [*GENERATOR_BASE, "--shards", "{shards}", "--resume", "{dit}"],
     r"meta\.json"),
    ("gen-unknown-model", "train_generator", [*GENERATOR_BASE, "--shards", "{shards}", "--model", "DiT-Q/3"],
     r"invalid choice"),
    ("gen-zero-batch", "train_generator", [*GENERATOR_BASE, "--shards", "{shards}", "--global-batch-size", "0"],
     r"batch_size must be >= 1"),
    ("gen-bad-policy", "train_generator", [*GENERATOR_BASE, "--shards", "{shards}", "--on-bad-shard", "ignore"],
     r"invalid choice"),
    ("gen-override-type", "train_generator", [*GENERATOR_BASE, "--shards", "{shards}", "--depth", "two"],
     r"depth.*two"),
    ("gen-indivisible-heads", "train_generator",
     [*GENERATOR_BASE, "--shards", "{shards}", "--hidden-size", "33"], r"hidden|head"),
    # --- sampling ------------------------------------------------------------------------------------------
    ("sample-tok-as-dit", "sample", [*SAMPLE_BASE, "--generator", "{tok}", "--tokenizer", "{tok}"], r"tokenizer|dit"),
    ("sample-dit-as-tok", "sample", [*SAMPLE_BASE, "--generator", "{dit}", "--tokenizer", "{dit}"], r"dit"),
    ("sample-pickle-dit", "sample", [*SAMPLE_BASE, "--generator", "{pickled_dit}", "--tokenizer", "{tok}"],
     r"model\.safetensors"),
    ("sample-pickle-tok", "sample", [*SAMPLE_BASE, "--generator", "{dit}", "--tokenizer", "{pickled_tok}"],
     r"model\.safetensors"),
    ("sample-unreadable-dit", "sample", [*SAMPLE_BASE, "--generator", "{unreadable_dit}", "--tokenizer", "{tok}"],
     r"model\.safetensors"),
    ("sample-unreadable-tok", "sample", [*SAMPLE_BASE, "--generator", "{dit}", "--tokenizer", "{unreadable_tok}"],
     r"model\.safetensors"),
    ("sample-missing", "sample", [*SAMPLE_BASE, "--generator", "{missing}", "--tokenizer", "{tok}"],
     r"does-not-exist"),
    ("sample-notmodel", "sample", [*SAMPLE_BASE, "--generator", "{notmodel}", "--tokenizer", "{tok}"],
     r"config\.json"),
    ("sample-garbage", "sample", [*SAMPLE_BASE, "--generator", "{dit}", "--tokenizer", "{garbage}"],
     r"config\.json"),
    ("sample-no-tokenizer", "sample", [*SAMPLE_BASE, "--generator", "{dit}"], r"--tokenizer"),
    ("sample-class", "sample", [*SAMPLE_BASE, "--generator", "{dit}", "--tokenizer", "{tok}", "--classes", "999"],
     r"999"),
    ("sample-num", "sample", [*SAMPLE_BASE, "--generator", "{dit}", "--tokenizer", "{tok}", "--num", "-1"],
     r"num"),
    ("sample-type", "sample", [*SAMPLE_BASE, "--generator", "{dit}", "--tokenizer", "{tok}", "--ddpm-steps", "x"],
     r"ddpm.steps"),
    ("sample-decode-steps", "sample",
     [*SAMPLE_BASE, "--generator", "{dit}", "--tokenizer", "{tok}", "--decode-steps", "0"], r"decode steps"),
    ("sample-out-is-file", "sample", [*SAMPLE_BASE, "--generator", "{dit}", "--tokenizer", "{tok}",
                                      "--output-dir", "{file}"], r"a_file\.txt"),
    # --- evaluation ----------------------------------------------------------------------------------------
    ("recon-dit", "evaluate", [*RECON_BASE, "--tokenizer", "{dit}"], r"dit"),
    ("recon-pickle", "evaluate", [*RECON_BASE, "--tokenizer", "{pickled_tok}"], r"model\.safetensors"),
    ("recon-missing", "evaluate", [*RECON_BASE, "--tokenizer", "{missing}"], r"does-not-exist"),
    ("recon-notmodel", "evaluate", [*RECON_BASE, "--tokenizer", "{notmodel}"], r"config\.json"),
    ("recon-decode-steps", "evaluate", [*RECON_BASE, "--tokenizer", "{tok}", "--decode-steps", "0"],
     r"decode steps"),
    ("recon-type", "evaluate", [*RECON_BASE, "--tokenizer", "{tok}", "--per-process-batch-size", "abc"], r"batch.size"),
    ("recon-no-tokenizer", "evaluate", [*RECON_BASE], r"--tokenizer"),
    ("recon-missing-inception", "evaluate",
     [*RECON_BASE, "--tokenizer", "{tok}", "--features", "inception", "--inception-weights", "{missing}"],
     r"does-not-exist|weights|inception"),
    ("recon-missing-before-weights", "evaluate",
     [*RECON_BASE, "--tokenizer", "{missing}", *INCEPTION, "--perceptual", "lpips-vgg", "--perceptual-weights",
      "{out}-weights/vgg.pth"], r"does-not-exist"),
    ("recon-data-before-weights", "evaluate", [*RECON_BASE, "--tokenizer", "{tok}", "--data", "{missing}", *INCEPTION],
     r"does-not-exist"),
    ("recon-resolution-before-weights", "evaluate",
     [*RECON_BASE, "--tokenizer", "{tok}", "--resolution", "30", *INCEPTION], r"resolution 30 .*divisible.* 4"),
    ("fid-reference-before-weights", "evaluate", ["fid", "--samples", "{pngs}", "--reference", "{missing}",
                                                  *INCEPTION, "--output-dir", "{out}"], r"does-not-exist"),
    ("fid-missing-samples", "evaluate", ["fid", "--samples", "{missing}", "--reference", "offline", "--features",
                                         "effnet-l0", "--output-dir", "{out}"], r"does-not-exist"),
    ("fid-empty-samples", "evaluate", ["fid", "--samples", "{notmodel}", "--reference", "offline", "--features",
                                       "effnet-l0", "--output-dir", "{out}"], r"notmodel|image|PNG|png"),
    ("fid-pickled-reference", "evaluate", ["fid", "--samples", "{pngs}", "--reference", "{pickled_npz}",
                                           "--features", "effnet-l0", "--num-workers", "0", "--cpu",
                                           "--output-dir", "{out}"], r"reference_stats\.npz"),
    ("pipeline-swapped", "evaluate", ["pipeline", "--generator", "{tok}", "--tokenizer", "{dit}", "--reference",
                                      "offline", "--features", "effnet-l0", "--num", "2", "--output-dir", "{out}/samples"],
     r"tokenizer|dit"),
    ("evaluate-no-command", "evaluate", [], r"command|required|recon"),
    # --- benchmark and demo --------------------------------------------------------------------------------
    ("bench-batch", "benchmark", ["throughput", "--per-process-batch-size", "0", "--output-dir", "{out}"], r"batch.size"),
    ("bench-dit", "benchmark", ["throughput", "--dit", "DiT-Q/3", "--output-dir", "{out}"], r"invalid choice"),
    ("bench-precision", "benchmark", ["throughput", "--precision", "fp8", "--output-dir", "{out}"], r"invalid choice"),
    ("demo-profile", "demo", ["--profile", "huge", "--output-dir", "{out}"], r"invalid choice"),
    ("demo-out-is-file", "demo", ["--profile", "tiny", "--output-dir", "{file}"], r"a_file\.txt"),
]


def _fill(argv: list[str], paths: dict[str, Path], out: Path) -> list[str]:
    names = {**{k: str(v) for k, v in paths.items()}, "out": str(out)}
    return [re.sub(r"\{(\w+)\}", lambda m: names[m.group(1)], a) for a in argv]


def _files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []


@pytest.mark.parametrize("case_id,script,argv,pattern", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_gives_one_line_and_exit_2(paths, tmp_path, capsys, case_id, script, argv, pattern):
    out = tmp_path / "out"
    before = {p: p.stat().st_mtime_ns for p in _files_under(paths["tok"].parent)}
    capsys.readouterr()
    code = cli(script, _fill(argv, paths, out))
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, (code, captured.err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error:"), lines[-5:]
    assert re.search(pattern, lines[0], flags=re.IGNORECASE), lines[0]
    assert "Traceback" not in captured.err and captured.out == ""
    assert _files_under(out) == [], f"{case_id} wrote {_files_under(out)}"  # no model, manifest or report
    after = {p: p.stat().st_mtime_ns for p in _files_under(paths["tok"].parent)}
    assert after == before, "the inputs were modified"
    assert not paths["marker"].exists(), "a user-supplied pickle was unpickled"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_model_files_give_one_line(paths, tmp_path, capsys):
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(paths["tok"], tokenizer)
    for name in ("config.json", "model.safetensors"):
        (tokenizer / name).chmod(0)
        capsys.readouterr()
        code = cli("cache_latents", _fill([*CACHE_BASE, "--tokenizer", str(tokenizer)], paths, tmp_path / "out"))
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and name in lines[0], lines
        assert _files_under(tmp_path / "out") == []
        (tokenizer / name).chmod(0o644)


def test_scripts_exit_2_with_one_line_as_real_processes(paths, tmp_path):
    """The process-level contract (exit status, stderr) of a representative case, without any test harness."""
    for script, argv in (("train_tokenizer", [*TOKENIZER_BASE, "--init-from", "{pickled_tok}"]),):
        result = subprocess.run([sys.executable, f"scripts/{script}.py", *_fill(argv, paths, tmp_path / "out")],
                                cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.stderr[-2000:]
        assert not (tmp_path / "out").exists()
    assert not paths["marker"].exists()


# ---------------------------------------------------------------------------------------------------------------
# No code path unpickles a user-supplied file
# ---------------------------------------------------------------------------------------------------------------


def _replant_with_checksum(checkpoint: Path, part: str, marker: Path, torch_format: bool = True) -> None:
    """Replace a checkpoint part by a malicious pickle AND fix its sha256 in meta.json, so only the loader
    itself stands between the pickle and its execution."""
    plant_pickle(checkpoint / part, marker, torch_format)
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["files"][part] = hashlib.sha256((checkpoint / part).read_bytes()).hexdigest()
    (checkpoint / "meta.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def one_step_run(paths, tmp_path_factory) -> Path:
    """A stage-1 run stopped after one step: its checkpoint is what the planted files go into."""
    run = tmp_path_factory.mktemp("one_step") / "run"
    assert cli("train_tokenizer", _fill(TOKENIZER_BASE, paths, run)) == 0
    shutil.rmtree(run / "model")
    return run


@pytest.mark.parametrize("part", ["optimizer_generator.pt", "scheduler_discriminator.pt",
                                  "model_tokenizer.safetensors", "ema_tokenizer.safetensors"])
def test_resume_never_unpickles_a_planted_checkpoint_part(paths, one_step_run, tmp_path, capsys, part):
    run = tmp_path / "run"
    shutil.copytree(one_step_run, run)
    checkpoint = run / "checkpoints" / "step_000000001"
    marker = tmp_path / MARKER_NAME
    _replant_with_checksum(checkpoint, part, marker)
    capsys.readouterr()
    code = cli("train_tokenizer", _fill(TOKENIZER_BASE, paths, run) + ["--max-steps", "2", "--resume", "auto"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error:") and part in err[-1], err[-3:]
    assert not marker.exists(), "the planted pickle ran"
    assert not (run / "model").exists()


def test_model_loaders_never_unpickle_planted_weights(paths, tmp_path):
    from generator.dit import DiT
    from pipelines.kit.generation import GenerationPipeline
    from tokenizer import EpsVAE, load_tokenizer

    marker = tmp_path / MARKER_NAME
    for torch_format in (True, False):
        tok, dit = tmp_path / f"tok{torch_format}", tmp_path / f"dit{torch_format}"
        shutil.copytree(paths["tok"], tok)
        shutil.copytree(paths["dit"], dit)
        for directory in (tok, dit):
            plant_pickle(directory / "model.safetensors", marker, torch_format)
            plant_pickle(directory / "ema.safetensors", marker, torch_format)
        for load in (lambda: load_tokenizer(tok), lambda: load_tokenizer(tok, use_ema=True),
                     lambda: EpsVAE.from_pretrained(tok), lambda: DiT.from_pretrained(dit),
                     lambda: DiT.from_pretrained(dit, use_ema=True),
                     lambda: GenerationPipeline.from_pretrained(str(dit), str(paths["tok"]), device="cpu")):
            with pytest.raises(ValueError, match="safetensors"):
                load()
    assert not marker.exists()
    from pipelines.kit.metrics import load_statistics

    with pytest.raises(ValueError):  # reference statistics with an object array: numpy refuses to unpickle
        load_statistics(paths["pickled_npz"])
    assert not paths["marker"].exists()


def test_no_production_code_can_unpickle():
    """Static guard: every torch.load is weights_only=True, no pickle.load / allow_pickle=True anywhere."""
    offenders = []
    for folder in ("tokenizer", "generator", "data", "pipelines", "scripts"):
        for path in (REPO_ROOT / folder).rglob("*.py"):
            source = path.read_text()
            for match in re.finditer(r"torch\.load\((?:[^()]|\([^()]*\))*\)", source):
                if "weights_only=True" not in match.group(0):
                    offenders.append(f"{path.name}: {match.group(0)[:80]}")
            for banned in ("pickle.load(", "pickle.loads(", "allow_pickle=True", "weights_only=False"):
                for line in source.splitlines():
                    if banned in line and not line.lstrip().startswith("#") and '"""' not in line:
                        offenders.append(f"{path.name}: {line.strip()[:80]}")
    assert offenders == [], offenders


def test_a_finished_script_tears_its_process_group_down(tmp_path):
    """run_main ends an initialised process group after a job that finished, instead of leaving gloo's threads to
    the interpreter's exit (where a rank could abort with exit -6 after writing everything)."""
    import torch.distributed as dist

    from scripts._cli import run_main

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert run_main(lambda argv: None, []) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
