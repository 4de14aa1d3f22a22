"""Class-conditional sampling: `pipelines.kit.generation`, `pipelines.sample` and `scripts/sample.py` end to end
on tiny models (CPU)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from generator import DiT, DiTConfig
from _cli import run_main
from pipelines.kit.generation import GenerationPipeline, check_compatible, make_generators
from pipelines.kit.sample_files import png_is_complete
from pipelines.sample import SampleConfig, parse_seeds, plan_samples, run_sampling
from tokenizer import EpsVAE, VAE
from tokenizer.tiling import tile_starts, tiled_decode

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "sample.py"
FAST = ["--ddpm-steps", "8", "--decode-steps", "2"]


def load_script():
    spec = importlib.util.spec_from_file_location("sample_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_dit(directory: Path, tokenizer, num_classes: int = 3, image_size: int = 32) -> DiT:
    """A tiny DiT for `tokenizer`'s latents whose weights are perturbed away from adaLN-Zero (a fresh DiT
    predicts ε = 0 exactly, which would make every determinism test trivial)."""
    latent_size = image_size // tokenizer.downsample
    config = DiTConfig(input_size=latent_size, patch_size=2, in_channels=tokenizer.latent_channels, hidden_size=32, depth=1, num_heads=2,
                       num_classes=num_classes, latent_mean=(0.1,) * tokenizer.latent_channels,
                       latent_std=(0.7,) * tokenizer.latent_channels)
    dit = DiT(config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in dit.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    dit.save_pretrained(directory)
    return dit


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling-models")
    torch.manual_seed(0)
    eps = EpsVAE.from_preset("tiny", "tiny")  # f=4, 4 channels
    eps.save_pretrained(root / "eps")
    save_dit(root / "dit", eps)
    vae = VAE.from_preset("tiny", "tiny")
    vae.save_pretrained(root / "vae")
    wide = EpsVAE.from_preset("tiny", "tiny", latent_channels=8)
    wide.save_pretrained(root / "eps8ch")
    for factor in (8, 16):
        tokenizer = EpsVAE.from_preset("tiny", "tiny", downsample=factor)
        tokenizer.save_pretrained(root / f"eps-f{factor}")
        save_dit(root / f"dit-f{factor}", tokenizer)
    return root


def sample(models, out, *extra, generator="dit", tokenizer="eps"):
    argv = ["--generator", str(models / generator), "--tokenizer", str(models / tokenizer), "--output-dir", str(out),
            *FAST, *extra]
    return run_main(load_script().main, argv)


def test_sample_cli_writes_pngs_grid_and_adm_npz(models, tmp_path):
    out = tmp_path / "out"
    assert sample(models, out, "--classes", "0,2", "--per-class", "3", "--seed", "10", "--per-process-batch-size", "4") == 0
    names = sorted(p.name for p in out.glob("0*.png"))
    assert names == ["000000_c0_s10.png", "000001_c0_s11.png", "000002_c0_s12.png",
                     "000003_c2_s13.png", "000004_c2_s14.png", "000005_c2_s15.png"]
    with np.load(out / "samples.npz") as npz:
        assert sorted(npz.files) == ["arr_0", "arr_1"]
        images, labels = npz["arr_0"], npz["arr_1"]
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 0, 0, 2, 2, 2]
    for i, name in enumerate(names):  # the npz is assembled from exactly these PNGs
        np.testing.assert_array_equal(images[i], np.asarray(Image.open(out / name)))
    assert images.std() > 1  # not a constant image
    with Image.open(out / "grid.png") as grid:  # 2 rows (classes) of 3 cells + a label margin
        assert grid.size[1] == 2 * 32 and grid.size[0] > 3 * 32
    assert json.loads((out / "sampling.json").read_text())["num_images"] == 6


def test_same_seeds_give_identical_images_for_any_batch_size(models, tmp_path):
    common = ["--classes", "all", "--num", "5", "--seeds", "3,7,20-22"]
    assert sample(models, tmp_path / "b1", *common, "--per-process-batch-size", "1") == 0
    assert sample(models, tmp_path / "b3", *common, "--per-process-batch-size", "3") == 0
    a, b = np.load(tmp_path / "b1" / "samples.npz")["arr_0"], np.load(tmp_path / "b3" / "samples.npz")["arr_0"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[0], a[1])  # different seeds, different images


def test_ddpm_noise_comes_from_the_per_image_generators(models):
    """With the exact ε-predictor for N(0, I) data, E[ε | x_t] = √(1-ᾱ_t)·x_t, DDPM must return N(0, I) latents,
    mapped by the DiT config's mean 0.1 / std 0.7; and each image's x_T and step noise come from its own
    generator, so sampling in chunks reproduces the whole batch exactly."""
    from generator import linear_beta_schedule

    pipeline = GenerationPipeline.from_pretrained(models / "dit", models / "eps")
    alpha_bar = linear_beta_schedule(1000).alphas_cumprod.float()
    pipeline.dit.forward = lambda x, t, y: x * (1 - alpha_bar[t.cpu()]).sqrt().view(-1, 1, 1, 1)
    labels, seeds = torch.arange(60) % 3, list(range(100, 160))
    whole = pipeline.sample_latents(labels, make_generators(seeds), ddpm_steps=25)  # fixed_large, DiT's default
    chunks = torch.cat([pipeline.sample_latents(labels[i:i + 7], make_generators(seeds[i:i + 7]), ddpm_steps=25)
                        for i in range(0, 60, 7)])
    torch.testing.assert_close(chunks, whole, rtol=0, atol=1e-6)
    standard = (whole - 0.1) / 0.7
    assert abs(standard.mean().item()) < 0.05 and abs(standard.std().item() - 1) < 0.05


def test_rank_split_covers_every_index_once(models, tmp_path):
    """Two "ranks" sampling their share `indices[rank::2]` into one folder give the single-process images."""
    pipeline = GenerationPipeline.from_pretrained(models / "dit", models / "eps")
    labels, seeds = [0, 1, 2, 0, 1], [4, 5, 6, 7, 8]
    whole = pipeline(labels, make_generators(seeds), ddpm_steps=8, decode_steps=2)
    shares = [pipeline(labels[r::2], make_generators(seeds[r::2]), ddpm_steps=8, decode_steps=2) for r in (0, 1)]
    merged = torch.empty_like(whole)
    merged[0::2], merged[1::2] = shares
    assert torch.equal(merged, whole)


def test_resume_skips_complete_images_and_redoes_partial_ones(models, tmp_path):
    out = tmp_path / "out"
    config = SampleConfig(generator=str(models / "dit"), tokenizer=str(models / "eps"), output_dir=str(out), num=4,
                          ddpm_steps=8, decode_steps=2, batch_size=2)
    first = run_sampling(config)
    assert first.generated == 4 and first.skipped == 0
    paths = sorted(out.glob("0*.png"))
    original = {p.name: np.asarray(Image.open(p)).copy() for p in paths}
    stamps = {p.name: p.stat().st_mtime_ns for p in paths}
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2])  # a partially written image
    paths[2].unlink()
    assert not png_is_complete(paths[1], 32)

    second = run_sampling(config)
    assert second.generated == 2 and second.skipped == 2
    for index in (0, 3):  # untouched
        assert paths[index].stat().st_mtime_ns == stamps[paths[index].name]
    for path in paths:  # redone images are the same images (same seeds)
        assert png_is_complete(path, 32)
        np.testing.assert_array_equal(np.asarray(Image.open(path)), original[path.name])
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files


@pytest.mark.parametrize("generator,tokenizer,size", [("dit", "vae", 32), ("dit-f8", "eps-f8", 32),
                                                      ("dit-f16", "eps-f16", 32)])
def test_baseline_vae_and_higher_compression(models, tmp_path, generator, tokenizer, size):
    assert sample(models, tmp_path / "out", "--num", "2", generator=generator, tokenizer=tokenizer) == 0
    images = np.load(tmp_path / "out" / "samples.npz")["arr_0"]
    assert images.shape == (2, size, size, 3)


def test_mismatched_pair_is_refused_naming_both_shapes(models):
    with pytest.raises(ValueError) as error:
        GenerationPipeline.from_pretrained(models / "dit", models / "eps8ch")
    message = str(error.value)
    assert "(4, 8, 8)" in message and "(8, 8, 8)" in message and len(message.splitlines()) == 1


def _write_provenance(dit_dir: Path, shards: Path, downsample: int, sha: str, mean, std) -> None:
    """The stage-2 training outputs `read_provenance` looks at: training.json → the shard manifest."""
    shards.mkdir(parents=True, exist_ok=True)
    (shards / "manifest.json").write_text(json.dumps({
        "encoder": {"downsample": downsample, "latent_channels": 4}, "source": {"resolution": 32},
        "latent_mean": list(mean), "latent_std": list(std), "class_names": ["cat", "dog", "fish"],
        "tokenizer": {"weights_sha256": sha}}))
    (dit_dir / "training.json").write_text(json.dumps({"shards": str(shards), "tokenizer_weights_sha256": sha}))


def test_downsample_normalisation_and_weights_mismatch_are_refused(models, tmp_path):
    import shutil

    from data.latent_shards import file_sha256

    dit_dir = tmp_path / "dit"
    shutil.copytree(models / "dit", dit_dir)
    sha = file_sha256(str(models / "eps" / "model.safetensors"))
    _write_provenance(dit_dir, tmp_path / "shards", 4, sha, (0.1,) * 4, (0.7,) * 4)
    pipeline = GenerationPipeline.from_pretrained(dit_dir, models / "eps")  # the matching pair loads
    assert pipeline.class_names == ["cat", "dog", "fish"] and pipeline.image_size == 32

    # Same channels, other downsample factor: the DiT's 8×8 latents were 32px images, the f8 tokenizer gives 4×4.
    with pytest.raises(ValueError, match=r"\(4, 8, 8\).*\(4, 4, 4\)"):
        GenerationPipeline.from_pretrained(dit_dir, models / "eps-f8")
    # Another tokenizer of the same shape: its weights hash differs from the one the shards were encoded with.
    other = tmp_path / "other-eps"
    torch.manual_seed(5)
    EpsVAE.from_preset("tiny", "tiny").save_pretrained(other)
    with pytest.raises(ValueError, match="allow-tokenizer-mismatch"):
        GenerationPipeline.from_pretrained(dit_dir, other)
    GenerationPipeline.from_pretrained(dit_dir, other, allow_tokenizer_mismatch=True)
    # The DiT config's normalisation disagrees with the manifest it claims to come from.
    _write_provenance(dit_dir, tmp_path / "shards", 4, sha, (0.0,) * 4, (1.0,) * 4)
    with pytest.raises(ValueError, match="normalisation"):
        GenerationPipeline.from_pretrained(dit_dir, models / "eps")


def test_check_compatible_image_size():
    config = DiTConfig(input_size=16, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                       num_classes=3)
    assert check_compatible(config, 4, 16, {}) == 256  # 16×16 tokens at 16× → 256² images
    assert check_compatible(config, 4, 8, {}) == 128
    with pytest.raises(ValueError, match="not a matching pair"):
        check_compatible(config, 4, 8, {"downsample": 16})


def test_class_names_are_listed_and_accepted(models, tmp_path, capsys):
    import shutil

    dit_dir = tmp_path / "dit"
    shutil.copytree(models / "dit", dit_dir)
    _write_provenance(dit_dir, tmp_path / "shards", 4, "0" * 64, (0.1,) * 4, (0.7,) * 4)
    assert run_main(load_script().main, ["--generator", str(dit_dir), "--class-names"]) == 0
    assert capsys.readouterr().out.splitlines() == ["0\tcat", "1\tdog", "2\tfish"]
    labels, seeds = plan_samples(SampleConfig(generator="g", tokenizer="t", classes="fish,0", per_class=2),
                                 3, ["cat", "dog", "fish"])
    assert labels == [2, 2, 0, 0] and seeds == [0, 1, 2, 3]


def test_plan_and_seed_parsing():
    assert parse_seeds("0-3,7,9-10") == [0, 1, 2, 3, 7, 9, 10]
    labels, seeds = plan_samples(SampleConfig(generator="g", tokenizer="t", num=5, seed=100), 3)
    assert labels == [0, 1, 2, 0, 1] and seeds == [100, 101, 102, 103, 104]
    labels, seeds = plan_samples(SampleConfig(generator="g", tokenizer="t", seeds="0-9999"), 1000)
    assert len(labels) == 10000 and np.bincount(labels).tolist() == [10] * 1000  # balanced classes
    with pytest.raises(ValueError, match="seeds"):
        plan_samples(SampleConfig(generator="g", tokenizer="t", num=3, seeds="0-1"), 3)


def test_tiled_decode_blends_back_to_the_whole_image():
    z = torch.randn(2, 4, 13, 10)

    def pointwise(latents):  # a local "decoder": tiling must reproduce it exactly
        return torch.nn.functional.interpolate(latents[:, :3], scale_factor=4, mode="nearest").tanh()

    assert tile_starts(13, 6, 2) == [0, 4, 7] and tile_starts(5, 6, 2) == [0]
    tiled = tiled_decode(pointwise, z, tile=6, overlap=2, downsample=4)
    torch.testing.assert_close(tiled, pointwise(z), rtol=1e-5, atol=1e-6)


def test_tiled_decoding_in_the_pipeline(models):
    pipeline = GenerationPipeline.from_pretrained(models / "dit", models / "eps")
    latents = torch.randn(1, 4, 16, 16)  # 64² images from a DiT trained at 32²: decoded in 8×8 latent tiles
    images = pipeline.decode(latents, make_generators([0]), decode_steps=1, tile=8, tile_overlap=2)
    assert images.shape == (1, 3, 64, 64) and images.abs().max() <= 1


def _corrupt(models, tmp_path, which: str, what: str) -> Path:
    import shutil

    target = tmp_path / which
    shutil.copytree(models / which, target)
    if what == "config":
        (target / "config.json").write_text("{ not json")
    else:
        (target / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    return target


@pytest.mark.parametrize("case,needle", [
    ("unknown class", "unknown class 'zebra'"),
    ("class out of range", "out of range"),
    ("decode steps 0", "decode steps"),
    ("missing generator", "not found"),
    ("missing tokenizer", "does not exist"),
    ("corrupt generator config", "config.json"),
    ("corrupt generator weights", "model.safetensors"),
    ("corrupt tokenizer weights", "model.safetensors"),
    ("mismatched pair", "(8, 8, 8)"),
    ("unwritable output", "cannot write"),
])
def test_bad_input_is_one_line_and_exit_2(models, tmp_path, capsys, case, needle):
    generator, tokenizer, out = models / "dit", models / "eps", tmp_path / "out"
    extra = ["--classes", "0"]
    if case == "unknown class":
        extra = ["--classes", "0,zebra"]
    elif case == "class out of range":
        extra = ["--classes", "1,3"]
    elif case == "decode steps 0":
        extra += ["--decode-steps", "0"]
    elif case == "missing generator":
        generator = tmp_path / "nope"
    elif case == "missing tokenizer":
        tokenizer = tmp_path / "nope"
    elif case == "corrupt generator config":
        generator = _corrupt(models, tmp_path, "dit", "config")
    elif case == "corrupt generator weights":
        generator = _corrupt(models, tmp_path, "dit", "weights")
    elif case == "corrupt tokenizer weights":
        tokenizer = _corrupt(models, tmp_path, "eps", "weights")
    elif case == "mismatched pair":
        tokenizer = models / "eps8ch"
    elif case == "unwritable output":
        blocker = tmp_path / "a-file"
        blocker.write_text("")
        out = blocker / "out"  # a directory below a regular file cannot be created, even as root
    argv = ["--generator", str(generator), "--tokenizer", str(tokenizer), "--output-dir", str(out),
            "--ddpm-steps", "2", *extra]
    try:
        code = run_main(load_script().main, argv)
    except SystemExit as exit_:  # argparse errors exit inside parse_args
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_real_subprocess_gives_one_line_without_traceback(models, tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--generator", str(models / "dit"), "--tokenizer", str(models / "eps"),
         "--classes", "5", "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "class 5 is out of range" in result.stderr


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def _stale_folder(models, tmp_path, capsys) -> Path:
    """A folder of 3-decode-step samples (issue 17's first run)."""
    out = tmp_path / "s"
    assert sample(models, out, "--num", "4", "--decode-steps", "3") == 0
    capsys.readouterr()
    return out


def test_rerun_with_other_settings_refuses_and_writes_nothing(models, tmp_path, capsys):
    out = _stale_folder(models, tmp_path, capsys)
    before = _snapshot(out)
    assert sample(models, out, "--num", "4", "--decode-steps", "1") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "decode_steps=3" in err and "decode_steps=1" in err and "--overwrite" in err
    assert _snapshot(out) == before  # no image, settings.json or sampling.json rewritten
    assert json.loads((out / "settings.json").read_text())["decode_steps"] == 3


def test_overwrite_regenerates_with_the_new_settings(models, tmp_path, capsys):
    out = _stale_folder(models, tmp_path, capsys)
    (out / "notes.txt").write_text("mine")  # not written by the tool: kept
    assert sample(models, out, "--num", "4", "--decode-steps", "1", "--overwrite") == 0
    assert sample(models, tmp_path / "fresh", "--num", "4", "--decode-steps", "1") == 0
    pngs = sorted(p.name for p in out.glob("0*.png"))
    assert pngs == sorted(p.name for p in (tmp_path / "fresh").glob("0*.png")) and len(pngs) == 4
    for name in pngs:
        assert (out / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()
    assert json.loads((out / "settings.json").read_text())["decode_steps"] == 1
    assert json.loads((out / "sampling.json").read_text())["decode_steps"] == 1
    assert (out / "notes.txt").read_text() == "mine"


def test_compiled_sampling_matches_eager_and_a_folder_does_not_mix_the_two(models, tmp_path, capsys, monkeypatch):
    """`--compile` (traced with `aot_eager` here: the same graphs without C++ code generation) gives the eager
    images within one level per pixel value, is recorded in settings.json and sampling.json, and an eager rerun
    into the compiled folder is refused."""
    import pipelines.kit.compiling as compiling
    from torch._dynamo.utils import counters

    monkeypatch.setattr(compiling, "COMPILE_BACKEND", "aot_eager")
    common = ["--num", "3", "--per-process-batch-size", "2"]  # a full batch and a partial one
    assert sample(models, tmp_path / "eager", *common) == 0
    before = int(counters["stats"]["unique_graphs"])
    assert sample(models, tmp_path / "compiled", *common, "--compile") == 0
    assert int(counters["stats"]["unique_graphs"]) > before  # the DiT and the decoder really ran compiled
    names = sorted(p.name for p in (tmp_path / "eager").glob("0*.png"))
    assert names == sorted(p.name for p in (tmp_path / "compiled").glob("0*.png")) and len(names) == 3
    for name in names:
        eager = np.asarray(Image.open(tmp_path / "eager" / name), dtype=np.int16)
        compiled = np.asarray(Image.open(tmp_path / "compiled" / name), dtype=np.int16)
        assert np.abs(eager - compiled).max() <= 1, name
    assert json.loads((tmp_path / "compiled" / "settings.json").read_text())["compile"] is True
    assert "compile" not in json.loads((tmp_path / "eager" / "settings.json").read_text())
    assert json.loads((tmp_path / "compiled" / "sampling.json").read_text())["compile"] is True
    capsys.readouterr()
    assert sample(models, tmp_path / "compiled", *common) == 2
    assert "compile=True" in capsys.readouterr().err


def test_identical_rerun_resumes_even_from_copied_model_folders(models, tmp_path, capsys):
    import shutil

    out = _stale_folder(models, tmp_path, capsys)
    pngs = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("0*.png")}
    assert sample(models, out, "--num", "4", "--decode-steps", "3", "--per-process-batch-size", "3") == 0  # batch size: no setting
    assert "0 new on this rank, 4 already there" in capsys.readouterr().out
    elsewhere = tmp_path / "copied"
    for name in ("dit", "eps"):
        shutil.copytree(models / name, elsewhere / name)
    assert sample(elsewhere, out, "--num", "4", "--decode-steps", "3") == 0  # other paths, same fingerprints
    assert "0 new on this rank, 4 already there" in capsys.readouterr().out
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("0*.png")} == pngs


