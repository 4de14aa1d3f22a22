"""Throughput of the generation pipeline (paper Table 3): images/s of DiT (250 DDPM steps) + decoding, for 8× and
16× compression, with the ε-VAE diffusion decoder and with the baseline VAE, in the precisions asked for
(default `auto`: bf16 autocast on a bf16 GPU, fp32 on a CPU, where emulated bf16 crawls). One line is
printed per measurement as it is taken.

Each component is timed on its own at the given batch size: one DiT forward step, ε-VAE decoding at 1/2/3 Euler
steps (the VAE decodes in one pass), and encoding. The whole-pipeline figure is composed from them:

    seconds per batch = ddpm_steps × (one DiT forward) + decode(default steps)

i.e. the DiT part is *extrapolated from k timed steps* (the output says so) — every DDPM step costs one
identical forward, and timing 250 DiT-XL/2 forwards on a CPU would take an hour. The DiT's FLOPs per forward
are counted with `torch.utils.flop_counter.FlopCounterMode` and set against the machine's measured matmul
rate (a large square matmul), so the table shows how much of the hardware the DiT uses.

Models are randomly initialised at the paper's sizes (timing needs no trained weights): DiT-XL/2 over
32×32×4 latents (8×, `sd` encoder) or 16×16×4 (16×, `sd-f16` encoder), the ε-VAE-SD (M) decoder, and the
baseline VAE decoder preset whose parameter count is closest to it ("comparable size"). `quick` swaps in tiny
models for the test suite.

`benchmark_training` (`scripts/benchmark.py train`, below) times whole training steps instead, eager and compiled.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from pipelines.kit.precision import PRECISIONS, autocast, autocast_dtype, pick_device, resolve_precision
from pipelines.kit.reconstruction import synchronize
from tokenizer import DEFAULT_DECODE_STEPS
from tokenizer.nn import count_parameters

# compression name → (encoder preset, downsample) at full size; the quick variant uses the tiny encoder.
COMPRESSIONS: dict[str, tuple[str, int]] = {"8x": ("sd", 8), "16x": ("sd-f16", 16)}
TOKENIZER_KINDS = ("eps-vae", "vae")
QUICK_DIT = dict(hidden_size=64, depth=2, num_heads=2)


@dataclass(frozen=True)
class _BenchmarkRun:
    """Where and how loudly a benchmark runs (shared by both benchmarks' configs)."""

    threads: int | None = None  # CPU threads (torch.set_num_threads); None keeps PyTorch's default
    quick: bool = False  # tiny models and sizes (tests)
    device: str | None = None  # None: the first CUDA device if any, else the CPU
    verbose: bool = True  # print one line per measurement as it is taken


@dataclass(frozen=True)
class ThroughputConfig(_BenchmarkRun):
    dit: str = "DiT-XL/2"  # DiT size (generator.DiT_models), randomly initialised
    batch_size: int = 1  # images per timed call (one process)
    precisions: tuple[str, ...] = ("auto",)  # autocast precisions to time; auto = this device's fast one
    compressions: tuple[str, ...] = ("8x", "16x")  # 8x: sd encoder, 32×32×4 latents; 16x: sd-f16, 16×16×4
    tokenizers: tuple[str, ...] = TOKENIZER_KINDS  # eps-vae (diffusion decoder) and/or vae (baseline decoder)
    timed_steps: int = 2  # DiT forwards timed (after one warm-up); the 250-step figure is extrapolated
    ddpm_steps: int = 250  # DDPM steps of the whole-pipeline figure (extrapolated from timed_steps)
    decode_steps: tuple[int, ...] = (1, 2, 3)  # ε-VAE Euler step counts to time
    default_decode_steps: int = DEFAULT_DECODE_STEPS  # used in the whole-pipeline figure
    resolution: int = 256  # image side in pixels
    decoder: str = "M"  # ε-VAE decoder preset (Table 5)
    num_classes: int = 1000  # DiT class-embedding size
    matmul_size: int = 4096  # side of the square matmul that measures the machine's peak rate
    output_dir: str | None = "runs/benchmark/throughput"  # directory for throughput.json + throughput.md

    def __post_init__(self) -> None:
        for name in ("precisions", "compressions", "tokenizers", "decode_steps"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name, allowed in (("precisions", PRECISIONS), ("compressions", COMPRESSIONS),
                              ("tokenizers", TOKENIZER_KINDS)):
            unknown = [v for v in getattr(self, name) if v not in allowed]
            if unknown or not getattr(self, name):
                raise ValueError(f"{name} must be among {list(allowed)}, got {list(getattr(self, name))}")
        for name in ("batch_size", "timed_steps", "ddpm_steps", "default_decode_steps", "matmul_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.decode_steps or min(self.decode_steps) < 1:
            raise ValueError(f"decode steps must be >= 1, got {self.decode_steps}")


# ---------------------------------------------------------------------------------------------------- timing


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int = 1, warmup: int = 1) -> float:
    """Median wall seconds of `fn()` over `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class MatmulProbe:
    """The machine's dense matmul rate: 2·n³ FLOPs of an n×n @ n×n product, in GFLOP/s. The operands are allocated
    (and one product run) once, so a probe can be timed again and again between steps."""

    def __init__(self, size: int, device: torch.device, precision: str = "fp32"):
        dtype = autocast_dtype(precision, device) or torch.float32
        self.size, self.device = size, device
        self.a = torch.randn(size, size, device=device, dtype=dtype)
        self.b = torch.randn(size, size, device=device, dtype=dtype)
        self.gflops()  # warm-up

    def gflops(self, repeats: int = 1) -> float:
        """The rate of the median of `repeats` timed products."""
        return 2 * self.size**3 / time_call(lambda: self.a @ self.b, self.device, repeats=repeats, warmup=0) / 1e9


def matmul_gflops(size: int, device: torch.device, precision: str = "fp32", repeats: int = 3) -> float:
    """The matmul rate of a fresh `MatmulProbe`, timed `repeats` times after one warm-up product."""
    return MatmulProbe(size, device, precision).gflops(repeats)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call as counted by PyTorch's FlopCounterMode (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------------- models


def build_tokenizers(config: ThroughputConfig, compression: str) -> dict[str, torch.nn.Module]:
    """ε-VAE (decoder preset `config.decoder`) and the VAE with the closest-sized baseline decoder."""
    from tokenizer import EpsVAE, VAE
    from tokenizer.vae_decoder import VAE_DECODER_PRESETS

    encoder, downsample = COMPRESSIONS[compression]
    if config.quick:
        encoder, decoder, vae_choices = "tiny", "tiny", ["tiny"]
    else:
        decoder, vae_choices = config.decoder, [k for k in VAE_DECODER_PRESETS if k != "tiny"]
    overrides = {"downsample": downsample}
    models: dict[str, torch.nn.Module] = {}
    if "eps-vae" in config.tokenizers:
        models["eps-vae"] = EpsVAE.from_preset(encoder, decoder, **overrides)
    if "vae" in config.tokenizers:
        target = count_parameters(EpsVAE.from_preset(encoder, decoder, **overrides).decoder) \
            if "eps-vae" not in models else count_parameters(models["eps-vae"].decoder)
        with torch.device("meta"):  # sizes only: pick the decoder preset of comparable parameter count
            sizes = {k: count_parameters(VAE.from_preset(encoder, k, **overrides).decoder) for k in vae_choices}
        closest = min(sizes, key=lambda k: abs(sizes[k] - target))
        models["vae"] = VAE.from_preset(encoder, closest, **overrides)
    return models


def build_dit(config: ThroughputConfig, latent_channels: int, latent_size: int):
    from generator.dit import DiT

    overrides = dict(QUICK_DIT) if config.quick else {}
    return DiT.from_name(config.dit, input_size=latent_size, in_channels=latent_channels,
                         num_classes=config.num_classes, **overrides)


# ---------------------------------------------------------------------------------------------------- benchmark


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """`torch.set_num_threads(threads)` inside the block (None: unchanged), restored after."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def machine_facts(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on (the report's `machine` entry)."""
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
            or platform.machine(), "device_type": device.type, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}


@torch.no_grad()
def benchmark_throughput(config: ThroughputConfig) -> dict[str, Any]:
    """Time every component for every (compression, tokenizer, precision); returns the JSON-ready report."""
    with torch_threads(config.threads):
        return _benchmark(config)


def _benchmark(config: ThroughputConfig) -> dict[str, Any]:
    device = pick_device(config.device)
    image_size = 32 if config.quick else config.resolution
    matmul_size = 256 if config.quick else config.matmul_size
    batch = config.batch_size
    # "auto" → the concrete precision this device runs; each is timed once even if named twice.
    precisions = list(dict.fromkeys(resolve_precision(p, device) for p in config.precisions))
    say = print if config.verbose else (lambda *args, **kwargs: None)
    machine = {**machine_facts(device), "precisions": precisions, "matmul_gflops": {}, "matmul_size": matmul_size}
    say(f"throughput on {machine['device']} ({device.type}, {machine['threads']} threads), precisions "
        f"{precisions} (asked: {list(config.precisions)}), batch {batch}", flush=True)
    for p in precisions:
        machine["matmul_gflops"][p] = matmul_gflops(matmul_size, device, p)
        say(f"  matmul {matmul_size}² {p}: {machine['matmul_gflops'][p]:.1f} GFLOP/s", flush=True)
    rows: list[dict[str, Any]] = []
    for compression in config.compressions:
        tokenizers = build_tokenizers(config, compression)
        any_tokenizer = next(iter(tokenizers.values()))
        downsample, channels = any_tokenizer.downsample, any_tokenizer.latent_channels
        latent_size = image_size // downsample
        dit = build_dit(config, channels, latent_size).to(device).eval()
        x = torch.randn(batch, 3, image_size, image_size, device=device)
        z = torch.randn(batch, channels, latent_size, latent_size, device=device)
        t = torch.full((batch,), 500, device=device, dtype=torch.int64)
        y = torch.zeros(batch, device=device, dtype=torch.int64)
        dit_flops = count_flops(lambda: dit(z, t, y))
        for precision in precisions:
            with autocast(device, precision):
                dit(z, t, y)  # warm-up
                # The reference is timed right before and after the forwards (a shared machine drifts 10-20%).
                before = matmul_gflops(matmul_size, device, precision, repeats=2)
                dit_step = time_call(lambda: dit(z, t, y), device, repeats=config.timed_steps, warmup=0)
                after = matmul_gflops(matmul_size, device, precision, repeats=2)
            dit_reference = (before + after) / 2
            say(f"  {compression} {precision} DiT step: {1e3 * dit_step:.1f} ms "
                f"({dit_flops / dit_step / 1e9:.1f} GFLOP/s, {100 * dit_flops / dit_step / 1e9 / dit_reference:.0f}% "
                f"of the matmul's {dit_reference:.1f}, timed {before:.1f} before and {after:.1f} after)", flush=True)
            for kind, tokenizer in tokenizers.items():
                tokenizer.to(device).eval()
                decode: dict[str, float] = {}
                with autocast(device, precision):
                    # A single-pass decoder (the VAE) is timed once: its step count changes nothing.
                    iterative = tokenizer.objective.iterative
                    pipeline_steps = config.default_decode_steps if iterative else 1
                    steps_list = sorted(set(config.decode_steps) | {pipeline_steps}) if iterative else [1]
                    tokenizer.decode(z, steps=1)  # warm-up
                    for steps in steps_list:
                        decode[str(steps)] = time_call(lambda: tokenizer.decode(z, steps=steps), device, warmup=0)
                    pipeline_decode = decode[str(pipeline_steps)]
                    encode = time_call(lambda: tokenizer.encode(x, sample=False), device)
                tokenizer.to("cpu")
                seconds = config.ddpm_steps * dit_step + pipeline_decode
                say(f"  {compression} {precision} {kind}: decode "
                    + ", ".join(f"{s} step(s) {1e3 * v:.0f} ms" for s, v in decode.items())
                    + f"; encode {1e3 * encode:.0f} ms; pipeline {batch / seconds:.4g} images/s", flush=True)
                rows.append({
                    "compression": compression, "downsample": downsample,
                    "latent_shape": [channels, latent_size, latent_size], "tokens": dit.config.num_patches,
                    "tokenizer": kind, "decoder_params_m": count_parameters(tokenizer.decoder) / 1e6,
                    "decoder_preset": tokenizer.config.decoder_preset, "precision": precision,
                    "batch_size": batch, "dit_step_s": dit_step, "dit_gflop_per_forward": dit_flops / 1e9,
                    "dit_achieved_gflops": dit_flops / dit_step / 1e9,
                    "dit_matmul_gflops_before_after": [before, after],
                    "dit_matmul_fraction": dit_flops / dit_step / 1e9 / dit_reference,
                    "decode_s": decode, "encode_s": encode,
                    "pipeline_decode_steps": pipeline_steps if iterative else None,
                    "pipeline_s_per_batch": seconds, "pipeline_images_per_s": batch / seconds,
                    "extrapolated_from_steps": config.timed_steps,
                })
        del dit, tokenizers
        gc.collect()
    report = {"config": dataclasses.asdict(config), "machine": machine, "image_size": image_size,
              "dit": config.dit + (" (quick: tiny)" if config.quick else ""),
              "dit_params_m": None, "rows": rows, "speedups": speedups(rows),
              "note": f"pipeline images/s = batch / ({config.ddpm_steps} × DiT step + decode): DiT time "
                      f"extrapolated from {config.timed_steps} timed steps; each DiT fraction is of the mean of two "
                      "matmul timings taken right before and after its forwards"}
    with torch.device("meta"):
        report["dit_params_m"] = count_parameters(build_dit(config, 4, image_size // 8)) / 1e6
    if config.output_dir:
        write_report(report, Path(config.output_dir))
    return report


def speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Whole-pipeline images/s of 16× over 8× for each tokenizer and precision (paper: ~2.3× on an H100)."""
    by_key = {(r["compression"], r["tokenizer"], r["precision"]): r for r in rows}
    out = []
    for (compression, kind, precision), row in by_key.items():
        base = by_key.get(("8x", kind, precision))
        if compression == "16x" and base is not None:
            out.append({"tokenizer": kind, "precision": precision,
                        "ratio_16x_over_8x": row["pipeline_images_per_s"] / base["pipeline_images_per_s"]})
    return out


def markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    rates = ", ".join(f"{p} {v:.1f} GFLOP/s" for p, v in machine["matmul_gflops"].items())
    lines = [f"Throughput on {machine['device']} ({machine['device_type']}, {machine['threads']} threads; "
             f"{machine['matmul_size']}² matmul: {rates}), {report['dit']} ({report['dit_params_m']:.4g}M "
             f"params), {report['image_size']}² images, batch {report['config']['batch_size']}.",
             f"{report['note']}.", "",
             "| compression | tokens | tokenizer (decoder params) | precision | DiT step (ms) | DiT GFLOP/fwd | "
             "DiT GFLOP/s (of matmul) | decode 1/2/3 steps (ms) | encode (ms) | pipeline images/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        decode = " / ".join(f"{1e3 * v:.0f}" for v in r["decode_s"].values())
        lines.append(
            f"| {r['compression']} ({'×'.join(map(str, r['latent_shape']))}) | {r['tokens']} | {r['tokenizer']} "
            f"({r['decoder_params_m']:.1f}M) | {r['precision']} | {1e3 * r['dit_step_s']:.1f} | "
            f"{r['dit_gflop_per_forward']:.4g} | {r['dit_achieved_gflops']:.4g} "
            f"({100 * r['dit_matmul_fraction']:.0f}%) | {decode} | {1e3 * r['encode_s']:.0f} | {r['pipeline_images_per_s']:.4g} |")
    if report["speedups"]:
        lines += ["", "| tokenizer | precision | 16× / 8× images/s |", "|---|---|---|"]
        lines += [f"| {s['tokenizer']} | {s['precision']} | {s['ratio_16x_over_8x']:.2f}× |"
                  for s in report["speedups"]]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    (directory / "throughput.md").write_text(markdown(report))


# ------------------------------------------------------------------------------------------------ training steps
#
# `scripts/benchmark.py train`: one full training step of each trainer (forward, backward, Adam, EMA), eager and
# compiled side by side in one process, against the matmul rate measured in the same process; and the latent-shard
# reader's latents/s. FLOPs are counted once per workload on an eager step (FlopCounterMode counts matmuls,
# convolutions and attention, forward and backward; elementwise work is not counted, so a fraction of the matmul
# rate is an upper bound on how much of the step is spent in the counted kernels).

COMPILE_MODES = ("eager", "compiled")
QUICK_TRAIN = dict(encoder="tiny", decoder="tiny", resolution=32, latent_size=8, reader_latents=64,
                   reader_batch_size=16, reader_workers=(0, 1), matmul_size=256)


@dataclass(frozen=True)
class TrainThroughputConfig(_BenchmarkRun):
    """What `benchmark_training` times; the tokenizer defaults are the demo's (tiny-lite encoder, XS decoder)."""

    tokenizer_batch_size: int = 8  # images per tokenizer training step (the demo's)
    resolution: int = 64  # tokenizer training image side (the demo's crops; it trains on 32² windows of them)
    encoder: str | None = None  # encoder preset; None: the demo's (tiny-lite)
    decoder: str | None = None  # decoder preset; None: the demo's (XS)
    perceptual: str = "effnet-l0"  # perceptual network of the "with perceptual" rows (the demo's)
    dit: str = "DiT-S/2"  # DiT size of the timed training step
    dit_batch_size: int = 8  # latents per DiT training step
    latent_size: int = 32  # latent side of the DiT step and of the shard reader (4 channels)
    modes: tuple[str, ...] = COMPILE_MODES  # eager and/or compiled (torch.compile, in place)
    precision: str = "auto"  # autocast precision of the steps (auto: this device's fast one)
    timed_steps: int = 5  # steps timed per row (median), after the warm-up steps
    warmup_steps: int = 2  # untimed steps per row (a compiled row compiles in these)
    reader_latents: int = 4096  # latents written to temporary shards for the reader figure
    reader_batch_size: int = 256  # latents per reader batch
    reader_workers: tuple[int, ...] = (0, 2)  # DataLoader workers of each reader row (0: read in the process)
    profiled_steps: int = 3  # eager steps of each workload run under torch.profiler (0: none): time by kind of op
    # Side of the square matmul that measures the machine's rate: 4096, as `throughput` (a 2048² one ran slower
    # here, 126.5 against 137.7-159.1 GFLOP/s, which flattered every fraction of it).
    matmul_size: int = 4096
    output_dir: str | None = "runs/benchmark/train"  # directory for train_throughput.json + train_throughput.md

    def __post_init__(self) -> None:
        object.__setattr__(self, "modes", tuple(self.modes))
        if not self.modes or any(m not in COMPILE_MODES for m in self.modes):
            raise ValueError(f"modes must be among {list(COMPILE_MODES)}, got {list(self.modes)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        for name in ("tokenizer_batch_size", "resolution", "dit_batch_size", "latent_size", "timed_steps",
                     "reader_latents", "reader_batch_size", "matmul_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "profiled_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        object.__setattr__(self, "reader_workers", tuple(self.reader_workers))
        if not self.reader_workers or min(self.reader_workers) < 0:
            raise ValueError(f"reader-workers must be one or more counts >= 0, got {list(self.reader_workers)}")

    def sized(self) -> "TrainThroughputConfig":
        """The quick variant's sizes applied (tiny models) when `quick`."""
        return dataclasses.replace(self, **QUICK_TRAIN) if self.quick else self


def _tokenizer_train_config(config: TrainThroughputConfig, perceptual: bool):
    """The demo's tokenizer (model section, loss weights) at the benchmark's sizes."""
    from pipelines.experiments.demo import DEMO_TOKENIZER

    model = DEMO_TOKENIZER.model
    model = dataclasses.replace(model, encoder=config.encoder or model.encoder,
                                decoder=config.decoder or model.decoder)
    loss = dataclasses.replace(DEMO_TOKENIZER.loss, perceptual=config.perceptual if perceptual else "none",
                               perceptual_weight=DEMO_TOKENIZER.loss.perceptual_weight if perceptual else 0.0)
    return dataclasses.replace(DEMO_TOKENIZER, model=model, loss=loss)


def tokenizer_training_step(config: TrainThroughputConfig, perceptual: bool, device: torch.device, precision: str):
    """(step function, modules to compile, what it is) for one demo-sized tokenizer step: encode, decode, the
    losses the demo trains with, backward, Adam, EMA: the trainer's own pieces, without accelerate."""
    from pipelines.kit.ema import EMA
    from pipelines.kit.optim import OptimizerConfig, build_optimizer
    from pipelines.train_tokenizer import (TokenizerTrainingStep, build_discriminator, build_tokenizer,
                                           generator_losses, sample_training_time)
    from tokenizer.perceptual import build_perceptual

    train_config = _tokenizer_train_config(config, perceptual)
    torch.manual_seed(0)
    tokenizer = build_tokenizer(train_config).to(device)
    discriminator = build_discriminator(train_config).to(device)
    distance = build_perceptual(train_config.loss.perceptual).to(device)
    step_module = TokenizerTrainingStep(tokenizer)
    memory_format = torch.channels_last if train_config.run.channels_last else torch.contiguous_format
    for module in (step_module, discriminator, distance):
        module.to(memory_format=memory_format)
    optimizer = build_optimizer(step_module, OptimizerConfig(lr=1e-4, betas=train_config.optim.adam_betas), device)
    ema = EMA(tokenizer, train_config.optim.ema_decay)
    batch = config.tokenizer_batch_size
    images = (torch.rand(batch, 3, config.resolution, config.resolution, device=device) * 2 - 1).to(
        memory_format=memory_format)  # (B, 3, H, W)

    def step() -> None:
        t = sample_training_time(tokenizer, batch, device)  # (B,)
        noise = torch.randn_like(images)
        with autocast(device, precision):
            out = step_module(images, noise, t)
            total, _ = generator_losses(train_config, tokenizer.objective, out, images, t, distance, discriminator,
                                        False, tokenizer.config.kl_weight)
        total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(tokenizer)

    what = {"model": f"ε-VAE {train_config.model.encoder} encoder / {train_config.model.decoder} decoder",
            "perceptual": train_config.loss.perceptual, "batch_size": batch,
            "shape": [3, config.resolution, config.resolution], "params_m": count_parameters(tokenizer) / 1e6,
            "channels_last": train_config.run.channels_last}
    return step, [tokenizer.encoder, tokenizer.decoder], what  # what --compile compiles (the perceptual net stays eager)


def dit_training_step(config: TrainThroughputConfig, device: torch.device, precision: str):
    """(step function, modules to compile, what it is) for one DiT step: the trainer's ε-prediction loss at
    t ~ U{0..999}, backward, Adam, EMA."""
    from generator.diffusion import epsilon_loss, linear_beta_schedule
    from pipelines.kit.ema import EMA
    from pipelines.kit.optim import OptimizerConfig, build_optimizer
    from pipelines.train_generator import schedule_on

    torch.manual_seed(0)
    overrides = dict(QUICK_DIT) if config.quick else {}
    dit = _training_dit(config.dit, config.latent_size, overrides).to(device)
    optimizer = build_optimizer(dit, OptimizerConfig(lr=1e-4), device)
    ema = EMA(dit, 0.9999)
    schedule = schedule_on(linear_beta_schedule(1000), device)
    batch = config.dit_batch_size
    latents = torch.randn(batch, 4, config.latent_size, config.latent_size, device=device)  # (B, 4, h, w)
    labels = torch.randint(0, 1000, (batch,), device=device)  # (B,)

    def step() -> None:
        t = torch.randint(0, 1000, (batch,), device=device)  # (B,)
        with autocast(device, precision):
            loss = epsilon_loss(dit, schedule, latents, t, model_kwargs={"y": labels}).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(dit)

    what = {"model": config.dit + (" (quick: tiny)" if config.quick else ""), "perceptual": None,
            "batch_size": batch, "shape": [4, config.latent_size, config.latent_size],
            "params_m": count_parameters(dit) / 1e6}
    return step, [dit], what


def _training_dit(name: str, latent_size: int, overrides: dict[str, Any]):
    from generator.dit import DiT

    return DiT.from_name(name, input_size=latent_size, in_channels=4, num_classes=1000, **overrides)


# Kinds of op a profiled step's time is split into: the first pattern that matches an ATen op's name (without
# "aten::") names its kind; anything else is "other".
OP_KINDS: tuple[tuple[str, str], ...] = (
    ("convolution", r"conv|mkldnn_convolution"),
    ("matmul", r"^(mm|addmm|bmm|baddbmm|matmul|linear|addmv|mv)$"),
    ("attention", r"attention"),
    ("normalization", r"_norm"),
    ("activation", r"silu|gelu|relu|sigmoid|tanh|softplus|softmax|elu"),
    ("optimizer + EMA", r"adam|_foreach|lerp"),
    ("random numbers", r"normal|uniform|bernoulli|rand|multinomial"),
    ("copies / layout / resampling", r"copy|cat|clone|contiguous|pad|upsample|pool|pixel_|stack|index|gather|scatter"
                                   r"|fill|zero|empty|resize|as_strided|_to_copy|flip|roll"),
    ("elementwise + reductions", r"^(add|sub|rsub|mul|div|neg|pow|exp|log|sqrt|rsqrt|abs|clamp|clamp_min|sum|mean"
                                 r"|var|var_mean|std|where|square|reciprocal|maximum|minimum|mse_loss|l1_loss|sign"
                                 r"|lt|gt|eq|ne|le|ge|cos|sin|logical_and|logical_or|dropout)_?$"),
)


def op_kind(name: str) -> str:
    """The kind (OP_KINDS) of an ATen op, e.g. "aten::convolution_backward" -> "convolution"."""
    bare = name.removeprefix("aten::")
    return next((kind for kind, pattern in OP_KINDS if re.search(pattern, bare)), "other")


def profile_steps(step: Callable[[], None], device: torch.device, steps: int, top: int = 12) -> dict[str, Any]:
    """Where `steps` calls of `step` spend their time, by kind of op (`op_kind`) and by op: each ATen op's self time
    (its device time on CUDA), per step. `unattributed_ms_per_step` is the wall time no op accounts for (Python,
    autograd bookkeeping). The profiler's own overhead inflates small ops, so shares are approximate."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as profiler:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        wall = time.perf_counter() - start
    by_op: dict[str, float] = {}
    for event in profiler.key_averages():
        if not event.key.startswith("aten::"):
            continue  # wrappers (autograd nodes, Optimizer.step) and kernels: their time is in the ATen ops
        micros = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        if micros > 0:
            by_op[event.key] = by_op.get(event.key, 0.0) + micros / 1e3 / steps
    kinds: dict[str, float] = {}
    for name, ms in by_op.items():
        kind = op_kind(name)
        kinds[kind] = kinds.get(kind, 0.0) + ms
    op_ms = sum(by_op.values())
    return {"steps": steps, "wall_ms_per_step": 1e3 * wall / steps, "op_ms_per_step": op_ms,
            "unattributed_ms_per_step": max(0.0, 1e3 * wall / steps - op_ms) if device.type != "cuda" else None,
            "kinds_ms_per_step": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "top_ops_ms_per_step": dict(sorted(by_op.items(), key=lambda kv: -kv[1])[:top])}


def shard_reader_rate(config: TrainThroughputConfig, say: Callable[..., None]) -> dict[str, Any]:
    """latents/s of `make_latent_loader` as the DiT trainer uses it (resampled, shuffled, random flip, posterior
    sample, normalised; one process) over shards of random 4×s×s latents in a temporary directory, with each
    count of DataLoader workers in `reader_workers` (what the training process receives).

    Two consecutive windows of `reader_latents` latents are timed: the first also checks the sha256 of each shard
    as it is first drawn (once per process; a long run pays it once), the second is what the rest of a run sees.
    The checksum's own cost is timed apart, per latent."""
    import glob
    import tempfile

    from data.latent_shards import (LatentShardWriter, file_sha256, make_latent_loader, merge_manifests,
                                    rank_prefix)

    shape = (4, config.latent_size, config.latent_size)
    rows = []
    with tempfile.TemporaryDirectory(prefix="latent-shards-") as directory:
        generator = torch.Generator().manual_seed(0)
        with LatentShardWriter(directory, rank_prefix(0), samples_per_shard=max(1, config.reader_latents // 4)) as w:
            for i in range(config.reader_latents):
                mean, logvar = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator) - 4
                w.write(f"sample{i:07d}", i % 10, mean, logvar, mean.flip(-1), logvar.flip(-1))
        merge_manifests(directory, tokenizer_config={}, tokenizer_weights_sha256="benchmark",
                        class_names=[str(c) for c in range(10)])
        start = time.perf_counter()
        for shard in sorted(glob.glob(os.path.join(directory, "*.tar"))):
            file_sha256(shard)
        checksum_us = 1e6 * (time.perf_counter() - start) / config.reader_latents
        for workers in config.reader_workers:
            loader, _ = make_latent_loader(directory, config.reader_batch_size, num_workers=workers, resampled=True,
                                           shuffle_buffer=min(1000, config.reader_latents), seed=0, flip=True,
                                           sample_posterior=True, normalize=True)
            batches = iter(loader)
            next(batches)  # starts the workers, opens the first shards, fills the shuffle buffers

            def window() -> float:
                count, start = 0, time.perf_counter()
                while count < config.reader_latents:
                    count += next(batches)[0].shape[0]
                return count / (time.perf_counter() - start)

            first, steady = window(), window()
            del batches, loader  # stops the workers
            rows.append({"num_workers": workers, "latents_per_s": steady, "first_window_latents_per_s": first})
            say(f"  latent-shard reader {'×'.join(map(str, shape))}, {workers} workers: {steady:.0f} latents/s "
                f"({first:.0f} in the first {config.reader_latents}, which check each shard's sha256: "
                f"{checksum_us:.0f} µs per latent; batch {config.reader_batch_size}, 1 process)", flush=True)
    return {"latent_shape": list(shape), "latents": config.reader_latents, "batch_size": config.reader_batch_size,
            "checksum_us_per_latent": checksum_us, "rows": rows}


def benchmark_training(config: TrainThroughputConfig) -> dict[str, Any]:
    """Time each training step eager and compiled, the matmul rate, and the shard reader; the JSON-ready report."""
    with torch_threads(config.threads):
        return _benchmark_training(config)


def _benchmark_training(config: TrainThroughputConfig) -> dict[str, Any]:
    from pipelines.kit.compiling import compile_modules, compile_unavailable_reason

    sized = config.sized()
    device = pick_device(config.device)
    precision = resolve_precision(config.precision, device)
    say = print if config.verbose else (lambda *args, **kwargs: None)
    modes = list(config.modes)
    skipped = compile_unavailable_reason(device) if "compiled" in modes else None
    if skipped:
        modes.remove("compiled")
        say(f"compiled rows skipped: {skipped}", flush=True)
    machine = {**machine_facts(device), "precision": precision, "matmul_size": sized.matmul_size}
    say(f"training steps on {machine['device']} ({device.type}, {machine['threads']} threads), precision "
        f"{precision}, modes {modes}", flush=True)
    probe = MatmulProbe(sized.matmul_size, device, precision)  # also the reference each timed step is paired with
    machine["matmul_gflops"] = probe.gflops(repeats=3)
    say(f"  matmul {sized.matmul_size}² {precision}: {machine['matmul_gflops']:.1f} GFLOP/s", flush=True)
    workloads = {
        "tokenizer": lambda: tokenizer_training_step(sized, False, device, precision),
        "tokenizer+perceptual": lambda: tokenizer_training_step(sized, True, device, precision),
        "dit": lambda: dit_training_step(sized, device, precision),
    }
    rows: list[dict[str, Any]] = []
    profiles: dict[str, dict[str, Any]] = {}
    for name, build in workloads.items():
        step, modules, what = build()
        step()  # warm-up (allocator, lazy initialisation) before the count
        flops = count_flops(step)
        for mode in modes:
            compile_s = None
            if mode == "compiled":
                compile_modules(*modules, device=device)
                start = time.perf_counter()
                step()  # the compile happens here (and any recompiles in the warm-up steps below)
                synchronize(device)
                compile_s = time.perf_counter() - start
            for _ in range(sized.warmup_steps):
                step()
            # Each timed step is paired with a matmul timed right before it, and the row's fraction is the median
            # of the pairs' fractions: this shared machine's speed moves 10-20% within seconds, and pairs follow it
            # more closely than one reference before and after all the steps (measured: the fractions of 7 runs
            # of the tokenizer step spread over 7 points paired, 19 before/after).
            rates, times = [], []
            for _ in range(sized.timed_steps):
                rates.append(probe.gflops())
                times.append(time_call(step, device, repeats=1, warmup=0))
            fractions = [flops / seconds / 1e9 / rate for seconds, rate in zip(times, rates)]
            seconds, reference = statistics.median(times), statistics.median(rates)
            achieved = flops / seconds / 1e9
            row = {"workload": name, **what, "mode": mode, "precision": precision, "step_s": seconds,
                   "items_per_s": what["batch_size"] / seconds, "gflop_per_step": flops / 1e9,
                   "achieved_gflops": achieved, "matmul_gflops": reference, "matmul_gflops_per_step": rates,
                   "step_s_per_step": times, "matmul_fraction": statistics.median(fractions),
                   "matmul_fraction_per_step": fractions, "compile_s": compile_s, "timed_steps": sized.timed_steps}
            rows.append(row)
            say(f"  {name} {mode}: {1e3 * seconds:.0f} ms/step, {row['items_per_s']:.3g} items/s, "
                f"{achieved:.1f} GFLOP/s, {100 * row['matmul_fraction']:.0f}% of the matmul rate (median of "
                f"{len(fractions)} step/matmul pairs, {100 * min(fractions):.0f}-{100 * max(fractions):.0f}%; matmul "
                f"{min(rates):.1f}-{max(rates):.1f} GFLOP/s)"
                + (f", first step {compile_s:.1f} s" if compile_s is not None else ""), flush=True)
            if mode == "eager" and sized.profiled_steps:  # before any compile replaces the modules' forwards
                profiles[name] = profile_steps(step, device, sized.profiled_steps)
                say(f"  {name} eager under the profiler, ms per step by kind of op: " + ", ".join(
                    f"{kind} {ms:.1f}" for kind, ms in profiles[name]["kinds_ms_per_step"].items()), flush=True)
        del step, modules
        gc.collect()
    report = {"config": dataclasses.asdict(config), "sizes": dataclasses.asdict(sized), "machine": machine,
              "rows": rows, "compiled_over_eager": compiled_speedups(rows), "compile_skipped": skipped,
              "reader": shard_reader_rate(sized, say), "profiles": profiles,
              "note": "FLOPs counted by FlopCounterMode on one eager step (forward + backward: matmuls, "
                      "convolutions, attention); step = forward, backward, Adam, EMA; median of "
                      f"{sized.timed_steps} steps after {sized.warmup_steps} warm-up steps, each timed right after "
                      "a matmul; a row's fraction is the median of its step/matmul pairs' fractions"}
    if config.output_dir:
        write_train_report(report, Path(config.output_dir))
    return report


def compiled_speedups(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Step time eager / compiled of each workload timed both ways (>1: compiling pays)."""
    by_key = {(r["workload"], r["mode"]): r for r in rows}
    return {name: by_key[(name, "eager")]["step_s"] / by_key[(name, "compiled")]["step_s"]
            for name, mode in by_key if mode == "compiled" and (name, "eager") in by_key}


def train_markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    lines = [f"Training steps on {machine['device']} ({machine['device_type']}, {machine['threads']} threads), "
             f"{machine['precision']}; {machine['matmul_size']}² matmul: {machine['matmul_gflops']:.1f} GFLOP/s.",
             f"{report['note']}.", "",
             "| workload | model (params) | batch × shape | mode | step (ms) | items/s | GFLOP/step | GFLOP/s "
             "(of matmul) | pairs' fractions | matmul GFLOP/s | first step (s) |",
             "|---" * 11 + "|"]
    for r in report["rows"]:
        first = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else "–"
        lines.append(
            f"| {r['workload']} | {r['model']} ({r['params_m']:.3g}M) | {r['batch_size']} × "
            f"{'×'.join(map(str, r['shape']))} | {r['mode']} | {1e3 * r['step_s']:.0f} | {r['items_per_s']:.3g} | "
            f"{r['gflop_per_step']:.4g} | {r['achieved_gflops']:.4g} ({100 * r['matmul_fraction']:.0f}%) | "
            f"{_span(r['matmul_fraction_per_step'], 100, '%')} | {_span(r['matmul_gflops_per_step'], 1, '')} | "
            f"{first} |")
    if report["compiled_over_eager"]:
        lines += ["", "| workload | eager / compiled step time |", "|---|---|"]
        lines += [f"| {name} | {ratio:.2f}× |" for name, ratio in report["compiled_over_eager"].items()]
    if report["compile_skipped"]:
        lines += ["", f"Compiled rows skipped: {report['compile_skipped']}."]
    reader = report["reader"]
    lines += ["", f"Latent-shard reader ({'×'.join(map(str, reader['latent_shape']))}, batch {reader['batch_size']}, "
                  f"one process; the first {reader['latents']} latents also check each shard's sha256 once, "
                  f"{reader['checksum_us_per_latent']:.0f} µs per latent):", "",
              "| DataLoader workers | latents/s | first window |", "|---|---|---|"]
    lines += [f"| {row['num_workers']} | {row['latents_per_s']:.0f} | {row['first_window_latents_per_s']:.0f} |"
              for row in reader["rows"]]
    return "\n".join(lines + profile_markdown(report.get("profiles") or {})) + "\n"


def _span(values: list[float], scale: float, unit: str) -> str:
    low, high = scale * min(values), scale * max(values)
    return f"{low:.0f}{unit}" if round(low) == round(high) else f"{low:.0f}-{high:.0f}{unit}"


def profile_markdown(profiles: dict[str, dict[str, Any]]) -> list[str]:
    """Lines of a table: ms per eager step and share of the ops' time, by kind of op, one column per workload."""
    if not profiles:
        return []
    names = list(profiles)
    kinds = sorted({kind for p in profiles.values() for kind in p["kinds_ms_per_step"]},
                   key=lambda kind: -max(p["kinds_ms_per_step"].get(kind, 0.0) / (p["op_ms_per_step"] or 1)
                                         for p in profiles.values()))  # the largest share in any workload first
    steps = {p["steps"] for p in profiles.values()}
    lines = ["", f"Where an eager step's time goes (torch.profiler over {'/'.join(map(str, sorted(steps)))} steps; "
                 "ATen ops' self time in ms per step and share of all ops' time; the profiler slows small ops):", "",
             "| kind of op | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]

    def cell(profile: dict[str, Any], ms: float) -> str:
        return f"{ms:.1f} ({100 * ms / profile['op_ms_per_step']:.0f}%)" if profile["op_ms_per_step"] else "–"

    for kind in kinds:
        lines.append(f"| {kind} | " + " | ".join(cell(profiles[n], profiles[n]["kinds_ms_per_step"].get(kind, 0.0))
                                                 for n in names) + " |")
    lines.append("| all ops / wall | " + " | ".join(
        f"{profiles[n]['op_ms_per_step']:.1f} / {profiles[n]['wall_ms_per_step']:.1f}" for n in names) + " |")
    return lines


def write_train_report(report: dict[str, Any], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "train_throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    (directory / "train_throughput.md").write_text(train_markdown(report))
