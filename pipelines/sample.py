"""Class-conditional generation: class ids → DiT (DDPM) → latents → ε-VAE decoder → images (the full pipeline).

    pipeline = GenerationPipeline.from_pretrained("runs/dit/model", "runs/tok/model", device="cuda")
    images = pipeline(labels, make_generators(seeds, device))  # uint8 (B, 3, H, W)

Per-image seeds (EDM's `StackedRandomGenerator`): every image owns one `torch.Generator` seeded with its seed,
and that one stream draws, in this order, the DiT's initial noise x_T, the noise of every ancestral DDPM step
and the decoder's noise (ε-VAE's x_1, and its DDPM noise for the ε-parameterised baseline). So the same seed
list gives the same images whatever the batch size or the number of processes.

The DiT samples in the per-channel standardised latent space it was trained in (paper C.3: DDPM, linear β,
T=1000, 250 respaced steps, no CFG); `DiT.denormalize_latents` maps back with the mean/std stored in its
config, then the tokenizer decodes (ε-VAE: 1-3 Euler steps, Eq. 7 with the Eq. 13 time grid; VAE: one pass).

`run_sampling` is the job behind `scripts/sample.py`: one PNG per image written atomically (resumable),
indices split across ranks as `indices[rank::world]`, then `grid.png` and the ADM-format `samples.npz`
assembled by the main process from the PNGs.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import zipfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from generator.dit import DiT, DiTConfig, load_config
from pipelines.kit.generation import DIFFUSION_STEPS, generate_latents
from pipelines.kit.metrics import to_uint8

logger = logging.getLogger(__name__)

PRECISIONS: dict[str, torch.dtype | None] = {"no": None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SAMPLE_NAME = re.compile(r"^(\d{6,})_c(\d+)_s(\d+)\.png$")
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk every complete PNG ends with


# ---------------------------------------------------------------------------------------------------------------
# Generator / tokenizer compatibility
# ---------------------------------------------------------------------------------------------------------------


def read_provenance(generator_dir: str | os.PathLike) -> dict[str, Any]:
    """What the generator directory says about the latents it was trained on (best effort, never raises).

    Stage-2 training writes `training.json` (with `shards` and `tokenizer_weights_sha256`); the shard
    `manifest.json` it points to holds the encoder's downsample factor, the source resolution, the latent
    mean/std and the class names. Returns a flat dict with whichever of `tokenizer_weights_sha256`,
    `downsample`, `resolution`, `latent_mean`, `latent_std`, `class_names` could be found.
    """
    found: dict[str, Any] = {}
    training = _read_json(Path(generator_dir) / "training.json")
    manifest: dict[str, Any] = {}
    if training.get("shards"):
        manifest = _read_json(Path(training["shards"]) / "manifest.json")
    if isinstance(manifest.get("encoder"), dict) and "downsample" in manifest["encoder"]:
        found["downsample"] = int(manifest["encoder"]["downsample"])
    if isinstance(manifest.get("source"), dict) and "resolution" in manifest["source"]:
        found["resolution"] = int(manifest["source"]["resolution"])
    for key in ("latent_mean", "latent_std", "class_names"):
        if key in manifest:
            found[key] = manifest[key]
    sha = training.get("tokenizer_weights_sha256") or (manifest.get("tokenizer") or {}).get("weights_sha256")
    if sha:
        found["tokenizer_weights_sha256"] = sha
    for key in ("class_names", "downsample"):  # stated in training.json itself wins over the manifest
        if key in training:
            found[key] = training[key]
    return found


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def check_compatible(
    dit_config: DiTConfig,
    latent_channels: int,
    downsample: int,
    provenance: dict[str, Any],
    generator_dir: str = "generator",
    tokenizer_dir: str = "tokenizer",
    tokenizer_sha256: str | None = None,
    allow_other_weights: bool = False,
) -> int:
    """Refuse a tokenizer whose latents are not the ones the DiT was trained on; returns the image size.

    Channels must equal the DiT's `in_channels`; where the training manifest is reachable its downsample
    factor must equal the tokenizer's (so `input_size × downsample` is the training resolution), its latent
    mean/std must be the ones stored in the DiT config (the normalisation the DiT learned), and its tokenizer
    weights hash must match unless `allow_other_weights` (e.g. a fine-tuned decoder on the same encoder).
    """
    size = dit_config.input_size
    trained_downsample = int(provenance.get("downsample", downsample))
    resolution = size * trained_downsample
    expected = (dit_config.in_channels, size, size)
    tokenizer_size = resolution // downsample if resolution % downsample == 0 else resolution / downsample
    got = (latent_channels, tokenizer_size, tokenizer_size)
    if expected != got or trained_downsample != downsample:
        raise ValueError(
            f"generator {generator_dir} was trained on latents of shape {expected} ({trained_downsample}x "
            f"downsampling of {resolution}px images) but tokenizer {tokenizer_dir} gives {got} "
            f"({latent_channels} channels, {downsample}x downsampling) at that resolution: not a matching pair")
    for key, stored in (("latent_mean", dit_config.latent_mean), ("latent_std", dit_config.latent_std)):
        manifest_value = provenance.get(key)
        if manifest_value is not None and stored is not None and not np.allclose(manifest_value, stored, rtol=1e-4):
            raise ValueError(f"generator {generator_dir} stores {key} {list(stored)} but its training shards say "
                             f"{list(manifest_value)}: the latent normalisation does not match")
    trained_sha = provenance.get("tokenizer_weights_sha256")
    if trained_sha and tokenizer_sha256 and trained_sha != tokenizer_sha256 and not allow_other_weights:
        raise ValueError(
            f"generator {generator_dir} was trained on latents of tokenizer weights sha256 {trained_sha[:12]}…, "
            f"tokenizer {tokenizer_dir} has {tokenizer_sha256[:12]}… (same shape {got}, but its latent "
            "normalisation may differ); pass --allow-tokenizer-mismatch to sample anyway")
    return resolution


# ---------------------------------------------------------------------------------------------------------------
# Tiled decoding
# ---------------------------------------------------------------------------------------------------------------


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` cells covering `length` cells, consecutive tiles sharing >= `overlap`."""
    if tile >= length:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, {tile}), got {overlap}")
    starts = list(range(0, length - tile, tile - overlap))
    return starts + [length - tile]


