"""Nested trainer configs: sections round-trip through JSON, old flat checkpoints still load, flags keep names."""
import json

import pytest

from pipelines.kit.run import RunConfig
from pipelines.train_generator import GeneratorTrainConfig
from pipelines.train_tokenizer import TokenizerTrainConfig


@pytest.mark.parametrize("config_class", [TokenizerTrainConfig, GeneratorTrainConfig])
def test_nested_and_flat_dicts_give_the_same_config(config_class):
    config = config_class.from_flat(lr=3e-4, adam_betas=(0.5, 0.9), output_dir="x", max_steps=7)
    nested = json.loads(json.dumps(config.to_dict()))  # what a checkpoint's config.json holds
    assert set(nested) == {f for f in config_class.section_types()}
    assert config_class.from_dict(nested) == config
    assert config_class.from_dict(json.loads(json.dumps(config.to_flat()))) == config  # pre-sections checkpoints
    assert config_class.from_dict({**nested, "max_steps": 9}).optim.max_steps == 9  # sections + flat overrides
    assert config.optim.adam_betas == (0.5, 0.9) and isinstance(config.run, RunConfig)


def test_per_trainer_run_defaults_and_one_line_errors():
    assert TokenizerTrainConfig().run.output_dir == "runs/tokenizer" and TokenizerTrainConfig().run.log_every == 10
    assert GeneratorTrainConfig().run.output_dir == "runs/generator" and GeneratorTrainConfig().run.log_every == 100
    assert TokenizerTrainConfig().optim.adam_betas == (0.0, 0.999) and GeneratorTrainConfig().optim.grad_clip is None
    with pytest.raises(ValueError, match="unknown TokenizerTrainConfig field"):
        TokenizerTrainConfig.from_flat(shards="x")
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        GeneratorTrainConfig.from_flat(max_steps=0)
    with pytest.raises(ValueError, match="sample_steps 5 > diffusion_steps 4"):
        GeneratorTrainConfig.from_flat(sample_steps=5, diffusion_steps=4)


def test_cli_flags_reach_their_sections():
    import train_generator as script

    args = script.build_parser().parse_args(["--lr", "0.5", "--output-dir", "o", "--model", "DiT-S/2",
                                             "--sample-steps", "3", "--depth", "2"])
    config = script.training_config(GeneratorTrainConfig, args, script.MODEL_OVERRIDE_FLAGS)
    assert (config.optim.lr, config.run.output_dir, config.model.model, config.sample.sample_steps) == \
        (0.5, "o", "DiT-S/2", 3)
    assert config.model.model_overrides == {"depth": 2}
    assert "(default: runs/generator)" in script.build_parser().format_help()
