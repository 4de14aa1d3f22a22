"""Image transforms shared by every image source: colour-mode normalisation, ADM/DiT crops, [-1, 1] tensors.

Evaluation and latent caching use the ADM center crop (`center_crop_arr`, Dhariwal & Nichol 2021, as in DiT's
`train.py`): repeated 2× BOX downscales while the short side is at least twice the target, one BICUBIC resize
to make the short side exactly `size`, then a center crop. Reproducing it exactly matters because DiT
checkpoints and ImageNet reference statistics were computed on these crops.

Training uses ADM's `random_crop_arr`: the short side is resized to a random length in
[ceil(size / max_crop_frac), ceil(size / min_crop_frac)] and a random `size`×`size` window is cut, followed by a
horizontal flip with probability 1/2. The default scale range (0.8, 1.0) is ADM's; `min_crop_frac=1.0` turns it
into a plain random crop after resizing the short side to `size`. We deliberately do not use random-resized
crops (Inception-style aspect distortion), which change object scale far more than a tokenizer should see.

Randomness comes from an optional `torch.Generator`; with none, torch's global RNG is used, which DataLoader
seeds per worker, so a run is reproducible under `torch.manual_seed`.

`RandomWindows` / `RandomWindowStream` cut a random `size`×`size` window out of each already-cropped training
image: the tokenizer can train on smaller crops than it encodes at evaluation (ε-VAE's decoder generalises to
larger sizes, paper Table 1), at the same pixel scale and a fraction of the compute per image.

Latent caching (`CacheCrops`) encodes the ADM center crop of each image (`crop="center"`, the default), or
`crops_per_image` ADM random crops (`crop="random"`, paper C.3: "horizontal flips and random cropping"), each
from a generator seeded by (seed, sample key, crop number), so the crops do not depend on ranks, workers,
batching or resumption. Flips are not drawn here: the cache stores every crop and its mirror image.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

ALPHA_MODES = ("white", "drop")


def to_rgb(image: Image.Image, alpha: str = "white") -> Image.Image:
    """Any PIL mode → 8-bit RGB.

    Grayscale, palette, CMYK, YCbCr and bilevel images go through PIL's converters. 16-bit and 32-bit integer
    grayscale ("I;16*", "I") are rescaled from their 16-bit range to 8 bits (PIL's own conversion would clip
    everything above 255 to white); float images ("F") are taken as [0, 1] when their maximum is ≤ 1, else as
    [0, 255]. Images with transparency are composited on white (`alpha="white"`, what a viewer shows) or have
    their alpha channel dropped (`alpha="drop"`, which reveals whatever colour hides under transparent pixels).
    """
    if alpha not in ALPHA_MODES:
        raise ValueError(f"unknown alpha policy {alpha!r}; choose from {ALPHA_MODES}")
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)  # 65535 → 255
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if np.nanmax(values, initial=0.0) <= 1.0 else 1.0
        gray = np.clip(np.nan_to_num(values * scale), 0, 255).round().astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "La", "RGBa", "PA") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        if alpha == "drop":
            return rgba.convert("RGB")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """ADM/DiT evaluation crop → (size, size, 3) uint8 array (see module docstring)."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top = (array.shape[0] - size) // 2
    left = (array.shape[1] - size) // 2
    return array[top : top + size, left : left + size]


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [low, high] inclusive."""
    return int(torch.randint(low, high + 1, (1,), generator=generator).item())


def random_crop_arr(
    image: Image.Image,
    size: int,
    min_crop_frac: float = 0.8,
    max_crop_frac: float = 1.0,
    generator: torch.Generator | None = None,
) -> np.ndarray:
    """ADM training crop → (size, size, 3) uint8: random short-side length, then a random window."""
    if not 0.0 < min_crop_frac <= max_crop_frac <= 1.0:
        raise ValueError(f"need 0 < min_crop_frac <= max_crop_frac <= 1, got {min_crop_frac}, {max_crop_frac}")
    short_side = _randint(math.ceil(size / max_crop_frac), math.ceil(size / min_crop_frac), generator)
    while min(*image.size) >= 2 * short_side:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = short_side / min(*image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top = _randint(0, array.shape[0] - size, generator)
    left = _randint(0, array.shape[1] - size, generator)
    return array[top : top + size, left : left + size]


def to_tensor_pm1(array: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 → (3, H, W) float32 in [-1, 1]."""
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got shape {array.shape} dtype {array.dtype}")
    tensor = torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1)  # (3, H, W); copy: PIL arrays are read-only
    return tensor.float() / 127.5 - 1.0


