"""Generated data -> model -> detections JSON -> COCOeval, through the library and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from msad_deploy.cli import main
from msad_deploy.config import Config, InputConfig
from msad_deploy.data.synth import generate_synthetic_coco
from msad_deploy.evaluation.coco_eval import METRIC_NAMES, evaluate_detections
from msad_deploy.evaluation.evaluator import evaluate_model
from msad_deploy.models import build_model, save_model_checkpoint
from tests.conftest import tiny_model_config


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate_synthetic_coco(root, num_train=2, num_val=4, image_size=128, seed=3, progress=False)
    return root


def _config(**model) -> Config:
    return Config(
        model=tiny_model_config(num_classes=8, **model),
        input=InputConfig(train_min_sizes=[128], train_max_size=128, test_min_size=128, test_max_size=128),
    )


def _with_confident_classifier(model: torch.nn.Module) -> torch.nn.Module:
    """An untrained head scores ~0.01 everywhere; raise the prior so decoding has candidates."""
    torch.nn.init.constant_(model.head.cls_logits.bias, 0.0)
    return model


@pytest.mark.parametrize("arch,shift,branch", [("fcos", 1, "fused"), ("msad_teacher", 1, "lr")])
def test_detections_round_trip_through_json(
    synth_root: Path, tmp_path: Path, arch: str, shift: int, branch: str
) -> None:
    config = _config(arch=arch, pyramid_shift=shift)
    config.data.num_workers = 0
    model = _with_confident_classifier(build_model(config.model))
    metrics, records = evaluate_model(
        model,
        config,
        synth_root / "val",
        synth_root / "annotations" / "instances_val.json",
        batch_size=3,
        teacher_branch=branch,
        progress=False,
    )
    assert set(metrics) == set(METRIC_NAMES)
    assert records, "an untrained model with a neutral prior still produces detections"
    valid_ids = {1, 2, 3, 5, 7, 11, 13, 17}
    gt = json.loads((synth_root / "annotations" / "instances_val.json").read_text())
    sizes = {image["id"]: (image["width"], image["height"]) for image in gt["images"]}
    for record in records:
        assert record["category_id"] in valid_ids
        x, y, w, h = record["bbox"]
        width, height = sizes[record["image_id"]]
        assert x >= 0 and y >= 0 and x + w <= width + 0.01 and y + h <= height + 0.01
    assert max(sum(r["image_id"] == i for r in records) for i in sizes) <= config.postprocess.max_detections
    path = tmp_path / "detections.json"
    path.write_text(json.dumps(records))
    from_file = evaluate_detections(synth_root / "annotations" / "instances_val.json", path)
    for name in METRIC_NAMES:
        assert (math.isnan(metrics[name]) and math.isnan(from_file[name])) or metrics[name] == from_file[name]


def test_unreadable_val_image_in_skip_mode_is_left_out_as_verify_images_would(
    synth_root: Path, tmp_path: Path
) -> None:
    import shutil

    root = tmp_path / "damaged"
    shutil.copytree(synth_root, root)
    (root / "val" / "000002.png").write_bytes(b"")  # image id 3
    config = _config()
    config.data.num_workers = 1
    config.data.on_bad = "skip"
    model = _with_confident_classifier(build_model(config.model))
    ann_file = root / "annotations" / "instances_val.json"
    with pytest.warns(UserWarning, match=r"left out of the evaluation: .*000002\.png"):
        metrics, records = evaluate_model(model, config, root / "val", ann_file, batch_size=2, progress=False)
    assert records and 3 not in {r["image_id"] for r in records}
    config.data.verify_images = True
    with pytest.warns(UserWarning, match="unreadable_image"):
        verified, _ = evaluate_model(model, config, root / "val", ann_file, batch_size=2, progress=False)
    for name in METRIC_NAMES:
        assert (math.isnan(metrics[name]) and math.isnan(verified[name])) or metrics[name] == verified[name]


def test_cli_synth_eval_and_info(synth_root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "data"
    assert (
        main(
            [
                "data",
                "synth",
                "--out",
                str(out),
                "--train",
                "1",
                "--val",
                "2",
                "--size",
                "96",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (out / "annotations" / "instances_val.json").is_file()

    config = _config(pyramid_shift=1)
    checkpoint = tmp_path / "student.pt"
    save_model_checkpoint(checkpoint, _with_confident_classifier(build_model(config.model)), config)
    metrics_file = tmp_path / "metrics.json"
    detections_file = tmp_path / "dets.json"
    args = ["eval", "--model", str(checkpoint), "--data", str(synth_root), "--out", str(metrics_file)]
    args += [
        "--save-detections",
        str(detections_file),
        "--workers",
        "0",
        "--no-progress",
        "postprocess.max_detections=5",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "AP50" in printed and "metrics written" in printed
    assert "AP_ci95: 95 % percentile interval of AP over 1000 resamples of the 4 images (seed 0)" in printed
    metrics = json.loads(metrics_file.read_text())
    assert set(metrics) == {*METRIC_NAMES, "AP_ci95"}
    low, high = metrics["AP_ci95"]
    assert low <= metrics["AP"] <= high
    records = json.loads(detections_file.read_text())
    assert max(sum(r["image_id"] == i for r in records) for i in {r["image_id"] for r in records}) <= 5

    assert (
        main(
            [
                "eval",
                "--detections",
                str(detections_file),
                "--data",
                str(synth_root),
                "--out",
                str(tmp_path / "m2.json"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "m2.json").read_text()).keys() == metrics.keys()
    plain = ["eval", "--detections", str(detections_file), "--data", str(synth_root), "--bootstrap", "0"]
    assert main([*plain, "--out", str(tmp_path / "m3.json")]) == 0
    assert set(json.loads((tmp_path / "m3.json").read_text())) == set(METRIC_NAMES)
    capsys.readouterr()

    assert main(["info", "--model", str(checkpoint), "--json", "--input-size", "64", "64"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["pyramid_shift"] == 1 and report["model"]["input_size"] == [64, 64]
    assert set(report["model"]["gflops"]) == {"backbone", "fpn", "head"}
    assert "torch" in report["environment"]["backends"]


def test_cli_errors_are_one_line(tmp_path: Path, capsys) -> None:
    assert main(["eval", "--model", str(tmp_path / "missing.pt"), "--data", str(tmp_path)]) == 2
    assert "missing.pt does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--model", "x.pt"])  # no dataset given
