#!/usr/bin/env python
r"""Stage 2: train the class-conditional DiT on cached latents. Thin CLI over `pipelines.train_generator`.

Examples:
    python scripts/train_generator.py --shards runs/latents --model DiT-S/2 --depth 2 --hidden-size 64 \
        --num-heads 2 --global-batch-size 16 --max-steps 200 --tokenizer runs/tok/model --output-dir runs/dit
    accelerate launch --multi_gpu --num_processes 8 scripts/train_generator.py --shards /data/latents \
        --model DiT-XL/2 --global-batch-size 256 --precision bf16 --resume auto --output-dir runs/dit-xl
A resumed run restores model, EMA, optimiser and RNG; the resampled latent stream restarts with a seed derived
from (seed, step), so it continues with fresh samples rather than replaying the exact data order.
"""
from __future__ import annotations

import sys

from _cli import (ArgumentParser, config_dict, parse_arguments, run_main, training_config, training_parser,
                  write_effective_config)

MODEL_OVERRIDE_FLAGS = {
    # flag: (type, help) — collected into GeneratorTrainConfig.model.model_overrides
    "hidden_size": (int, "transformer width (preset: S 384, B 768, L 1024, XL 1152)"),
    "depth": (int, "number of DiT blocks"),
    "num_heads": (int, "attention heads"),
    "mlp_ratio": (float, "MLP width / hidden size"),
    "patch_size": (int, "latent patch size (2, 4, 8)"),
}


def build_parser() -> ArgumentParser:
    from generator import DiT_models
    from pipelines.train_generator import GeneratorTrainConfig

    return training_parser(__doc__, GeneratorTrainConfig,
                           {"model": list(DiT_models), "on_bad_shard": ["raise", "skip"]},
                           MODEL_OVERRIDE_FLAGS, "model overrides (applied on top of the DiT preset)")


def main(argv=None) -> None:
    from pipelines.train_generator import GeneratorTrainConfig, train_generator

    config = training_config(GeneratorTrainConfig, parse_arguments(build_parser(), argv), MODEL_OVERRIDE_FLAGS)
    result = train_generator(config)
    written = write_effective_config(config.run.output_dir, config_dict(config), "scripts/train_generator.py")
    if written:
        print(f"settings in {written}")
    print(f"DiT ({result.num_parameters:,} parameters) saved to {result.model_dir} at step {result.step}")


if __name__ == "__main__":
    sys.exit(run_main(main))
