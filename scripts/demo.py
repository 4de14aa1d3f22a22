#!/usr/bin/env python
r"""The main job (`make demo`): train and evaluate the whole two-stage pipeline offline on CPU.

Writes <output-dir>/report.md, metrics.json, timings.json, recon.png, grid.png and loss.png (default runs/demo).
Every budget is a number of steps: two runs of one commit write the same metrics.json. A second run reuses
finished stages of the same settings (demo.json; other settings are refused, never mixed); --fresh
(make demo FRESH=1) starts over.

Examples:
    python scripts/demo.py                                    # ~10 min on 2 CPU cores, run alone
    python scripts/demo.py --profile 16x --output-dir runs/demo-16x   # the paper's harder 16× compression
    python scripts/demo.py --profile tiny --output-dir /tmp/demo --fresh
"""
from __future__ import annotations

import sys

from _cli import OUTPUT_DIR_FLAG, add_deprecated_alias, parse_arguments, run_main, script_parser, \
    write_effective_config


def build_parser():
    from pipelines.experiments.demo import PROFILES

    parser = script_parser(__doc__)
    parser.add_argument(OUTPUT_DIR_FLAG, dest="output_dir", default="runs/demo",
                        help="where the demo writes its stages and report (default: runs/demo)")
    add_deprecated_alias(parser, "--out", OUTPUT_DIR_FLAG, "output_dir")
    parser.add_argument("--profile", default="default", choices=sorted(PROFILES),
                        help="default: 8× ε-VAE, ~10 min on 2 CPU cores; 16x: 16× ε-VAE on whole crops (450 tokenizer steps); tiny: seconds (tests)")
    parser.add_argument("--fresh", action="store_true", help="delete the output directory and start over")
    return parser


def main(argv=None) -> None:
    from pipelines.experiments.demo import run_demo

    args = parse_arguments(build_parser(), argv)
    run_demo(args.output_dir, args.profile, args.fresh)
    write_effective_config(args.output_dir, {"output_dir": args.output_dir, "profile": args.profile},
                           "scripts/demo.py")


if __name__ == "__main__":
    sys.exit(run_main(main))
