"""The demo pipeline end to end with the `tiny` profile: every artifact produced and well-formed, and reuse."""
import json

import pytest
from PIL import Image

from pipelines.experiments.demo import RECON_STEPS, run_demo
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
    assert set(written["stage_seconds"]) == {"data", "tokenizer", "cache", "generator", "samples", "evaluate"}

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
