"""Offline photo dataset: square crops of the colour photographs scikit-image ships, one class per photograph.

It is the embedded default for the demo and the tests: nothing is downloaded (only photos present in the local
scikit-image install are used; those that need a pooch download are not in the registry), and it is
deterministic given `seed`.

Each photo is cut into a grid of about square tiles (`tiles_per_short_side` across its short side); about a
third of them, spread so every row and column of the grid has some, hold the val crops and the rest the train
crops. Crops never cross a tile boundary: a tile is cut out *before* resampling, so even the bicubic filter's
support cannot read another tile's pixels, and val measures generalisation to unseen pixels. Spreading val over
the photo keeps the two splits one distribution, as ImageNet's are: with val one far band of each photo, real
train crops alone scored FD-EffNetL0 95 against val while two halves of val scored 34, so a generator could not
get near the floor however well it learned. Crops come at several scales: a window of side `scale × tile` (the
photo's smallest tile side, the same in both splits) is resized to `resolution`. Windows smaller than the
resolution are upsampled, so resolutions above ~128 get softer crops.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from data.transforms import to_tensor_pm1

SPLITS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class PhotoSpec:
    """A photo file inside scikit-image's data folder; `box` (left, top, right, bottom) keeps its useful part."""

    filename: str
    box: tuple[int, int, int, int] | None = None


# Colour photographs shipped inside the scikit-image wheel (no pooch download). Sorted by name: the class index
# is the position in this order, the same order an exported folder tree sorts to.
PHOTOS: dict[str, PhotoSpec] = {
    "astronaut": PhotoSpec("astronaut.png"),
    "chelsea": PhotoSpec("chelsea.png"),
    "coffee": PhotoSpec("coffee.png"),
    "hubble_deep_field": PhotoSpec("hubble_deep_field.jpg"),
    "immunohistochemistry": PhotoSpec("ihc.png"),
    "motorcycle": PhotoSpec("motorcycle_left.png"),
    "retina": PhotoSpec("retina.jpg", box=(210, 210, 1200, 1200)),  # inside the fundus disc: no black corners
    "rocket": PhotoSpec("rocket.jpg"),
}


# Photographs scikit-image also ships that no demo split uses: grey-level, different subjects. They judge
# reconstruction on photos the tokenizer never saw (held_out_crops), never training or generation.
HELD_OUT_PHOTOS: dict[str, PhotoSpec] = {
    "brick": PhotoSpec("brick.png"),
    "camera": PhotoSpec("camera.png"),
    "coins": PhotoSpec("coins.png"),
    "grass": PhotoSpec("grass.png"),
    "gravel": PhotoSpec("gravel.png"),
    "moon": PhotoSpec("moon.png"),
}


