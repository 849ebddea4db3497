"""Backbones, ImageNet weights (cache, download, offline error; no network), checkpoints, cost split."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from msad_deploy.config import Config, ConfigError
from msad_deploy.errors import describe_error
from msad_deploy.models import (
    SUPPORTED_BACKBONES,
    build_backbone,
    build_model,
    load_model,
    model_cost,
    save_model_checkpoint,
)
from msad_deploy.models.backbones import WeightsDownloadError, imagenet_weights_path
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


def _no_network(*args, **kwargs):
    raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))


def test_pretrained_offline_fails_with_one_line_naming_url_and_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    path = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert imagenet_weights_path("resnet18") == str(path)
    with pytest.raises(WeightsDownloadError) as caught:
        build_backbone("resnet18", pretrained=True)
    line = describe_error(caught.value)
    assert isinstance(caught.value, OSError) and "\n" not in line
    assert url in line and str(path) in line and "Temporary failure in name resolution" in line
    assert "model.pretrained=false" in line and "urlopen" not in line
    assert not path.exists()


def test_pretrained_downloads_into_the_torch_hub_cache_with_hash_check(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = torchvision.models.resnet18()
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        torch.save(reference.state_dict(), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    backbone = build_backbone("resnet18", pretrained=True)
    assert calls == [(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url, "f37072fd")]
    assert Path(imagenet_weights_path("resnet18")).is_file()
    torch.testing.assert_close(backbone.stages[0][0].weight, reference.conv1.weight)


@pytest.mark.parametrize("norm", ["bn", "frozen_bn"])
def test_pretrained_loads_cached_weights(tmp_path: Path, monkeypatch, norm: str) -> None:
    """A cached file is read as is: torch.hub checks the name's sha256 prefix only when downloading."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    reference = torchvision.models.resnet18()
    with torch.no_grad():  # non-default BN statistics, so loading them is visible
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    path = Path(imagenet_weights_path("resnet18"))
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    backbone = build_backbone("resnet18", pretrained=True, norm=norm, trainable_stages=3)
    norm_type = torchvision.ops.FrozenBatchNorm2d if norm == "frozen_bn" else torch.nn.BatchNorm2d
    assert isinstance(backbone.stages[0][1], norm_type)
    torch.testing.assert_close(backbone.stages[0][0].weight, reference.conv1.weight)
    torch.testing.assert_close(backbone.stages[0][1].running_mean, reference.bn1.running_mean)
    torch.testing.assert_close(backbone.stages[3][0][-1].conv2.weight, reference.layer4[-1].conv2.weight)
    torch.testing.assert_close(
        backbone.stages[3][0][-1].bn2.running_var, reference.layer4[-1].bn2.running_var
    )
    trainable = [any(p.requires_grad for p in stage.parameters()) for stage in backbone.stages]
    assert trainable == [False, True, True, True]


def test_pretrained_unreadable_cache_says_delete_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = Path(imagenet_weights_path("resnet18"))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"truncated")
    with pytest.raises(ValueError, match=r"resnet18-f37072fd\.pth for resnet18 are not readable.*delete"):
        build_backbone("resnet18", pretrained=True)


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


@pytest.mark.parametrize("norm", ["bn", "bn_per_level"])
def test_a_batchnorm_head_folds_into_its_convolutions_at_export(tmp_path: Path, norm: str) -> None:
    """head_norm="bn": the tower's BatchNorm (statistics shared across levels) leaves no normalisation
    node in the graph ``msad export onnx`` writes (folded into the convolutions), and that graph gives
    the checkpoint's detections."""
    import numpy as np
    import onnx
    from msad_deploy.export.onnx import OnnxExportOptions, export_onnx

    from msad_deploy.models.head import FCOSHead
    from msad_deploy.runtime import Detector
    from tests.runtime_fixtures import assert_same_results

    with pytest.raises(ValueError, match="unknown head norm 'ln'"):
        FCOSHead(32, 4, channels=32, num_convs=1, norm="ln")
    config = Config(model=tiny_model_config(head_norm=norm, pyramid_shift=1))
    config.input.test_min_size = config.input.test_max_size = 64
    model = build_model(config.model).eval()
    norms = [m for m in model.head.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == (2 if norm == "bn" else 2 * 5)  # one per tower (and level)
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in model.head.modules())
    for norm in norms:  # statistics a trained head would have
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
    checkpoint = tmp_path / "bn_head.pt"
    save_model_checkpoint(
        checkpoint, model, config, class_names=list("abcd"), label_to_category_id=[1, 2, 3, 4]
    )
    exported = tmp_path / "bn_head.onnx"
    export_onnx(checkpoint, exported, OnnxExportOptions(dynamic=True))
    ops = {node.op_type for node in onnx.load(exported).graph.node}
    assert "BatchNormalization" not in ops and "InstanceNormalization" not in ops, sorted(ops)
    image = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    with (
        Detector.load(checkpoint, device="cpu") as eager,
        Detector.load(exported, device="cpu") as onnx_detector,
    ):
        assert_same_results(onnx_detector(image), eager(image), box_tol=0.01)
