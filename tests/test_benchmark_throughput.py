"""`scripts/benchmark.py throughput --quick`: every component timed, JSON + markdown written, sizes checked."""
import importlib.util
import json
import statistics
from pathlib import Path

import pytest
import torch

from pipelines.experiments.throughput import ThroughputConfig, build_tokenizers, count_flops, speedups
from _cli import run_main
from tokenizer.nn import count_parameters

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"


def load_script():
    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_throughput_writes_json_and_markdown_with_every_component(tmp_path):
    out = tmp_path / "bench"
    code = run_main(load_script().main, ["throughput", "--quick", "--precision", "fp32", "bf16", "--timed-steps", "1",
                                         "--threads", "1", "--output-dir", str(out)])
    assert code == 0
    report = json.loads((out / "throughput.json").read_text())
    rows = {(r["compression"], r["tokenizer"], r["precision"]): r for r in report["rows"]}
    assert set(rows) == {(c, k, p) for c in ("8x", "16x") for k in ("eps-vae", "vae") for p in ("fp32", "bf16")}
    for (compression, kind, _), row in rows.items():
        assert row["dit_step_s"] > 0 and row["encode_s"] > 0 and row["dit_gflop_per_forward"] > 0
        assert set(row["decode_s"]) == ({"1", "2", "3"} if kind == "eps-vae" else {"1"})
        assert all(v > 0 for v in row["decode_s"].values())
        assert row["downsample"] == int(compression[:-1]) and row["extrapolated_from_steps"] == 1
        # the composed figure is exactly what the docstring promises
        decode = row["decode_s"]["3" if kind == "eps-vae" else "1"]
        assert row["pipeline_s_per_batch"] == pytest.approx(250 * row["dit_step_s"] + decode)
        # the DiT's fraction is of the matmul timed right before and after its own forwards
        reference = sum(row["dit_matmul_gflops_before_after"]) / 2
        assert row["dit_matmul_fraction"] == pytest.approx(row["dit_gflop_per_forward"] / row["dit_step_s"] / reference)
    # 16× compression has a quarter of the tokens of 8×, so fewer DiT FLOPs per forward
    assert rows[("16x", "vae", "fp32")]["tokens"] * 4 == rows[("8x", "vae", "fp32")]["tokens"]
    assert rows[("16x", "vae", "fp32")]["dit_gflop_per_forward"] < rows[("8x", "vae", "fp32")]["dit_gflop_per_forward"]
    assert {(s["tokenizer"], s["precision"]) for s in report["speedups"]} == {
        (k, p) for k in ("eps-vae", "vae") for p in ("fp32", "bf16")}
    assert report["machine"]["matmul_gflops"]["fp32"] > 0
    table = (out / "throughput.md").read_text()
    assert "extrapolated from 1 timed steps" in table and "16× / 8×" in table and "before and after" in table
    assert table.count("| 8x") == 4 and table.count("| 16x") == 4
    assert_tables_are_rectangular(table)


