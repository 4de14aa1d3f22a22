"""Tokenizer benchmark studies: run construction (what varies and what is shared), the pure helpers against
independent references, a micro-profile smoke run of every study, and reuse of finished runs."""
import dataclasses
import json
import re

import pytest
import torch
from PIL import Image

from pipelines.experiments import tokenizer_studies as studies
from tokenizer import OBJECTIVES, VAE, EpsVAE, EpsVAEConfig, VAEConfig
from tokenizer.nn import count_parameters

MICRO = studies.PROFILES["micro"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Two torch threads on a CPU other jobs share run tiny convolutions several times slower than one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ------------------------------------------------------------------------------------------------- pure helpers
def test_saturating_nfe_takes_fewest_steps_within_tolerance():
    curve = {1: 40.0, 2: 21.0, 3: 20.4, 5: 20.0, 10: 20.2}
    assert studies.saturating_nfe(curve, 0.05) == 2  # 21.0 <= 20.0 * 1.05
    assert studies.saturating_nfe(curve, 0.025) == 3  # 21.0 > 20.5 >= 20.4
    assert studies.saturating_nfe(curve, 0.0) == 5
    assert studies.saturating_nfe({3: 7.0}) == 3
    with pytest.raises(ValueError):
        studies.saturating_nfe({})


def test_relative_improvement_is_table7_ratio():
    # Table 7, ε-VAE (B) vs VAE (B) at 128²: 11.15 → 6.24 is Δ 4.91, 44.0%.
    assert studies.relative_improvement(11.15, 6.24) == pytest.approx(0.440, abs=5e-4)
    assert studies.relative_improvement(2.0, 3.0) == pytest.approx(-0.5)


def test_balanced_indices_cover_every_class_of_a_class_ordered_split():
    indices = studies.balanced_indices(256, 8)  # 8 classes × 32 crops, 8 images
    assert len(indices) == 8 and sorted({i // 32 for i in indices}) == list(range(8))
    assert studies.balanced_indices(5, None) == list(range(5))
    assert studies.balanced_indices(5, 50) == list(range(5))


def test_time_cap_shares_the_remaining_budget():
    assert studies.time_cap_minutes(None, 0.0, 3, 3) is None
    assert studies.time_cap_minutes(12.0, 0.0, 4, 4) == pytest.approx(3.0)
    assert studies.time_cap_minutes(12.0, 60.0, 2, 4) == pytest.approx(5.5)  # a fast first run leaves time
    assert studies.time_cap_minutes(12.0, 12 * 60.0, 1, 4) == pytest.approx(0.25 * 3.0)  # floor, never zero


# ------------------------------------------------------------------------------------------------- run specs
def test_ladder_rows_add_one_change_each():
    rows = studies.ladder_settings()
    assert [row.key for row, _ in rows] == ["baseline", "a", "b", "c", "d", "e", "f", "g"]
    base = rows[0][1]
    assert base == {"parameterization": "epsilon", "time_sampling": "uniform", "gamma": 1.0,
                    "time_spacing": "uniform", "perceptual_weight": 0.0, "adversarial_weight": 0.0}
    expected_changes = {"a": {"parameterization"}, "b": {"time_sampling"}, "c": set(), "d": {"perceptual_weight"},
                        "e": {"adversarial_weight"}, "f": {"gamma"}, "g": {"time_spacing"}}
    for (_, before), (row, after) in zip(rows, rows[1:]):
        assert {k for k in after if after[k] != before[k]} == expected_changes[row.key]
    final = rows[-1][1]
    assert final == {"parameterization": "velocity", "time_sampling": "logit_normal", "gamma": 0.6,
                     "time_spacing": "reversed_log", "perceptual_weight": 0.5, "adversarial_weight": 0.5}
    assert studies.LADDER_BY_KEY["c"].skipped and "ADM" in studies.LADDER_BY_KEY["c"].skipped
    keys = [row.key for row, _ in rows]
    assert all(settings["gamma"] == 1.0 for _, settings in rows[:keys.index("f")])  # γ = 1 before (f)
    assert all(settings["time_spacing"] == "uniform" for _, settings in rows[:keys.index("g")])
    with pytest.raises(ValueError, match="unknown ladder rows"):
        studies.ladder_settings(("z",))


def test_ladder_runs_skip_c_and_share_f_with_g():
    runs = studies.ladder_runs(studies.PROFILES["quick"])
    assert [r.info["row"] for r in runs] == ["baseline", "a", "b", "d", "e", "f", "g"]
    keys = [r.training_key() for r in runs]
    assert keys[-1] == keys[-2] and len(set(keys)) == 6  # (g) only changes inference spacing
    assert {v.spacing for v in runs[-1].variants} == {"reversed_log"}
    assert {v.spacing for v in runs[-2].variants} == {"uniform"}
    assert [v.steps for v in runs[0].variants] == list(studies.PROFILES["quick"].ladder_nfes)
    assert runs[0].model_config["parameterization"] == "epsilon" and runs[0].perceptual_weight == 0


def _train_settings(spec, profile, tmp_path):
    config = studies._train_config(spec, profile, tmp_path / spec.name, "offline", None, None).to_flat()
    for varied in ("output_dir", "init_from", "model_type", "encoder", "decoder", "perceptual_weight",
                   "adversarial_weight"):
        config.pop(varied)
    return config


@pytest.mark.parametrize("profile_name", ["quick", "full", "micro"])
def test_runs_share_everything_but_the_studied_factor(profile_name, tmp_path):
    profile = studies.PROFILES[profile_name]
    for name, study in studies.STUDIES.items():
        runs = study.build_runs(profile)
        assert len({r.name for r in runs}) == len(runs), name
        assert len({json.dumps(_train_settings(r, profile, tmp_path), sort_keys=True) for r in runs}) == 1, name
        encoders = {json.dumps(r.model_config["encoder"], sort_keys=True) for r in runs}
        if name == "compression":
            assert len(encoders) == len(studies.compression_settings(profile))
            for r in runs:
                encoder = studies.EncoderConfig.from_dict(r.model_config["encoder"])
                assert (encoder.downsample, encoder.latent_channels) == \
                       (r.info["downsample"], r.info["latent_channels"])
        else:
            assert len(encoders) == 1, name  # the same encoder in every run
    gammas = studies.gamma_runs(profile)
    assert [r.model_config["gamma"] for r in gammas] == list(profile.gammas)
    stripped = {json.dumps({k: v for k, v in r.model_config.items() if k != "gamma"}, sort_keys=True) for r in gammas}
    assert len(stripped) == 1  # γ is the only difference


def test_profiles_match_the_brief():
    quick, full = studies.PROFILES["quick"], studies.PROFILES["full"]
    assert quick.resolution == 64 and quick.study_minutes == 20 and full.resolution == 128
    assert quick.gammas == (0.4, 0.6, 0.8, 1.0) and quick.sweep_steps == (1, 2, 3, 5, 10)
    assert quick.downsamples == (4, 8, 16) and quick.latent_channels == (4, 8, 16)
    assert full.encoder == studies.ENCODER_PRESETS["lite"] and len(full.width_groups) >= 2
    assert len(quick.width_groups) >= 2
    for profile in (quick, full):  # comparable decoder sizes inside each group (Table 7's groups: within 2.5×)
        for vae_width, eps_width in profile.width_groups:
            with torch.device("meta"):
                vae = VAE(VAEConfig.from_dict(studies.vae_config(profile, vae_width)))
                eps = EpsVAE(EpsVAEConfig.from_dict(studies.eps_config(profile, eps_width)))
            ratio = count_parameters(eps.decoder) / count_parameters(vae.decoder)
            assert 0.4 < ratio < 2.5, (vae_width, eps_width, ratio)


# ------------------------------------------------------------------------------------------------- evaluation
class _Identity(torch.nn.Module):
    """An oracle tokenizer whose reconstruction is the input: every distance must vanish."""

    objective = OBJECTIVES["reconstruction"]  # one deterministic pass, as the baseline VAE

    def encode(self, images, sample=False):
        return images

    def decode(self, z, steps=None, generator=None):
        return z


def test_evaluator_scores_a_perfect_reconstruction_as_perfect():
    evaluator = studies.StudyEvaluator(MICRO, "offline", torch.device("cpu"))
    (row,) = evaluator.evaluate(_Identity(), (studies.EvalVariant(MICRO.resolution, None, None),))
    assert row["num_images"] == MICRO.eval_images
    assert row["rfd"] == pytest.approx(0.0, abs=1e-6)
    assert row["perceptual"] == pytest.approx(0.0, abs=1e-6)
    assert row["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert row["psnr"] > 60 and row["decode_images_per_s"] > 0


# ------------------------------------------------------------------------------------------------- smoke runs
def _table_rows(markdown: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("|---")]


EXPECTED_SUMMARY = {"vae-vs-eps": "groups", "ladder": "rows", "steps": "rfd", "gamma": "rfd_by_gamma",
                    "compression": "latent_channels", "resolution": "rfd_by_resolution"}
EXPECTED_PLOTS = {"vae-vs-eps": "rfd_vs_params.png", "ladder": "rfd_vs_nfe.png", "steps": "rfd_vs_steps.png",
                  "gamma": "rfd_vs_gamma.png", "compression": "rfd_vs_compression.png",
                  "resolution": "rfd_vs_resolution.png"}


@pytest.mark.parametrize("study", list(studies.STUDIES))
def test_micro_study_writes_every_artifact(study, tmp_path):
    report = studies.run_study(study, "micro", tmp_path)
    out = tmp_path / study
    written = json.loads((out / "results.json").read_text())
    assert written["study"] == study and written["profile"] == "micro" and written["fd_label"] == "rFD-EffNetL0"
    assert EXPECTED_SUMMARY[study] in written["summary"]
    runs = studies.STUDIES[study].build_runs(MICRO)
    assert [r["name"] for r in written["runs"]] == [r.name for r in runs]
    for run, spec in zip(written["runs"], runs):
        assert (out / "runs" / spec.name / "result.json").is_file()
        assert run["decoder_params"] > 0 and run["training"]["images_per_s"] > 0
        assert run["training"]["steps"] == MICRO.train_steps
        assert len(run["evaluations"]) == len(spec.variants)
        for row in run["evaluations"]:
            assert {"rfd", "psnr", "ssim", "perceptual", "decode_images_per_s", "num_images"} <= set(row)
            assert row["rfd"] >= 0 and 0 < row["psnr"] < 100 and -1 <= row["ssim"] <= 1
            assert row["num_images"] == MICRO.eval_images
    markdown = (out / "results.md").read_text()
    detail = markdown.split("## All evaluations")[1]
    assert len(_table_rows(detail)) == 1 + sum(len(s.variants) for s in runs)  # header + one per evaluation
    assert "not FID" in markdown and f"({EXPECTED_PLOTS[study]})" in markdown
    with Image.open(out / EXPECTED_PLOTS[study]) as image:
        image.verify()
    assert report["runs"][0]["name"] == runs[0].name

    if study == "vae-vs-eps":
        (group,) = written["summary"]["groups"]
        assert group["relative_improvement"] == pytest.approx(
            (group["vae_rfd"] - group["eps_rfd"]) / group["vae_rfd"])
        # The groups table (header + VAE + ε-VAE) and the gap at each ε-VAE NFE (header + NFE 1 and 2).
        assert "Δ rFD (rel.)" in markdown and len(_table_rows(markdown.split("## All")[0])) == 3 + 3
    if study == "ladder":
        rows = written["summary"]["rows"]
        assert [r["row"] for r in rows] == ["baseline", "g"]
        for row in rows:
            curve = {int(k): v for k, v in row["rfd_by_nfe"].items()}
            assert row["nfe"] == studies.saturating_nfe(curve) and row["rfd"] == curve[row["nfe"]]
        assert "(c) DDPM UNet → ADM UNet" in markdown
    if study == "steps":
        assert set(written["summary"]["rfd"]) == {"uniform", "reversed_log"}
        steps_rows = [r for r in _table_rows(markdown.split("## All")[0]) if re.match(r"\| \d+ \|", r)]
        assert len(steps_rows) == len(MICRO.sweep_steps)
    if study == "resolution":
        for by_resolution in written["summary"]["rfd_by_resolution"].values():
            assert set(by_resolution) == {str(MICRO.resolution * m) for m in MICRO.resolution_multipliers}


def test_second_call_reuses_finished_runs(tmp_path, monkeypatch):
    first = studies.run_study("gamma", "micro", tmp_path)
    run_dir = tmp_path / "gamma" / "runs" / "gamma-0.6"
    stored = json.loads((run_dir / "result.json").read_text())

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished run was trained or evaluated again")

    import pipelines.train_tokenizer as stage1

    monkeypatch.setattr(stage1, "train_tokenizer", must_not_run)
    monkeypatch.setattr(studies.StudyEvaluator, "evaluate", must_not_run)
    again = studies.run_study("gamma", "micro", tmp_path)
    assert again["summary"] == first["summary"]
    assert json.loads((run_dir / "result.json").read_text()) == stored

    # A trained but unevaluated run is only evaluated: same model, same decode seeds, same numbers.
    (run_dir / "result.json").unlink()
    monkeypatch.undo()
    monkeypatch.setattr(stage1, "train_tokenizer", must_not_run)
    third = studies.run_study("gamma", "micro", tmp_path)
    for before, after in zip(stored["evaluations"], json.loads((run_dir / "result.json").read_text())["evaluations"]):
        for key in ("rfd", "psnr", "ssim", "perceptual"):
            assert after[key] == pytest.approx(before[key], rel=1e-5, abs=1e-6)
    assert third["summary"]["best_gamma"] == first["summary"]["best_gamma"]

    # Other settings in the same directory: refuse rather than mix results.
    changed = MICRO.with_training(max_steps=MICRO.train_steps + 1)
    with pytest.raises(ValueError, match="other settings"):
        studies.run_study("gamma", changed, tmp_path)


# ------------------------------------------------------------------------------------------------- CLI
def test_arguments_and_dispatch(monkeypatch):
    import benchmark  # scripts/benchmark.py (conftest puts scripts/ on sys.path)

    parser = benchmark.build_parser()
    args = parser.parse_args(["tokenizer", "--study", "ladder", "--profile", "micro", "--output-dir", "/tmp/x"])
    assert (args.study, args.profile, args.output_dir, args.data) == ("ladder", "micro", "/tmp/x", "offline")
    assert parser.parse_args(["tokenizer", "--study", "ladder", "--out", "/tmp/y"]).output_dir == "/tmp/y"  # old name
    with pytest.raises(SystemExit):
        parser.parse_args(["tokenizer", "--study", "nope"])
    calls = []
    monkeypatch.setattr(studies, "run_study", lambda name, profile, out, **kw: calls.append((name, profile)) or name)
    benchmark.main(["tokenizer", "--study", "all", "--profile", "micro"])
    assert [name for name, _ in calls] == list(studies.STUDIES)
    result = studies.run_studies("all", "micro")
    assert list(result) == list(studies.STUDIES)


def test_unknown_study_or_profile_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown study"):
        studies.run_study("nope", "micro", tmp_path)
    with pytest.raises(ValueError, match="unknown profile"):
        studies.run_study("gamma", "huge", tmp_path)


def test_profile_preconditioning_reaches_velocity_rows_only():
    quick = studies.PROFILES["quick"]
    ladder = {run.name: run.model_config for run in studies.ladder_runs(quick)}
    assert ladder["row-baseline"]["parameterization"] == "epsilon"
    assert ladder["row-baseline"]["preconditioning"] == "none"  # not defined for ε-prediction
    assert all(config["preconditioning"] == "skip" for name, config in ladder.items() if name != "row-baseline")
    full_eps = [run for run in studies.vae_vs_eps_runs(studies.PROFILES["full"]) if run.model_type == "eps_vae"]
    assert full_eps and all(run.model_config["preconditioning"] == "none" for run in full_eps)  # the paper


def test_settled_needs_less_than_the_tolerance_over_the_last_quarter():
    history = [{"step": s, "rfd": r} for s, r in ((250, 200.0), (500, 160.0), (750, 150.0), (1000, 146.0))]
    assert studies.settled(history, 0.05)  # 750 → 1000: 150 → 146 (2.7%)
    assert not studies.settled(history[:3], 0.05)  # fewer than four scores
    history[-1]["rfd"] = 140.0
    assert not studies.settled(history, 0.05)  # 150 → 140 (6.7%)


def test_min_steps_trains_past_a_settled_curve_and_train_steps_caps_it():
    history = [{"step": s, "rfd": r} for s, r in ((250, 200.0), (500, 160.0), (750, 150.0), (1000, 146.0))]
    long, equal = studies.PROFILES["long"], studies.PROFILES["long-equal"]
    assert not studies.keeps_training(history, long)  # settled at 1000
    assert studies.keeps_training(history, equal)  # settled, but equal-length runs go on to 3000
    assert studies.keeps_training(history[:2], long)  # not settled yet
    assert not studies.keeps_training([*history, {"step": 3000, "rfd": 300.0}], equal)  # the cap, settled or not
    assert equal.min_steps == equal.train_steps == 3000
    assert dataclasses.replace(equal.with_training(max_steps=4000), min_steps=0) == long


def test_convergence_profile_trains_in_segments_and_records_the_curve(tmp_path):
    profile = dataclasses.replace(MICRO.with_training(max_steps=3), convergence_every=1, convergence_tolerance=0.5)
    report = studies.run_study("vae-vs-eps", profile, tmp_path)
    for result in report["runs"]:
        history = result["training"]["history"]
        assert [h["step"] for h in history] == [1, 2, 3] and result["training"]["steps"] == 3
        assert all(h["rfd"] > 0 for h in history)
    assert (tmp_path / "vae-vs-eps" / "rfd_vs_steps.png").is_file()
    assert "settled" in (tmp_path / "vae-vs-eps" / "results.md").read_text()
