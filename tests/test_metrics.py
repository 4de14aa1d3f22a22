"""Evaluation metrics (pipelines/metrics.py) against scikit-image / scipy references and known values."""
import numpy as np
import pytest
import scipy.linalg
import torch

from pipelines.kit.metrics import (
    FEATURE_EXTRACTORS,
    INCEPTION_FILE,
    EffNetFeatures,
    FeatureStats,
    MissingWeightsError,
    build_feature_extractor,
    compute_statistics,
    frechet_distance,
    frechet_distance_of_features,
    inception_score,
    load_statistics,
    precision_recall,
    psnr,
    save_statistics,
    ssim,
    to_uint8,
)

skimage_data = pytest.importorskip("skimage.data")
skimage_metrics = pytest.importorskip("skimage.metrics")


def _photo_crops(count: int, size: int, seed: int = 0) -> np.ndarray:
    """Random crops of scikit-image's colour photos: uint8 (count, size, size, 3)."""
    rng = np.random.default_rng(seed)
    photos = [skimage_data.chelsea(), skimage_data.astronaut(), skimage_data.coffee(), skimage_data.rocket()]
    crops = []
    for index in range(count):
        photo = photos[index % len(photos)]
        top = rng.integers(0, photo.shape[0] - size)
        left = rng.integers(0, photo.shape[1] - size)
        crops.append(photo[top : top + size, left : left + size, :3])
    return np.stack(crops)


def _image_pairs():
    rng = np.random.default_rng(1)
    random_x = rng.integers(0, 256, (3, 23, 31, 3), dtype=np.uint8)
    random_y = rng.integers(0, 256, (3, 23, 31, 3), dtype=np.uint8)
    photos = _photo_crops(4, 40)
    noisy = np.clip(photos + rng.normal(0, 12, photos.shape), 0, 255).astype(np.uint8)
    blocky = np.repeat(np.repeat(photos[:, ::4, ::4], 4, axis=1), 4, axis=2)  # structured, low-frequency error
    return {"random": (random_x, random_y), "photo+noise": (photos, noisy), "photo+blocks": (photos, blocky)}


@pytest.mark.parametrize("case", ["random", "photo+noise", "photo+blocks"])
def test_psnr_and_ssim_match_skimage(case):
    x, y = _image_pairs()[case]
    expected_psnr = [skimage_metrics.peak_signal_noise_ratio(a, b, data_range=255) for a, b in zip(x, y)]
    expected_ssim = [skimage_metrics.structural_similarity(a, b, channel_axis=-1, data_range=255) for a, b in zip(x, y)]
    np.testing.assert_allclose(psnr(x, y).numpy(), expected_psnr, rtol=0, atol=1e-4)
    np.testing.assert_allclose(ssim(x, y).numpy(), expected_ssim, rtol=0, atol=1e-4)
    # The same numbers from (B, 3, H, W) uint8 tensors.
    x_t, y_t = (torch.from_numpy(a).permute(0, 3, 1, 2) for a in (x, y))
    np.testing.assert_allclose(ssim(x_t, y_t).numpy(), expected_ssim, rtol=0, atol=1e-4)
    np.testing.assert_allclose(psnr(x_t, y_t).numpy(), expected_psnr, rtol=0, atol=1e-4)


def test_identical_images_have_infinite_psnr_and_unit_ssim():
    x = _photo_crops(2, 16)
    assert torch.isinf(psnr(x, x)).all()
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.float64))


def test_metric_inputs_are_validated():
    with pytest.raises(ValueError, match="uint8"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="7×7"):
        ssim(np.zeros((1, 5, 5, 3), np.uint8), np.zeros((1, 5, 5, 3), np.uint8))
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(np.zeros((1, 8, 8, 3), np.uint8), np.zeros((2, 8, 8, 3), np.uint8))


def test_to_uint8_rounds_like_the_sampler():
    x = torch.tensor([-1.5, -1.0, -0.996, 0.0, 0.5, 1.0, 2.0])
    expected = torch.tensor([0, 0, 1, 128, 191, 255, 255], dtype=torch.uint8)  # 127.5 → 128 (round half even)
    assert torch.equal(to_uint8(x), expected)


def _random_statistics(dim: int, rng: np.random.Generator):
    mean = rng.normal(size=dim)
    factor = rng.normal(size=(dim, 2 * dim)) / np.sqrt(dim)
    return mean, factor @ factor.T + 0.1 * np.eye(dim)


