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
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tokenizer import flow, pretrained
from tokenizer.encoder import (ENCODER_PRESETS, DiagonalGaussian, EncoderConfig, build_encoder,
                               multipliers_for_downsample)
from tokenizer.unet import ADM_PRESETS, CONDITIONING_MODES, ADMConfig, build_adm_unet
from tokenizer.image_io import image_batch
from tokenizer.losses import KL_NORMALIZATIONS
from tokenizer.objectives import DEFAULT_DECODE_STEPS, OBJECTIVES, Generators
from tokenizer.tiling import tiled_decode
from tokenizer.vae_decoder import VAE_DECODER_PRESETS, VAEDecoderConfig, build_vae_decoder

PARAMETERIZATIONS = ("velocity", "epsilon")  # the ε-VAE objectives of tokenizer.objectives


# ------------------------------------------------------------------------------------------------------ configs
def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _config_from_saved(config_cls, d: dict):
    """A config from its saved dict. A folder written before `kl_normalization` existed trained with the summed
    KL, so a missing key reads as "sum": fine-tuning an old model (`--init-from`) keeps its loss unchanged."""
    return config_cls(**{"kl_normalization": "sum", **d})


def _check_latent_stats(config) -> None:
    """Both or neither statistic, one entry per latent channel, positive std (JSON lists become tuples)."""
    if (config.latent_mean is None) != (config.latent_std is None):
        raise ValueError("latent_mean and latent_std must be given together")
    if config.latent_mean is None:
        return
    for name in ("latent_mean", "latent_std"):
        value = tuple(float(v) for v in getattr(config, name))
        object.__setattr__(config, name, value)
        if len(value) != config.encoder.latent_channels:
            raise ValueError(f"{name} has {len(value)} entries for {config.encoder.latent_channels} latent channels")
    if min(config.latent_std) <= 0:
        raise ValueError(f"latent_std must be positive, got {config.latent_std}")


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
    # How the summed posterior KL is scaled before kl_weight (`losses.kl_loss`): "pixels" divides by 3·H·W, the
    # SD/LDM balance at any image size; "sum" is the convention of folders saved before this field existed.
    kl_normalization: str = "pixels"
    encoder_preset: str | None = None  # names the configs came from, for reference only
    decoder_preset: str | None = None
    # Per-channel mean/std of the latents, measured by scripts/cache_latents.py over the data it encoded (the
    # diffusers VAE's shift/scaling factor): `encode(x, normalize=True)` gives unit-variance latents for a
    # diffusion model, `decode(z, normalized=True)` undoes it. None until latents were cached.
    latent_mean: tuple[float, ...] | None = None
    latent_std: tuple[float, ...] | None = None

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
        _check_choice("kl_normalization", self.kl_normalization, KL_NORMALIZATIONS)
        if self.preconditioning != "none" and self.parameterization != "velocity":
            raise ValueError("preconditioning applies to the velocity parameterisation only")
        if not self.gamma > 0 or not self.data_std > 0:
            raise ValueError(f"gamma and data_std must be > 0, got {self.gamma} and {self.data_std}")
        if self.ddpm_num_steps < 1 or self.kl_weight < 0:
            raise ValueError(f"need ddpm_num_steps >= 1 and kl_weight >= 0, got {self.ddpm_num_steps}, "
                             f"{self.kl_weight}")
        _check_latent_stats(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EpsVAEConfig":
        return _config_from_saved(cls, d)


@dataclass(frozen=True)
class VAEConfig:
    """Baseline VAE: the same encoder with the deterministic decoder of Table 5 / Table 7."""

    encoder: EncoderConfig = ENCODER_PRESETS["lite"]
    decoder: VAEDecoderConfig = VAE_DECODER_PRESETS["B"]
    kl_weight: float = 1e-6
    kl_normalization: str = "pixels"  # as in EpsVAEConfig
    encoder_preset: str | None = None
    decoder_preset: str | None = None
    latent_mean: tuple[float, ...] | None = None  # as in EpsVAEConfig
    latent_std: tuple[float, ...] | None = None

    def __post_init__(self):
        if isinstance(self.encoder, dict):
            object.__setattr__(self, "encoder", EncoderConfig.from_dict(self.encoder))
        if isinstance(self.decoder, dict):
            object.__setattr__(self, "decoder", VAEDecoderConfig.from_dict(self.decoder))
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")
        _check_choice("kl_normalization", self.kl_normalization, KL_NORMALIZATIONS)
        _check_latent_stats(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        return _config_from_saved(cls, d)


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


class _Tokenizer(nn.Module):
    """Shared encoder side, latent normalisation, tiling and folder format of `EpsVAE` and `VAE`."""

    model_type: str
    config_cls: type
    _tiling: tuple[int, int] | None = None  # (tile, overlap) in latent cells, set by enable_tiling

    def encode_posterior(self, x: torch.Tensor) -> DiagonalGaussian:
        """q(z|x) from images (B, 3, H, W) in [-1, 1]."""
        return DiagonalGaussian(self.encoder(x))

    def encode(self, x, sample: bool = True, generator: torch.Generator | None = None,
               normalize: bool = False) -> torch.Tensor:
        """A posterior sample (training, stochastic latents) or its mean (sample=False): (B, Z, H/f, W/f).

        x: images (B, 3, H, W) in [-1, 1], or PIL images / uint8 arrays (converted on the model's device).
        normalize: standardise per channel with the latent statistics in the config (what a diffusion model on
        these latents trains on); a one-line error when the folder has none yet.
        """
        x = image_batch(x, self._device())
        posterior = self.encode_posterior(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return (z - self._stat("latent_mean", z)) / self._stat("latent_std", z) if normalize else z

    def _denormalize(self, z: torch.Tensor, normalized: bool) -> torch.Tensor:
        return z * self._stat("latent_std", z) + self._stat("latent_mean", z) if normalized else z

    def _stat(self, name: str, like: torch.Tensor) -> torch.Tensor:
        values = getattr(self.config, name)
        if values is None:
            raise ValueError(f"this {type(self).__name__} has no latent statistics yet (they are written into its "
                             "folder by scripts/cache_latents.py); use normalize=False / normalized=False")
        return torch.tensor(values, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def enable_tiling(self, tile: int = 32, overlap: int = 4) -> "_Tokenizer":
        """Decode large latents as overlapping `tile`×`tile` latent tiles blended over `overlap` cells, so memory
        grows with the tile, not the image (`tokenizer.tiling`)."""
        if tile < 1 or not 0 <= overlap < tile:
            raise ValueError(f"need tile >= 1 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
        self._tiling = (int(tile), int(overlap))
        return self

    def disable_tiling(self) -> "_Tokenizer":
        self._tiling = None
        return self

    def _decode_maybe_tiled(self, z: torch.Tensor, decode_fn) -> torch.Tensor:
        if self._tiling is None:
            return decode_fn(z)
        tile, overlap = self._tiling
        return tiled_decode(decode_fn, z, tile, overlap, self.downsample).clamp(-1.0, 1.0)

    @property
    def downsample(self) -> int:
        return self.config.encoder.downsample

    def _check_latents(self, z: torch.Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"decode expects latents (B, {self.latent_channels}, h, w), got {tuple(z.shape)}")

    @property
    def latent_channels(self) -> int:
        return self.config.encoder.latent_channels

    def save_pretrained(self, directory: str | Path, raw_state_dict: dict[str, torch.Tensor] | None = None,
                        training: dict | None = None) -> Path:
        """Write the model folder (`tokenizer.pretrained`): config.json, model.safetensors (these weights),
        raw.safetensors when `raw_state_dict` is given, and a model card with `training` facts (steps, data...)."""
        from tokenizer.nn import count_parameters

        config = self.config
        facts = {"architecture": f"{type(self).__name__}: encoder {config.encoder_preset or config.encoder.kind}, "
                                 f"decoder {config.decoder_preset or 'custom'}",
                 "parameters": f"{count_parameters(self):,} (decoder {count_parameters(self.decoder):,})",
                 "latents": f"{self.latent_channels} channels, {self.downsample}x downsampling",
                 "latent statistics": "recorded" if config.latent_mean is not None else "not yet (cache latents)",
                 **(training or {})}
        usage = ("from tokenizer import load_tokenizer\ntokenizer = load_tokenizer(\"path/or/owner-name\")\n"
                 "z = tokenizer.encode(images, sample=False)            # images: (B, 3, H, W) in [-1, 1] or PIL\n"
                 f"x = tokenizer.decode(z{f', steps={DEFAULT_DECODE_STEPS}' if self.objective.iterative else ''})")
        card = pretrained.model_card(f"{type(self).__name__} tokenizer", "An image tokenizer of the ε-VAE paper "
                                     "(Zhao et al., ICML 2025).", facts, usage)
        return pretrained.save_folder(directory, type(self).__name__, self.model_type, config.to_dict(),
                                      self.state_dict(), raw_state_dict, card)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, weights: str = "ema", device=None, dtype=None,
                        use_ema: bool | None = None):
        """Rebuild from a local folder or a Hub id (`owner/name`); `weights`: "ema" (default) or "raw".

        `use_ema` is the format-1 spelling (True: "ema"; False: model.safetensors, which format 1 folders with
        an ema.safetensors copy used for the raw weights).
        """
        directory = pretrained.resolve_model_dir(name_or_path)
        _, fields = pretrained.read_config(directory, {cls.model_type: cls.__name__})
        try:
            config = cls.config_cls.from_dict(fields)
        except TypeError as error:
            raise ValueError(f"config.json in {str(directory)!r} does not describe a {cls.__name__}: {error}") \
                from None
        model = cls(config)
        pretrained.load_weights(model, directory, pretrained.weights_choice(directory, weights, use_ema))
        return pretrained.place(model, device, dtype)


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
               spacing: str | None = None, normalized: bool = False) -> torch.Tensor:
        """Latents (B, Z, h, w) -> images (B, 3, h·f, w·f) in [-1, 1], in `steps` network evaluations.

        `steps` defaults to DEFAULT_DECODE_STEPS (3, the paper's setting). Velocity: Euler steps over the
        config's reversed-log times (Eq. 13) or `spacing`; epsilon: ancestral DDPM respaced to `steps`.
        `normalized=True` takes latents standardised with the config's statistics (`encode(normalize=True)`).
        Wrap in `torch.no_grad()` for inference; the same `generator` seed gives the same images.
        """
        steps = DEFAULT_DECODE_STEPS if steps is None else steps
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise ValueError(f"decode steps must be an integer >= 1, got {steps!r}")
        self._check_latents(z)
        z = self._denormalize(z, normalized)

        def decode_fn(latents: torch.Tensor) -> torch.Tensor:
            noise = self._initial_noise(latents, generator)  # (B, 3, H, W)
            return self.objective.decode(self, latents, noise, int(steps), generator, spacing).clamp(-1.0, 1.0)

        return self._decode_maybe_tiled(z, decode_fn)


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

    def decode(self, z: torch.Tensor, steps: int | None = None, generator: Generators = None,
               normalized: bool = False) -> torch.Tensor:
        """Latents (B, Z, h, w) -> images (B, 3, h·f, w·f) clamped to [-1, 1], in one deterministic pass.

        `steps` and `generator` are accepted so every tokenizer decodes with the same call; one pass uses no
        noise, so they change nothing (`objective.iterative` is False).
        """
        if steps is not None and (isinstance(steps, bool) or int(steps) != steps or steps < 1):
            raise ValueError(f"decode steps must be an integer >= 1, got {steps!r}")
        self._check_latents(z)
        return self._decode_maybe_tiled(self._denormalize(z, normalized), lambda latents: self.objective.decode(
            self, latents, None, 1, generator, None).clamp(-1.0, 1.0))


MODEL_TYPES: dict[str, type[_Tokenizer]] = {"eps_vae": EpsVAE, "vae": VAE}


def load_tokenizer(name_or_path: str | Path, *, weights: str = "ema", device=None, dtype=None,
                   use_ema: bool | None = None) -> EpsVAE | VAE:
    """Load an `EpsVAE` or a `VAE` (local folder or Hub id), whichever its config.json's model_type names."""
    directory = pretrained.resolve_model_dir(name_or_path)
    model_type, _ = pretrained.read_config(directory, {name: cls.__name__ for name, cls in MODEL_TYPES.items()})
    return MODEL_TYPES[model_type].from_pretrained(directory, weights=weights, device=device, dtype=dtype,
                                                   use_ema=use_ema)


def weights_fingerprint(name_or_path: str | Path, use_ema: bool | None = None, weights: str = "ema") -> str:
    """sha256 of the weights `load_tokenizer(name_or_path, ...)` reads: how manifests, generators and sample
    folders name the tokenizer their latents came from."""
    directory = pretrained.resolve_model_dir(name_or_path)
    return pretrained.weights_fingerprint(directory, pretrained.weights_choice(directory, weights, use_ema))
