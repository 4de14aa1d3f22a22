#!/usr/bin/env python
"""Benchmarks. `throughput`: images/s of the pipeline and its parts (Table 3); `tokenizer`: the paper's studies.

Examples:
    python scripts/benchmark.py throughput --dit DiT-XL/2 --batch-size 2 --precision fp32 bf16 \
        --timed-steps 2 --out runs/benchmark/throughput
    python scripts/benchmark.py throughput --quick --out /tmp/bench     # tiny models, seconds
    python scripts/benchmark.py tokenizer --study vae-vs-eps --profile quick --out runs/bench
Throughput models are randomly initialised at the paper's sizes; the 250-step DiT time is extrapolated from the timed
steps (the report says from how many).
"""
from __future__ import annotations

import sys

from _cli import ArgumentParser, positive_int, run_main


def build_parser() -> ArgumentParser:
    from generator.dit import DiT_models
    from pipelines.experiments.throughput import COMPRESSIONS, TOKENIZER_KINDS, ThroughputConfig
    from pipelines.kit.precision import PRECISIONS
    from pipelines.experiments.tokenizer_studies import PROFILES, STUDIES

    defaults = ThroughputConfig()
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    throughput = commands.add_parser("throughput", help="pipeline and component throughput (Table 3)")
    throughput.add_argument("--dit", default=defaults.dit, choices=list(DiT_models))
    throughput.add_argument("--batch-size", type=positive_int, default=defaults.batch_size)
    throughput.add_argument("--precision", nargs="+", dest="precisions", default=list(defaults.precisions),
                            choices=list(PRECISIONS), help="one or more precisions (autocast dtypes) to time")
    throughput.add_argument("--compression", nargs="+", dest="compressions", default=list(defaults.compressions),
                            choices=list(COMPRESSIONS))
    throughput.add_argument("--tokenizer", nargs="+", dest="tokenizers", default=list(defaults.tokenizers),
                            choices=list(TOKENIZER_KINDS))
    throughput.add_argument("--timed-steps", type=positive_int, default=defaults.timed_steps,
                            help="DiT forwards timed; the ddpm-steps figure is extrapolated from them")
    throughput.add_argument("--ddpm-steps", type=positive_int, default=defaults.ddpm_steps)
    throughput.add_argument("--decode-steps", type=positive_int, nargs="+", default=list(defaults.decode_steps))
    throughput.add_argument("--image-size", type=positive_int, default=defaults.image_size)
    throughput.add_argument("--decoder", default=defaults.decoder, help="ε-VAE decoder preset (Table 5)")
    throughput.add_argument("--matmul-size", type=positive_int, default=defaults.matmul_size)
    throughput.add_argument("--device", default=None)
    throughput.add_argument("--threads", type=positive_int, default=None,
                            help="CPU threads (fewer than the cores avoids oversubscription on a shared machine)")
    throughput.add_argument("--quick", action="store_true", help="tiny models (for tests)")
    throughput.add_argument("--out", default=defaults.out, help="directory for throughput.json / .md")
    studies = commands.add_parser("tokenizer", help="controlled tokenizer studies (Tables 4, 7; Fig. 2-3)")
    studies.add_argument("--study", required=True, choices=[*STUDIES, "all"], help="which study ('all': each in turn)")
    studies.add_argument("--profile", default="quick", choices=list(PROFILES),
                         help="micro: seconds (tests); quick: ~20 min per study on 2 CPU cores; full: paper sizes, GPUs")
    studies.add_argument("--out", default="runs/bench", help="each study writes <out>/<study>/")
    studies.add_argument("--data", default="offline", help="offline | ImageNet-style folder | webdataset shards")
    studies.add_argument("--perceptual-weights", default=None,
                         help="weights file of the training perceptual loss (lpips-vgg in the full profile)")
    studies.add_argument("--threads", type=int, default=None,
                         help="CPU threads for torch (1 is faster than 2 on a CPU other jobs are using)")
    return parser


def main(argv=None) -> None:
    from pipelines.experiments.throughput import ThroughputConfig, benchmark_throughput, markdown

    namespace = build_parser().parse_args(argv)
    if namespace.command == "tokenizer":
        from pipelines.experiments.tokenizer_studies import run_studies

        run_studies(namespace.study, namespace.profile, namespace.out, data=namespace.data,
                    perceptual_weights=namespace.perceptual_weights, threads=namespace.threads)
        return
    args = vars(namespace)
    if args.pop("command") == "throughput":
        config = ThroughputConfig(**args)
        print(markdown(benchmark_throughput(config)), end="")
        if config.out:
            print(f"wrote {config.out}/throughput.json and throughput.md")


if __name__ == "__main__":
    sys.exit(run_main(main))
