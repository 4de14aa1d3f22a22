"""`scripts/evaluate.py fid` / `pipeline` and `pipelines.kit.fid` on small image sets with the offline EffNet features.

The Fréchet distance itself is checked against a float64 scipy reference in tests/test_metrics.py; here the
command around it is tested: FD(x, x) = 0, FD rising with added noise, the ADM .npz layout, reference caching
and statistics-only references.
"""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _cli import run_main
from pipelines.kit.fid import FIDConfig, evaluate_fid, npz_images_shape, reference_cache_path
from pipelines.kit.metrics import build_feature_extractor, save_statistics
from pipelines.kit.sample_files import write_adm_npz

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "evaluate.py"
N_IMAGES = 20


def load_script():
    spec = importlib.util.spec_from_file_location("evaluate_script_fid", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def photos():
    """N_IMAGES distinct 32×32 offline photo crops, uint8 (N, 32, 32, 3)."""
    from data.sources import build_image_dataset
    from pipelines.kit.metrics import to_uint8

    dataset = build_image_dataset("offline", split="val", resolution=32, train=False)
    step = len(dataset) // N_IMAGES
    images = torch.stack([dataset[i * step][0] for i in range(N_IMAGES)])  # (N, 3, 32, 32) in [-1, 1]
    return to_uint8(images).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def extractor():
    return build_feature_extractor("effnet-l0")


def write_folder(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:06d}_c0_s{i}.png")
    return folder


def fid(extractor, samples, reference, tmp_path, **options) -> "FIDReport":  # noqa: F821
    config = FIDConfig(samples=str(samples), reference=str(reference), features="effnet-l0",
                       cache_dir=str(tmp_path / "cache"), batch_size=8, num_workers=0, **options)
    return evaluate_fid(config, extractor)


def test_fd_of_a_set_with_itself_is_zero_through_the_command(photos, tmp_path):
    folder = write_folder(tmp_path / "photos", photos)
    output = tmp_path / "report" / "fid.json"
    code = run_main(load_script().main, [
        "fid", "--samples", str(folder), "--reference", str(folder), "--features", "effnet-l0",
        "--cache-dir", str(tmp_path / "cache"), "--batch-size", "8", "--output", str(output)])
    assert code == 0
    report = json.loads(output.read_text())
    assert report["fd_label"] == "FD-EffNetL0" and report["is_label"] == "IS-EffNetL0"  # never called FID / IS
    assert report["fd"] == pytest.approx(0.0, abs=1e-6)
    assert report["num_samples"] == report["num_reference"] == N_IMAGES
    assert report["precision"] == 1.0 and report["recall"] == 1.0  # every point lies in its own k-NN ball
    assert report["inception_score"] > 1.0
    markdown = output.with_suffix(".md").read_text()
    assert "FD-EffNetL0" in markdown and "FID" not in markdown


def test_fd_rises_monotonically_with_added_noise(photos, extractor, tmp_path):
    reference = write_folder(tmp_path / "reference", photos)
    rng = np.random.default_rng(0)
    distances = []
    for sigma in (0, 10, 30, 80):
        noisy = np.clip(photos + rng.normal(0, sigma, photos.shape), 0, 255).round().astype(np.uint8)
        path = tmp_path / f"noisy-{sigma}.npz"
        np.savez(path, arr_0=noisy, arr_1=np.zeros(len(noisy), np.int64))
        distances.append(fid(extractor, path, reference, tmp_path).fd)
    assert distances[0] == pytest.approx(0.0, abs=1e-6)
    assert all(a < b for a, b in zip(distances, distances[1:])), distances


def test_adm_npz_round_trip(photos, extractor, tmp_path):
    folder = write_folder(tmp_path / "samples", photos)
    paths = sorted(folder.glob("*.png"))
    labels = list(range(len(paths)))
    npz = tmp_path / "samples.npz"
    write_adm_npz(npz, paths, labels, 32)  # streamed writer of scripts/sample.py
    with np.load(npz) as data:  # readable by np.load as ADM's evaluator does
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (N_IMAGES, 32, 32, 3)
        np.testing.assert_array_equal(data["arr_0"], photos)
        assert data["arr_1"].tolist() == labels
    numpy_written = tmp_path / "numpy.npz"
    np.savez(numpy_written, arr_0=photos, arr_1=np.asarray(labels))  # and our reader reads np.savez files
    assert npz_images_shape(numpy_written) == (N_IMAGES, 32, 32, 3)
    reference = write_folder(tmp_path / "reference", photos[::-1][: N_IMAGES - 4])
    from_folder = fid(extractor, folder, reference, tmp_path).fd
    assert fid(extractor, npz, reference, tmp_path).fd == pytest.approx(from_folder, rel=1e-9)
    assert fid(extractor, numpy_written, reference, tmp_path).fd == pytest.approx(from_folder, rel=1e-9)


def test_reference_statistics_are_cached_and_usable_alone(photos, extractor, tmp_path):
    samples = write_folder(tmp_path / "samples", photos[:12])
    reference = write_folder(tmp_path / "reference", photos[6:])
    first = fid(extractor, samples, reference, tmp_path)
    config = FIDConfig(samples=str(samples), reference=str(reference), features="effnet-l0",
                       cache_dir=str(tmp_path / "cache"))
    cache = reference_cache_path(config, 32)
    assert cache.is_file() and "effnet-l0" in cache.name and "32px" in cache.name
    with np.load(cache) as data:
        mu, sigma, features = data["mu"], data["sigma"], data["features"]
    assert features.shape == (N_IMAGES - 6, 1280)

    # Statistics alone (ADM's VIRTUAL_imagenet256_labeled.npz layout): same FD, precision/recall skipped.
    stats = tmp_path / "stats.npz"
    save_statistics(stats, mu, sigma)
    alone = fid(extractor, samples, stats, tmp_path)
    assert alone.fd == pytest.approx(first.fd, rel=1e-9)
    assert alone.precision is None and alone.num_reference is None
    assert any("precision/recall skipped" in note for note in alone.notes)

    # The second run reads the cache, not the images: shift the cached mean and the distance follows.
    with open(cache, "wb") as handle:
        np.savez(handle, mu=mu + 0.5, sigma=sigma, features=features, count=np.int64(len(features)))
    second = fid(extractor, samples, reference, tmp_path)
    save_statistics(stats, mu + 0.5, sigma)
    assert second.fd == pytest.approx(fid(extractor, samples, stats, tmp_path).fd, rel=1e-9)
    assert second.fd > first.fd + 100


def test_data_source_reference(photos, extractor, tmp_path):
    samples = write_folder(tmp_path / "samples", photos[:8])
    report = fid(extractor, samples, "offline", tmp_path, reference_split="val", reference_num_images=12)
    assert report.num_reference == 12 and report.fd > 0 and report.precision is not None


def test_pipeline_command_samples_and_scores(photos, tmp_path):
    from generator import DiT, DiTConfig
    from tokenizer import EpsVAE

    torch.manual_seed(0)
    tokenizer = EpsVAE.from_preset("tiny", "tiny")
    tokenizer.save_pretrained(tmp_path / "eps")
    DiT(DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                  num_classes=3)).save_pretrained(tmp_path / "dit")
    reference = write_folder(tmp_path / "reference", photos[:8])
    output = tmp_path / "pipeline.json"
    code = run_main(load_script().main, [
        "pipeline", "--generator", str(tmp_path / "dit"), "--tokenizer", str(tmp_path / "eps"),
        "--out", str(tmp_path / "samples"), "--num", "6", "--ddpm-steps", "4", "--decode-steps", "1",
        "--reference", str(reference), "--features", "effnet-l0", "--cache-dir", str(tmp_path / "cache"),
        "--output", str(output)])
    assert code == 0
    report = json.loads(output.read_text())
    assert report["sampling"]["num_images"] == 6 and report["sampling"]["cfg_scale"] == 1.0
    assert report["metrics"]["num_samples"] == 6 and report["metrics"]["fd"] > 0
    assert (tmp_path / "samples" / "samples.npz").is_file()
    assert "FD-EffNetL0" in output.with_suffix(".md").read_text()


@pytest.mark.parametrize("case,needle", [
    ("missing inception weights", "weights-inception-2015-12-05-6726825d.pth"),
    ("missing samples", "not found"),
    ("wrong statistics size", "2048-d statistics"),
    ("unknown reference", "cannot tell what data source"),
])
def test_fid_bad_input_is_one_line(photos, tmp_path, capsys, case, needle):
    folder = write_folder(tmp_path / "photos", photos[:4])
    argv = ["fid", "--samples", str(folder), "--reference", str(folder), "--features", "effnet-l0",
            "--cache-dir", str(tmp_path / "cache")]
    if case == "missing inception weights":
        argv = ["fid", "--samples", str(folder), "--reference", str(folder), "--features", "inception"]
    elif case == "missing samples":
        argv[2] = str(tmp_path / "nope")
    elif case == "wrong statistics size":
        save_statistics(tmp_path / "s.npz", np.zeros(2048), np.eye(2048))
        argv[4] = str(tmp_path / "s.npz")
    elif case == "unknown reference":
        argv[4] = "/no/such/imagenet"
    assert run_main(load_script().main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    if case == "missing inception weights":
        assert "--inception-weights" in err and "copy the file there" in err  # both ways to provide it
