"""Files written before the `pipelines/` reshaping (tests/fixtures/legacy, made by commit ed2d115) still load:
model folders through `from_pretrained`, resume checkpoints through the trainers' `--resume`."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from support import reset_accelerate

LEGACY = Path(__file__).parent / "fixtures" / "legacy"


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    yield
    reset_accelerate()


def test_legacy_model_folders_load_and_run():
    from generator.dit import DiT
    from tokenizer import EpsVAE, load_tokenizer

    tokenizer = load_tokenizer(LEGACY / "tok" / "model")
    assert isinstance(tokenizer, EpsVAE) and tokenizer.latent_channels == 2 and tokenizer.downsample == 2
    # Trained with the summed KL before `kl_normalization` existed: fine-tuning it keeps that loss.
    assert tokenizer.config.kl_normalization == "sum"
    dit = DiT.from_pretrained(LEGACY / "gen" / "model")
    assert dit.config.in_channels == 2 and dit.config.input_size == 4
    with torch.no_grad():
        z = tokenizer.encode(torch.zeros(1, 3, 8, 8), sample=False)
        images = tokenizer.decode(z, generator=torch.Generator().manual_seed(0))
        out = dit(torch.zeros(2, 2, 4, 4), torch.tensor([0, 999]), torch.tensor([0, 1]))
    assert images.shape == (1, 3, 8, 8) and torch.isfinite(images).all()
    assert out.shape == (2, 2, 4, 4) and torch.isfinite(out).all()


def _stored_config(run: Path) -> dict:
    return json.loads((run / "checkpoints" / "step_000000002" / "config.json").read_text())


def test_legacy_tokenizer_checkpoint_resumes(tmp_path):
    from pipelines.train_tokenizer import TokenizerTrainConfig, train_tokenizer

    run = shutil.copytree(LEGACY / "tok", tmp_path / "tok")
    values = _stored_config(run)
    values.update(output_dir=str(run), init_from=str(LEGACY / "tok" / "model"), max_steps=3, resume="auto")
    final = train_tokenizer(TokenizerTrainConfig.from_dict(values))
    meta = json.loads((run / "checkpoints" / "step_000000003" / "meta.json").read_text())
    assert meta["step"] == 3 and (final / "model.safetensors").is_file()


def test_legacy_generator_checkpoint_resumes(tmp_path):
    from pipelines.train_generator import GeneratorTrainConfig, train_generator

    run = shutil.copytree(LEGACY / "gen", tmp_path / "gen")
    values = _stored_config(run)
    values.update(output_dir=str(run), shards=str(LEGACY / "lat"), max_steps=3, resume="auto")
    result = train_generator(GeneratorTrainConfig.from_dict(values))
    assert result.step == 3 and (result.model_dir / "model.safetensors").is_file()


def test_resuming_with_other_settings_is_refused_in_one_line(tmp_path):
    from pipelines.train_generator import GeneratorTrainConfig, train_generator

    run = shutil.copytree(LEGACY / "gen", tmp_path / "gen")
    values = _stored_config(run)
    values.update(output_dir=str(run), shards=str(LEGACY / "lat"), max_steps=3, resume="auto", lr=3e-4)
    with pytest.raises(ValueError, match=r"lr=0.0001 \(now 0.0003\)"):
        train_generator(GeneratorTrainConfig.from_dict(values))


@pytest.mark.parametrize("device", ["cpu", "cpu:0", torch.device("cpu", 0)])
def test_loaders_and_per_image_generators_take_any_device_spelling(device):
    """An indexed device ("cpu:0", as accelerate's ranks name theirs; "cuda:1" alike) reaches every loader: weights
    are read on the CPU and moved, so safetensors never sees the index."""
    from generator.dit import DiT
    from pipelines.kit.generation import make_generators, per_image_generators
    from tokenizer import load_tokenizer

    tokenizer = load_tokenizer(LEGACY / "tok" / "model", device=device)
    dit = DiT.from_pretrained(LEGACY / "gen" / "model", device=device)
    assert next(tokenizer.parameters()).device == next(dit.parameters()).device == torch.device("cpu")
    generators = make_generators([3, 4], device) + per_image_generators(5, 2, device)
    assert [g.device.type for g in generators] == ["cpu"] * 4
    assert [g.initial_seed() for g in generators] == [3, 4, 5, 6]