def _ramp(size: int, ramp: int, rising: bool, falling: bool, device: torch.device) -> torch.Tensor:
    """1-D blending weights: linear ramps of `ramp` pixels at the interior edges, strictly positive. (size,)"""
    weight = torch.ones(size, device=device, dtype=torch.float32)
    if ramp > 0:
        edge = (torch.arange(ramp, device=device, dtype=torch.float32) + 0.5) / ramp  # (0, 1)
        if rising:
            weight[:ramp] = torch.minimum(weight[:ramp], edge)
        if falling:
            weight[-ramp:] = torch.minimum(weight[-ramp:], edge.flip(0))
    return weight


def tiled_decode(
    decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, tile: int, overlap: int, downsample: int
) -> torch.Tensor:
    """Decode (B, C, h, w) latents as overlapping `tile`×`tile` latent tiles, each decoded independently, blended
    with linear ramps over the overlaps (normalised by the summed weights). Memory grows with the tile, not the
    image, which is what lets the attention layers of the U-Net decoder handle images above the training size.
    """
    _, _, height, width = z.shape
    rows, cols = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    if len(rows) == 1 and len(cols) == 1:
        return decode(z)
    ramp = overlap * downsample
    out: torch.Tensor | None = None
    total = torch.zeros(1, 1, height * downsample, width * downsample, device=z.device)
    for top in rows:
        for left in cols:
            piece = decode(z[:, :, top:top + tile, left:left + tile]).float()  # (B, 3, t·f, t·f)
            th, tw = piece.shape[-2:]
            wy = _ramp(th, ramp, top > 0, top + tile < height, z.device)
            wx = _ramp(tw, ramp, left > 0, left + tile < width, z.device)
            weight = (wy[:, None] * wx[None, :])[None, None]  # (1, 1, t·f, t·f)
            if out is None:
                out = torch.zeros(piece.shape[0], piece.shape[1], height * downsample, width * downsample,
                                  device=z.device)
            y, x = top * downsample, left * downsample
            out[:, :, y:y + th, x:x + tw] += weight * piece
            total[:, :, y:y + th, x:x + tw] += weight
    return out / total  # (B, 3, H, W)


