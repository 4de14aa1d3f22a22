"""The public tokenizer modules: `EpsVAE` (conv encoder + diffusion U-Net decoder, paper Sec. 3) and the
baseline `VAE` (same encoder + deterministic conv decoder, Sec. 4), with `save_pretrained`/`from_pretrained`.

A model directory holds `config.json` (the nested config plus `"model_type"` and `"format_version"`) and
`model.safetensors` (optionally `ema.safetensors`); every model rebuilds from its config alone.

    model = EpsVAE.from_preset("lite", "B", latent_channels=8, downsample=16)
    z = model.encode(x)                                   # (B, 8, H/16, W/16)
    x_hat = model.decode(z, steps=3, generator=g)         # (B, 3, H, W) in [-1, 1]

Both classes decode with `decode(z, steps=None, generator=None)`; what a model predicts, how its training time
is drawn and how it decodes belong to its `objective` (`tokenizer.objectives`), so callers never ask which
class they hold.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tokenizer import flow
from tokenizer.objectives import DEFAULT_DECODE_STEPS, OBJECTIVES, Generators
from tokenizer.encoder import (ENCODER_PRESETS, DiagonalGaussian, EncoderConfig, build_encoder,
                               multipliers_for_downsample)
from tokenizer.unet import ADM_PRESETS, CONDITIONING_MODES, ADMConfig, build_adm_unet
from tokenizer.vae_decoder import VAE_DECODER_PRESETS, VAEDecoderConfig, build_vae_decoder

FORMAT_VERSION = 1
CONFIG_NAME, WEIGHTS_NAME, EMA_WEIGHTS_NAME = "config.json", "model.safetensors", "ema.safetensors"
PARAMETERIZATIONS = ("velocity", "epsilon")  # the ε-VAE objectives of tokenizer.objectives


# ------------------------------------------------------------------------------------------------------ configs
def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


@dataclass(frozen=True)
class EpsVAEConfig:
    """ε-VAE: encoder, ADM decoder and the diffusion settings of Sec. 3.2-3.3 (γ = 0.6 at 128², Table 4)."""

    encoder: EncoderConfig = ENCODER_PRESETS["lite"]
    decoder: ADMConfig = ADM_PRESETS["B"]
    conditioning: str = "concat"  # "concat" (Sec. 3.1) or "adagn" (appendix D)
    parameterization: str = "velocity"  # "velocity" (rectified flow) or "epsilon" (Table 4 DDPM baseline)
    gamma: float = 0.6  # noise scaling of Chen (2023), Sec. 3.3
    time_sampling: str = "logit_normal"
    time_location: float = 0.0  # mean of the logit-normal's normal (0 = the paper); > 0 favours t near 1
    time_spacing: str = "reversed_log"  # Eq. 13
    data_std: float = 0.5  # image std in [-1, 1], for the unit-variance network input
    # "none": the UNet's output is v (the paper). "skip": v = c_skip·x_t + c_out·UNet (EDM-style
    # preconditioning, flow.velocity_preconditioning): the same velocity model, much faster early training.
    preconditioning: str = "none"
    ddpm_num_steps: int = 1000  # epsilon parameterisation only: T of the linear-β DDPM
    kl_weight: float = 1e-6
    encoder_preset: str | None = None  # names the configs came from, for reference only
    decoder_preset: str | None = None

    def __post_init__(self):
        if isinstance(self.encoder, dict):
            object.__setattr__(self, "encoder", EncoderConfig.from_dict(self.encoder))
        if isinstance(self.decoder, dict):
            object.__setattr__(self, "decoder", ADMConfig.from_dict(self.decoder))
        _check_choice("conditioning", self.conditioning, CONDITIONING_MODES)
        _check_choice("parameterization", self.parameterization, PARAMETERIZATIONS)
        _check_choice("time_sampling", self.time_sampling, flow.TIME_DISTRIBUTIONS)
        _check_choice("time_spacing", self.time_spacing, flow.TIME_SPACINGS)
        _check_choice("preconditioning", self.preconditioning, flow.PRECONDITIONINGS)
        if self.preconditioning != "none" and self.parameterization != "velocity":
            raise ValueError("preconditioning applies to the velocity parameterisation only")
        if not self.gamma > 0 or not self.data_std > 0:
            raise ValueError(f"gamma and data_std must be > 0, got {self.gamma} and {self.data_std}")
        if self.ddpm_num_steps < 1 or self.kl_weight < 0:
            raise ValueError(f"need ddpm_num_steps >= 1 and kl_weight >= 0, got {self.ddpm_num_steps}, "
                             f"{self.kl_weight}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EpsVAEConfig":
        return cls(**d)


@dataclass(frozen=True)
class VAEConfig:
    """Baseline VAE: the same encoder with the deterministic decoder of Table 5 / Table 7."""

    encoder: EncoderConfig = ENCODER_PRESETS["lite"]
    decoder: VAEDecoderConfig = VAE_DECODER_PRESETS["B"]
    kl_weight: float = 1e-6
    encoder_preset: str | None = None
    decoder_preset: str | None = None

    def __post_init__(self):
        if isinstance(self.encoder, dict):
            object.__setattr__(self, "encoder", EncoderConfig.from_dict(self.encoder))
        if isinstance(self.decoder, dict):
            object.__setattr__(self, "decoder", VAEDecoderConfig.from_dict(self.decoder))
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        return cls(**d)


def _preset_encoder(name: str, latent_channels: int | None, downsample: int | None,
                    logvar_init: float | None = None) -> EncoderConfig:
    """An encoder preset with its latent width, downsampling factor (paper Fig. 2) or initial logvar changed."""
    if name not in ENCODER_PRESETS:
        raise ValueError(f"unknown encoder preset {name!r}; choose from {sorted(ENCODER_PRESETS)}")
    config = ENCODER_PRESETS[name]
    if latent_channels is not None:
        config = dataclasses.replace(config, latent_channels=int(latent_channels))
    if downsample is not None:
        multipliers = multipliers_for_downsample(config.channel_multipliers, int(downsample))
        config = dataclasses.replace(config, channel_multipliers=multipliers)
    if logvar_init is not None:
        config = dataclasses.replace(config, logvar_init=float(logvar_init))
    return config


def _config_from_presets(config_cls, decoder_presets: dict, encoder: str, decoder: str, overrides: dict):
    if decoder not in decoder_presets:
        raise ValueError(f"unknown decoder preset {decoder!r}; choose from {sorted(decoder_presets)}")
    latent_channels = overrides.pop("latent_channels", None)
    downsample = overrides.pop("downsample", None)
    logvar_init = overrides.pop("logvar_init", None)
    fields = {f.name for f in dataclasses.fields(config_cls)} - {"encoder", "decoder"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown override(s) {unknown}; allowed: latent_channels, downsample, logvar_init, "
                         f"{sorted(fields)}")
    return config_cls(encoder=_preset_encoder(encoder, latent_channels, downsample, logvar_init),
                      decoder=decoder_presets[decoder],
                      **{"encoder_preset": encoder, "decoder_preset": decoder, **overrides})


# -------------------------------------------------------------------------------------------------- save / load
def _read_config(directory: str | Path, expected_type: str | None) -> tuple[str, dict]:
    """Read and check `config.json`; returns (model_type, config fields without the bookkeeping keys)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {str(directory)!r} does not exist")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is missing; a tokenizer directory needs {CONFIG_NAME}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{str(path)!r} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object")
    model_type = data.pop("model_type", None)
    version = data.pop("format_version", None)
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{str(path)!r} has model_type {model_type!r}, not a tokenizer ({sorted(MODEL_TYPES)})")
    if expected_type is not None and model_type != expected_type:
        raise ValueError(f"{str(path)!r} holds a {model_type!r} model; load it with "
                         f"{MODEL_TYPES[model_type].__name__}.from_pretrained or load_tokenizer")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{str(path)!r} has format_version {version!r}; this code reads up to {FORMAT_VERSION}")
    return model_type, data


