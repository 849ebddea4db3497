"""Shared fixtures: tiny model configs so model tests stay fast on 2 CPU cores."""

from __future__ import annotations

import pytest
import torch

from msad_deploy.config import ModelConfig


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny_model_config(**overrides) -> ModelConfig:
    """resnet18 with a 32-channel FPN and a 1-conv head: real structure, small cost."""
    values = dict(
        backbone="resnet18",
        num_classes=4,
        fpn_channels=32,
        head_channels=32,
        head_num_convs=1,
        head_norm_groups=8,
    )
    values.update(overrides)
    return ModelConfig(**values)


@pytest.fixture(autouse=True)
def _private_cache_dir(monkeypatch, tmp_path_factory) -> None:
    """Keep the image-verification cache of every test out of ~/.cache (and apart from other tests)."""
    monkeypatch.setenv("MSAD_CACHE_DIR", str(tmp_path_factory.mktemp("msad_cache")))