# ---------------------------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------------------------


def make_generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per image (EDM-style per-image seeds)."""
    return [torch.Generator(device=torch.device(device)).manual_seed(int(seed)) for seed in seeds]


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


class GenerationPipeline:
    """A DiT and the tokenizer whose latents it was trained on; `__call__` turns class ids into uint8 images."""

    def __init__(self, dit: DiT, tokenizer, class_names: Sequence[str] | None = None,
                 diffusion_steps: int = DIFFUSION_STEPS):
        if tokenizer.latent_channels != dit.config.in_channels:
            raise ValueError(f"DiT expects {dit.config.in_channels} latent channels, the tokenizer gives "
                             f"{tokenizer.latent_channels}")
        self.dit = dit.eval().requires_grad_(False)
        self.tokenizer = tokenizer.eval().requires_grad_(False)
        self.class_names = list(class_names) if class_names else None
        self.diffusion_steps = diffusion_steps

    @classmethod
    def from_pretrained(
        cls,
        generator_dir: str | os.PathLike,
        tokenizer_dir: str | os.PathLike,
        device: torch.device | str = "cpu",
        use_ema: bool = False,
        tokenizer_use_ema: bool = False,
        allow_tokenizer_mismatch: bool = False,
    ) -> "GenerationPipeline":
        """Load both directories and refuse a pair that does not match (`check_compatible`); one-line errors."""
        from safetensors import SafetensorError

        from data.latent_shards import file_sha256
        from tokenizer import load_tokenizer
        from tokenizer.models import EMA_WEIGHTS_NAME, WEIGHTS_NAME

        dit_config = load_config(generator_dir)  # cheap checks first: missing / corrupt config.json
        weights = Path(tokenizer_dir) / (EMA_WEIGHTS_NAME if tokenizer_use_ema and
                                         (Path(tokenizer_dir) / EMA_WEIGHTS_NAME).is_file() else WEIGHTS_NAME)
        try:
            tokenizer = load_tokenizer(tokenizer_dir, use_ema=tokenizer_use_ema)
        except SafetensorError as error:
            raise ValueError(f"cannot read tokenizer weights {weights}: {error}") from None
        provenance = read_provenance(generator_dir)
        sha = file_sha256(str(weights)) if provenance.get("tokenizer_weights_sha256") else None
        check_compatible(dit_config, tokenizer.latent_channels, tokenizer.downsample, provenance,
                         str(generator_dir), str(tokenizer_dir), sha, allow_tokenizer_mismatch)
        try:
            dit = DiT.from_pretrained(generator_dir, use_ema=use_ema, device=device)
        except SafetensorError as error:
            raise ValueError(f"cannot read the DiT weights in {generator_dir}: {error}") from None
        return cls(dit, tokenizer.to(device), provenance.get("class_names"))

    @property
    def device(self) -> torch.device:
        return next(self.dit.parameters()).device

    @property
    def num_classes(self) -> int:
        return self.dit.config.num_classes

    @property
    def image_size(self) -> int:
        return self.dit.config.input_size * self.tokenizer.downsample

    @property
    def is_diffusion_decoder(self) -> bool:
        from tokenizer import EpsVAE

        return isinstance(self.tokenizer, EpsVAE)

    @torch.no_grad()
    def sample_latents(
        self,
        labels: torch.Tensor,
        generators: Sequence[torch.Generator],
        ddpm_steps: int | str = 250,
        cfg_scale: float = 1.0,
        variance: str = "fixed_large",
        autocast_dtype: torch.dtype | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Tokenizer-space latents (B, C, h, w): x_T and every DDPM step's noise come from each image's generator."""
        return generate_latents(self.dit, labels, ddpm_steps, list(generators), cfg_scale=cfg_scale,
                                diffusion_steps=self.diffusion_steps, variance=variance,
                                autocast_dtype=autocast_dtype, progress=progress)  # (B, C, h, w)

    @torch.no_grad()
    def decode(
        self,
        latents: torch.Tensor,
        generators: Sequence[torch.Generator],
        decode_steps: int = 3,
        tile: int | None = None,
        tile_overlap: int = 4,
        autocast_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Latents (B, C, h, w) → images (B, 3, H, W) in [-1, 1]; ε-VAE noise from the per-image generators."""
        if isinstance(decode_steps, bool) or int(decode_steps) != decode_steps or decode_steps < 1:
            raise ValueError(f"decode steps must be an integer >= 1, got {decode_steps!r}")

        def decode_fn(z: torch.Tensor) -> torch.Tensor:
            with _autocast(self.device, autocast_dtype):
                if self.is_diffusion_decoder:
                    return self.tokenizer.decode(z, steps=int(decode_steps), generator=list(generators)).float()
                return self.tokenizer.decode(z).float()

        if tile is None:
            return decode_fn(latents)
        return tiled_decode(decode_fn, latents, tile, tile_overlap, self.tokenizer.downsample).clamp(-1, 1)

    def __call__(
        self,
        labels: torch.Tensor | Sequence[int],
        generators: Sequence[torch.Generator],
        ddpm_steps: int | str = 250,
        decode_steps: int = 3,
        cfg_scale: float = 1.0,
        variance: str = "fixed_large",
        tile: int | None = None,
        tile_overlap: int = 4,
        autocast_dtype: torch.dtype | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Class ids (B,) → uint8 images (B, 3, H, W)."""
        latents = self.sample_latents(torch.as_tensor(labels), generators, ddpm_steps, cfg_scale, variance,
                                      autocast_dtype, progress)
        return to_uint8(self.decode(latents, generators, decode_steps, tile, tile_overlap, autocast_dtype))


# ---------------------------------------------------------------------------------------------------------------
# The sampling job (scripts/sample.py)
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleConfig:
    """Everything `run_sampling` needs. Defaults are the paper's protocol (C.3): 250 DDPM steps, no CFG."""

    generator: str
    tokenizer: str
    out: str = "runs/samples"
    classes: str = "all"  # "all", or ids / class names: "207,360,387"
    per_class: int | None = None  # K images of each class, class-major order
    num: int | None = None  # N images, classes cycled (balanced); default: per_class 1, or one per seed
    seeds: str | None = None  # "0-49999", "1,5,9-12": one per image
    seed: int = 0  # without --seeds, image i gets seed + i
    ddpm_steps: int = 250
    decode_steps: int = 3  # ε-VAE Euler steps (1-3 in the paper); ignored by the baseline VAE
    cfg_scale: float = 1.0  # 1 = no guidance (the paper's numbers)
    variance: str = "fixed_large"
    batch_size: int = 32
    precision: str = "no"  # no / fp32 / bf16 / fp16 autocast
    use_ema: bool = False  # the DiT's ema.safetensors (training already saves EMA weights as model.safetensors)
    tokenizer_use_ema: bool = False
    allow_tokenizer_mismatch: bool = False
    decode_tile: int | None = None  # latent tile size for tiled decoding of large images; None: whole image
    decode_tile_overlap: int = 4
    grid_classes: int = 16  # rows of grid.png
    grid_columns: int = 8
    write_npz: bool = True
    cpu: bool = False

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
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.decode_tile is not None and not 0 <= self.decode_tile_overlap < self.decode_tile:
            raise ValueError(f"decode tile overlap must be in [0, {self.decode_tile}), got {self.decode_tile_overlap}")


def parse_classes(text: str, num_classes: int, class_names: Sequence[str] | None = None) -> list[int]:
    """"all" or comma-separated ids / names → class ids; unknown or out-of-range ones are a ValueError."""
    text = text.strip()
    if text == "all":
        return list(range(num_classes))
    by_name = {name: index for index, name in enumerate(class_names or [])}
    classes = []
    for token in (t.strip() for t in text.split(",")):
        if token in by_name:
            classes.append(by_name[token])
            continue
        try:
            value = int(token)
        except ValueError:
            known = f" or one of the names {list(by_name)[:5]}…" if by_name else ""
            raise ValueError(f"unknown class {token!r}: expected an id in [0, {num_classes}){known}") from None
        if not 0 <= value < num_classes:
            raise ValueError(f"class {value} is out of range: the generator has classes 0..{num_classes - 1}")
        classes.append(value)
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
    """(labels, seeds), one entry per image index (see `SampleConfig` for the counting rules)."""
    classes = parse_classes(config.classes, num_classes, class_names)
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


def sample_filename(index: int, label: int, seed: int) -> str:
    return f"{index:06d}_c{label}_s{seed}.png"


def png_is_complete(path: Path, size: int | None = None) -> bool:
    """A finished RGB PNG (ends with its IEND chunk; `size`×`size` when given): cheap, reads the header only."""
    from PIL import Image

    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() < len(_PNG_END):
                return False
            handle.seek(-len(_PNG_END), os.SEEK_END)
            if handle.read() != _PNG_END:
                return False
        with Image.open(path) as image:
            return image.format == "PNG" and image.mode == "RGB" and (size is None or image.size == (size, size))
    except (OSError, ValueError, SyntaxError):
        return False


def write_png_atomic(path: Path, image: np.ndarray) -> None:
    """(H, W, 3) uint8 → PNG under a temporary name, renamed when complete (a killed run leaves no half file)."""
    from PIL import Image

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)


