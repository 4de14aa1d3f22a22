"""`scripts/evaluate.py recon` end to end on tiny models, and its one-line errors."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from _cli import run_main
from pipelines.evaluate import ReconstructionEvalConfig, evaluate_reconstruction
from tokenizer import EpsVAE, VAE

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "evaluate.py"


def load_script():
    spec = importlib.util.spec_from_file_location("evaluate_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    torch.manual_seed(0)
    EpsVAE.from_preset("tiny", "tiny").save_pretrained(root / "eps")
    VAE.from_preset("tiny", "tiny").save_pretrained(root / "vae")
    return root


def test_recon_cli_writes_every_metric(tiny_dirs, tmp_path):
    output = tmp_path / "recon.json"
    code = run_main(load_script().main, [
        "recon", "--tokenizer", str(tiny_dirs / "eps"), "--data", "offline", "--resolution", "32",
        "--features", "effnet-l0", "--perceptual", "effnet-l0", "--decode-steps", "1", "3",
        "--num-images", "6", "--batch-size", "4", "--num-workers", "0", "--output", str(output)])
    assert code == 0
    report = json.loads(output.read_text())
    assert report["fd_label"] == "rFD-EffNetL0"  # never called FID
    rows = {(r["resolution"], r["decode_steps"]): r for r in report["rows"]}
    assert set(rows) == {(32, 1), (32, 3), (64, 1), (64, 3)}
    for row in rows.values():
        assert row["num_images"] == 6
        assert 0 < row["psnr"] < 60 and -1 <= row["ssim"] <= 1 and row["perceptual"] >= 0 and row["rfd"] >= 0
    assert "rFD-EffNetL0" in output.with_suffix(".md").read_text()


def test_recon_is_independent_of_batch_size(tiny_dirs):
    def run(batch_size):
        return evaluate_reconstruction(ReconstructionEvalConfig(
            tokenizer=str(tiny_dirs / "eps"), resolution=32, resolution_multipliers=(1,), decode_steps=(2,),
            features="effnet-l0", perceptual="none", num_images=4, batch_size=batch_size, num_workers=0))

    a, b = run(1), run(4)
    assert a.rows[0].psnr == pytest.approx(b.rows[0].psnr, abs=1e-6)
    assert a.rows[0].ssim == pytest.approx(b.rows[0].ssim, abs=1e-6)


def test_recon_baseline_vae_has_one_row_per_resolution(tiny_dirs):
    report = evaluate_reconstruction(ReconstructionEvalConfig(
        tokenizer=str(tiny_dirs / "vae"), resolution=32, features="effnet-l0", perceptual="none",
        num_images=3, batch_size=3, num_workers=0))
    assert [(r.resolution, r.decode_steps) for r in report.rows] == [(32, None), (64, None)]
    assert report.model_type == "vae"


@pytest.mark.parametrize("argv,needle", [
    (["recon", "--tokenizer", "/nonexistent/dir", "--features", "effnet-l0", "--perceptual", "none"], "/nonexistent/dir"),
    (["recon", "--tokenizer", "X", "--decode-steps", "0", "--features", "effnet-l0"], "decode steps"),
    (["recon", "--tokenizer", "X", "--features", "resnet"], "invalid choice"),
])
def test_recon_cli_bad_input_is_one_line(argv, needle, capsys):
    try:
        code = run_main(load_script().main, argv)
    except SystemExit as exit_:  # argparse errors exit from inside parse_args
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err