def test_other_weights_or_plan_refuse_and_vae_ignores_decode_steps(models, tmp_path, capsys):
    out = _stale_folder(models, tmp_path, capsys)
    assert sample(models, out, "--num", "4", "--decode-steps", "3", "--seed", "9") == 2
    assert "seeds_sha256=" in capsys.readouterr().err
    assert sample(models, out, "--num", "4", "--decode-steps", "3", tokenizer="eps-f8", generator="dit-f8") == 2
    err = capsys.readouterr().err
    assert "generator_weights_sha256=" in err and "tokenizer_weights_sha256=" in err
    vae_out = tmp_path / "vae"
    assert sample(models, vae_out, "--num", "2", "--decode-steps", "3", tokenizer="vae") == 0
    assert json.loads((vae_out / "settings.json").read_text())["decode_steps"] is None
    assert sample(models, vae_out, "--num", "2", "--decode-steps", "1", tokenizer="vae") == 0
    assert "0 new on this rank, 2 already there" in capsys.readouterr().out


def test_old_samples_without_settings_refuse_unless_overwrite(models, tmp_path, capsys):
    out = _stale_folder(models, tmp_path, capsys)
    (out / "settings.json").unlink()  # as an older version of the tool left it
    before = _snapshot(out)
    assert sample(models, out, "--num", "4", "--decode-steps", "3") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no settings.json" in err and "--overwrite" in err, err
    assert _snapshot(out) == before
    assert sample(models, out, "--num", "4", "--decode-steps", "3", "--overwrite") == 0
    assert "4 new on this rank, 0 already there" in capsys.readouterr().out
    assert (out / "settings.json").is_file()