def skimage_data_dir() -> str:
    """scikit-image's bundled data folder, found without importing the package."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scikit-image is not installed; the offline photo dataset needs its sample photos")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def available_photos() -> list[str]:
    """Names (sorted) of the registry photos present in the local scikit-image install."""
    directory = skimage_data_dir()
    return sorted(name for name, spec in PHOTOS.items() if os.path.isfile(os.path.join(directory, spec.filename)))


def load_photo(name: str) -> Image.Image:
    """One registry photo (or held-out photo) as RGB, cut to its useful box."""
    spec = PHOTOS[name] if name in PHOTOS else HELD_OUT_PHOTOS[name]
    with Image.open(os.path.join(skimage_data_dir(), spec.filename)) as image:
        photo = image.convert("RGB")
    return photo.crop(spec.box) if spec.box is not None else photo


def held_out_crops(resolution: int, tiles_per_short_side: int = 4) -> tuple[np.ndarray, list[str]]:
    """Every square tile of the held-out photos present locally, resized to `resolution`: uint8 (N, R, R, 3) and
    each crop's photo name. Tiles do not overlap; their side is the photo's short side / `tiles_per_short_side`."""
    directory = skimage_data_dir()
    crops, names = [], []
    for name, spec in sorted(HELD_OUT_PHOTOS.items()):
        if not os.path.isfile(os.path.join(directory, spec.filename)):
            continue
        photo = load_photo(name)
        side = min(photo.size) // tiles_per_short_side
        for top in range(0, photo.size[1] - side + 1, side):
            for left in range(0, photo.size[0] - side + 1, side):
                box = (left, top, left + side, top + side)
                crops.append(np.asarray(photo.resize((resolution, resolution), Image.BICUBIC, box=box)))
                names.append(name)
    if not crops:
        raise FileNotFoundError(f"none of the held-out photos {sorted(HELD_OUT_PHOTOS)} is in {directory}")
    return np.stack(crops), names


def split_tiles(width: int, height: int, tiles_per_short_side: int = 4) -> dict[str, list[tuple[int, int, int, int]]]:
    """Disjoint (left, top, right, bottom) train and val tiles covering the photo.

    Tile (row, col) is val when (row + col) % 3 == 0: a third of the tiles, on diagonals, so val samples the
    whole photo (centre and edges, every object) rather than one side of it.
    """
    if tiles_per_short_side < 2:
        raise ValueError(f"tiles_per_short_side must be >= 2, got {tiles_per_short_side}")
    tile = min(width, height) / tiles_per_short_side
    columns, rows = max(1, round(width / tile)), max(1, round(height / tile))
    xs = np.linspace(0, width, columns + 1).round().astype(int)
    ys = np.linspace(0, height, rows + 1).round().astype(int)
    tiles: dict[str, list[tuple[int, int, int, int]]] = {"train": [], "val": []}
    for row in range(rows):
        for column in range(columns):
            split = "val" if (row + column) % 3 == 0 else "train"
            tiles[split].append((int(xs[column]), int(ys[row]), int(xs[column + 1]), int(ys[row + 1])))
    return tiles


class OfflinePhotoDataset(Dataset):
    """Map-style dataset of `(image (3, R, R) float in [-1, 1], class_index int)` crops of bundled photos.

    `crop_boxes[i]` is sample i's window in photo coordinates (left, top, right, bottom); the crop list is fixed
    by `seed` at construction and each crop is computed lazily. `random_flip` (for training) flips with torch's
    RNG, which DataLoader seeds per worker.
    """

    def __init__(
        self,
        split: str = "train",
        resolution: int = 64,
        crops_per_class: int | None = None,
        seed: int = 0,
        *,
        scales: tuple[float, ...] = (0.5, 0.7, 1.0),
        tiles_per_short_side: int = 4,
        random_flip: bool = False,
        photos: tuple[str, ...] | None = None,
    ):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {tuple(SPLITS)}")
        if not 8 <= resolution <= 1024:
            raise ValueError(f"resolution must be in [8, 1024], got {resolution}")
        if not scales or not all(0.0 < s <= 1.0 for s in scales):
            raise ValueError(f"scales must be in (0, 1], got {scales}")
        self.split, self.resolution, self.seed, self.random_flip = split, resolution, seed, random_flip
        self.crops_per_class = crops_per_class if crops_per_class is not None else (128 if split == "train" else 32)
        if self.crops_per_class < 1:
            raise ValueError(f"crops_per_class must be >= 1, got {self.crops_per_class}")
        names = sorted(photos) if photos is not None else available_photos()
        missing = [n for n in names if n not in PHOTOS]
        if missing:
            raise ValueError(f"unknown photos {missing}; choose from {sorted(PHOTOS)}")
        if len(names) < 2:
            raise FileNotFoundError(f"need at least 2 bundled photos in {skimage_data_dir()}, found {names}")
        self.class_names = names
        self.skipped: list = []  # nothing is ever skipped here; kept for the common dataset interface

        # Per class: its photo's tiles of this split, each cut out before any resampling.
        self._tiles: list[list[Image.Image]] = []
        self.crop_tile_index: list[int] = []  # per crop: which of its photo's tiles of this split it lies in
        self.crop_boxes: list[tuple[int, int, int, int]] = []  # photo coordinates
        self._tile_boxes: list[tuple[int, int, int, int]] = []  # tile coordinates
        for class_index, name in enumerate(names):
            photo = load_photo(name)
            all_tiles = split_tiles(*photo.size, tiles_per_short_side)
            tile_side = min(min(r - l, b - t) for boxes in all_tiles.values() for l, t, r, b in boxes)
            boxes = all_tiles[split]
            tiles = [photo.crop(box) for box in boxes]
            for tile in tiles:
                tile.load()
            self._tiles.append(tiles)
            rng = np.random.default_rng([seed, SPLITS[split], class_index])
            for k in range(self.crops_per_class):
                # Round-robin over tiles, scales shifted by one each pass: every tile gets an equal share (±1) and,
                # over passes, every scale; tile parity then splits a class's crops into two pixel-disjoint halves.
                which, visit = k % len(boxes), k // len(boxes)
                side = max(1, round(scales[(which + visit) % len(scales)] * tile_side))
                tile_box = boxes[which]
                left = int(rng.integers(0, tile_box[2] - tile_box[0] - side + 1))
                top = int(rng.integers(0, tile_box[3] - tile_box[1] - side + 1))
                self.crop_tile_index.append(which)
                self._tile_boxes.append((left, top, left + side, top + side))
                self.crop_boxes.append(
                    (tile_box[0] + left, tile_box[1] + top, tile_box[0] + left + side, tile_box[1] + top + side)
                )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def targets(self) -> list[int]:
        return [i // self.crops_per_class for i in range(len(self))]

    def __len__(self) -> int:
        return len(self._tile_boxes)

    def crop_array(self, index: int) -> np.ndarray:
        """Sample `index` as an unflipped (R, R, 3) uint8 array."""
        tile = self._tiles[index // self.crops_per_class][self.crop_tile_index[index]]
        crop = tile.resize(
            (self.resolution, self.resolution), resample=Image.BICUBIC, box=self._tile_boxes[index]
        )
        return np.asarray(crop)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} crops")
        index %= len(self)
        image = to_tensor_pm1(self.crop_array(index))  # (3, R, R)
        if self.random_flip and torch.rand(()).item() < 0.5:
            image = image.flip(-1)
        return image, index // self.crops_per_class


def export_offline_photos(
    root: str,
    resolution: int = 64,
    train_crops_per_class: int = 128,
    val_crops_per_class: int = 32,
    seed: int = 0,
    image_format: str = "png",
) -> str:
    """Write the offline crops as an ImageNet-style tree `root/{train,val}/<class>/<class>_NNNNN.<fmt>`.

    The folder code path then reads them back with the same class indices (folder names sort like `PHOTOS`).
    """
    if image_format not in ("png", "jpg", "jpeg", "webp"):
        raise ValueError(f"unsupported image_format {image_format!r}")
    for split, count in (("train", train_crops_per_class), ("val", val_crops_per_class)):
        dataset = OfflinePhotoDataset(split, resolution, count, seed)
        for index in range(len(dataset)):
            name = dataset.class_names[index // count]
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f"{name}_{index % count:05d}.{image_format}")
            options = {} if image_format == "png" else {"quality": 95}
            Image.fromarray(dataset.crop_array(index)).save(path, **options)
    return root
