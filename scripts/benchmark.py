#!/usr/bin/env python
r"""Benchmarks. `throughput`: images/s of the pipeline and its parts (Table 3); `train`: training steps, eager vs
compiled, against the machine's matmul rate, and the latent-shard reader; `tokenizer`: the paper's studies.

Examples:
    python scripts/benchmark.py throughput            # default: this device's fast precision (auto), a few minutes
    python scripts/benchmark.py throughput --dit DiT-XL/2 --per-process-batch-size 2 --precision fp32 bf16 \
        --timed-steps 2 --output-dir runs/benchmark/throughput
    python scripts/benchmark.py throughput --quick --output-dir /tmp/bench     # tiny models, seconds
    python scripts/benchmark.py train --output-dir runs/benchmark/train        # demo tokenizer + DiT-S/2 steps
    python scripts/benchmark.py train --dit DiT-XL/2 --modes eager --timed-steps 2
    python scripts/benchmark.py tokenizer --study vae-vs-eps --profile quick --output-dir runs/bench
Throughput models are randomly initialised at the paper's sizes; the 250-step DiT time is extrapolated from the timed
steps (the report says from how many). One line is printed per measurement as it is taken; the tables follow.
"""
from __future__ import annotations

import sys

from _cli import (OUTPUT_DIR_FLAG, PER_PROCESS_BATCH_FLAG, ArgumentParser, BoolFlag, add_config_arguments,
                  add_config_file_argument, add_cpu_argument, config_from_arguments,
                  add_deprecated_alias, add_precision_argument, field_docs, parse_arguments, positive_int, run_main,
                  script_parser, write_effective_config)


