"""Backbones, ImageNet weight loading without downloads, checkpoints, and the cost split."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from msad_deploy.config import Config, ConfigError
from msad_deploy.models import (
    SUPPORTED_BACKBONES,
    build_backbone,
    build_model,
    load_model,
    model_cost,
    save_model_checkpoint,
)
from msad_deploy.models.backbones import imagenet_weights_path
from tests.conftest import tiny_model_config


@pytest.mark.parametrize("name", SUPPORTED_BACKBONES)
def test_backbones_return_c2_to_c5(name: str) -> None:
    backbone = build_backbone(name).eval()
    with torch.no_grad():
        features = backbone(torch.zeros(1, 3, 64, 96))
    assert sorted(features) == [2, 3, 4, 5]
    for level, feature in features.items():
        assert feature.shape[-2:] == (64 // 2**level, 96 // 2**level)
        assert feature.shape[1] == backbone.out_channels[level]


def test_frozen_bn_and_trainable_stages() -> None:
    backbone = build_backbone("resnet18", norm="frozen_bn", trainable_stages=2)
    assert any(isinstance(m, torchvision.ops.FrozenBatchNorm2d) for m in backbone.modules())
    trainable = [any(p.requires_grad for p in stage.parameters()) for stage in backbone.stages]
    assert trainable == [False, False, True, True]
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vgg16")
    with pytest.raises(ValueError, match="trainable_stages"):
        build_backbone("resnet18", trainable_stages=5)


def test_pretrained_without_cached_weights_says_how_to_get_them(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(
        FileNotFoundError, match=r"not in the local cache.*resnet18-f37072fd\.pth.*TORCH_HOME"
    ):
        build_backbone("resnet18", pretrained=True)


def test_pretrained_loads_cached_weights(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = torchvision.models.resnet18()
    path = Path(imagenet_weights_path("resnet18"))
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    backbone = build_backbone("resnet18", pretrained=True)
    torch.testing.assert_close(backbone.stages[0][0].weight, reference.conv1.weight)
    torch.testing.assert_close(backbone.stages[3][0][-1].conv2.weight, reference.layer4[-1].conv2.weight)


@pytest.mark.parametrize("arch,shift", [("fcos", 0), ("fcos", 1), ("msad_teacher", 1)])
def test_checkpoint_round_trip_with_weights_only(tmp_path: Path, arch: str, shift: int) -> None:
    config = Config(model=tiny_model_config(arch=arch, pyramid_shift=shift))
    model = build_model(config.model)
    path = tmp_path / "model.pt"
    save_model_checkpoint(
        path, model, config, class_names=["a", "b", "c", "d"], label_to_category_id=[1, 2, 5, 9]
    )
    payload = torch.load(path, weights_only=True)
    assert payload["label_to_category_id"] == [1, 2, 5, 9] and payload["arch"] == arch
    restored, _, restored_config, _ = load_model(path)
    assert restored_config == config
    for (name, a), (_, b) in zip(model.state_dict().items(), restored.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    assert not (tmp_path / "model.pt.tmp").exists()


def test_bad_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "none.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt is not a readable"):
        load_model(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="expected keys"):
        load_model(foreign)
    with pytest.raises(ConfigError, match="model.arch"):
        build_model(tiny_model_config(arch="yolo"))


def test_cost_split_reflects_the_pyramid_shift() -> None:
    hr = build_model(tiny_model_config())
    student = build_model(tiny_model_config(pyramid_shift=1))
    hr_cost = model_cost(hr, (256, 256))
    student_cost = model_cost(student, (128, 128))
    assert set(hr_cost.gflops) == {"backbone", "fpn", "head"}
    # A quarter of the pixels through the backbone...
    assert student_cost.gflops["backbone"] == pytest.approx(hr_cost.gflops["backbone"] / 4, rel=0.02)
    # ...but the head runs on maps as large as HR P3..P7, so its cost does not fall.
    assert student_cost.gflops["head"] == pytest.approx(hr_cost.gflops["head"], rel=1e-6)
    assert hr_cost.total_gflops == pytest.approx(sum(hr_cost.gflops.values()))
    teacher_cost = model_cost(build_model(tiny_model_config(arch="msad_teacher")), (256, 256))
    assert "fusion" in teacher_cost.gflops and teacher_cost.gflops["head"] == pytest.approx(
        3 * hr_cost.gflops["head"]
    )
