"""ε-VAE tokenizer: encoders, ADM U-Net diffusion decoder, baseline VAE decoder, flow math and losses.

`from tokenizer import EpsVAE, VAE, load_tokenizer` is the public entry point.
"""
from tokenizer.models import EpsVAE, EpsVAEConfig, VAE, VAEConfig, load_tokenizer
from tokenizer.objectives import DEFAULT_DECODE_STEPS, OBJECTIVES, TrainingOutputs
from tokenizer.unet import ADM_PRESETS, ADMConfig, ADMUNet

__all__ = ["ADMConfig", "ADMUNet", "ADM_PRESETS", "DEFAULT_DECODE_STEPS", "EpsVAE", "EpsVAEConfig", "OBJECTIVES",
           "TrainingOutputs", "VAE", "VAEConfig", "load_tokenizer"]
