#!/usr/bin/env python
"""Evaluate the tokenizer (`recon`) and the generation pipeline (`fid`: samples vs a reference; `pipeline`: both).

recon: rFID / PSNR / SSIM / LPIPS at 1-3 decode steps and 1×/2× resolution. fid: FID (FD-EffNetL0 offline), IS,
precision/recall of a sample folder or ADM .npz against reference statistics, images or a data source.
pipeline: sample N images as scripts/sample.py does (default 50k, no CFG: the paper's protocol) and score them.

Examples:
    python scripts/evaluate.py recon --tokenizer runs/tok/model --data offline --resolution 64 \
        --features effnet-l0 --perceptual effnet-l0 --decode-steps 1 3 --output runs/tok/recon.json
    python scripts/evaluate.py recon --tokenizer runs/eps-sd-m/model --data /data/imagenet --resolution 256 \
        --resolution-multipliers 1 --inception-weights ~/weights-inception-2015-12-05-6726825d.pth
    python scripts/evaluate.py fid --samples runs/samples/fid50k/samples.npz \
        --reference VIRTUAL_imagenet256_labeled.npz --output runs/samples/fid50k/fid.json
    python scripts/evaluate.py fid --samples runs/samples/demo --reference offline --features effnet-l0
    accelerate launch --multi_gpu --num_processes 8 scripts/evaluate.py pipeline --generator runs/dit-xl/model \
        --tokenizer runs/eps-sd-m/model --out runs/samples/fid50k --batch-size 125 --precision bf16 \
        --reference VIRTUAL_imagenet256_labeled.npz --output runs/samples/fid50k/pipeline.json
"""
from __future__ import annotations

import sys

from _cli import ArgumentParser, add_config_arguments, config_from_arguments, run_main


def build_parser() -> ArgumentParser:
    from pipelines.evaluate import ReconstructionEvalConfig
    from pipelines.kit.fid import FIDConfig
    from pipelines.kit.metrics import FEATURE_EXTRACTORS
    from pipelines.kit.precision import PRECISIONS
    from pipelines.sample import SampleConfig
    from tokenizer.perceptual import PERCEPTUAL_NETWORKS

    parser = ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    recon = commands.add_parser("recon", help="reconstruction metrics of a tokenizer")
    recon.add_argument("--inception-weights", dest="feature_weights", default=None,
                       help="path to weights-inception-2015-12-05-6726825d.pth (or put it in the torch hub cache)")
    add_config_arguments(recon, ReconstructionEvalConfig, skip=("feature_weights",), choices={
        "features": sorted(FEATURE_EXTRACTORS), "perceptual": sorted(PERCEPTUAL_NETWORKS),
        "precision": PRECISIONS})

    inception_help = "path to weights-inception-2015-12-05-6726825d.pth (or put it in the torch hub cache)"
    fid = commands.add_parser("fid", help="FID / IS / precision-recall of samples against a reference")
    add_config_arguments(fid, FIDConfig, skip=("feature_weights",), choices={"features": sorted(FEATURE_EXTRACTORS)})
    fid.add_argument("--inception-weights", dest="feature_weights", default=None, help=inception_help)

    pipeline = commands.add_parser("pipeline", help="sample with the full pipeline, then score the samples")
    add_config_arguments(pipeline, SampleConfig, choices={"precision": PRECISIONS,
                                                           "variance": ["fixed_large", "fixed_small"]})
    # One --batch-size / --device for sampling and features; --out is the sample folder, --output the report.
    add_config_arguments(pipeline, FIDConfig, skip=("samples", "batch_size", "feature_weights"),
                         choices={"features": sorted(FEATURE_EXTRACTORS)})
    pipeline.add_argument("--inception-weights", dest="feature_weights", default=None, help=inception_help)
    return parser


PIPELINE_DEFAULT_NUM = 50_000  # the paper's protocol (Table 3): 50k samples, no CFG


def main(argv=None) -> None:
    from pipelines.evaluate import ReconstructionEvalConfig, evaluate_reconstruction

    args = build_parser().parse_args(argv)
    if args.command == "recon":
        if "tokenizer" not in vars(args):
            raise ValueError("recon needs --tokenizer DIR (a save_pretrained directory)")
        config = config_from_arguments(ReconstructionEvalConfig, args,
                                       feature_weights=args.feature_weights)
        report = evaluate_reconstruction(config)
        print(report.markdown(), end="")
        if config.output:
            print(f"wrote {config.output} and {config.output.rsplit('.', 1)[0]}.md")
    elif args.command == "fid":
        from pipelines.kit.fid import FIDConfig, evaluate_fid

        missing = [flag for flag in ("samples", "reference") if flag not in vars(args)]
        if missing:
            raise ValueError(f"fid needs {' and '.join('--' + m for m in missing)}")
        config = config_from_arguments(FIDConfig, args, feature_weights=args.feature_weights)
        print(evaluate_fid(config).markdown(), end="")
        if config.output:
            print(f"wrote {config.output} and {config.output.rsplit('.', 1)[0]}.md")
    elif args.command == "pipeline":
        from pipelines.kit.fid import FIDConfig
        from pipelines.sample import SampleConfig, sample_and_score

        missing = [flag for flag in ("generator", "tokenizer", "reference") if flag not in vars(args)]
        if missing:
            raise ValueError(f"pipeline needs {' and '.join('--' + m for m in missing)}")
        extra = {} if {"num", "per_class", "seeds"} & set(vars(args)) else {"num": PIPELINE_DEFAULT_NUM}
        sample_config = config_from_arguments(SampleConfig, args, **extra)
        fid_config = config_from_arguments(FIDConfig, args, samples=sample_config.out,
                                           feature_weights=args.feature_weights)
        report = sample_and_score(sample_config, fid_config)
        if report is not None:
            print(report["markdown"], end="")
            if fid_config.output:
                print(f"wrote {fid_config.output} and {fid_config.output.rsplit('.', 1)[0]}.md")


if __name__ == "__main__":
    sys.exit(run_main(main))
