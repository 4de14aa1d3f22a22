#!/usr/bin/env python
"""The main job (`make demo`): train and evaluate the whole two-stage pipeline offline on CPU.

Writes runs/demo/report.md, metrics.json, recon.png, grid.png and loss.png. A second run reuses finished
stages; --fresh (make demo FRESH=1) starts over.
"""
from __future__ import annotations

import sys

from _cli import ArgumentParser, run_main


def main(argv=None) -> None:
    from pipelines.experiments.demo import PROFILES, run_demo

    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    parser.add_argument("--profile", default="default", choices=sorted(PROFILES),
                        help="default: ~12 min on 2 CPU cores; tiny: seconds (tests)")
    parser.add_argument("--fresh", action="store_true", help="delete the output directory and start over")
    args = parser.parse_args(argv)
    run_demo(args.out, args.profile, args.fresh)


if __name__ == "__main__":
    sys.exit(run_main(main))
