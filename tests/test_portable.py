"""Model folders are self-describing: copied anywhere (nothing else on disk) they sample exactly as in place,
through the CLI and the Python API, and list their class names; the README's Python snippet runs."""
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from support import reset_accelerate

README = Path(__file__).resolve().parents[1] / "README.md"
SAMPLE_ARGS = ["--classes", "astronaut,2", "--per-class", "2", "--ddpm-steps", "5", "--decode-steps", "2",
               "--seed", "3", "--per-process-batch-size", "3", "--cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny run: tokenizer (2 steps), latents cached, DiT (2 steps); returns the run folder."""
    from pipelines.cache_latents import CacheLatentsConfig, cache_latents
    from pipelines.train_generator import GeneratorTrainConfig, train_generator
    from pipelines.train_tokenizer import TokenizerTrainConfig, train_tokenizer

    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    tokenizer = train_tokenizer(TokenizerTrainConfig.from_flat(
        output_dir=str(run / "tokenizer"), encoder="tiny", decoder="tiny", discriminator="tiny", data="offline",
        resolution=32, batch_size=4, num_workers=0, max_steps=2, warmup_steps=1, perceptual="none",
        perceptual_weight=0.0, image_every=1000, cpu=True))
    reset_accelerate()
    cache_latents(CacheLatentsConfig(tokenizer=str(tokenizer), data="offline", output_dir=str(run / "latents"),
                                     resolution=32, crops_per_class=2, batch_size=8, num_workers=0, cpu=True))
    reset_accelerate()
    train_generator(GeneratorTrainConfig.from_flat(
        shards=str(run / "latents"), output_dir=str(run / "generator"), model="DiT-S/2",
        model_overrides={"depth": 1, "hidden_size": 32, "num_heads": 2}, batch_size=4, num_workers=0,
        shuffle_buffer=8, max_steps=2, sample_every=1000, cpu=True))
    reset_accelerate()
    return run


def _sample_cli(argv: list, capsys) -> str:
    import sample  # scripts/sample.py

    from _cli import run_main

    capsys.readouterr()
    assert run_main(sample.main, [str(a) for a in argv]) == 0
    reset_accelerate()
    return capsys.readouterr().out


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("0*.png"))}


def test_copied_folders_sample_identically_and_list_their_classes(trained, tmp_path, capsys):
    in_place = tmp_path / "in_place"
    _sample_cli(["--generator", trained / "generator" / "model", "--tokenizer", trained / "tokenizer" / "model",
                 "--output-dir", in_place, *SAMPLE_ARGS], capsys)

    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(trained / "generator" / "model", elsewhere / "dit")
    shutil.copytree(trained / "tokenizer" / "model", elsewhere / "tok")
    hidden = trained.with_name(trained.name + "-hidden")  # nothing else on disk: no shards, no run folder
    trained.rename(hidden)
    try:
        copied = tmp_path / "copied"
        _sample_cli(["--generator", elsewhere / "dit", "--tokenizer", elsewhere / "tok", "--output-dir", copied,
                     *SAMPLE_ARGS], capsys)
        listing = _sample_cli(["--generator", elsewhere / "dit", "--class-names"], capsys)

        from pipelines import GenerationPipeline

        pipe = GenerationPipeline.from_pretrained(elsewhere / "dit", elsewhere / "tok", device="cpu")
        api = pipe(["astronaut", 2], num_images_per_class=2, generator=3, ddpm_steps=5, decode_steps=2,
                   output_type="np")
    finally:
        hidden.rename(trained)

    assert len(_pngs(in_place)) == 4 and _pngs(copied) == _pngs(in_place)
    assert "0\tastronaut" in listing and "7\trocket" in listing
    from_files = np.stack([np.asarray(Image.open(in_place / name)) for name in _pngs(in_place)])
    assert api.dtype == np.uint8 and np.array_equal(api, from_files)  # generator=3 ≡ the CLI's --seed 3
    assert pipe.class_names[0] == "astronaut"


def test_tokenizer_folder_records_its_latent_statistics(trained):
    from tokenizer import load_tokenizer

    tokenizer = load_tokenizer(trained / "tokenizer" / "model")
    assert tokenizer.config.latent_mean is not None and len(tokenizer.config.latent_std) == 4
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = tokenizer.encode(images, sample=False)
        unit = tokenizer.encode(images, sample=False, normalize=True)
        mean = torch.tensor(tokenizer.config.latent_mean).view(1, -1, 1, 1)
        std = torch.tensor(tokenizer.config.latent_std).view(1, -1, 1, 1)
        torch.testing.assert_close(unit, (z - mean) / std)
        generator = torch.Generator().manual_seed(0)
        torch.testing.assert_close(tokenizer.decode(unit, steps=1, generator=generator, normalized=True),
                                   tokenizer.decode(z, steps=1, generator=torch.Generator().manual_seed(0)))


def _readme_python_snippet() -> str:
    text = README.read_text()
    section = text[text.index("## Use from Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_snippet_runs(trained, tmp_path, capsys, monkeypatch):
    workdir = tmp_path / "work"
    for stage in ("generator", "tokenizer"):
        shutil.copytree(trained / stage / "model", workdir / "runs" / "demo" / stage / "model")
    monkeypatch.chdir(workdir)
    capsys.readouterr()
    exec(compile(_readme_python_snippet(), "README.md", "exec"), {})
    out = capsys.readouterr().out.strip().splitlines()
    print("\n".join(out))  # shown with -s; the closing note pastes it
    assert out[0].startswith("['astronaut', 'chelsea'") and out[1].startswith("4 (32, 32) (4, 3, 32, 32)")
    assert os.path.getsize(workdir / "astronaut.png") > 0


def test_unconditional_generator_trains_and_samples_without_classes(trained, tmp_path, capsys):
    from pipelines import GenerationPipeline
    from pipelines.train_generator import GeneratorTrainConfig, train_generator

    result = train_generator(GeneratorTrainConfig.from_flat(
        shards=str(trained / "latents"), output_dir=str(tmp_path / "uncond"), model="DiT-S/2", unconditional=True,
        model_overrides={"depth": 1, "hidden_size": 32, "num_heads": 2}, batch_size=4, num_workers=0,
        shuffle_buffer=8, max_steps=2, sample_every=1000, cpu=True))
    reset_accelerate()
    assert result.model.config.num_classes == 0 and result.model.config.class_names is None
    _sample_cli(["--generator", result.model_dir, "--tokenizer", trained / "tokenizer" / "model", "--output-dir",
                 tmp_path / "s", "--num", "3", "--ddpm-steps", "4", "--seed", "5", "--cpu"], capsys)
    assert len(_pngs(tmp_path / "s")) == 3
    with np.load(tmp_path / "s" / "samples.npz") as samples:
        assert samples["arr_0"].shape == (3, 32, 32, 3)
    pipe = GenerationPipeline.from_pretrained(result.model_dir, trained / "tokenizer" / "model", device="cpu")
    images = pipe(None, num_images_per_class=3, generator=5, ddpm_steps=4, output_type="np")
    assert np.array_equal(images, np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / "s").glob("0*.png"))]))
