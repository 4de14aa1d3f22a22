#!/usr/bin/env python
r"""Stage 1: train ε-VAE (or the baseline VAE). Thin CLI over `pipelines.train_tokenizer.train_tokenizer`.

Examples:
    python scripts/train_tokenizer.py --data offline --encoder tiny --decoder tiny --resolution 64 \
        --perceptual effnet-l0 --global-batch-size 16 --max-steps 200 --output-dir runs/tok
    accelerate launch --multi_gpu --num_processes 8 scripts/train_tokenizer.py --data /data/imagenet \
        --encoder sd --decoder M --resolution 128 --precision bf16 --resume auto --output-dir runs/eps-sd-m
    python scripts/train_tokenizer.py --config runs/tok/config.yaml --max-steps 400   # a finished run's settings, changed
"""
from __future__ import annotations

import sys

from _cli import (ArgumentParser, config_dict, parse_arguments, run_main, training_config, training_parser,
                  write_effective_config)

MODEL_OVERRIDE_FLAGS = {
    # flag: (type, help) — collected into TokenizerTrainConfig.model.model_overrides
    "gamma": (float, "noise scaling γ of x_t (paper: 0.6 at 128²)"),
    "latent_channels": (int, "latent channels (4/8/16/32)"),
    "downsample": (int, "encoder downsample factor (4/8/16/32)"),
    "conditioning": (str, "decoder conditioning: concat | adagn"),
    "parameterization": (str, "velocity (rectified flow) | epsilon (DDPM baseline)"),
    "time_sampling": (str, "training t: logit_normal | uniform"),
    "time_location": (float, "logit-normal location m of SD3's lognorm(m, 1): 0 = the paper, > 0 favours t near 1"),
    "time_spacing": (str, "decode times: reversed_log | uniform"),
    "kl_weight": (float, "KL weight (default 1e-6)"),
    "kl_normalization": (str, "KL scale: pixels (summed KL / 3·H·W, the SD/LDM balance at any size; default) | "
                              "sum (summed KL, the convention before; folders without the field load as sum)"),
    "logvar_init": (float, "initial posterior log-variance of the encoder (default 0; short runs: about -6)"),
    "preconditioning": (str, "none (the paper) | skip (v = c_skip·x_t + c_out·UNet; faster early training)"),
}


def build_parser() -> ArgumentParser:
    from pipelines.train_tokenizer import TokenizerTrainConfig
    from tokenizer.discriminator import DISCRIMINATOR_PRESETS
    from tokenizer.encoder import ENCODER_PRESETS
    from tokenizer.perceptual import PERCEPTUAL_NETWORKS
    from tokenizer.unet import ADM_PRESETS
    from tokenizer.vae_decoder import VAE_DECODER_PRESETS

    return training_parser(__doc__, TokenizerTrainConfig,
                           {"model_type": ["eps_vae", "vae"], "perceptual": sorted(PERCEPTUAL_NETWORKS),
                            "encoder": list(ENCODER_PRESETS), "discriminator": list(DISCRIMINATOR_PRESETS),
                            "decoder": list(dict.fromkeys([*ADM_PRESETS, *VAE_DECODER_PRESETS])),
                            "reconstruction": ["l1", "l2"]},
                           MODEL_OVERRIDE_FLAGS, "model overrides (applied on top of the presets)")


def main(argv=None) -> None:
    from pipelines.train_tokenizer import TokenizerTrainConfig, train_tokenizer

    config = training_config(TokenizerTrainConfig, parse_arguments(build_parser(), argv), MODEL_OVERRIDE_FLAGS)
    final_dir = train_tokenizer(config)
    written = write_effective_config(config.run.output_dir, config_dict(config), "scripts/train_tokenizer.py")
    print(f"tokenizer saved to {final_dir}" + (f"; settings in {written}" if written else ""))


if __name__ == "__main__":
    sys.exit(run_main(main))
