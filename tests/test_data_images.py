"""Image sources: transforms, hostile files, ImageNet-style folders, offline photo crops, the source registry."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from data import build_image_dataset
from data.folder import ImageFolderDataset
from data.images import BadImageError, decode_image
from data.offline import OfflinePhotoDataset, export_offline_photos, load_photo, split_tiles
from data.sources import resolve_source
from data.transforms import TrainTransform, center_crop_arr, random_crop_arr, to_rgb, to_tensor_pm1
from support import boxes_overlap


def _noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(array).convert(mode)


# --- transforms ---------------------------------------------------------------------------------------------


def test_center_crop_matches_explicit_adm_chain():
    image = _noise_image(1000, 600)
    # ADM chain written out by hand: 1000x600 → BOX halvings while short side ≥ 128 → 125x75 → BICUBIC to
    # short side 64 (round(125·64/75) = 107) → center crop at x = (107-64)//2 = 21.
    expected = image
    for size in ((500, 300), (250, 150), (125, 75)):
        expected = expected.resize(size, resample=Image.BOX)
    expected = np.asarray(expected.resize((107, 64), resample=Image.BICUBIC))[:, 21:85]
    result = center_crop_arr(image, 64)
    assert result.shape == (64, 64, 3)
    np.testing.assert_array_equal(result, expected)


def test_random_crop_is_seeded_and_in_range():
    image = _noise_image(300, 200)
    a = random_crop_arr(image, 64, generator=torch.Generator().manual_seed(3))
    b = random_crop_arr(image, 64, generator=torch.Generator().manual_seed(3))
    c = random_crop_arr(image, 64, generator=torch.Generator().manual_seed(4))
    assert a.shape == (64, 64, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    tensor = TrainTransform(64)(image, generator=torch.Generator().manual_seed(0))
    assert tensor.shape == (3, 64, 64) and tensor.min() >= -1 and tensor.max() <= 1


def test_to_tensor_range():
    array = np.array([[[0, 255, 128]]], dtype=np.uint8)
    tensor = to_tensor_pm1(array)
    assert tensor.shape == (3, 1, 1)
    torch.testing.assert_close(tensor.flatten(), torch.tensor([-1.0, 1.0, 128 / 127.5 - 1.0]))


def test_colour_modes_convert_to_rgb():
    gray = Image.fromarray(np.full((4, 4), 77, dtype=np.uint8), mode="L")
    assert np.all(np.asarray(to_rgb(gray)) == 77)

    sixteen = Image.fromarray(np.full((4, 4), 257 * 200, dtype=np.uint16))  # "I;16"
    assert sixteen.mode.startswith("I;16")
    assert np.all(np.asarray(to_rgb(sixteen)) == 200)  # rescaled, not clipped to 255

    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, fully transparent
    rgba_image = Image.fromarray(rgba, mode="RGBA")
    assert np.all(np.asarray(to_rgb(rgba_image, alpha="white")) == 255)
    np.testing.assert_array_equal(np.asarray(to_rgb(rgba_image, alpha="drop"))[0, 0], [255, 0, 0])

    cmyk = Image.new("CMYK", (4, 4), (0, 0, 0, 0))  # no ink = white
    assert np.all(np.asarray(to_rgb(cmyk)) == 255)

    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([10, 20, 30] + [0] * 765)
    np.testing.assert_array_equal(np.asarray(to_rgb(palette))[0, 0], [10, 20, 30])
    for image in (gray, sixteen, rgba_image, cmyk, palette):
        assert to_rgb(image).mode == "RGB"


# --- hostile files through the folder dataset ---------------------------------------------------------------


def _write_hostile_tree(root, size: int = 48) -> dict[str, str]:
    """train/<wnid>/ with good images in several colour modes plus every hostile case; returns paths by name."""
    paths = {}
    a, b = root / "train" / "n002", root / "train" / "n001"  # created unsorted on purpose
    a.mkdir(parents=True)
    b.mkdir(parents=True)

    def put(name, folder, save):
        path = folder / name
        save(str(path))
        paths[name] = str(path)

    put("good_rgb.JPEG", a, lambda p: _noise_image(size + 20, size + 5, 1).save(p, quality=90))
    put("gray.png", a, lambda p: _noise_image(size, size, 2, "L").save(p))
    put("cmyk.jpg", a, lambda p: _noise_image(size, size, 3, "CMYK").save(p))
    put("rgba.png", b, lambda p: _noise_image(size, size, 4, "RGBA").save(p))
    put("palette.gif", b, lambda p: _noise_image(size, size, 5, "P").save(p))
    sixteen = (np.arange(size * size, dtype=np.uint16).reshape(size, size) * 20)
    put("sixteen.png", b, lambda p: Image.fromarray(sixteen).save(p))
    # hostile ones
    put("zero.JPEG", a, lambda p: open(p, "wb").close())
    put("notes.txt", a, lambda p: open(p, "w").write("not an image"))
    put("fake.jpg", b, lambda p: open(p, "wb").write(b"definitely not a jpeg" * 10))
    put("small.png", b, lambda p: _noise_image(size // 2, size // 2, 6).save(p))

    def truncated(p):
        _noise_image(size * 2, size * 2, 7).save(p, quality=95)
        data = open(p, "rb").read()
        open(p, "wb").write(data[: len(data) // 2])

    put("truncated.jpg", b, truncated)
    return paths


def test_folder_handles_every_hostile_case(tmp_path):
    _write_hostile_tree(tmp_path)
    dataset = ImageFolderDataset(str(tmp_path), "train", resolution=48, train=False)
    assert dataset.class_names == ["n001", "n002"] and dataset.num_classes == 2
    reasons = {os.path.basename(p): r for p, r in dataset.skipped}
    assert "0 bytes" in reasons["zero.JPEG"]
    assert "not an image" in reasons["notes.txt"]
    assert "cannot decode" in reasons["fake.jpg"]
    assert "too small" in reasons["small.png"]
    # header is fine, pixels are not: found lazily, substituted by the next index, recorded
    names = [os.path.basename(p) for p, _ in dataset.samples]
    assert names == ["palette.gif", "rgba.png", "sixteen.png", "truncated.jpg", "cmyk.jpg", "good_rgb.JPEG", "gray.png"]
    truncated_index = names.index("truncated.jpg")
    image, label = dataset[truncated_index]
    next_image, next_label = dataset[truncated_index + 1]
    torch.testing.assert_close(image, next_image)
    assert label == next_label == 1
    assert "truncated.jpg" in {os.path.basename(p) for p, _ in dataset.skipped}
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=0)
    batches = list(loader)  # a whole epoch, no crash
    images = torch.cat([x for x, _ in batches])
    assert images.shape == (7, 3, 48, 48) and images.min() >= -1 and images.max() <= 1
    labels = torch.cat([y for _, y in batches]).tolist()
    assert labels[:3] == [0, 0, 0]  # n001 first: sorted wnids, not creation order


def test_folder_strict_names_the_file(tmp_path):
    paths = _write_hostile_tree(tmp_path)
    with pytest.raises(BadImageError, match="zero.JPEG|notes.txt|fake.jpg|small.png"):
        ImageFolderDataset(str(tmp_path), "train", resolution=48, strict=True)
    for name in ("zero.JPEG", "notes.txt", "fake.jpg", "small.png"):
        os.remove(paths[name])
    dataset = ImageFolderDataset(str(tmp_path), "train", resolution=48, strict=True)
    index = [os.path.basename(p) for p, _ in dataset.samples].index("truncated.jpg")
    with pytest.raises(BadImageError, match="truncated.jpg"):
        dataset[index]


def test_folder_upscale_small_keeps_small_images(tmp_path):
    _write_hostile_tree(tmp_path)
    dataset = ImageFolderDataset(str(tmp_path), "train", resolution=48, upscale_small=True)
    assert "small.png" in [os.path.basename(p) for p, _ in dataset.samples]
    index = [os.path.basename(p) for p, _ in dataset.samples].index("small.png")
    assert dataset[index][0].shape == (3, 48, 48)


def test_decode_image_rejects_zero_bytes():
    with pytest.raises(BadImageError, match="0 bytes"):
        decode_image(b"")


def _simple_tree(root, classes=("n003", "n001", "n002"), per_class=2, size=40):
    for c, name in enumerate(classes):
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            _noise_image(size, size, 10 * c + i).save(folder / f"{name}_{i}.JPEG")


def test_val_split_as_tree_file_list_and_loc_csv(tmp_path):
    _simple_tree(tmp_path)
    train = ImageFolderDataset(str(tmp_path), "train", resolution=32)
    assert train.class_names == ["n001", "n002", "n003"]
    assert sorted(train.targets) == [0, 0, 1, 1, 2, 2]

    # 1) tree: val classes index like train even when val lacks a class
    (tmp_path / "val" / "n003").mkdir(parents=True)
    _noise_image(40, 40, 99).save(tmp_path / "val" / "n003" / "x.JPEG")
    val = ImageFolderDataset(str(tmp_path), "val", resolution=32)
    assert val.targets == [2] and val.num_classes == 3

    # 2) flat val folder + labels file with wnids and 0-based ints
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "train").symlink_to(tmp_path / "train")
    (flat / "val").mkdir(parents=True)
    for i in range(3):
        _noise_image(40, 40, 50 + i).save(flat / "val" / f"ILSVRC2012_val_{i:08d}.JPEG")
    (flat / "val_labels.txt").write_text(
        "ILSVRC2012_val_00000000.JPEG n002\nILSVRC2012_val_00000001.JPEG 0\nILSVRC2012_val_00000002.JPEG n003\n"
    )
    val = ImageFolderDataset(str(flat), "val", resolution=32)
    assert val.targets == [1, 0, 2]
    assert val[0][0].shape == (3, 32, 32)

    # 3) Kaggle LOC_val_solution.csv
    os.remove(flat / "val_labels.txt")
    (flat / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n"
        "ILSVRC2012_val_00000001,n003 1 2 3 4 n003 5 6 7 8\n"
        "ILSVRC2012_val_00000002,n001 1 2 3 4\n"
        "ILSVRC2012_val_00000009,n001 1 2 3 4\n"  # listed but missing: skipped and recorded
    )
    val = ImageFolderDataset(str(flat), "val", resolution=32)
    assert val.targets == [2, 0]
    assert len(val.skipped) == 1 and "missing" in val.skipped[0].reason

    with pytest.raises(ValueError, match="unknown class"):
        (flat / "val_labels.txt").write_text("ILSVRC2012_val_00000000.JPEG n999\n")
        ImageFolderDataset(str(flat), "val", resolution=32)


def test_folder_missing_split_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="val"):
        ImageFolderDataset(str(tmp_path), "val", resolution=32)


# --- offline photo dataset ----------------------------------------------------------------------------------


def test_offline_is_deterministic_and_fast():
    start = time.perf_counter()
    a = OfflinePhotoDataset("train", resolution=64, crops_per_class=16, seed=0)
    assert time.perf_counter() - start < 2.0
    b = OfflinePhotoDataset("train", resolution=64, crops_per_class=16, seed=0)
    c = OfflinePhotoDataset("train", resolution=64, crops_per_class=16, seed=1)
    assert a.num_classes >= 2 and len(a.class_names) == a.num_classes and len(a) == 16 * a.num_classes
    assert a.class_names == sorted(a.class_names)
    for i in (0, 5, len(a) - 1):
        torch.testing.assert_close(a[i][0], b[i][0], rtol=0, atol=0)
        assert a[i][1] == i // 16
    assert a.crop_boxes == b.crop_boxes and a.crop_boxes != c.crop_boxes
    image = a[3][0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1
    sides = {box[2] - box[0] for box in a.crop_boxes[:16]}
    assert len(sides) >= 3  # several scales


def test_offline_train_and_val_regions_are_disjoint(monkeypatch):
    train = OfflinePhotoDataset("train", resolution=32, crops_per_class=24, seed=0)
    val = OfflinePhotoDataset("val", resolution=32, crops_per_class=24, seed=0)
    assert train.class_names == val.class_names
    for c in range(train.num_classes):
        train_boxes = train.crop_boxes[c * 24 : (c + 1) * 24]
        val_boxes = val.crop_boxes[c * 24 : (c + 1) * 24]
        assert not any(boxes_overlap(t, v) for t in train_boxes for v in val_boxes)

    # Pixel-level: replace each photo's val tiles by noise; train crops must not change at all.
    import data.offline as offline

    original = offline.load_photo

    def photo_with_noisy_val_tiles(name):
        photo = original(name)
        array = np.array(photo)
        noise = np.random.default_rng(0).integers(0, 256, array.shape, dtype=np.uint8)
        for left, top, right, bottom in split_tiles(*photo.size)["val"]:
            array[top:bottom, left:right] = noise[top:bottom, left:right]
        return Image.fromarray(array)

    monkeypatch.setattr(offline, "load_photo", photo_with_noisy_val_tiles)
    altered = OfflinePhotoDataset("train", resolution=32, crops_per_class=24, seed=0)
    for i in range(0, len(train), 7):
        np.testing.assert_array_equal(train.crop_array(i), altered.crop_array(i))


def test_split_tiles_cover_the_photo_and_spread_val_over_it():
    for width, height in ((512, 512), (451, 300), (300, 640)):
        tiles = split_tiles(width, height)
        boxes = tiles["train"] + tiles["val"]
        assert sum((r - l) * (b - t) for l, t, r, b in boxes) == width * height  # a partition: covers, no overlap
        assert not any(boxes_overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
        assert 0.25 <= len(tiles["val"]) / len(boxes) <= 0.45
        # Val reaches every row and every column of the grid, not one side of the photo.
        assert {t for _, t, _, _ in tiles["val"]} == {t for _, t, _, _ in boxes}
        assert {l for l, _, _, _ in tiles["val"]} == {l for l, _, _, _ in boxes}
    with pytest.raises(ValueError, match="tiles_per_short_side"):
        split_tiles(100, 100, 1)


def test_offline_crops_fill_every_tile_evenly():
    val = OfflinePhotoDataset("val", resolution=32, crops_per_class=24, seed=0)
    photo_sizes = {}
    for c, name in enumerate(val.class_names):
        tiles = val.crop_tile_index[c * 24 : (c + 1) * 24]
        counts = np.bincount(tiles)
        assert counts.max() - counts.min() <= 1 and len(counts) == max(tiles) + 1
        photo_sizes[name] = len(counts)
        # Each crop lies inside the tile it is listed under.
        val_tiles = split_tiles(*load_photo(name).size)["val"]
        for box, tile in zip(val.crop_boxes[c * 24 : (c + 1) * 24], tiles):
            l, t, r, b = val_tiles[tile]
            assert l <= box[0] and t <= box[1] and box[2] <= r and box[3] <= b
    assert len(photo_sizes) == val.num_classes


def test_export_offline_round_trips_through_folder_code(tmp_path):
    export_offline_photos(str(tmp_path), resolution=32, train_crops_per_class=3, val_crops_per_class=2)
    folder = ImageFolderDataset(str(tmp_path), "val", resolution=32, train=False)
    offline = OfflinePhotoDataset("val", resolution=32, crops_per_class=2)
    assert folder.class_names == offline.class_names
    assert folder.targets == offline.targets
    for i in range(len(offline)):
        torch.testing.assert_close(folder[i][0], offline[i][0], rtol=0, atol=0)


# --- registry -----------------------------------------------------------------------------------------------


def test_build_image_dataset_dispatches(tmp_path):
    _simple_tree(tmp_path)
    offline = build_image_dataset("offline", "val", 32, crops_per_class=2)
    assert isinstance(offline, OfflinePhotoDataset) and not offline.random_flip
    assert build_image_dataset("offline", "train", 32, crops_per_class=2).random_flip
    folder = build_image_dataset(str(tmp_path), "train", 32, rank=1, world_size=2, seed=0)
    assert isinstance(folder, ImageFolderDataset) and folder.num_classes == 3
    assert resolve_source("shards-{000..009}.tar")[0] == "webdataset"
    assert resolve_source("pipe:cat x.tar")[0] == "webdataset"
    assert resolve_source(f"folder:{tmp_path}") == ("folder", str(tmp_path))
    with pytest.raises(ValueError, match="cannot tell"):
        build_image_dataset(str(tmp_path / "nope"), "train", 32)
