#!/usr/bin/env python
r"""Sample class-conditional images: class ids → DiT (250 DDPM steps) → ε-VAE decoder (1-3 steps) → PNGs.

Examples:
    python scripts/sample.py --generator runs/dit/model --tokenizer runs/tok/model --classes 207,360,387 \
        --per-class 4 --output-dir runs/samples/demo
    accelerate launch --multi_gpu --num_processes 8 scripts/sample.py --generator runs/dit-xl/model \
        --tokenizer runs/eps-sd-m/model --classes all --num 50000 --seeds 0-49999 --per-process-batch-size 125 \
        --precision bf16 --output-dir runs/samples/fid50k          # rerun the same command to resume
    # other settings into a folder that holds samples: refused (settings.json records them); --overwrite restarts
    python scripts/sample.py --generator runs/dit/model --class-names    # list the classes the DiT knows
Writes NNNNNN_c<class>_s<seed>.png per image, grid.png, samples.npz (ADM evaluator format: arr_0, arr_1) and
config.yaml (--config <output-dir>/config.yaml repeats the run).
"""
from __future__ import annotations

import sys

from _cli import (OUTPUT_DIR_FLAG, ArgumentParser, add_config_arguments, add_deprecated_alias, config_dict,
                  config_from_arguments, parse_arguments, run_main, script_parser, write_effective_config)


def build_parser() -> ArgumentParser:
    from pipelines.sample import SampleConfig

    parser = script_parser(__doc__)
    add_config_arguments(parser, SampleConfig, choices={"variance": ["fixed_large", "fixed_small"]})
    add_deprecated_alias(parser, "--out", OUTPUT_DIR_FLAG, "output_dir")
    parser.add_argument("--class-names", action="store_true",
                        help="print the class ids and names the generator was trained on, then exit")
    return parser


def main(argv=None) -> None:
    from pipelines.kit.generation import read_provenance
    from pipelines.sample import SampleConfig, images_per_second, run_sampling

    args = parse_arguments(build_parser(), argv)
    if args.class_names:
        if "generator" not in vars(args):
            raise ValueError("--class-names needs --generator DIR")
        from generator.dit import load_config

        num_classes = load_config(args.generator).num_classes
        names = read_provenance(args.generator).get("class_names") or []
        for index in range(num_classes):
            print(f"{index}\t{names[index] if index < len(names) else ''}".rstrip())
        return
    missing = [flag for flag in ("generator", "tokenizer") if flag not in vars(args)]
    if missing:
        raise ValueError(f"sampling needs {' and '.join('--' + m + ' DIR' for m in missing)}")
    config = config_from_arguments(SampleConfig, args)
    result = run_sampling(config)
    write_effective_config(config.output_dir, config_dict(config), "scripts/sample.py")
    print(f"{result.num_images} images of {result.image_size}px in {result.out_dir} ({result.generated} new on "
          f"this rank, {result.skipped} already there; {images_per_second(result):.2f} images/s)")


if __name__ == "__main__":
    sys.exit(run_main(main))