def _reference_frechet(mu1, sigma1, mu2, sigma2) -> float:
    """The classic pytorch-fid / ADM formula with scipy's general matrix square root (independent of ours)."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_float64_reference():
    rng = np.random.default_rng(0)
    for dim in (1, 5, 64):
        first, second = _random_statistics(dim, rng), _random_statistics(dim, rng)
        np.testing.assert_allclose(frechet_distance(*first, *second), _reference_frechet(*first, *second), rtol=1e-8)
    # Closed form for diagonal covariances: ‖Δμ‖² + Σ (σ1 − σ2)².
    std1, std2 = rng.uniform(0.5, 2, 7), rng.uniform(0.5, 2, 7)
    mu1, mu2 = rng.normal(size=7), rng.normal(size=7)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((std1 - std2) ** 2)
    np.testing.assert_allclose(frechet_distance(mu1, np.diag(std1**2), mu2, np.diag(std2**2)), expected, rtol=1e-10)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    features = np.random.default_rng(2).normal(size=(500, 64)) ** 3  # non-Gaussian, full-rank covariance
    mu, sigma = compute_statistics([features])
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


@pytest.mark.parametrize("n_x, n_y, dim", [(12, 9, 40), (39, 5, 40), (60, 50, 16), (30, 50, 40)])
def test_feature_frechet_distance_agrees_with_the_statistics_formula(n_x, n_y, dim):
    """Both paths of frechet_distance_of_features: low rank (both sets have fewer vectors than dimensions)
    and full (statistics, eigh), against each other and against scipy's matrix square root."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n_x, dim))
    y = 1.5 * rng.normal(size=(n_y, dim)) + 0.3
    first, second = FeatureStats.from_batches([x[:4], x[4:]]), FeatureStats.from_batches([y])
    assert (first.rows is not None and second.rows is not None) == (max(n_x, n_y) < dim)  # which path runs
    statistics = (*compute_statistics([x]), *compute_statistics([y]))
    expected = frechet_distance(*statistics)
    assert frechet_distance_of_features(first, second) == pytest.approx(expected, rel=1e-7)
    assert frechet_distance_of_features(first, second) == pytest.approx(_reference_frechet(*statistics), rel=1e-6)
    assert frechet_distance_of_features(first, first) == pytest.approx(0.0, abs=1e-8)


def test_feature_stats_keep_rows_only_below_the_dimension():
    rng = np.random.default_rng(4)
    features = rng.normal(size=(10, 6))
    stats = FeatureStats.from_batches([features[:3], torch.from_numpy(features[3:4])])
    np.testing.assert_array_equal(stats.rows, features[:4])
    stats.merge(FeatureStats.from_batches([features[4:5]]))
    np.testing.assert_array_equal(stats.rows, features[:5])
    stats.update(features[5:6])
    assert stats.count == 6 and stats.rows is None  # as many vectors as dimensions: the sums suffice
    stats.update(features[6:])
    assert stats.rows is None
    reduced = FeatureStats.from_batches([features[:2]])
    reduced.count = 4  # what an all-reduce of the sums across ranks leaves: rows no longer match the count
    assert reduced.rows is None
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance_of_features(FeatureStats.from_batches([features[:1]]), stats)


def test_streaming_statistics_equal_numpy_in_float64():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(301, 9)).astype(np.float32) + 5
    mu, sigma = compute_statistics([features[:100], torch.from_numpy(features[100:250]), features[250:]])
    np.testing.assert_allclose(mu, features.astype(np.float64).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-12)
    assert mu.dtype == sigma.dtype == np.float64
    first, second = FeatureStats(dim=9), FeatureStats(dim=9)
    first.update(features[:7])
    second.update(features[7:])
    first.merge(second)
    np.testing.assert_allclose(first.mean_cov()[1], sigma, rtol=1e-10, atol=1e-12)


def test_statistics_npz_round_trip_and_adm_layout(tmp_path):
    rng = np.random.default_rng(4)
    mu, sigma = _random_statistics(6, rng)
    save_statistics(tmp_path / "stats.npz", mu, sigma)
    loaded_mu, loaded_sigma = load_statistics(tmp_path / "stats.npz")
    assert np.array_equal(loaded_mu, mu) and np.array_equal(loaded_sigma, sigma)
    # ADM reference batches carry images and spatial statistics beside mu/sigma.
    images = np.zeros((2, 4, 4, 3), np.uint8)
    np.savez(tmp_path / "VIRTUAL_ref.npz", arr_0=images, mu=mu, sigma=sigma, mu_s=mu, sigma_s=sigma)
    assert np.array_equal(load_statistics(tmp_path / "VIRTUAL_ref.npz")[1], sigma)
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(ValueError, match="lacks keys"):
        load_statistics(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError):
        load_statistics(tmp_path / "absent.npz")


