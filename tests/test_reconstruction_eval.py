"""The shared reconstruction evaluator (pipelines/kit/reconstruction.py) against a per-image reference loop:
per-image decode seeds make every number independent of the batch size; a one-pass tokenizer collapses the
step sweep; real-image features are reused when given."""
import pytest
import torch
import torch.nn.functional as F

from pipelines.kit.metrics import compute_statistics, frechet_distance, psnr, ssim, to_uint8
from pipelines.kit.reconstruction import DecodeSetting, evaluate_reconstructions
from tokenizer import VAE, EpsVAE

SEED = 7


class _PooledPixels:
    """A cheap stand-in feature network: 4×4 average-pooled pixels, (B, 48) float64; counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, images_u8: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        return {"pool": F.adaptive_avg_pool2d(images_u8.double(), 4).flatten(1)}


def _l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x - y).abs().mean(dim=(1, 2, 3))  # (B,), a perceptual-distance stand-in


@pytest.fixture(scope="module")
def eps_vae():
    torch.manual_seed(0)
    model = EpsVAE.from_preset("tiny", "tiny")
    with torch.no_grad():  # the zero-initialised output layers would make every step count decode alike
        for parameter in model.decoder.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1  # (6, 3, 32, 32)


def _evaluate(tokenizer, images, settings, batch_size, **kwargs):
    return evaluate_reconstructions(tokenizer, images.split(batch_size), settings, _PooledPixels(), _l1,
                                    device="cpu", seed=SEED, **kwargs)


@torch.no_grad()
def _reference(tokenizer, images, setting):
    """All images in one batch, image i's noise from a generator seeded SEED + i: what every caller reported
    before the shared evaluator, written out without it."""
    real = to_uint8(images)
    z = tokenizer.encode(images, sample=False)
    spacing = {} if setting.spacing is None else {"spacing": setting.spacing}
    generators = [torch.Generator().manual_seed(SEED + index) for index in range(len(images))]
    recon = to_uint8(tokenizer.decode(z, steps=setting.steps, generator=generators, **spacing).float())
    features = [_PooledPixels()(u8)["pool"] for u8 in (real, recon)]
    return {"psnr": float(psnr(real, recon).mean()), "ssim": float(ssim(real, recon).mean()),
            "perceptual": float(_l1(recon.float() / 127.5 - 1, real.float() / 127.5 - 1).mean()),
            "rfd": frechet_distance(*compute_statistics([features[0]]), *compute_statistics([features[1]]))}


def test_evaluator_matches_the_reference_at_any_batch_size(eps_vae, images):
    # Batch size 1 is left out: a one-image convolution may round differently in the last float bit, which
    # can flip a uint8 pixel; that is not a seeding difference.
    settings = [DecodeSetting(1), DecodeSetting(2, "uniform"), DecodeSetting()]
    by_batch = {size: _evaluate(eps_vae, images, settings, size) for size in (2, 4, 6)}
    for index, setting in enumerate(settings):
        expected = _reference(eps_vae, images, setting)
        for result in by_batch.values():
            metrics = result.metrics[index]
            assert metrics.setting == setting and metrics.num_images == 6 and metrics.decode_images_per_s > 0
            for name, value in expected.items():
                assert getattr(metrics, name) == pytest.approx(value, rel=1e-6), (setting, name)
    one_step, two_steps, _ = by_batch[4].metrics
    assert one_step.psnr != two_steps.psnr  # the step count matters, so the comparison above means something


def test_one_pass_tokenizer_collapses_the_step_sweep(images):
    torch.manual_seed(0)
    vae = VAE.from_preset("tiny", "tiny").eval()
    result = _evaluate(vae, images, [DecodeSetting(1), DecodeSetting(3), DecodeSetting(2, "uniform")], 4)
    (metrics,) = result.metrics
    assert metrics.setting == DecodeSetting() and metrics.setting.steps is None
    assert metrics.psnr == pytest.approx(_reference(vae, images, DecodeSetting())["psnr"], rel=1e-6)


def test_given_real_features_are_reused_and_max_images_stops_between_batches(eps_vae, images):
    settings = [DecodeSetting(1)]
    first = _evaluate(eps_vae, images, settings, 3, max_images=4)  # two batches of 3: stops once >= 4
    assert first.metrics[0].num_images == 6 and first.real.count == 6
    extractor = _PooledPixels()
    again = evaluate_reconstructions(eps_vae, images.split(3), settings, extractor, _l1, device="cpu", seed=SEED,
                                     real=first.real)
    assert extractor.calls == 2  # reconstructions only
    assert again.real is first.real and again.metrics[0].rfd == first.metrics[0].rfd
    without_perceptual = evaluate_reconstructions(eps_vae, images.split(3), settings, _PooledPixels(),
                                                  device="cpu", seed=SEED)
    assert without_perceptual.metrics[0].perceptual is None
    assert without_perceptual.metrics[0].psnr == first.metrics[0].psnr


def test_fewer_than_two_images_name_the_source(eps_vae, images):
    with pytest.raises(ValueError, match="the val split at 32px has 1 image"):
        _evaluate(eps_vae, images[:1], [DecodeSetting(1)], 1, source="the val split at 32px")
