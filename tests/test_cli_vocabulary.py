"""One command surface (issue 18): every script's --help documents every option; the output-directory, precision,
batch-size and device flags have the same names and choices wherever they appear; --config files round-trip;
old spellings still parse, with a warning."""
from __future__ import annotations

import argparse
import importlib
import json
import re
import warnings

import pytest

import _cli

# script → its subcommands (None: no subcommands)
SCRIPTS = {"train_tokenizer": None, "train_generator": None, "cache_latents": None, "sample": None,
           "evaluate": ("recon", "fid", "pipeline"), "benchmark": ("throughput", "train", "tokenizer"), "demo": None}
BANNED = {"--out", "--output", "--batch-size", "--image-size", "--device"}  # old names: hidden aliases only


def leaf_parsers():
    for name, commands in SCRIPTS.items():
        parser = importlib.import_module(name).build_parser()
        if commands is None:
            yield name, parser
            continue
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        assert set(sub.choices) == set(commands)
        for command in commands:
            yield f"{name} {command}", sub.choices[command]


PARSERS = dict(leaf_parsers())


def visible_options(parser):
    return [a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS]


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_option_has_help_text(name):
    parser = PARSERS[name]
    undocumented = []
    for action in visible_options(parser):
        text = re.sub(r"\((default|required)[^)]*\)\s*$", "", action.help or "").strip()
        if not text:
            undocumented.append(action.option_strings[0])
    assert not undocumented, f"{name}: options without help text: {undocumented}"
    shown = {s for a in visible_options(parser) for s in a.option_strings}
    assert not shown & BANNED, f"{name}: old names shown in --help: {sorted(shown & BANNED)}"
    assert "--config" in shown
    assert parser.epilog and "Examples" in parser.epilog or name.startswith("demo")  # Examples reach --help
    assert "Examples" in parser.format_help() or name == "demo"


def _option(parser, flag):
    for action in parser._actions:
        if flag in action.option_strings and action.help != argparse.SUPPRESS:
            return action
    return None


def test_shared_flags_have_one_name_and_one_set_of_choices():
    from pipelines.kit.precision import PRECISIONS

    seen = {"precision": 0, "output": 0, "batch": 0, "cpu": 0}
    for name, parser in PARSERS.items():
        precision = _option(parser, "--precision")
        if precision is not None:
            seen["precision"] += 1
            assert list(precision.choices) == list(PRECISIONS), name
        flags = {s for a in visible_options(parser) for s in a.option_strings}
        if _option(parser, "--output-dir"):
            seen["output"] += 1
        assert not {"--out", "--output"} & flags
        batch = flags & {"--global-batch-size", "--per-process-batch-size"}
        if batch:
            seen["batch"] += 1
            expected = "--global-batch-size" if name.startswith("train_") else "--per-process-batch-size"
            assert batch == {expected}, name
        if "--cpu" in flags:
            seen["cpu"] += 1
            assert "--no-cpu" in flags and "--device" not in flags
    assert seen["output"] == len(PARSERS)  # every script writes into --output-dir (evaluate pipeline: its samples)
    assert seen["precision"] >= 6 and seen["batch"] >= 6 and seen["cpu"] >= 6


def test_precision_auto_resolves_to_fp32_on_a_cpu_and_bf16_without_native_support_warns(monkeypatch):
    import torch

    from pipelines.kit import precision

    monkeypatch.delenv(precision.ACCELERATE_ENV, raising=False)
    assert precision.resolve_precision("auto", "cpu") == "fp32"  # this machine
    assert precision.accelerate_mixed_precision("auto", cpu=True) == "no"
    assert precision.resolve_precision("no", "cpu") == "fp32"
    monkeypatch.setenv(precision.ACCELERATE_ENV, "fp16")  # `accelerate launch --mixed_precision fp16` wins
    assert precision.accelerate_mixed_precision("auto", cpu=True) == "fp16"
    monkeypatch.setenv(precision.ACCELERATE_ENV, "no")
    assert precision.accelerate_mixed_precision("auto", cpu=True) == "no"
    monkeypatch.delenv(precision.ACCELERATE_ENV)
    # an AVX2 CPU (the project's usual machine): explicit bf16 warns once, with the capability and measured ratio
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(precision, "_warned", set())
    with pytest.warns(RuntimeWarning, match=r"without native bf16 \(AVX2\).*measured .*× slower than fp32"):
        assert precision.resolve_precision("bf16", "cpu") == "bf16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        precision.resolve_precision("bf16", "cpu")
        precision.autocast("cpu", "bf16")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(precision, "_warned", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # native bf16: no warning
        assert precision.resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="precision must be one of"):
        precision.resolve_precision("fp64", "cpu")


def test_config_file_sets_defaults_flags_override_and_the_written_file_reproduces(tmp_path):
    import train_tokenizer
    from pipelines.train_tokenizer import TokenizerTrainConfig

    settings = {"model": {"encoder": "tiny", "model_overrides": {"gamma": 0.5}}, "data": {"resolution": 64},
                "lr": 3e-4, "max_steps": 7}
    (tmp_path / "a.json").write_text(json.dumps(settings))
    args = _cli.parse_arguments(train_tokenizer.build_parser(), ["--config", str(tmp_path / "a.json"),
                                                                  "--max-steps", "9", "--cpu"])
    config = _cli.training_config(TokenizerTrainConfig, args, train_tokenizer.MODEL_OVERRIDE_FLAGS)
    assert (config.model.encoder, config.data.resolution, config.optim.lr, config.optim.max_steps) == \
        ("tiny", 64, 3e-4, 9)
    assert config.model.model_overrides == {"gamma": 0.5} and config.run.cpu is True
    written = _cli.write_effective_config(str(tmp_path / "run"), _cli.config_dict(config), "train_tokenizer")
    again = _cli.training_config(TokenizerTrainConfig, _cli.parse_arguments(
        train_tokenizer.build_parser(), ["--config", written]), train_tokenizer.MODEL_OVERRIDE_FLAGS)
    assert again == config
    (tmp_path / "bad.yaml").write_text("lerning_rate: 1\n")
    with pytest.raises(SystemExit) as exit_:
        _cli.parse_arguments(train_tokenizer.build_parser(), ["--config", str(tmp_path / "bad.yaml")])
    assert exit_.value.code == 2


def test_old_spellings_still_parse_with_a_warning(capsys):
    import benchmark
    import cache_latents
    import sample

    args = _cli.parse_arguments(sample.build_parser(), ["--generator", "g", "--tokenizer", "t", "--out", "o",
                                                        "--batch-size", "3", "--cpu", "true", "--precision", "no"])
    assert (args.output_dir, args.batch_size, args.cpu, args.precision) == ("o", 3, True, "fp32")
    err = capsys.readouterr().err
    assert "--out is deprecated" in err and "use --output-dir" in err and "use --per-process-batch-size" in err
    assert "--cpu true is deprecated" in err
    args = _cli.parse_arguments(cache_latents.build_parser(), ["--verify", "false", "--output-dir", "x"])
    assert args.verify is False and "use --no-verify" in capsys.readouterr().err
    assert _cli.parse_arguments(cache_latents.build_parser(), ["--verify"]).verify is True
    args = _cli.parse_arguments(benchmark.build_parser(), ["throughput", "--image-size", "64", "--device", "cpu"])
    assert (args.resolution, args.device) == (64, "cpu")
