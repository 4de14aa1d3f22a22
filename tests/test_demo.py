"""The demo pipeline end to end with the `tiny` profile: every artifact produced and well-formed, and reuse."""
import json

import pytest
from PIL import Image

from pipelines.experiments.demo import PROFILES, RECON_STEPS, block_average_baseline, class_agreement, run_demo
from support import boxes_overlap


@pytest.mark.slow
def test_tiny_demo_produces_every_artifact(tmp_path, capsys):
    out = tmp_path / "demo"
    metrics = run_demo(out, "tiny", fresh=True)

    written = json.loads((out / "metrics.json").read_text())
    assert written == json.loads(json.dumps(metrics))
    for steps in RECON_STEPS:  # 1 and DEFAULT_DECODE_STEPS
        for metric in ("psnr", "ssim", "rfd"):
            assert isinstance(written["reconstruction"][f"{metric}_{steps}step"], float)
    for key in ("fd", "fd_floor", "fd_ceiling"):
        assert written["generation"][key] >= 0
    agreement = written["class_agreement"]
    assert agreement["chance"] == 1 / 8 and all(0 <= agreement[k] <= 1 for k in agreement)
    for split in ("held_out", "validation"):
        scores = written["held_out"][split]
        assert scores["block_average_numbers_per_image"] == 3 * 4 * 4  # 32² at 8×
        assert all(isinstance(scores[f"{m}_psnr"], float) for m in ("tokenizer_1step", "block_average"))
    timings = json.loads((out / "timings.json").read_text())  # wall times stay out of metrics.json
    assert set(timings["stage_seconds"]) == {"data", "tokenizer", "cache", "generator", "samples", "evaluate"}
    assert "seconds" not in json.dumps(written)

    for name in ("recon.png", "grid.png", "loss.png"):
        with Image.open(out / name) as image:
            image.verify()
    with Image.open(out / "grid.png") as grid:  # one row per class (8 photos), 2 per class at 32² ×3 scale
        assert grid.size[1] == 8 * 32 * 3
    report = (out / "report.md").read_text()
    assert "FD-EffNetL0" in report and "FID" not in report.replace("not FID", "")
    for image_name in ("recon.png", "grid.png", "loss.png"):
        assert f"({image_name})" in report

    capsys.readouterr()
    again = run_demo(out, "tiny")  # finished stages are reused, results unchanged
    assert "reused" in capsys.readouterr().out
    assert again["generation"] == metrics["generation"]

    # A folder holds one profile's stages: other settings, or stages of an older demo, are refused, not mixed.
    import dataclasses

    PROFILES["tiny-other"] = dataclasses.replace(PROFILES["tiny"], ddpm_steps=11)
    try:
        with pytest.raises(ValueError, match=r"other settings .*ddpm_steps"):
            run_demo(out, "tiny-other")
    finally:
        del PROFILES["tiny-other"]
    (out / "demo.json").unlink()
    with pytest.raises(ValueError, match="older demo"):
        run_demo(out, "tiny")

    # Budgets are steps, not minutes: a fresh run elsewhere writes the same numbers.
    other = tmp_path / "other"
    run_demo(other, "tiny", fresh=True)
    assert (other / "metrics.json").read_text() == (out / "metrics.json").read_text()


def test_real_halves_share_no_pixels_and_cover_every_class():
    from data.offline import OfflinePhotoDataset
    from pipelines.experiments.demo import real_halves

    val = OfflinePhotoDataset("val", resolution=32, crops_per_class=24, seed=0)
    half_a, half_b = real_halves(val, 1000)
    assert len(half_a) == len(half_b) >= 8 * 10 and not set(half_a) & set(half_b)
    for a in half_a:
        for b in half_b:
            if val.targets[a] == val.targets[b]:
                assert not boxes_overlap(val.crop_boxes[a], val.crop_boxes[b])
    small_a, small_b = real_halves(val, 16)  # a limit below the half size still spans every class
    assert len(small_a) == 16 and {val.targets[i] for i in small_a} == set(range(8))
    with pytest.raises(ValueError, match="at least 2"):
        real_halves(val, 1)


def test_every_demo_budget_is_steps_not_minutes():
    for name, profile in PROFILES.items():
        assert profile.tokenizer.run.max_minutes is None and profile.generator.run.max_minutes is None, name
        assert profile.tokenizer.optim.max_steps < 10_000 and profile.generator.optim.max_steps < 10_000, name
    assert PROFILES["default"].downsample == 8 and PROFILES["16x"].downsample == 16


def test_block_average_baseline_keeps_block_means_and_is_exact_on_constant_blocks():
    import torch

    image = torch.rand(2, 3, 16, 16) * 2 - 1
    out = block_average_baseline(image, 8)
    assert out.shape == image.shape
    constant = torch.full((1, 3, 16, 16), 0.25)
    assert torch.allclose(block_average_baseline(constant, 8), constant)
    # It keeps only the block means: detail that averages to zero inside each block changes nothing.
    detail = torch.randn(2, 3, 16, 16)
    detail = detail - torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(detail, 8), scale_factor=8)
    assert torch.allclose(block_average_baseline(image + detail, 8), out, atol=1e-6)
    assert not torch.allclose(out, image)


def test_class_agreement_counts_nearest_centroid_hits():
    import numpy as np

    centroids = np.array([[0.0, 0.0], [10.0, 0.0]])
    features = np.array([[1.0, 0.0], [9.0, 0.0], [6.0, 0.0], [4.0, 1.0]])
    assert class_agreement(features, np.array([0, 1, 0, 0]), centroids) == 0.75
