"""Config loading: YAML + key=value overrides, strict typed schemas, atomic saving, shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from swintormer.core.config import ConfigError, TrainingConfig, apply_overrides, load_config, save_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_are_typed(tmp_path):
    path = write(tmp_path, "batch_size: 2\noptimizer: {lr: 1.0e-3}\n")
    config = load_config(TrainingConfig, path, ["optimizer.lr=5e-4", "ema.decay=0.99", "mixed_precision=bf16",
                                                "optimizer.betas=[0.8, 0.9]", "grad_clip_norm=null"])
    assert config.batch_size == 2
    assert config.optimizer.lr == 5e-4 and isinstance(config.optimizer.lr, float)
    assert config.optimizer.betas == (0.8, 0.9)
    assert config.ema.decay == 0.99 and config.mixed_precision == "bf16" and config.grad_clip_norm is None
    assert config.optimizer.weight_decay == 1e-4  # untouched defaults stay


def test_unknown_key_is_an_error_naming_it(tmp_path):
    path = write(tmp_path, "optimizer: {lr: 1.0e-3, momentum: 0.9}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer\.momentum'"):
        load_config(TrainingConfig, path)
    with pytest.raises(ConfigError, match=r"unknown key 'ema\.decayy'"):
        load_config(TrainingConfig, None, ["ema.decayy=0.9"])


def test_wrong_type_is_an_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"key 'batch_size'.*'many'"):
        load_config(TrainingConfig, write(tmp_path, "batch_size: many\n"))
    with pytest.raises(ConfigError, match=r"key 'mixed_precision'"):
        load_config(TrainingConfig, None, ["mixed_precision=fp8"])
    with pytest.raises(ConfigError, match=r"scheduler.*same length"):
        load_config(TrainingConfig, None, ["scheduler.periods=[10, 20]", "scheduler.restart_weights=[1.0]"])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(TrainingConfig, None, ["batch_size"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"batch_size": 2}, ["batch_size.inner=3"])
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(TrainingConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(TrainingConfig, write(tmp_path, "- 1\n- 2\n"))


def test_save_config_round_trips_and_leaves_no_temporary(tmp_path):
    config = load_config(TrainingConfig, None, ["batch_size=3", "optimizer.betas=[0.9, 0.95]"])
    save_config(config, tmp_path / "run" / "config.yaml")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.yaml"]
    again = load_config(TrainingConfig, tmp_path / "run" / "config.yaml")
    assert again == config


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs" / "swintormer").glob("*.yaml")))
def test_shipped_swintormer_configs_validate(name):
    from pipelines.train_swintormer import SwintormerTrainConfig

    config = load_config(SwintormerTrainConfig, REPO / "configs" / "swintormer" / name)
    raw = yaml.safe_load((REPO / "configs" / "swintormer" / name).read_text())
    assert config.train.max_steps == raw["train"]["max_steps"]


def test_dpdd_config_is_the_papers_setting():
    from pipelines.train_swintormer import SwintormerTrainConfig

    config = load_config(SwintormerTrainConfig, REPO / "configs/swintormer/dpdd_paper.yaml")
    opt = config.train.optimizer
    assert (opt.name, opt.lr, opt.betas, opt.weight_decay) == ("adamw", 3e-4, (0.9, 0.99), 1e-4)
    assert config.train.scheduler.name == "cosine_restarts" and config.train.ema.decay == 0.999
    assert config.train.grad_clip_norm is not None and config.data.patch_size == 256
    assert config.loss.l1 == 1.0 and config.loss.vgg is None and config.loss.mae is None
    assert config.model.preset == "paper" and config.model.in_channels == 6