def read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))  # (H, W, 3) uint8


def write_adm_npz(path: Path, image_paths: Sequence[Path], labels: Sequence[int], size: int) -> None:
    """ADM evaluator format: `arr_0` uint8 (N, H, W, 3) and `arr_1` int64 labels, written image by image.

    `np.savez` would need all N images in memory (9.8 GB for 50k at 256²); this streams each PNG into the zip
    member `arr_0.npy` behind a standard .npy header, which `np.load` reads as usual.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (len(image_paths), size, size, 3)}
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, header)
            for image_path in image_paths:
                image = read_png(image_path)
                if image.shape != (size, size, 3):
                    raise ValueError(f"{image_path} is {image.shape}, expected ({size}, {size}, 3)")
                member.write(np.ascontiguousarray(image).tobytes())
        with archive.open("arr_1.npy", "w") as member:
            np.lib.format.write_array(member, np.asarray(labels, dtype=np.int64))
    os.replace(tmp, path)


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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
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
    """Generate every planned image not yet on disk (this rank's share), then grid.png and samples.npz (main)."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    started = time.monotonic()
    state = PartialState(cpu=config.cpu)
    dit_config = load_config(config.generator)  # one-line errors before anything heavy
    class_names = pipeline.class_names if pipeline is not None else read_provenance(config.generator).get("class_names")
    labels, seeds = plan_samples(config, dit_config.num_classes, class_names)
    out_dir = Path(config.out)
    _check_writable(out_dir, state.process_index)
    if pipeline is None:
        pipeline = GenerationPipeline.from_pretrained(
            config.generator, config.tokenizer, device=state.device, use_ema=config.use_ema,
            tokenizer_use_ema=config.tokenizer_use_ema, allow_tokenizer_mismatch=config.allow_tokenizer_mismatch)
    size, device = pipeline.image_size, pipeline.device
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
            autocast_dtype=PRECISIONS[config.precision])
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
        result.grid = out_dir / "grid.png"
        write_grid(result.grid, paths, labels, pipeline.class_names, config.grid_classes, config.grid_columns)
        if config.write_npz:
            result.npz = out_dir / "samples.npz"
            write_adm_npz(result.npz, paths, labels, size)
        (out_dir / "sampling.json").write_text(json.dumps({
            "generator": str(config.generator), "tokenizer": str(config.tokenizer), "num_images": len(paths),
            "image_size": size, "ddpm_steps": config.ddpm_steps,
            "decode_steps": config.decode_steps if pipeline.is_diffusion_decoder else None,
            "cfg_scale": config.cfg_scale, "precision": config.precision, "seeds": config.seeds,
            "seed": config.seed, "classes": config.classes, "world_size": state.num_processes,
        }, indent=2) + "\n")
    state.wait_for_everyone()
    return result


def images_per_second(result: SampleResult) -> float:
    return result.generated / result.seconds if result.seconds > 0 else math.nan
