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
"""
from __future__ import annotations

import dataclasses
import gc
import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

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
class ThroughputConfig:
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
    threads: int | None = None  # CPU threads (torch.set_num_threads); None keeps PyTorch's default
    quick: bool = False  # tiny models and sizes (tests)
    device: str | None = None  # None: the first CUDA device if any, else the CPU
    output_dir: str | None = "runs/benchmark/throughput"  # directory for throughput.json + throughput.md
    verbose: bool = True  # print one line per measurement as it is taken

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


def matmul_gflops(size: int, device: torch.device, precision: str = "fp32", repeats: int = 3) -> float:
    """The machine's dense matmul rate: 2·n³ FLOPs of an n×n @ n×n product, in GFLOP/s."""
    dtype = autocast_dtype(precision, device) or torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = time_call(lambda: a @ b, device, repeats=repeats, warmup=1)
    return 2 * size**3 / seconds / 1e9


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


@torch.no_grad()
def benchmark_throughput(config: ThroughputConfig) -> dict[str, Any]:
    """Time every component for every (compression, tokenizer, precision); returns the JSON-ready report."""
    previous_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _benchmark(config)
    finally:
        torch.set_num_threads(previous_threads)


def _benchmark(config: ThroughputConfig) -> dict[str, Any]:
    device = pick_device(config.device)
    image_size = 32 if config.quick else config.resolution
    matmul_size = 256 if config.quick else config.matmul_size
    batch = config.batch_size
    # "auto" → the concrete precision this device runs; each is timed once even if named twice.
    precisions = list(dict.fromkeys(resolve_precision(p, device) for p in config.precisions))
    say = print if config.verbose else (lambda *args, **kwargs: None)
    machine = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
               or platform.machine(), "device_type": device.type, "torch": torch.__version__,
               "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "precisions": precisions, "matmul_gflops": {}, "matmul_size": matmul_size}
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
                dit_step = time_call(lambda: dit(z, t, y), device, repeats=config.timed_steps, warmup=1)
            say(f"  {compression} {precision} DiT step: {1e3 * dit_step:.1f} ms "
                f"({dit_flops / dit_step / 1e9:.1f} GFLOP/s)", flush=True)
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
                    "dit_matmul_fraction": dit_flops / dit_step / 1e9 / machine["matmul_gflops"][precision],
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
                      f"extrapolated from {config.timed_steps} timed steps"}
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