@dataclass(frozen=True)
class EvalTransform:
    """RGB PIL image → center-cropped (3, size, size) tensor in [-1, 1]; deterministic."""

    size: int

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        return to_tensor_pm1(center_crop_arr(image, self.size))


@dataclass(frozen=True)
class TrainTransform:
    """RGB PIL image → ADM random crop + horizontal flip, (3, size, size) tensor in [-1, 1]."""

    size: int
    min_crop_frac: float = 0.8
    max_crop_frac: float = 1.0
    flip_prob: float = 0.5

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        array = random_crop_arr(image, self.size, self.min_crop_frac, self.max_crop_frac, generator)
        tensor = to_tensor_pm1(array)  # (3, size, size)
        if torch.rand((), generator=generator).item() < self.flip_prob:
            tensor = tensor.flip(-1)
        return tensor


CROP_MODES = ("center", "random")


def random_window(image: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniformly placed `size`×`size` window of a (C, H, W) image (`size` ≤ H, W; the same image when equal)."""
    height, width = image.shape[-2:]
    if not 1 <= size <= min(height, width):
        raise ValueError(f"window {size} does not fit in a {height}×{width} image")
    top = int(torch.randint(0, height - size + 1, (), generator=generator))
    left = int(torch.randint(0, width - size + 1, (), generator=generator))
    return image[..., top:top + size, left:left + size]


class _WindowedSource:
    """What both window wrappers share: the wrapped source and its attributes (class_names, num_classes...)."""

    def __init__(self, dataset, size: int):
        self.dataset, self.size = dataset, size

    def __getattr__(self, name: str):
        if name == "dataset":  # not set yet (unpickling in a worker): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


class RandomWindows(_WindowedSource, torch.utils.data.Dataset):
    """A map-style `(image, label)` dataset whose images are cut to a random `size`×`size` window (torch's global
    RNG: wrapped in a per-item seeded augmentation the windows replay exactly on resume)."""

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return random_window(image, self.size), label


class RandomWindowStream(_WindowedSource, torch.utils.data.IterableDataset):
    """`RandomWindows` for streaming sources (webdataset): windows drawn from each worker's seeded global RNG."""

    def __iter__(self):
        for image, label in self.dataset:
            yield random_window(image, self.size), label


@dataclass(frozen=True)
class CacheCrops:
    """The crops latent caching encodes per image: the center crop, or `crops_per_image` seeded random crops.

    `key(base, j)` names crop j of the sample `base` (the base key itself for the center crop, `<base>_c<j>`
    for random crops); `__call__(image, base, j)` gives that crop as (3, size, size) in [-1, 1].
    """

    size: int
    mode: str = "center"
    crops_per_image: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in CROP_MODES:
            raise ValueError(f"crop must be one of {CROP_MODES}, got {self.mode!r}")
        if self.crops_per_image < 1:
            raise ValueError(f"crops_per_image must be >= 1, got {self.crops_per_image}")
        if self.mode == "center" and self.crops_per_image != 1:
            raise ValueError(f"crops_per_image {self.crops_per_image} needs crop='random' (there is one center crop)")

    def key(self, base: str, index: int) -> str:
        return base if self.mode == "center" else f"{base}_c{index}"

    def generator(self, base: str, index: int) -> torch.Generator:
        """A generator that depends only on (seed, sample key, crop number)."""
        digest = hashlib.sha256(f"{self.seed}/{base}/{index}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))

    def __call__(self, image: Image.Image, base: str, index: int) -> torch.Tensor:
        if self.mode == "center":
            return to_tensor_pm1(center_crop_arr(image, self.size))
        return to_tensor_pm1(random_crop_arr(image, self.size, generator=self.generator(base, index)))


def make_transform(size: int, train: bool) -> EvalTransform | TrainTransform:
    """The transform every image source uses: random crop + flip for training, ADM center crop otherwise."""
    if not 8 <= size <= 4096:
        raise ValueError(f"resolution must be in [8, 4096], got {size}")
    return TrainTransform(size) if train else EvalTransform(size)
