#!/usr/bin/env python
"""Cache tokenizer latents (center crop + flip posterior moments) as webdataset shards with a manifest.

Thin CLI over `pipelines.cache_latents.cache_latents`. Examples:
    python scripts/cache_latents.py --tokenizer runs/tok/model --data offline --resolution 64 \
        --output-dir runs/latents --verify true
    accelerate launch --multi_gpu --num_processes 8 scripts/cache_latents.py --tokenizer runs/eps-sd-m/model \
        --data /data/imagenet --resolution 256 --precision bf16 --batch-size 128 --output-dir /data/latents
    python scripts/cache_latents.py --output-dir /data/latents --verify true      # check an existing cache
Re-running the same command resumes: completed shards are kept and only the rest is encoded.
"""
from __future__ import annotations

import sys

from _cli import ArgumentParser, add_config_arguments, config_from_arguments, run_main


def build_parser() -> ArgumentParser:
    from pipelines.cache_latents import STORAGE_DTYPES, CacheLatentsConfig
    from pipelines.kit.precision import PRECISIONS

    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser, CacheLatentsConfig, choices={
        "precision": PRECISIONS, "storage_dtype": sorted(STORAGE_DTYPES)})
    return parser


def main(argv=None) -> None:
    from pipelines.cache_latents import CacheLatentsConfig, cache_latents

    config = config_from_arguments(CacheLatentsConfig, build_parser().parse_args(argv))
    result = cache_latents(config)
    manifest = result.manifest
    if manifest:
        print(f"{config.output_dir}: {manifest['num_samples']} latents {manifest['latent_shape']} in "
              f"{len(manifest['shards'])} shards; encoded {result.encoded} now at {result.images_per_s:.1f} images/s"
              + ("; verified" if config.verify else ""))


if __name__ == "__main__":
    sys.exit(run_main(main))