def test_inception_score_known_values():
    assert inception_score(torch.zeros(100, 1000))[0] == pytest.approx(1.0, abs=1e-12)
    # Confident, evenly spread predictions over K classes give IS = K.
    logits = torch.full((200, 20), -1e4)
    logits[torch.arange(200), torch.arange(200) % 20] = 0
    score, spread = inception_score(logits, splits=10)
    assert score == pytest.approx(20.0, rel=1e-9) and spread == pytest.approx(0.0, abs=1e-9)


def test_precision_recall_on_overlapping_and_disjoint_sets():
    rng = np.random.default_rng(5)
    real = rng.normal(size=(300, 8))
    same = rng.normal(size=(300, 8))
    precision, recall = precision_recall(real, same, k=3, row_batch=64)
    assert precision > 0.8 and recall > 0.8
    far = rng.normal(size=(300, 8)) + 100
    assert precision_recall(real, far, k=3) == (0.0, 0.0)
    # A collapsed generator (all samples near one real point) is precise but has no recall.
    collapsed = real[:1] + 1e-3 * rng.normal(size=(300, 8))
    precision, recall = precision_recall(real, collapsed, k=3)
    assert precision == 1.0 and recall < 0.05


def test_missing_inception_weights_raise_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    with pytest.raises(MissingWeightsError) as info:
        build_feature_extractor("inception")
    message = str(info.value)
    assert str(tmp_path / "hub" / "checkpoints" / INCEPTION_FILE) in message
    assert "--inception-weights" in message and "\n" not in message
    assert not any(tmp_path.rglob("*.pth"))


def test_inception_extractor_loads_a_given_file_safely(tmp_path, monkeypatch):
    """With a tensor-only weights file (random values here) the wrapper returns float64 pool features and
    logits; torch-fidelity's own weights_only=False load is forced to the safe loader."""
    from torch_fidelity import feature_extractor_inceptionv3 as fidelity

    with monkeypatch.context() as patch:  # build once without weights to get the layout
        patch.setattr(fidelity.torch, "load", lambda *args, **kwargs: {})
        patch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        network = fidelity.FeatureExtractorInceptionV3("probe", ["2048"], feature_extractor_weights_path="unused")
    weights = tmp_path / INCEPTION_FILE
    torch.save(network.state_dict(), weights)
    extractor = build_feature_extractor("inception", weights_path=weights)
    assert extractor.name == "FID"
    out = extractor(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert out["pool"].shape == (2, 2048) and out["pool"].dtype == torch.float64
    assert out["logits"].shape == (2, 1008)
    # A file that needs the full unpickler (arbitrary objects) is refused.
    import argparse
    import pickle

    unsafe = tmp_path / "unsafe.pth"
    torch.save({**network.state_dict(), "extra": argparse.Namespace(a=1)}, unsafe)
    with pytest.raises(pickle.UnpicklingError):
        build_feature_extractor("inception", weights_path=unsafe)


@pytest.fixture(scope="module")
def effnet_features():
    return EffNetFeatures(size=96)  # smaller than the standard 224 to keep the test fast


def test_effnet_extractor_outputs_and_label(effnet_features):
    assert FEATURE_EXTRACTORS["effnet-l0"] is EffNetFeatures and EffNetFeatures.name == "FD-EffNetL0"
    out = effnet_features(torch.from_numpy(_photo_crops(3, 48)).permute(0, 3, 1, 2))
    assert out["pool"].shape == (3, 1280) and out["pool"].dtype == torch.float64
    assert out["logits"].shape == (3, 1000)
    with pytest.raises(ValueError, match="uint8"):
        effnet_features(torch.zeros(1, 3, 8, 8))


def test_effnet_classifies_chelsea_as_a_cat_at_standard_size():
    image = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1)[None]  # (1, 3, 300, 451) uint8
    top5 = build_feature_extractor("effnet-l0")(image)["logits"].topk(5).indices[0].tolist()
    assert any(281 <= index <= 285 for index in top5), top5


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # 32 samples < 1280 dims: singular
def test_frechet_distance_rises_with_noise_on_effnet_features(effnet_features):
    images = _photo_crops(32, 64, seed=6)  # (32, 64, 64, 3)
    rng = np.random.default_rng(7)
    noise = rng.normal(size=images.shape)

    def statistics(batch: np.ndarray):
        return compute_statistics([effnet_features(torch.from_numpy(batch).permute(0, 3, 1, 2))["pool"]])

    reference = statistics(images)
    distances = []
    for level in (8, 32, 96):
        noisy = np.clip(np.round(images + level * noise), 0, 255).astype(np.uint8)
        distances.append(frechet_distance(*reference, *statistics(noisy)))
    assert distances[0] > 0 and distances[0] < distances[1] < distances[2], distances
