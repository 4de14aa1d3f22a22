#!/usr/bin/env python
r"""Cache tokenizer latents (center crop + flip posterior moments) as webdataset shards with a manifest.

Thin CLI over `pipelines.cache_latents.cache_latents`. Examples:
    python scripts/cache_latents.py --tokenizer runs/tok/model --data offline --resolution 64 \
        --output-dir runs/latents --verify
    accelerate launch --multi_gpu --num_processes 8 scripts/cache_latents.py --tokenizer runs/eps-sd-m/model \
        --data /data/imagenet --resolution 256 --precision bf16 --per-process-batch-size 128 --output-dir /data/latents
    python scripts/cache_latents.py --output-dir /data/latents --verify      # check an existing cache
Re-running the same command resumes: completed shards are kept and only the rest is encoded. The settings of the
run are written to <output-dir>/config.yaml (--config <output-dir>/config.yaml repeats it).
"""
from __future__ import annotations

import sys

from _cli import (ArgumentParser, add_config_arguments, config_dict, config_from_arguments, parse_arguments,
                  run_main, script_parser, write_effective_config)


def build_parser() -> ArgumentParser:
    from pipelines.cache_latents import STORAGE_DTYPES, CacheLatentsConfig

    parser = script_parser(__doc__)
    add_config_arguments(parser, CacheLatentsConfig, choices={"storage_dtype": sorted(STORAGE_DTYPES)})
    return parser


def main(argv=None) -> None:
    from pipelines.cache_latents import CacheLatentsConfig, cache_latents

    config = config_from_arguments(CacheLatentsConfig, parse_arguments(build_parser(), argv))
    result = cache_latents(config)
    manifest = result.manifest
    if config.tokenizer is not None:
        write_effective_config(config.output_dir, config_dict(config), "scripts/cache_latents.py")
    if manifest:
        print(f"{config.output_dir}: {manifest['num_samples']} latents {manifest['latent_shape']} in "
              f"{len(manifest['shards'])} shards; encoded {result.encoded} now at {result.images_per_s:.1f} images/s"
              + ("; verified" if config.verify else ""))


if __name__ == "__main__":
    sys.exit(run_main(main))