def _load_state(model: nn.Module, directory: Path, use_ema: bool) -> None:
    path = directory / WEIGHTS_NAME
    if use_ema:
        if (directory / EMA_WEIGHTS_NAME).is_file():
            path = directory / EMA_WEIGHTS_NAME
        else:
            warnings.warn(f"use_ema=True but {EMA_WEIGHTS_NAME} is missing in {str(directory)!r}; "
                          f"loading {WEIGHTS_NAME}", stacklevel=3)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} is missing")
    try:
        state = load_file(str(path))
        result = model.load_state_dict(state, strict=False)
    except (RuntimeError, OSError, SafetensorError) as error:  # corrupt/foreign file or tensors of the wrong shape
        first_line = str(error).strip().splitlines()[-1].strip() if str(error).strip() else type(error).__name__
        raise ValueError(f"cannot load {str(path)!r} into the model of config.json: {first_line}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{str(path)!r} does not match config.json: {len(result.missing_keys)} missing keys "
                         f"(e.g. {result.missing_keys[:3]}), {len(result.unexpected_keys)} unexpected "
                         f"(e.g. {result.unexpected_keys[:3]})")


def _state_for_safetensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}


class _Tokenizer(nn.Module):
    """Shared encoder side and directory format of `EpsVAE` and `VAE`."""

    model_type: str
    config_cls: type

    def encode_posterior(self, x: torch.Tensor) -> DiagonalGaussian:
        """q(z|x) from images (B, 3, H, W) in [-1, 1]."""
        return DiagonalGaussian(self.encoder(x))

    def encode(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """A posterior sample (training, stochastic latents) or its mean (sample=False): (B, Z, H/f, W/f)."""
        posterior = self.encode_posterior(x)
        return posterior.sample(generator) if sample else posterior.mode()

    @property
    def downsample(self) -> int:
        return self.config.encoder.downsample

    def _check_latents(self, z: torch.Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"decode expects latents (B, {self.latent_channels}, h, w), got {tuple(z.shape)}")

    @property
    def latent_channels(self) -> int:
        return self.config.encoder.latent_channels

    def save_pretrained(self, directory: str | Path, ema_state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write config.json + model.safetensors (+ ema.safetensors when an EMA state dict is given)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"model_type": self.model_type, "format_version": FORMAT_VERSION, **self.config.to_dict()}
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        save_file(_state_for_safetensors(self.state_dict()), str(directory / WEIGHTS_NAME))
        if ema_state_dict is not None:
            save_file(_state_for_safetensors(ema_state_dict), str(directory / EMA_WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, directory: str | Path, use_ema: bool = False):
        """Rebuild from config.json alone and load the weights strictly (EMA weights with use_ema=True)."""
        _, fields = _read_config(directory, cls.model_type)
        try:
            config = cls.config_cls.from_dict(fields)
        except TypeError as error:
            raise ValueError(f"config.json in {str(directory)!r} does not describe a {cls.__name__}: {error}") \
                from None
        model = cls(config)
        _load_state(model, Path(directory), use_ema)
        return model


# ------------------------------------------------------------------------------------------------------- models
class EpsVAE(_Tokenizer):
    """ε-VAE (Sec. 3): x -> z by a conv encoder, z -> x by iterative denoising with an ADM U-Net."""

    model_type = "eps_vae"
    config_cls = EpsVAEConfig

    def __init__(self, config: EpsVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config.encoder)
        self.decoder = build_adm_unet(config.decoder, cond_channels=config.encoder.latent_channels,
                                      conditioning=config.conditioning)

    @classmethod
    def from_preset(cls, encoder: str = "lite", decoder: str = "B", **overrides) -> "EpsVAE":
        """`EpsVAE.from_preset("lite", "B", latent_channels=16, downsample=8, gamma=1.0)`."""
        return cls(_config_from_presets(EpsVAEConfig, ADM_PRESETS, encoder, decoder, overrides))

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """G(x_t, t, z): the network's prediction (B, 3, H, W), velocity (Eq. 9) or ε (epsilon baseline).

        In velocity parameterisation x_t is first scaled to unit variance (`flow.network_input_scale`,
        Chen 2023); a DDPM x_t already has near-unit variance, so epsilon mode feeds it unchanged, as ADM does.
        """
        config = self.config
        if config.parameterization != "velocity":
            return self.decoder(x_t, t, z)
        scale = flow.network_input_scale(t, config.gamma, config.data_std).to(x_t.dtype)
        output = self.decoder(scale * x_t, t, z)  # (B, 3, H, W)
        if config.preconditioning == "skip":
            c_skip, c_out = flow.velocity_preconditioning(t, config.gamma, config.data_std)
            output = c_skip.to(x_t.dtype) * x_t + c_out.to(output.dtype) * output
        return output

    def _initial_noise(self, z: torch.Tensor, generator: Generators) -> torch.Tensor:
        """x_1 ~ N(0, I) of shape (B, 3, h·f, w·f), drawn on the generator's device so seeds reproduce.

        `generator` may be one generator for the batch or one per sample (per-image seeds: the same seed gives
        the same image whatever the batch it is decoded in).
        """
        b, _, h, w = z.shape
        # The decoder's weight dtype, not z's: under autocast z is bf16 but the Euler state should stay float32.
        dtype = self.decoder.conv_out.weight.dtype
        shape = (self.config.decoder.out_channels, h * self.downsample, w * self.downsample)
        if generator is None or isinstance(generator, torch.Generator):
            device = generator.device if generator is not None else z.device
            return torch.randn((b, *shape), generator=generator, device=device).to(z.device, dtype)
        if len(generator) != b:
            raise ValueError(f"got {len(generator)} generators for a batch of {b} latents")
        return torch.stack([torch.randn(shape, generator=g, device=g.device).to(z.device, dtype) for g in generator])

    @property
    def objective(self):
        return OBJECTIVES[self.config.parameterization]

    def decode(self, z: torch.Tensor, steps: int | None = None, generator: Generators = None,
               spacing: str | None = None) -> torch.Tensor:
        """Latents (B, Z, h, w) -> images (B, 3, h·f, w·f) in [-1, 1], in `steps` network evaluations.

        `steps` defaults to DEFAULT_DECODE_STEPS (3, the paper's setting). Velocity: Euler steps over the
        config's reversed-log times (Eq. 13) or `spacing`; epsilon: ancestral DDPM respaced to `steps`. Wrap
        in `torch.no_grad()` for inference; the same `generator` seed gives the same images.
        """
        steps = DEFAULT_DECODE_STEPS if steps is None else steps
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise ValueError(f"decode steps must be an integer >= 1, got {steps!r}")
        self._check_latents(z)
        noise = self._initial_noise(z, generator)  # (B, 3, H, W)
        return self.objective.decode(self, z, noise, int(steps), generator, spacing).clamp(-1.0, 1.0)


class VAE(_Tokenizer):
    """Baseline VAE (Sec. 4): the same encoder and a deterministic conv decoder G(z)."""

    model_type = "vae"
    config_cls = VAEConfig

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config.encoder)
        self.decoder = build_vae_decoder(config.decoder, config.encoder.latent_channels, config.encoder.downsample)

    @classmethod
    def from_preset(cls, encoder: str = "lite", decoder: str = "B", **overrides) -> "VAE":
        """`VAE.from_preset("lite", "B", latent_channels=16, downsample=8)`."""
        return cls(_config_from_presets(VAEConfig, VAE_DECODER_PRESETS, encoder, decoder, overrides))

    @property
    def objective(self):
        return OBJECTIVES["reconstruction"]

    def decode(self, z: torch.Tensor, steps: int | None = None, generator: Generators = None) -> torch.Tensor:
        """Latents (B, Z, h, w) -> images (B, 3, h·f, w·f) clamped to [-1, 1], in one deterministic pass.

        `steps` and `generator` are accepted so every tokenizer decodes with the same call; one pass uses no
        noise, so they change nothing (`objective.iterative` is False).
        """
        if steps is not None and (isinstance(steps, bool) or int(steps) != steps or steps < 1):
            raise ValueError(f"decode steps must be an integer >= 1, got {steps!r}")
        self._check_latents(z)
        return self.objective.decode(self, z, None, 1, generator, None).clamp(-1.0, 1.0)


MODEL_TYPES: dict[str, type[_Tokenizer]] = {"eps_vae": EpsVAE, "vae": VAE}


def load_tokenizer(directory: str | Path, use_ema: bool = False) -> EpsVAE | VAE:
    """Load an `EpsVAE` or a `VAE` directory, whichever its config.json's model_type names."""
    model_type, _ = _read_config(directory, None)
    return MODEL_TYPES[model_type].from_pretrained(directory, use_ema=use_ema)


def weights_path(directory: str | Path, use_ema: bool = False) -> Path:
    """The weights file `load_tokenizer(directory, use_ema)` reads: ema.safetensors when asked and present."""
    directory = Path(directory)
    if use_ema and (directory / EMA_WEIGHTS_NAME).is_file():
        return directory / EMA_WEIGHTS_NAME
    return directory / WEIGHTS_NAME


def weights_fingerprint(directory: str | Path, use_ema: bool = False) -> str:
    """The sha256 (hex) of those weights: what a latent manifest and a generator record to name the tokenizer
    their latents came from, and what sampling checks before pairing a generator with a tokenizer."""
    import hashlib

    digest = hashlib.sha256()
    with open(weights_path(directory, use_ema), "rb") as handle:  # chunked: Python 3.10 has no file_digest
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
