#!/usr/bin/env python
r"""Evaluate the tokenizer (`recon`) and the generation pipeline (`fid`: samples vs a reference; `pipeline`: both).

recon: rFID / PSNR / SSIM / LPIPS at 1-3 decode steps and 1×/2× resolution. fid: FID (FD-EffNetL0 offline), IS,
precision/recall of a sample folder or ADM .npz against reference statistics, images or a data source.
pipeline: sample N images as scripts/sample.py does (default 50k, no CFG: the paper's protocol) and score them.

Examples:
    python scripts/evaluate.py recon --tokenizer runs/tok/model --data offline --resolution 64 \
        --features effnet-l0 --perceptual effnet-l0 --decode-steps 1 3 --output-dir runs/tok/eval
    python scripts/evaluate.py recon --tokenizer runs/eps-sd-m/model --data /data/imagenet --resolution 256 \
        --resolution-multipliers 1 --inception-weights ~/weights-inception-2015-12-05-6726825d.pth
    python scripts/evaluate.py fid --samples runs/samples/fid50k/samples.npz \
        --reference VIRTUAL_imagenet256_labeled.npz --output-dir runs/samples/fid50k
    python scripts/evaluate.py fid --samples runs/samples/demo --reference offline --features effnet-l0
    accelerate launch --multi_gpu --num_processes 8 scripts/evaluate.py pipeline --generator runs/dit-xl/model \
        --tokenizer runs/eps-sd-m/model --output-dir runs/samples/fid50k --per-process-batch-size 125 \
        --precision bf16 --reference VIRTUAL_imagenet256_labeled.npz
Under `accelerate launch` the work is split across the processes (recon: batches of validation images; fid: batches
of samples and of an uncached reference; pipeline: the samples) with the numbers of one process; the main process
prints and writes the report. With --output-dir DIR each command writes DIR/<command>.json and .md (pipeline: next
to its samples) and DIR/config.yaml (--config DIR/config.yaml repeats the run).
"""
from __future__ import annotations

import sys

from _cli import (OUTPUT_DIR_FLAG, ArgumentParser, add_config_arguments, add_config_file_argument, add_cpu_argument,
                  add_deprecated_alias, config_dict, config_from_arguments, parse_arguments, run_main, script_parser,
                  write_effective_config)

INCEPTION_HELP = "path to weights-inception-2015-12-05-6726825d.pth (or put it in the torch hub cache)"
OUTPUT_HELP = "write <output-dir>/{name}.json and .md (the report) and config.yaml there (default: print only)"


def _add_common(parser: ArgumentParser, name: str, with_output_dir: bool = True) -> None:
    """--inception-weights, --cpu (old: --device), --output-dir (old: --output FILE.json)."""
    parser.add_argument("--inception-weights", dest="feature_weights", default=None, help=INCEPTION_HELP)
    if with_output_dir:
        parser.add_argument(OUTPUT_DIR_FLAG, dest="output_dir", default=None, help=OUTPUT_HELP.format(name=name))
        add_cpu_argument(parser)
    add_deprecated_alias(parser, "--device", "--cpu", "device")
    add_deprecated_alias(parser, "--output", OUTPUT_DIR_FLAG, "output")


