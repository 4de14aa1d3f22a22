"""The sampling job behind `scripts/sample.py`: class ids → `GenerationPipeline` (DiT → tokenizer) → PNGs.

    result = run_sampling(SampleConfig(generator="runs/dit/model", tokenizer="runs/tok/model", num=50_000))

One PNG per image, written atomically (resumable: a rerun skips the complete ones), named after its index,
class and seed (`pipelines.kit.sample_files`). Before the first image the run's settings (`sampling_settings`: the
weights' fingerprints, the planned classes and seeds, steps, guidance, precision...) go to `settings.json`; a rerun
into the same folder resumes only when its settings are the same, otherwise it refuses with one line (or starts
over with `overwrite`), so a folder never mixes images made two ways. Image indices are split across ranks as
`indices[rank::world]`, and every image has its own seed (`pipelines.kit.generation`), so the same plan gives the
same images on any number of processes. The main process then assembles `grid.png`, the ADM-format `samples.npz` and
`sampling.json` from the PNGs. `sample_and_score` is the paper's generation protocol in one call (Table 3:
50k samples, no CFG, then FID), behind `scripts/evaluate.py pipeline`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from generator.dit import load_config
from pipelines.kit.compiling import compile_modules, require_compile_support
from pipelines.kit.fid import FIDConfig, check_reference, evaluate_fid, write_report
from pipelines.kit.generation import GenerationPipeline, class_ids, make_generators, read_provenance
from pipelines.kit.metrics import build_feature_extractor
from pipelines.kit.precision import check_precision
from pipelines.kit.sample_files import (SAMPLE_NAME, png_is_complete, sample_filename, temporary_path,
                                        write_adm_npz, write_png_atomic)
from tokenizer import DEFAULT_DECODE_STEPS

logger = logging.getLogger(__name__)

SETTINGS_NAME = "settings.json"  # written before the first image: what a rerun must match to resume
GRID_NAME, NPZ_NAME, REPORT_NAME = "grid.png", "samples.npz", "sampling.json"  # assembled at the end


@dataclass(frozen=True)
class SampleConfig:
    """Everything `run_sampling` needs. Defaults are the paper's protocol (C.3): 250 DDPM steps, no CFG."""

    generator: str  # DiT save_pretrained folder or Hub id
    tokenizer: str  # ε-VAE / VAE save_pretrained folder or Hub id
    output_dir: str = "runs/samples"  # PNGs, grid.png, samples.npz, settings.json, config.yaml
    classes: str = "all"  # "all", or ids / class names: "207,360,387"
    per_class: int | None = None  # K images of each class, class-major order
    num: int | None = None  # N images, classes cycled (balanced); default: per_class 1, or one per seed
    seeds: str | None = None  # "0-49999", "1,5,9-12": one per image
    seed: int = 0  # without --seeds, image i gets seed + i
    ddpm_steps: int = 250  # respaced DDPM sampling steps (paper: 250)
    decode_steps: int = DEFAULT_DECODE_STEPS  # ε-VAE Euler steps (1-3 in the paper); ignored by the baseline VAE
    cfg_scale: float = 1.0  # 1 = no guidance (the paper's numbers)
    variance: str = "fixed_large"  # DDPM posterior variance: fixed_large (DiT's default) | fixed_small
    batch_size: int = 32
    precision: str = "auto"  # DiT and decoder autocast: auto | fp32 | bf16 | fp16 (pipelines.kit.precision)
    use_ema: bool = False  # the DiT's ema.safetensors (training already saves EMA weights as model.safetensors)
    tokenizer_use_ema: bool = False  # the tokenizer's ema.safetensors instead of model.safetensors
    allow_tokenizer_mismatch: bool = False  # decode with a tokenizer other than the one the DiT was trained on
    decode_tile: int | None = None  # latent tile size for tiled decoding of large images; None: whole image
    decode_tile_overlap: int = 4  # latent pixels shared by neighbouring tiles (blended)
    grid_classes: int = 16  # rows of grid.png
    grid_columns: int = 8  # columns of grid.png
    write_npz: bool = True  # also write samples.npz (ADM evaluator format)
    overwrite: bool = False  # delete the folder's samples made with other settings and start over
    # torch.compile the DiT and the decoder (TorchInductor; the first batch compiles). Images equal eager ones
    # within float tolerance, so a PNG may differ by one level in a few pixels: recorded in settings.json, and a
    # folder is not resumed across the two
    compile: bool = False
    cpu: bool = False  # force CPU even where a GPU is visible (CPU-only `accelerate launch`)

    def __post_init__(self) -> None:
        if isinstance(self.decode_steps, bool) or self.decode_steps < 1:
            raise ValueError(f"decode steps must be >= 1, got {self.decode_steps}")
        for name in ("ddpm_steps", "batch_size", "grid_classes", "grid_columns"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("per_class", "num"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not self.cfg_scale >= 0:
            raise ValueError(f"cfg scale must be >= 0, got {self.cfg_scale}")
        check_precision(self.precision)
        if self.decode_tile is not None and not 0 <= self.decode_tile_overlap < self.decode_tile:
            raise ValueError(f"decode tile overlap must be in [0, {self.decode_tile}), got {self.decode_tile_overlap}")


def parse_classes(text: str, num_classes: int, class_names: Sequence[str] | None = None) -> list[int]:
    """"all" or comma-separated ids / names → class ids; unknown or out-of-range ones are a ValueError."""
    text = text.strip()
    if text == "all":
        return list(range(num_classes))
    classes = class_ids(text.split(","), num_classes, class_names)
    if not classes:
        raise ValueError("--classes is empty")
    return classes


def parse_seeds(text: str) -> list[int]:
    """"0-49999" or "1,5,9-12" → a list of non-negative seeds (ranges inclusive, as in EDM's generate.py)."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if match is None:
            raise ValueError(f"bad seed list {text!r}: expected e.g. '0-49999' or '1,5,9-12'")
        first, last = int(match[1]), int(match[2] if match[2] is not None else match[1])
        if last < first:
            raise ValueError(f"bad seed range {part!r}: the end is below the start")
        seeds.extend(range(first, last + 1))
    return seeds


def plan_samples(config: SampleConfig, num_classes: int,
                 class_names: Sequence[str] | None = None) -> tuple[list[int], list[int]]:
    """(labels, seeds), one entry per image index (see `SampleConfig` for the counting rules).

    An unconditional DiT (0 classes) has one label, its null class 0: `--num` / `--per-class` count its images.
    """
    classes = [0] if num_classes == 0 else parse_classes(config.classes, num_classes, class_names)
    seeds = parse_seeds(config.seeds) if config.seeds is not None else None
    if config.per_class is not None:
        if config.num is not None and config.num != config.per_class * len(classes):
            raise ValueError(f"--num {config.num} contradicts --per-class {config.per_class} × {len(classes)} classes")
        labels = [c for c in classes for _ in range(config.per_class)]
    else:
        count = config.num or (len(seeds) if seeds is not None else len(classes))
        labels = [classes[i % len(classes)] for i in range(count)]
    if seeds is None:
        seeds = [config.seed + i for i in range(len(labels))]
    if len(seeds) != len(labels):
        raise ValueError(f"--seeds gives {len(seeds)} seeds for {len(labels)} images")
    return labels, seeds


def write_grid(path: Path, image_paths: Sequence[Path], labels: Sequence[int], class_names: Sequence[str] | None,
               max_rows: int = 16, columns: int = 8, max_cell: int = 256) -> None:
    """One row per class (in order of first appearance), up to `columns` images each, labelled on the left."""
    from PIL import Image, ImageDraw

    rows: dict[int, list[Path]] = {}
    for image_path, label in zip(image_paths, labels):
        if label not in rows and len(rows) >= max_rows:
            continue
        cells = rows.setdefault(label, [])
        if len(cells) < columns:
            cells.append(image_path)
    columns = max(len(cells) for cells in rows.values())
    with Image.open(next(iter(rows.values()))[0]) as first:
        cell = min(first.size[0], max_cell)
    margin = 8 + 7 * max(len(_row_label(label, class_names)) for label in rows)
    grid = Image.new("RGB", (margin + columns * cell, len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for row, (label, cells) in enumerate(rows.items()):
        draw.text((4, row * cell + cell // 2 - 5), _row_label(label, class_names), fill="black")
        for column, image_path in enumerate(cells):
            with Image.open(image_path) as image:
                tile = image.convert("RGB").resize((cell, cell), Image.BICUBIC) if image.size[0] != cell \
                    else image.convert("RGB")
                grid.paste(tile, (margin + column * cell, row * cell))
    tmp = temporary_path(path)
    grid.save(tmp, format="PNG")
    os.replace(tmp, path)


def _row_label(label: int, class_names: Sequence[str] | None) -> str:
    if class_names and 0 <= label < len(class_names):
        return f"{label} {class_names[label]}"
    return str(label)


def _check_writable(directory: Path, rank: int) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-probe-{rank}-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"cannot write to output directory {directory}: {error.strerror or error}") from None


def _ids_sha256(values: Sequence[int]) -> str:
    return hashlib.sha256(json.dumps([int(v) for v in values]).encode()).hexdigest()


def sampling_settings(config: SampleConfig, pipeline: GenerationPipeline, labels: Sequence[int],
                      seeds: Sequence[int]) -> dict[str, Any]:
    """What decides the images of a sample folder: the weights by fingerprint (a copied model folder is the same
    model), the planned classes and seeds by hash, and the sampler's settings. Paths, the batch size and the
    number of processes are not settings: per-image seeds make the images independent of them."""
    from tokenizer.models import weights_fingerprint  # the DiT's folder has the same format: same weights file choice

    tiled = config.decode_tile is not None
    return {
        "generator_weights_sha256": weights_fingerprint(config.generator, config.use_ema),
        "tokenizer_weights_sha256": weights_fingerprint(config.tokenizer, config.tokenizer_use_ema),
        "num_images": len(labels), "labels_sha256": _ids_sha256(labels), "seeds_sha256": _ids_sha256(seeds),
        "image_size": pipeline.image_size, "ddpm_steps": config.ddpm_steps,
        "decode_steps": config.decode_steps if pipeline.tokenizer.objective.iterative else None,  # a VAE ignores them
        "cfg_scale": config.cfg_scale, "variance": config.variance, "precision": config.precision,
        "decode_tile": config.decode_tile, "decode_tile_overlap": config.decode_tile_overlap if tiled else None,
        **({"compile": True} if config.compile else {}),  # absent when eager: older folders' settings still match
    }


def _tool_outputs(out_dir: Path) -> list[Path]:
    """The files of `out_dir` this tool writes: sample PNGs, the grid, the npz, the report and the settings."""
    names = (GRID_NAME, NPZ_NAME, REPORT_NAME, SETTINGS_NAME)
    return sorted(p for p in out_dir.iterdir() if p.is_file() and (SAMPLE_NAME.match(p.name) or p.name in names))


def _shown(value: Any) -> str:
    is_hash = isinstance(value, str) and len(value) == 64
    return f"{value[:12]}…" if is_hash else str(value)


def settings_conflict(out_dir: Path, settings: dict[str, Any]) -> str | None:
    """Why images made with `settings` cannot join `out_dir` (one line), or None: it holds no samples yet, or
    samples made with exactly these settings (a resume)."""
    held = [p for p in _tool_outputs(out_dir) if p.name not in (REPORT_NAME, SETTINGS_NAME)]
    if not held:
        return None
    advice = "(use --overwrite to replace them, or another --output-dir)"
    try:
        old = json.loads((out_dir / SETTINGS_NAME).read_text())
    except FileNotFoundError:
        return (f"{out_dir} already holds samples but no {SETTINGS_NAME} (written by an older version of this "
                f"tool), so what they were made with is unknown {advice}")
    except (OSError, ValueError):
        old = None
    if not isinstance(old, dict):
        return f"{out_dir} already holds samples but its {SETTINGS_NAME} is unreadable {advice}"
    new = json.loads(json.dumps(settings))  # compared as stored (tuples → lists, ...)
    differing = [key for key in dict.fromkeys([*new, *old]) if old.get(key) != new.get(key)]
    if not differing:
        return None
    made = ", ".join(f"{key}={_shown(old.get(key))}" for key in differing)
    asked = ", ".join(f"{key}={_shown(new.get(key))}" for key in differing)
    return f"{out_dir} already holds samples made with {made}; this run asks for {asked} {advice}"


def _claim_output_folder(out_dir: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Main process, before any image: with `overwrite`, delete what this tool wrote there; then, when the folder
    can take these images, record their settings (atomically). A conflict is left for every rank to raise."""
    if overwrite:
        for path in _tool_outputs(out_dir):
            path.unlink()
    path = out_dir / SETTINGS_NAME
    text = json.dumps(settings, indent=2) + "\n"
    if settings_conflict(out_dir, settings) is None and not (path.is_file() and path.read_text() == text):
        tmp = temporary_path(path)
        tmp.write_text(text)
        os.replace(tmp, path)


@dataclass
class SampleResult:
    out_dir: Path
    num_images: int  # planned, all ranks
    generated: int  # by this rank in this run
    skipped: int  # this rank's images already complete on disk
    seconds: float
    image_size: int
    npz: Path | None = None
    grid: Path | None = None


def run_sampling(config: SampleConfig, pipeline: GenerationPipeline | None = None) -> SampleResult:
    """Generate every planned image not yet on disk (this rank's share), then grid.png and samples.npz (main).

    A folder already holding samples made with other settings (`sampling_settings`) is refused with one line
    before anything is written, unless `config.overwrite` (then this tool's files there are deleted first)."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    started = time.monotonic()
    state = PartialState(cpu=config.cpu)
    dit_config = load_config(config.generator)  # one-line errors before anything heavy
    if config.compile:
        require_compile_support(state.device)
    class_names = pipeline.class_names if pipeline is not None else read_provenance(config.generator).get("class_names")
    labels, seeds = plan_samples(config, dit_config.num_classes, class_names)
    out_dir = Path(config.output_dir)
    _check_writable(out_dir, state.process_index)
    if pipeline is None:
        pipeline = GenerationPipeline.from_pretrained(
            config.generator, config.tokenizer, device=state.device, use_ema=config.use_ema,
            tokenizer_use_ema=config.tokenizer_use_ema, allow_tokenizer_mismatch=config.allow_tokenizer_mismatch)
    size, device = pipeline.image_size, pipeline.device
    if config.compile:  # in place: a pipeline passed in stays compiled
        compile_modules(pipeline.dit, pipeline.tokenizer.decoder, device=device)
    # The main process checks the folder and records the settings; after the barrier every rank reads the same
    # settings.json and reaches the same verdict, so none generates while another refuses.
    settings = sampling_settings(config, pipeline, labels, seeds)
    if state.is_main_process:
        _claim_output_folder(out_dir, settings, config.overwrite)
    state.wait_for_everyone()
    conflict = settings_conflict(out_dir, settings)
    if conflict is not None:
        raise ValueError(conflict)
    paths = [out_dir / sample_filename(i, label, seed) for i, (label, seed) in enumerate(zip(labels, seeds))]

    mine = list(range(len(paths)))[state.process_index::state.num_processes]
    todo = [i for i in mine if not png_is_complete(paths[i], size)]
    if state.is_main_process and len(todo) < len(mine):
        logger.info("resuming: %d of this rank's %d images are already complete", len(mine) - len(todo), len(mine))
    bar = tqdm(total=len(todo), unit="img", desc=f"sampling {size}px", disable=not state.is_main_process)
    for start in range(0, len(todo), config.batch_size):
        batch = todo[start:start + config.batch_size]
        images = pipeline(
            [labels[i] for i in batch], make_generators([seeds[i] for i in batch], device),
            ddpm_steps=config.ddpm_steps, decode_steps=config.decode_steps, cfg_scale=config.cfg_scale,
            variance=config.variance, tile=config.decode_tile, tile_overlap=config.decode_tile_overlap,
            precision=config.precision)
        for i, image in zip(batch, images.permute(0, 2, 3, 1).cpu().numpy()):  # (H, W, 3) uint8
            write_png_atomic(paths[i], image)
        bar.update(len(batch))
    bar.close()

    state.wait_for_everyone()
    result = SampleResult(out_dir, len(paths), len(todo), len(mine) - len(todo), time.monotonic() - started, size)
    if state.is_main_process:
        missing = [p.name for p in paths if not png_is_complete(p, size)]
        if missing:
            raise ValueError(f"{len(missing)} images are missing or incomplete after sampling (e.g. {missing[0]})")
        result.grid = out_dir / GRID_NAME
        write_grid(result.grid, paths, labels, pipeline.class_names, config.grid_classes, config.grid_columns)
        if config.write_npz:
            result.npz = out_dir / NPZ_NAME
            write_adm_npz(result.npz, paths, labels, size)
        (out_dir / REPORT_NAME).write_text(json.dumps({
            "generator": str(config.generator), "tokenizer": str(config.tokenizer), "num_images": len(paths),
            "image_size": size, "ddpm_steps": config.ddpm_steps,
            "decode_steps": config.decode_steps if pipeline.tokenizer.objective.iterative else None,
            "cfg_scale": config.cfg_scale, "precision": config.precision, "seeds": config.seeds,
            "seed": config.seed, "classes": config.classes, "world_size": state.num_processes,
            "compile": config.compile,
        }, indent=2) + "\n")
    state.wait_for_everyone()
    return result


def images_per_second(result: SampleResult) -> float:
    return result.generated / result.seconds if result.seconds > 0 else math.nan


def sample_and_score(sample_config: SampleConfig, fid_config: FIDConfig) -> dict[str, Any] | None:
    """The paper's generation protocol in one go (Table 3: 50k samples, no CFG): `run_sampling` on every rank,
    then `pipelines.kit.fid.evaluate_fid` of the ADM `.npz`, its feature extraction split over the same ranks.

    `fid_config.samples` is replaced by the `.npz` written here. Returns the combined report (None on other
    ranks); JSON + markdown go to `fid_config.output`.
    """
    from accelerate import PartialState

    if not sample_config.write_npz:
        sample_config = dataclasses.replace(sample_config, write_npz=True)
    state = PartialState(cpu=sample_config.cpu)
    check_reference(fid_config.reference)
    # Missing metric weights fail now, on every rank, not after hours of sampling.
    device = torch.device(fid_config.device) if fid_config.device and state.num_processes == 1 else state.device
    extractor = build_feature_extractor(fid_config.features, fid_config.feature_weights, device=device)
    result = run_sampling(sample_config)
    scored = evaluate_fid(dataclasses.replace(fid_config, samples=str(result.out_dir / NPZ_NAME), output=None),
                          extractor, state=state)
    if not state.is_main_process:
        return None
    sampling = {"generator": sample_config.generator, "tokenizer": sample_config.tokenizer,
                "num_images": result.num_images, "image_size": result.image_size,
                "ddpm_steps": sample_config.ddpm_steps, "decode_steps": sample_config.decode_steps,
                "cfg_scale": sample_config.cfg_scale, "precision": sample_config.precision,
                "sampling_seconds": result.seconds, "images_per_second_this_rank": images_per_second(result)}
    payload = {"sampling": sampling, "metrics": scored.to_dict()}
    markdown = (f"Generator {sample_config.generator} + tokenizer {sample_config.tokenizer}: {result.num_images} "
                f"samples, {sample_config.ddpm_steps} DDPM steps, {sample_config.decode_steps} decode steps, "
                f"CFG {sample_config.cfg_scale}\n\n" + scored.markdown())
    if fid_config.output:
        write_report(payload, markdown, Path(fid_config.output))
    payload["markdown"] = markdown
    return payload