def test_default_precision_is_auto_and_each_measurement_prints_as_it_is_taken(tmp_path, capsys, monkeypatch):
    """The default run times this device's fast precision only (fp32 on a CPU without native bf16) and prints a
    line per measurement before the tables; its settings land in config.yaml."""
    from pipelines.kit import precision

    monkeypatch.delenv(precision.ACCELERATE_ENV, raising=False)
    out = tmp_path / "bench"
    code = run_main(load_script().main, ["throughput", "--quick", "--timed-steps", "1", "--threads", "1",
                                         "--compression", "16x", "--output-dir", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    expected = precision.resolve_precision("auto", "cpu")
    lines = text.splitlines()
    table = next(i for i, line in enumerate(lines) if line.startswith("Throughput on"))
    progress = [line for line in lines[:table] if line.startswith("  16x")]
    assert len(progress) == 3 and all(f" {expected} " in line for line in progress)  # DiT, eps-vae, vae
    assert "matmul" in lines[1] and f"precisions ['{expected}'] (asked: ['auto'])" in lines[0]
    report = json.loads((out / "throughput.json").read_text())
    assert {r["precision"] for r in report["rows"]} == {expected}
    assert "precisions:\n- auto" in (out / "config.yaml").read_text()


def test_flop_counter_matches_a_hand_count():
    layer = torch.nn.Linear(64, 32)
    x = torch.randn(8, 64)
    assert count_flops(lambda: layer(x)) == 2 * 8 * 64 * 32


def test_full_size_models_are_the_papers():
    """Full sizes on the meta device: sd / sd-f16 encoders (8×, 16×), ε-VAE (M) decoder ≈ 49.33M (Table 7),
    and the baseline VAE decoder preset closest to it in size."""
    with torch.device("meta"):
        models = build_tokenizers(ThroughputConfig(), "16x")
        assert models["eps-vae"].downsample == 16 and models["vae"].downsample == 16
        eps_params = count_parameters(models["eps-vae"].decoder)
        vae_params = count_parameters(models["vae"].decoder)
        assert abs(eps_params / 1e6 - 49.33) < 1.0
        assert 0.5 < vae_params / eps_params < 2.0
        assert build_tokenizers(ThroughputConfig(tokenizers=("vae",)), "8x")["vae"].downsample == 8


def test_speedup_ratio():
    rows = [{"compression": c, "tokenizer": "vae", "precision": "fp32", "pipeline_images_per_s": v}
            for c, v in (("8x", 2.0), ("16x", 5.0))]
    assert speedups(rows) == [{"tokenizer": "vae", "precision": "fp32", "ratio_16x_over_8x": 2.5}]


@pytest.mark.parametrize("argv", [["throughput", "--precision", "fp64"], ["throughput", "--batch-size", "0"],
                                  ["nonsense"]])
def test_bad_arguments_exit_2(argv):
    with pytest.raises(SystemExit) as exit_:
        run_main(load_script().main, argv)
    assert exit_.value.code == 2


def test_quick_train_mode_times_every_step_eager_and_compiled_and_the_reader(tmp_path, capsys, monkeypatch):
    """`benchmark.py train --quick`: tokenizer (with and without the perceptual net) and DiT steps in both modes,
    FLOP/s against the same run's matmul rate, the shard reader's latents/s, JSON + markdown. The compiled rows go
    through the real in-place compile path with the `aot_eager` backend (no code generation: seconds)."""
    from pipelines.kit import compiling

    monkeypatch.setattr(compiling, "COMPILE_BACKEND", "aot_eager")
    out = tmp_path / "train"
    code = run_main(load_script().main, ["train", "--quick", "--timed-steps", "3", "--warmup-steps", "1",
                                         "--threads", "1", "--perceptual", "none", "--profiled-steps", "1",
                                         "--output-dir", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "train_throughput.json").read_text())
    rows = {(r["workload"], r["mode"]): r for r in report["rows"]}
    assert set(rows) == {(w, m) for w in ("tokenizer", "tokenizer+perceptual", "dit") for m in ("eager", "compiled")}
    assert report["machine"]["matmul_gflops"] > 0
    for (workload, mode), row in rows.items():
        assert row["step_s"] > 0 and row["gflop_per_step"] > 0
        # each timed step is paired with the matmul timed right before it; the row's figures are the medians
        rates, times, fractions = (row[key] for key in ("matmul_gflops_per_step", "step_s_per_step",
                                                        "matmul_fraction_per_step"))
        assert len(rates) == len(times) == len(fractions) == 3 and min(rates) > 0
        assert fractions == pytest.approx([row["gflop_per_step"] / t / r for t, r in zip(times, rates)])
        assert row["matmul_fraction"] == statistics.median(fractions)
        assert (row["step_s"], row["matmul_gflops"]) == (statistics.median(times), statistics.median(rates))
        assert (row["compile_s"] is not None) == (mode == "compiled")
        assert f"  {workload} {mode}:" in printed  # printed as it was measured
    # The DiT row counts the forward and the backward: 3× the forward's FLOPs (backward = 2 matmuls per matmul).
    from pipelines.experiments.throughput import QUICK_DIT, _training_dit

    dit, batch = _training_dit("DiT-S/2", 8, QUICK_DIT), rows[("dit", "eager")]["batch_size"]
    forward = count_flops(lambda: dit(torch.randn(batch, 4, 8, 8), torch.zeros(batch, dtype=torch.long),
                                      torch.zeros(batch, dtype=torch.long)))
    assert rows[("dit", "eager")]["gflop_per_step"] * 1e9 == pytest.approx(3 * forward, rel=0.05)
    assert set(report["compiled_over_eager"]) == {"tokenizer", "tokenizer+perceptual", "dit"}
    reader = report["reader"]
    assert [row["num_workers"] for row in reader["rows"]] == [0, 1]  # in the process, and through a worker
    assert all(row["latents_per_s"] > 0 and row["first_window_latents_per_s"] > 0 for row in reader["rows"])
    assert reader["checksum_us_per_latent"] > 0 and reader["latent_shape"] == [4, 8, 8]
    table = (out / "train_throughput.md").read_text()
    assert "| pairs' fractions | matmul GFLOP/s |" in table
    assert_tables_are_rectangular(table)
    assert "eager / compiled step time" in table and "latents/s" in table
    assert sum(line.startswith("| dit |") for line in table.splitlines()) == 3  # two rows and the ratio
    assert "| DataLoader workers |" in table and "\n| 1 | " in table
    assert (out / "config.yaml").is_file()
    # Each workload's eager step, profiled before the compiled row replaces its modules' forwards.
    profiles = report["profiles"]
    assert set(profiles) == {"tokenizer", "tokenizer+perceptual", "dit"}
    for name, profile in profiles.items():
        kinds = profile["kinds_ms_per_step"]
        assert sum(kinds.values()) == pytest.approx(profile["op_ms_per_step"])
        assert 0 < profile["op_ms_per_step"] <= 1.05 * profile["wall_ms_per_step"]
        assert printed.index(f"  {name} eager:") < printed.index(f"  {name} eager under the profiler") < \
            printed.index(f"  {name} compiled:")
    assert profiles["tokenizer"]["kinds_ms_per_step"]["convolution"] > 0
    assert profiles["dit"]["kinds_ms_per_step"]["matmul"] > 0
    assert "Where an eager step's time goes" in table and "\n| convolution | " in table


def assert_tables_are_rectangular(markdown: str) -> None:
    """Each markdown table's header, separator and rows have the same number of cells (else it renders broken)."""
    for block in markdown.split("\n\n"):
        cells = {line.count("|") for line in block.splitlines() if line.startswith("|")}
        assert len(cells) <= 1, block


def test_op_kinds_of_the_profile():
    from pipelines.experiments.throughput import op_kind

    assert [op_kind(f"aten::{name}") for name in ("convolution_backward", "mkldnn_convolution", "addmm",
                                                  "_scaled_dot_product_flash_attention_for_cpu_backward",
                                                  "native_group_norm_backward", "silu_backward", "_fused_adam_",
                                                  "_foreach_lerp_", "normal_", "copy_", "add_", "expand", "view")] == [
        "convolution", "convolution", "matmul", "attention", "normalization", "activation", "optimizer + EMA",
        "optimizer + EMA", "random numbers", "copies / layout / resampling", "elementwise + reductions", "other",
        "other"]


def test_train_mode_rejects_bad_settings():
    from pipelines.experiments.throughput import TrainThroughputConfig

    with pytest.raises(ValueError, match="modes"):
        TrainThroughputConfig(modes=("jit",))
    with pytest.raises(ValueError, match="profiled-steps"):
        TrainThroughputConfig(profiled_steps=-1)
    with pytest.raises(SystemExit) as exit_:
        run_main(load_script().main, ["train", "--modes", "jit"])
    assert exit_.value.code == 2
