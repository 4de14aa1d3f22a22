#!/usr/bin/env python
"""Evaluate the tokenizer (`recon`: rFID / PSNR / SSIM / LPIPS at 1-3 decode steps and 1×/2× resolution).

Examples:
    python scripts/evaluate.py recon --tokenizer runs/tok/model --data offline --resolution 64 \
        --features effnet-l0 --perceptual effnet-l0 --decode-steps 1 3 --output runs/tok/recon.json
    python scripts/evaluate.py recon --tokenizer runs/eps-sd-m/model --data /data/imagenet --resolution 256 \
        --resolution-multipliers 1 --inception-weights ~/weights-inception-2015-12-05-6726825d.pth
"""
from __future__ import annotations

import sys

from pipelines.cli import ArgumentParser, add_config_arguments, config_from_arguments, run_main


def build_parser() -> ArgumentParser:
    from pipelines.evaluate import ReconstructionEvalConfig
    from pipelines.metrics import FEATURE_EXTRACTORS
    from tokenizer.perceptual import PERCEPTUAL_NETWORKS

    parser = ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    recon = commands.add_parser("recon", help="reconstruction metrics of a tokenizer")
    recon.add_argument("--inception-weights", dest="feature_weights", default=None,
                       help="path to weights-inception-2015-12-05-6726825d.pth (or put it in the torch hub cache)")
    add_config_arguments(recon, ReconstructionEvalConfig, skip=("feature_weights",), choices={
        "features": sorted(FEATURE_EXTRACTORS), "perceptual": sorted(PERCEPTUAL_NETWORKS),
        "precision": ["no", "bf16", "fp16"]})
    return parser


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


if __name__ == "__main__":
    sys.exit(run_main(main))
