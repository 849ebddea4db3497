"""YAML configs, key=value overrides and the errors users see."""

from __future__ import annotations

from pathlib import Path

import pytest

from msad_deploy.config import Config, ConfigError, config_to_dict, from_dict, load_config, save_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    if path.name.startswith("bench_"):  # msad bench matrices, not training configs
        from msad_deploy.benchmarks.matrix import BenchConfig, bench_config

        from msad_deploy.config import load_yaml_mapping

        assert isinstance(bench_config(load_yaml_mapping(path), str(path)), BenchConfig)
        return
    config = load_config(path)
    assert isinstance(config, Config)


def test_overrides_are_parsed_as_yaml_scalars() -> None:
    config = load_config(
        None,
        [
            "model.backbone=resnet34",
            "model.pyramid_shift=1",
            "input.train_min_sizes=[128, 160]",
            "loss.focal_alpha=1",
        ],
    )
    assert config.model.backbone == "resnet34"
    assert config.model.pyramid_shift == 1
    assert config.input.train_min_sizes == [128, 160]
    assert config.loss.focal_alpha == 1.0 and isinstance(config.loss.focal_alpha, float)


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    config = load_config(None, ["model.num_classes=6", "postprocess.nms_thresh=0.5"])
    save_config(config, tmp_path / "c.yaml")
    assert config_to_dict(load_config(tmp_path / "c.yaml")) == config_to_dict(config)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.backbon=resnet18"], "unknown key"),
        (["model.num_classes=six"], "model.num_classes: expected an integer"),
        (["model.pretrained=1"], "expected true/false"),
        (["input.train_min_sizes=5"], "expected a list"),
        (["model"], "key=value"),
        (["model=3"], "expected a mapping"),
    ],
)
def test_bad_overrides_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="broken.yaml is not valid YAML"):
        load_config(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(listing)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("model:\n  head_channels: wide\n")
    with pytest.raises(ConfigError, match=r"wrong.yaml.model.head_channels"):
        load_config(wrong)


def test_from_dict_keeps_defaults_for_missing_keys() -> None:
    config = from_dict(Config, {"model": {"num_classes": 3}})
    assert config.model.num_classes == 3 and config.model.fpn_channels == 256
