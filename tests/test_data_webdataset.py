"""Webdataset image shards: URL forms, exactly-once splitting over ranks × workers, bad samples."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from data import build_image_dataset
from data.images import BadImageError
from data.webdataset_images import WebImageDataset


def _encoded(seed: int, size: int = 40, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


def _write_shards(directory, num_shards: int, per_shard: int) -> list[str]:
    """Shards whose `.cls` is a unique sample id, so seen samples can be counted."""
    paths = []
    for s in range(num_shards):
        path = os.path.join(directory, f"shard-{s:03d}.tar")
        with wds.TarWriter(path) as sink:
            for i in range(per_shard):
                uid = s * per_shard + i
                ext = ("jpg", "png", "webp")[uid % 3]
                fmt = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext]
                sink.write({"__key__": f"{uid:06d}", ext: _encoded(uid, fmt=fmt), "cls": str(uid).encode()})
        paths.append(path)
    return paths


def _epoch_ids(dataset, num_workers: int) -> list[int]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers)
    ids = []
    for image, label in loader:
        assert image.shape == (3, 32, 32) and image.min() >= -1 and image.max() <= 1
        ids.append(int(label))
    return ids


def test_local_brace_and_pipe_urls(tmp_path):
    paths = _write_shards(tmp_path, 3, 4)
    expected = list(range(12))
    for urls in (paths, str(tmp_path / "shard-{000..002}.tar"), [f"pipe:cat {p}" for p in paths]):
        dataset = WebImageDataset(urls, resolution=32, train=False)
        assert _epoch_ids(dataset, 0) == expected
        assert dataset.skip_counter.count == 0


@pytest.mark.parametrize("num_shards", [8, 3])  # 8 ≥ 2×2 slots: shard split; 3 < 4: sample-level fallback
def test_two_ranks_two_workers_see_every_sample_once(tmp_path, num_shards):
    _write_shards(tmp_path, num_shards, 5)
    pattern = str(tmp_path / f"shard-{{000..{num_shards - 1:03d}}}.tar")
    seen = []
    for rank in range(2):
        dataset = WebImageDataset(pattern, 32, train=True, rank=rank, world_size=2, shuffle_buffer=4, seed=0)
        seen.append(_epoch_ids(dataset, num_workers=2))
    assert sorted(seen[0] + seen[1]) == list(range(num_shards * 5))
    assert seen[0] and seen[1]  # both ranks got work
    if num_shards == 8:
        # shard-level: each (shuffled) shard belongs wholly to one rank, four shards each
        shards = [{uid // 5 for uid in ids} for ids in seen]
        assert len(shards[0]) == len(shards[1]) == 4 and not shards[0] & shards[1]


def test_too_few_shards_raises_in_shard_mode(tmp_path):
    _write_shards(tmp_path, 2, 2)
    dataset = WebImageDataset(str(tmp_path / "shard-{000..001}.tar"), 32, False, rank=0, world_size=4, split="shard")
    with pytest.raises(ValueError, match="2 shards < 4 ranks x 1 workers"):
        list(dataset)


def test_bad_samples_are_skipped_and_counted(tmp_path):
    good, bad = [], []
    path = str(tmp_path / "hostile.tar")
    with wds.TarWriter(path) as sink:
        samples = {
            "good_rgb": {"jpg": _encoded(1), "cls": b"0"},
            "good_gray": {"png": _encoded(2, mode="L", fmt="PNG"), "cls": b"1"},
            "good_rgba": {"png": _encoded(3, mode="RGBA", fmt="PNG"), "cls": b"2"},
            "good_cmyk": {"jpg": _encoded(4, mode="CMYK"), "cls": b"3"},
            "corrupt": {"jpg": b"garbage" * 20, "cls": b"4"},
            "truncated": {"jpg": _encoded(5, size=64)[:300], "cls": b"5"},
            "empty": {"jpg": b"", "cls": b"6"},
            "small": {"jpg": _encoded(6, size=16), "cls": b"7"},
            "no_cls": {"jpg": _encoded(7)},
            "bad_cls": {"jpg": _encoded(8), "cls": b"cat"},
            "no_image": {"txt": b"hello", "cls": b"9"},
        }
        for key, sample in samples.items():
            sink.write({"__key__": key, **sample})
            (good if key.startswith("good") else bad).append(key)
    dataset = WebImageDataset(path, 32, train=False)
    labels = [label for _, label in dataset]
    assert labels == [0, 1, 2, 3]
    assert dataset.skip_counter.count == len(bad)
    skipped_keys = {p.rsplit(":", 1)[1] for p, _ in dataset.skipped}
    assert skipped_keys == set(bad)

    strict = WebImageDataset(path, 32, train=False, strict=True)
    with pytest.raises(BadImageError, match="hostile.tar:corrupt"):
        list(strict)


def test_truncated_shard_does_not_crash_the_epoch(tmp_path):
    paths = _write_shards(tmp_path, 2, 6)
    data = open(paths[0], "rb").read()
    open(paths[0], "wb").write(data[: len(data) // 2 + 100])
    dataset = WebImageDataset(paths, 32, train=False)
    ids = _epoch_ids(dataset, 0)
    assert set(range(6, 12)) <= set(ids)  # the intact shard is read in full
    assert set(ids) < set(range(12))  # some of the truncated shard is lost
    assert dataset.skip_counter.count >= 1


def test_registry_builds_webdataset_with_split_placeholder(tmp_path):
    for split in ("train", "val"):
        os.makedirs(tmp_path / split)
        _write_shards(tmp_path / split, 1, 2)
    (tmp_path / "val" / "classes.txt").write_text("a\nb\n")
    dataset = build_image_dataset(str(tmp_path / "{split}" / "shard-000.tar"), "val", 32)
    assert isinstance(dataset, WebImageDataset)
    assert dataset.class_names == ["a", "b"] and dataset.num_classes == 2
    assert [label for _, label in dataset] == [0, 1]
