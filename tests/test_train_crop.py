"""Tokenizer training on random windows smaller than the resolution (`--train-crop`)."""
from __future__ import annotations

import json

import pytest
import torch

import pickle

from data.transforms import RandomWindows, RandomWindowStream, random_window
from pipelines import train_tokenizer as trainer
from pipelines.train_tokenizer import SeededAugmentation, TokenizerTrainConfig, build_train_loader, train_tokenizer
from tokenizer import load_tokenizer


def _config(output_dir, **changes) -> TokenizerTrainConfig:
    values = dict(output_dir=str(output_dir), encoder="tiny", decoder="tiny", discriminator="tiny", data="offline",
                  resolution=32, train_crop=16, batch_size=4, num_workers=0, warmup_steps=1, max_steps=2,
                  perceptual="none", perceptual_weight=0.0, adversarial_weight=0.0, checkpoint_every=1, log_every=1,
                  image_every=1000, seed=3, cpu=True)
    values.update(changes)
    return TokenizerTrainConfig.from_flat(**values)


def test_random_window_is_a_uniformly_placed_window_of_the_image():
    image = torch.arange(6 * 6, dtype=torch.float32).view(1, 6, 6)
    generator = torch.Generator().manual_seed(0)
    corners = set()
    for _ in range(400):
        window = random_window(image, 4, generator)
        assert window.shape == (1, 4, 4)
        top, left = divmod(int(window[0, 0, 0]), 6)
        assert torch.equal(window, image[:, top:top + 4, left:left + 4])
        corners.add((top, left))
    assert corners == {(top, left) for top in range(3) for left in range(3)}  # every placement is drawn
    assert torch.equal(random_window(image, 6), image)
    with pytest.raises(ValueError, match="window 7 does not fit in a 6×6 image"):
        random_window(image, 7)


class _Stream(torch.utils.data.IterableDataset):
    class_names = ["a", "b"]

    def __iter__(self):
        for label in range(3):
            yield torch.full((3, 8, 8), float(label)), label


def test_a_streaming_source_gets_windows_too_and_both_wrappers_pickle_for_workers():
    stream = RandomWindowStream(_Stream(), 4)
    items = list(stream)
    assert [label for _, label in items] == [0, 1, 2] and all(image.shape == (3, 4, 4) for image, _ in items)
    assert stream.class_names == ["a", "b"]
    copied = pickle.loads(pickle.dumps(RandomWindows([(torch.zeros(3, 8, 8), 1)], 4)))
    assert copied[0][0].shape == (3, 4, 4) and len(copied) == 1
    assert pickle.loads(pickle.dumps(stream)).class_names == ["a", "b"]


def test_windows_replay_under_the_seeded_augmentation_and_keep_the_source_attributes(tmp_path):
    config = _config(tmp_path)
    first, _, augmented = build_train_loader(config, per_device_batch=4, rank=0, world_size=1)
    second, _, _ = build_train_loader(config, per_device_batch=4, rank=0, world_size=1)
    assert isinstance(augmented, SeededAugmentation) and isinstance(augmented.dataset, RandomWindows)
    assert augmented.dataset.num_classes == 8 and len(augmented.dataset.class_names) == 8
    (images_a, labels_a), (images_b, labels_b) = next(iter(first)), next(iter(second))
    assert images_a.shape == (4, 3, 16, 16)
    assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)
    augmented.epoch = 1  # the next epoch cuts other windows
    assert not torch.equal(next(iter(first))[0], images_a)


def test_a_model_trained_on_windows_records_them_and_codes_whole_images(tmp_path, monkeypatch):
    seen = []
    real_builder = trainer.build_train_loader

    def recording_loader(*args, **kwargs):
        loader, sampler, augmented = real_builder(*args, **kwargs)

        def batches():
            for images, labels in loader:
                seen.append(tuple(images.shape))
                yield images, labels
        wrapped = type("Loader", (), {"__iter__": lambda self: batches(), "__len__": lambda self: len(loader)})()
        return wrapped, sampler, augmented

    monkeypatch.setattr(trainer, "build_train_loader", recording_loader)
    model_dir = train_tokenizer(_config(tmp_path / "run"))
    assert seen and all(shape[-2:] == (16, 16) for shape in seen)
    record = json.loads((model_dir / "training.json").read_text())
    assert record["resolution"] == 32 and record["train_crop"] == 16
    tokenizer = load_tokenizer(model_dir)
    with torch.no_grad():
        latents = tokenizer.encode(torch.zeros(1, 3, 32, 32), sample=False)
        assert latents.shape[-2:] == (8, 8)
        assert tokenizer.decode(latents, steps=1, generator=torch.Generator().manual_seed(0)).shape == (1, 3, 32, 32)


def test_train_crop_must_fit_the_resolution():
    with pytest.raises(ValueError, match=r"train_crop must be between 1 and the resolution \(32\), got 48"):
        _config("unused", train_crop=48)


def test_resuming_with_another_window_is_refused_in_one_line(tmp_path):
    train_tokenizer(_config(tmp_path / "run", max_steps=1))
    checkpoint = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))[-1]
    with pytest.raises(ValueError, match=r"train_crop=16 \(now 8\)"):
        _config(tmp_path / "run", train_crop=8).check_resume(checkpoint)
