"""`--compile` (torch.compile, in place) in both trainers: the same numbers as eager, checkpoints without the
`_orig_mod.` prefix that resume in an eager run, no recompilation per step, and a one-line refusal without a C++
compiler. Tiny models; inductor on the CPU (the first compile of each graph takes seconds)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelines.kit import compiling
from pipelines.kit.checkpoints import CheckpointManager
from pipelines.kit.logging import read_jsonl
from pipelines.train_generator import GeneratorTrainConfig, train_generator
from pipelines.train_tokenizer import TokenizerTrainConfig, train_tokenizer
from support import cache_tiny_latents, reset_accelerate

TINY_DIT = {"depth": 1, "hidden_size": 32, "num_heads": 2}
needs_compiler = pytest.mark.skipif(compiling.compile_unavailable_reason("cpu") is not None,
                                    reason="no C++ compiler for TorchInductor")


@pytest.fixture(autouse=True)
def _eager_rng_in_compiled_graphs():
    """Random ops inside a compiled graph (label dropout, posterior sampling) draw from the eager generator, so
    compiled and eager runs see the same noise and can be compared number for number."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fallback_random=True):
        yield
    reset_accelerate()


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory) -> Path:
    return cache_tiny_latents(tmp_path_factory, samples_per_shard=8)


def _generator_config(latent_dir: Path, output_dir: Path, **changes) -> GeneratorTrainConfig:
    values = dict(shards=str(latent_dir), output_dir=str(output_dir), model="DiT-S/2", model_overrides=TINY_DIT,
                  batch_size=4, num_workers=0, shuffle_buffer=8, max_steps=3, checkpoint_every=1, log_every=1,
                  sample_every=100, ema_decay=0.9, cpu=True, keep_last=10)
    values.update(changes)
    return GeneratorTrainConfig.from_flat(**values)


def _tokenizer_config(output_dir: Path, **changes) -> TokenizerTrainConfig:
    values = dict(output_dir=str(output_dir), encoder="tiny", decoder="tiny", discriminator="tiny", data="offline",
                  resolution=32, batch_size=4, num_workers=0, warmup_steps=2, max_steps=3, perceptual="none",
                  perceptual_weight=0.0, adversarial_weight=0.5, disc_start=1, r1_interval=2, checkpoint_every=1,
                  keep_last=10, log_every=1, image_every=1000, seed=3, cpu=True)
    values.update(changes)
    return TokenizerTrainConfig.from_flat(**values)


def _checkpoint(run: Path, step: int, name: str) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step_{step:09d}" / f"{name}.safetensors")


def _assert_same_weights(eager: dict, compiled: dict, what: str) -> None:
    assert compiled.keys() == eager.keys(), f"{what}: keys differ"
    assert not any("_orig_mod" in key for key in compiled), f"{what}: compiled keys carry _orig_mod."
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-5, msg=f"{what}.{key}")


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@needs_compiler
@pytest.mark.slow
def test_compiled_dit_training_matches_eager_and_resumes_eagerly(latent_dir, tmp_path):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    train_generator(_generator_config(latent_dir, eager, max_steps=4))
    reset_accelerate()
    before = _compiled_graphs()
    train_generator(_generator_config(latent_dir, compiled, max_steps=3, compile=True))
    reset_accelerate()
    assert _compiled_graphs() > before  # the DiT really ran compiled
    for name in ("model_dit", "ema_dit"):
        _assert_same_weights(_checkpoint(eager, 3, name), _checkpoint(compiled, 3, name), name)
    eager_losses = [r["loss"] for r in read_jsonl(eager / "metrics.jsonl")][:3]
    compiled_losses = [r["loss"] for r in read_jsonl(compiled / "metrics.jsonl")]
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    # The compiled run's checkpoint resumes in an eager run (same keys, `compile` may change on resume).
    resumed = train_generator(_generator_config(latent_dir, compiled, max_steps=4, resume="auto"))
    assert resumed.step == 4
    assert CheckpointManager(compiled / "checkpoints").resolve("auto").name == "step_000000004"


@needs_compiler
@pytest.mark.slow
def test_compiled_tokenizer_training_matches_eager_without_recompiling_every_step(tmp_path, monkeypatch):
    """Encoder, UNet decoder and discriminator compiled; adversarial and lazy-R1 steps included. Graphs are
    compiled in the first steps only: a run of 6 steps compiles no more graphs than a run of 3.

    Dynamo traces with the `aot_eager` backend here (the same graphs, no C++ code generation): inductor on three
    networks costs minutes of a 2-core CPU; the DiT test below runs the real inductor backend."""
    import pipelines.kit.compiling as compiling

    monkeypatch.setattr(compiling, "COMPILE_BACKEND", "aot_eager")
    eager, compiled, longer = tmp_path / "eager", tmp_path / "compiled", tmp_path / "longer"
    train_tokenizer(_tokenizer_config(eager))
    reset_accelerate()
    start = _compiled_graphs()
    train_tokenizer(_tokenizer_config(compiled, compile=True))
    reset_accelerate()
    three_steps = _compiled_graphs() - start
    for name in ("model_tokenizer", "model_discriminator", "ema_tokenizer"):
        _assert_same_weights(_checkpoint(eager, 3, name), _checkpoint(compiled, 3, name), name)
    start = _compiled_graphs()
    train_tokenizer(_tokenizer_config(longer, compile=True, max_steps=6))
    reset_accelerate()
    assert 0 < three_steps and _compiled_graphs() - start <= three_steps
    # ... and the compiled checkpoint resumes in an eager run.
    train_tokenizer(_tokenizer_config(compiled, max_steps=4, resume="auto"))
    assert CheckpointManager(compiled / "checkpoints").resolve("auto").name == "step_000000004"


@needs_compiler
@pytest.mark.slow
def test_same_shape_steps_do_not_recompile_and_a_partial_batch_recompiles_once():
    from generator.dit import DiT

    from pipelines.kit.compiling import compile_modules

    torch.manual_seed(0)
    dit = DiT.from_name("DiT-S/2", input_size=8, in_channels=4, num_classes=10, **TINY_DIT)
    compile_modules(dit, device="cpu")

    def step(batch: int) -> None:
        x, t, y = torch.randn(batch, 4, 8, 8), torch.randint(0, 1000, (batch,)), torch.randint(0, 10, (batch,))
        dit(x, t, y).square().mean().backward()

    step(4)
    first = _compiled_graphs()
    step(4)
    step(4)
    assert _compiled_graphs() == first  # same shape: cached
    step(3)  # a last partial batch: one recompile with a symbolic batch size ...
    after_partial = _compiled_graphs()
    step(2)
    step(4)
    assert _compiled_graphs() == after_partial  # ... which then serves every batch size
    assert not any("_orig_mod" in key for key in dit.state_dict())


def test_compile_without_a_cpp_compiler_refuses_in_one_line(monkeypatch, latent_dir, tmp_path):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(compiling.shutil, "which", lambda name: None)
    reason = compiling.compile_unavailable_reason("cpu")
    assert reason is not None and "\n" not in reason and "C++ compiler" in reason
    with pytest.raises(ValueError, match="C\\+\\+ compiler"):
        train_generator(_generator_config(latent_dir, tmp_path / "run", compile=True))
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
