"""`scripts/evaluate.py recon` and `fid` under `accelerate launch` with two CPU processes report exactly the numbers
of one process (issues 18 and 22).

The batches (of `--per-process-batch-size` consecutive images) are dealt round-robin to the ranks and the main
process adds their scores and features up in batch order, so every batch has the same contents and every sum the
same order as with one process; both runs use one OpenMP thread per process (`_run`), so the kernels reduce in the
same order too. The reports are compared field by field with no tolerance (only the wall-clock `seconds` differ).
Six validation images in batches of 2 give the ranks 2 and 1 batches: the last round is partial.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from support import save_tiny_tokenizer
from test_multiprocess import _run

pytestmark = pytest.mark.slow


def _metrics(report: Path) -> dict:
    payload = json.loads(report.read_text())
    payload.pop("seconds")
    return payload


def test_recon_two_processes_report_the_numbers_of_one(tmp_path):
    tokenizer = save_tiny_tokenizer(tmp_path / "tokenizer")
    args = ["recon", "--tokenizer", tokenizer, "--data", "offline", "--resolution", "32", "--resolution-multipliers",
            "1", "--decode-steps", "2", "--features", "effnet-l0", "--perceptual", "none", "--num-images", "6",
            "--per-process-batch-size", "2", "--num-workers", "0", "--cpu"]
    _run("evaluate.py", [*args, "--output-dir", tmp_path / "one"], 1)
    _run("evaluate.py", [*args, "--output-dir", tmp_path / "two"], 2)
    one, two = _metrics(tmp_path / "one" / "recon.json"), _metrics(tmp_path / "two" / "recon.json")
    assert one["rows"][0]["num_images"] == 6 and one == two


def test_fid_two_processes_report_the_numbers_of_one(tmp_path):
    from data.sources import build_image_dataset
    from pipelines.kit.metrics import to_uint8

    dataset = build_image_dataset("offline", split="val", resolution=32, train=False)
    samples = tmp_path / "samples"
    samples.mkdir()
    for index in range(7):  # 4 batches of 2: the ranks get 2 each, the last one holds a single image
        image = to_uint8(dataset[index * 5][0]).permute(1, 2, 0).numpy()
        Image.fromarray(np.ascontiguousarray(image)).save(samples / f"{index:06d}.png")
    # An uncached data-source reference: its features are split across the ranks too.
    args = ["fid", "--samples", samples, "--reference", "offline", "--reference-num-images", "9", "--features",
            "effnet-l0", "--per-process-batch-size", "2", "--num-workers", "0", "--no-use-cache", "--cpu"]
    _run("evaluate.py", [*args, "--output-dir", tmp_path / "one"], 1)
    _run("evaluate.py", [*args, "--output-dir", tmp_path / "two"], 2)
    one, two = _metrics(tmp_path / "one" / "fid.json"), _metrics(tmp_path / "two" / "fid.json")
    assert one["num_samples"] == 7 and one["num_reference"] == 9 and one["precision"] is not None
    assert one == two