def build_parser() -> ArgumentParser:
    from pipelines.evaluate import ReconstructionEvalConfig
    from pipelines.kit.fid import FIDConfig
    from pipelines.kit.metrics import FEATURE_EXTRACTORS
    from pipelines.sample import SampleConfig
    from tokenizer.perceptual import PERCEPTUAL_NETWORKS

    parser = script_parser(__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    recon = commands.add_parser("recon", help="reconstruction metrics of a tokenizer",
                                description="Reconstruction metrics of a tokenizer.", epilog=parser.epilog,
                                formatter_class=parser.formatter_class)
    add_config_file_argument(recon)
    add_config_arguments(recon, ReconstructionEvalConfig, skip=("feature_weights", "output", "device"), choices={
        "features": sorted(FEATURE_EXTRACTORS), "perceptual": sorted(PERCEPTUAL_NETWORKS)})
    _add_common(recon, "recon")

    fid = commands.add_parser("fid", help="FID / IS / precision-recall of samples against a reference",
                              description="FID / IS / precision-recall of samples against a reference.",
                              epilog=parser.epilog, formatter_class=parser.formatter_class)
    add_config_file_argument(fid)
    add_config_arguments(fid, FIDConfig, skip=("feature_weights", "output", "device"),
                         choices={"features": sorted(FEATURE_EXTRACTORS)})
    _add_common(fid, "fid")

    pipeline = commands.add_parser("pipeline", help="sample with the full pipeline, then score the samples",
                                   description="Sample with the full pipeline, then score the samples.",
                                   epilog=parser.epilog, formatter_class=parser.formatter_class)
    add_config_file_argument(pipeline)
    # One --output-dir (the samples and the report), --per-process-batch-size and --cpu for sampling and features.
    add_config_arguments(pipeline, SampleConfig, choices={"variance": ["fixed_large", "fixed_small"]})
    add_config_arguments(pipeline, FIDConfig, skip=("samples", "batch_size", "feature_weights", "output", "device"),
                         choices={"features": sorted(FEATURE_EXTRACTORS)})
    add_deprecated_alias(pipeline, "--out", OUTPUT_DIR_FLAG, "output_dir")
    _add_common(pipeline, "pipeline", with_output_dir=False)
    return parser


PIPELINE_DEFAULT_NUM = 50_000  # the paper's protocol (Table 3): 50k samples, no CFG


def _device_and_output(args, name: str) -> dict:
    """The configs' `device` (from --cpu, or the old --device) and `output` (the report's JSON path)."""
    values = vars(args)
    extra = {"feature_weights": args.feature_weights}
    if values.get("cpu"):
        extra["device"] = "cpu"
    elif "device" in values:
        extra["device"] = values["device"]
    if "output" in values:  # the old --output FILE.json
        extra["output"] = values["output"]
    elif values.get("output_dir"):
        extra["output"] = f"{values['output_dir']}/{name}.json"
    return extra


def _print_and_record(report, config, args, command: str) -> None:
    """On the main process (`report` is None on the others under accelerate launch): print the table and record
    the effective config beside the report."""
    if report is None:
        return
    print(report.markdown(), end="")
    if config.output:
        write_effective_config(args.output_dir, config_dict(config), f"scripts/evaluate.py {command}")
        print(f"wrote {config.output} and {config.output.rsplit('.', 1)[0]}.md")


def main(argv=None) -> None:
    from pipelines.evaluate import ReconstructionEvalConfig, evaluate_reconstruction

    args = parse_arguments(build_parser(), argv)
    if args.command == "recon":
        if "tokenizer" not in vars(args):
            raise ValueError("recon needs --tokenizer DIR (a save_pretrained directory)")
        config = config_from_arguments(ReconstructionEvalConfig, args, **_device_and_output(args, "recon"))
        _print_and_record(evaluate_reconstruction(config), config, args, "recon")
    elif args.command == "fid":
        from pipelines.kit.fid import FIDConfig, evaluate_fid
        from pipelines.kit.metrics import evaluation_state

        missing = [flag for flag in ("samples", "reference") if flag not in vars(args)]
        if missing:
            raise ValueError(f"fid needs {' and '.join('--' + m for m in missing)}")
        config = config_from_arguments(FIDConfig, args, **_device_and_output(args, "fid"))
        _print_and_record(evaluate_fid(config, state=evaluation_state(config.device)[0]), config, args, "fid")
    elif args.command == "pipeline":
        from pipelines.kit.fid import FIDConfig
        from pipelines.sample import SampleConfig, sample_and_score

        missing = [flag for flag in ("generator", "tokenizer", "reference") if flag not in vars(args)]
        if missing:
            raise ValueError(f"pipeline needs {' and '.join('--' + m for m in missing)}")
        extra = {} if {"num", "per_class", "seeds"} & set(vars(args)) else {"num": PIPELINE_DEFAULT_NUM}
        sample_config = config_from_arguments(SampleConfig, args, **extra)
        fid_extra = _device_and_output(args, "pipeline")
        fid_extra.setdefault("output", f"{sample_config.output_dir}/pipeline.json")
        if sample_config.cpu:
            fid_extra["device"] = "cpu"
        fid_config = config_from_arguments(FIDConfig, args, samples=sample_config.output_dir, **fid_extra)
        report = sample_and_score(sample_config, fid_config)
        if report is not None:
            settings = {**config_dict(fid_config), **config_dict(sample_config)}
            for name in ("samples", "output", "device"):
                settings.pop(name, None)
            write_effective_config(sample_config.output_dir, settings, "scripts/evaluate.py pipeline")
            print(report["markdown"], end="")
            print(f"wrote {fid_config.output} and {fid_config.output.rsplit('.', 1)[0]}.md")


if __name__ == "__main__":
    sys.exit(run_main(main))
