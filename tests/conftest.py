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


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a test module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    on 2 shared cores, OpenMP spinning on a busy second core costs 20x."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def runtime_checkpoint(tmp_path_factory):
    """A tiny MSAD student checkpoint (8 classes, test size 128) for runtime, predict and serve tests."""
    from tests.runtime_fixtures import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("runtime_checkpoint"))


@pytest.fixture(scope="session")
def runtime_artifacts(tmp_path_factory):
    """That checkpoint, its ONNX and .pt2 exports, and a 128x256 fixed ONNX (tests/runtime_fixtures.py).

    Session-scoped: the exports are the slow part (about a minute on 2 cores), made once for every module."""
    from tests.runtime_fixtures import build_artifacts

    return build_artifacts(tmp_path_factory.mktemp("runtime_artifacts"))