def build_parser() -> ArgumentParser:
    from generator.dit import DiT_models
    from pipelines.experiments.throughput import (COMPILE_MODES, COMPRESSIONS, TOKENIZER_KINDS, ThroughputConfig,
                                                  TrainThroughputConfig)
    from pipelines.experiments.tokenizer_studies import PROFILES, STUDIES

    defaults, docs = ThroughputConfig(), field_docs(ThroughputConfig)

    def helps(name: str, text: str | None = None) -> str:
        return f"{text or docs[name]} (default: {getattr(defaults, name)})"

    parser = script_parser(__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    throughput = commands.add_parser("throughput", help="pipeline and component throughput (Table 3)",
                                     description="Pipeline and component throughput (Table 3).",
                                     epilog=parser.epilog)
    add_config_file_argument(throughput)
    throughput.add_argument("--dit", default=defaults.dit, choices=list(DiT_models), help=helps("dit"))
    throughput.add_argument(PER_PROCESS_BATCH_FLAG, dest="batch_size", type=positive_int, default=defaults.batch_size,
                            help=helps("batch_size", "images per timed call (one process)"))
    add_deprecated_alias(throughput, "--batch-size", PER_PROCESS_BATCH_FLAG, "batch_size", type=positive_int)
    add_precision_argument(throughput, "one or more precisions to time; auto = this device's fast one",
                           nargs="+", dest="precisions", default=list(defaults.precisions))
    throughput.add_argument("--compression", nargs="+", dest="compressions", default=list(defaults.compressions),
                            choices=list(COMPRESSIONS), help=helps("compressions"))
    throughput.add_argument("--tokenizer", nargs="+", dest="tokenizers", default=list(defaults.tokenizers),
                            choices=list(TOKENIZER_KINDS), help=helps("tokenizers"))
    throughput.add_argument("--timed-steps", type=positive_int, default=defaults.timed_steps,
                            help=helps("timed_steps"))
    throughput.add_argument("--ddpm-steps", type=positive_int, default=defaults.ddpm_steps, help=helps("ddpm_steps"))
    throughput.add_argument("--decode-steps", type=positive_int, nargs="+", default=list(defaults.decode_steps),
                            help=helps("decode_steps"))
    throughput.add_argument("--resolution", type=positive_int, default=defaults.resolution, help=helps("resolution"))
    add_deprecated_alias(throughput, "--image-size", "--resolution", "resolution", type=positive_int)
    throughput.add_argument("--decoder", default=defaults.decoder, help=helps("decoder"))
    throughput.add_argument("--matmul-size", type=positive_int, default=defaults.matmul_size,
                            help=helps("matmul_size"))
    add_cpu_argument(throughput)
    add_deprecated_alias(throughput, "--device", "--cpu", "device")
    throughput.add_argument("--threads", type=positive_int, default=None,
                            help="CPU threads (fewer than the cores avoids oversubscription on a shared machine)")
    throughput.add_argument("--quick", action=BoolFlag, default=False, help="tiny models (for tests)")
    throughput.add_argument(OUTPUT_DIR_FLAG, dest="output_dir", default=defaults.output_dir,
                            help=helps("output_dir"))
    add_deprecated_alias(throughput, "--out", OUTPUT_DIR_FLAG, "output_dir")

    train = commands.add_parser("train", help="training steps eager vs compiled, FLOP/s of matmul; shard reader",
                                description="Training steps (tokenizer at the demo's sizes, with and without the "
                                            "perceptual net; a DiT), eager and compiled, FLOP/s against the "
                                            "matmul rate timed right before each step; where an eager step's "
                                            "time goes; the latent-shard reader's latents/s.", epilog=parser.epilog)
    add_config_file_argument(train)
    add_config_arguments(train, TrainThroughputConfig, skip=("device", "verbose"),
                         choices={"dit": list(DiT_models), "modes": COMPILE_MODES})
    add_cpu_argument(train)

    studies = commands.add_parser("tokenizer", help="controlled tokenizer studies (Tables 4, 7; Fig. 2-3)",
                                  description="Controlled tokenizer studies (Tables 4, 7; Fig. 2-3).",
                                  epilog=parser.epilog)
    add_config_file_argument(studies)
    studies.add_argument("--study", required=True, choices=[*STUDIES, "all"], help="which study ('all': each in turn)")
    studies.add_argument("--profile", default="quick", choices=list(PROFILES),
                         help="micro: seconds (tests); quick: ~20 min per study on 2 CPU cores; full: paper sizes, GPUs")
    studies.add_argument(OUTPUT_DIR_FLAG, dest="output_dir", default="runs/bench",
                         help="each study writes <output-dir>/<study>/ (default: runs/bench)")
    add_deprecated_alias(studies, "--out", OUTPUT_DIR_FLAG, "output_dir")
    studies.add_argument("--data", default="offline", help="offline | ImageNet-style folder | webdataset shards")
    studies.add_argument("--perceptual-weights", default=None,
                         help="weights file of the training perceptual loss (lpips-vgg in the full profile)")
    studies.add_argument("--threads", type=int, default=None,
                         help="CPU threads for torch (1 is faster than 2 on a CPU other jobs are using)")
    add_cpu_argument(studies)
    return parser


def main(argv=None) -> None:
    import dataclasses

    from pipelines.experiments.throughput import ThroughputConfig, benchmark_throughput, markdown

    namespace = parse_arguments(build_parser(), argv)
    if namespace.command == "train":
        from pipelines.experiments.throughput import TrainThroughputConfig, benchmark_training, train_markdown

        extra = {"device": "cpu"} if getattr(namespace, "cpu", False) else {}
        train_config = config_from_arguments(TrainThroughputConfig, namespace, **extra)
        print(train_markdown(benchmark_training(train_config)), end="")
        if train_config.output_dir:
            write_effective_config(train_config.output_dir, dataclasses.asdict(train_config),
                                   "scripts/benchmark.py train")
            print(f"wrote {train_config.output_dir}/train_throughput.json and train_throughput.md")
        return
    if namespace.command == "tokenizer":
        from pipelines.experiments.tokenizer_studies import run_studies

        run_studies(namespace.study, namespace.profile, namespace.output_dir, data=namespace.data,
                    perceptual_weights=namespace.perceptual_weights, threads=namespace.threads,
                    cpu=bool(getattr(namespace, "cpu", False)))
        return
    args = vars(namespace)
    args.pop("command")
    if args.pop("cpu", False):
        args["device"] = "cpu"
    config = ThroughputConfig(**args)
    print(markdown(benchmark_throughput(config)), end="")
    if config.output_dir:
        write_effective_config(config.output_dir, dataclasses.asdict(config), "scripts/benchmark.py throughput")
        print(f"wrote {config.output_dir}/throughput.json and throughput.md")


if __name__ == "__main__":
    sys.exit(run_main(main))
