"""One dynamic artifact at any input resolution: ``Detector.load(..., test_size=S)`` (and ``--test-size`` on
msad predict / eval / serve) for checkpoints and dynamic exports; fixed-size exports refuse a size they
were not made for, at load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from msad_deploy.cli import main
from msad_deploy.data.synth import generate_synthetic_coco
from msad_deploy.models.spec import InferenceSpec
from msad_deploy.runtime import Detector
from tests.runtime_fixtures import assert_same_results, sample_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dynamic_onnx(runtime_checkpoint, tmp_path_factory) -> Path:
    from msad_deploy.export.onnx import OnnxExportOptions, export_onnx

    out = tmp_path_factory.mktemp("test_size") / "dynamic.onnx"
    export_onnx(runtime_checkpoint, out, OnnxExportOptions(dynamic=True))
    return out


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return sample_images(6, seed=11)


def _same(ours, reference) -> bool:
    try:
        assert_same_results(ours, reference, box_tol=0.01)
    except AssertionError:
        return False
    return True


def test_the_test_size_keeps_the_aspect_bound() -> None:
    spec = InferenceSpec(arch="fcos", num_classes=2, test_min_size=800, test_max_size=1333)
    smaller = spec.at_input(640)
    assert (smaller.test_min_size, smaller.test_max_size) == (640, 1066)
    assert spec.at_input(800) == spec and spec.at_input(1600).test_max_size == 2666
    for bad in (0, -8, 1.5, "640", True):
        with pytest.raises(ValueError, match="test_size must be a positive integer"):
            spec.at_input(bad)
    padded = spec.at_input(size_divisibility=32)
    assert padded.size_divisibility == 32 and padded.test_min_size == 800
    student = spec.replace(input_shift=1)
    with pytest.raises(ValueError, match="multiple of 2"):
        student.at_input(size_divisibility=33)


def test_checkpoint_and_dynamic_onnx_agree_at_another_test_size(
    runtime_checkpoint, dynamic_onnx, images
) -> None:
    with (
        Detector.load(runtime_checkpoint, device="cpu", test_size=96) as checkpoint,
        Detector.load(dynamic_onnx, device="cpu", test_size=96) as onnx,
        Detector.load(dynamic_onnx, device="cpu") as onnx_128,
    ):
        assert checkpoint.info()["test_size"] == onnx.info()["test_size"] == [96, 96]
        assert onnx_128.info()["test_size"] == [128, 128]
        assert (onnx.spec.test_min_size, onnx.backend.spec.test_min_size) == (96, 96)
        at_96, onnx_96, at_128 = checkpoint(images), onnx(images), onnx_128(images)
    assert sum(len(r) for r in at_96) > 0
    for ours, reference in zip(onnx_96, at_96):
        assert_same_results(ours, reference, box_tol=0.01)
    differ = sum(not _same(a, b) for a, b in zip(at_96, at_128))
    assert differ == len(images), f"only {differ} of {len(images)} images changed with the test size"


def test_a_checkpoint_at_a_test_size_equals_the_config_override(runtime_checkpoint, images) -> None:
    overrides = ["input.test_min_size=96", "input.test_max_size=96"]
    with (
        Detector.load(runtime_checkpoint, device="cpu", test_size=96) as sized,
        Detector.load(runtime_checkpoint, device="cpu", overrides=overrides) as overridden,
    ):
        assert sized.spec == overridden.spec
        assert (sized.config.input.test_min_size, sized.config.input.test_max_size) == (96, 96)
        for ours, reference in zip(sized(images), overridden(images)):
            assert_same_results(ours, reference, box_tol=1e-4, score_tol=1e-6)


def test_fixed_size_artifacts_take_only_the_size_they_were_exported_for(runtime_artifacts, images) -> None:
    # student.onnx is fixed 128x128 (test size 128, padded to 128): 96 also pads to 128, so it runs ...
    with (
        Detector.load(runtime_artifacts["onnx"], device="cpu", test_size=96) as fixed,
        Detector.load(runtime_artifacts["checkpoint"], device="cpu", test_size=96) as checkpoint,
    ):
        for ours, reference in zip(fixed(images), checkpoint(images)):
            assert_same_results(ours, reference, box_tol=0.01)
    # ... while 200 needs 256x256 inputs
    for key in ("onnx", "pt2"):
        with pytest.raises(ValueError) as error:
            Detector.load(runtime_artifacts[key], device="cpu", test_size=200)
        message = str(error.value)
        assert runtime_artifacts[key].name in message and "128x128" in message, message
        assert "256x256" in message and "--dynamic" in message, message
    with pytest.raises(ValueError, match="resizes and pads frames inside its graph"):
        Detector.load(runtime_artifacts["frames_onnx"], device="cpu", test_size=96)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("test_size_data")
    generate_synthetic_coco(root, num_train=1, num_val=3, image_size=128, seed=3, progress=False)
    return root


def test_test_size_on_the_command_line(runtime_checkpoint, dynamic_onnx, data, tmp_path, monkeypatch) -> None:
    # msad eval --model: the dynamic ONNX at --test-size 96 scores the checkpoint's overridden config
    saved = {}
    for key, args in (
        ("onnx", [str(dynamic_onnx), "--test-size", "96"]),
        ("checkpoint", [str(runtime_checkpoint), "input.test_min_size=96", "input.test_max_size=96"]),
    ):
        saved[key] = tmp_path / f"{key}.json"
        command = ["eval", "--model", *args, "--data", str(data), "--no-progress", "--device", "cpu"]
        assert main([*command, "--save-detections", str(saved[key])]) == 0
    onnx, checkpoint = (json.loads(saved[k].read_text()) for k in ("onnx", "checkpoint"))
    assert len(onnx) == len(checkpoint) > 0
    for a, b in zip(
        sorted(onnx, key=lambda r: (r["image_id"], -r["score"])),
        sorted(checkpoint, key=lambda r: (r["image_id"], -r["score"])),
    ):
        assert a["category_id"] == b["category_id"] and np.allclose(a["bbox"], b["bbox"], atol=0.011)
    assert main(["eval", "--detections", str(saved["onnx"]), "--data", str(data), "--test-size", "96"]) == 2

    # msad predict --test-size
    folder = tmp_path / "photos"
    folder.mkdir()
    from PIL import Image

    Image.fromarray(sample_images(1, seed=5)[0]).save(folder / "a.png")
    out = tmp_path / "out"
    assert (
        main(
            [
                "predict",
                str(dynamic_onnx),
                str(folder),
                "--out",
                str(out),
                "--test-size",
                "96",
                "--no-progress",
                "--no-draw",
            ]
        )
        == 0
    )
    report = json.loads((out / "detections.json").read_text())
    assert report["test_size"] == [96, 96]
    with Detector.load(runtime_checkpoint, device="cpu", test_size=96) as detector:
        expected = detector(folder / "a.png")
    assert len(report["images"][0]["detections"]) == len(expected) > 0

    # msad serve --test-size reaches the Detector
    import msad_deploy.runtime.serving as server

    seen = {}
    monkeypatch.setattr(server, "serve", lambda *args, **kwargs: seen.update(kwargs))
    assert main(["serve", str(dynamic_onnx), "--test-size", "96"]) == 0
    assert seen["test_size"] == 96


def test_a_per_call_test_size_equals_a_detector_loaded_at_it(
    runtime_checkpoint, dynamic_onnx, images
) -> None:
    """detect_tensors(test_size=S) (adaptive serving's operating points) gives what a Detector loaded at S
    gives, and leaves the Detector at its own size."""
    for artifact in (runtime_checkpoint, dynamic_onnx):
        with (
            Detector.load(artifact, device="cpu", test_size=128) as adaptive,
            Detector.load(artifact, device="cpu", test_size=96) as at_96,
        ):
            tensors = [adaptive.to_tensor(image) for image in images]
            for ours, reference in zip(adaptive.detect_tensors(tensors, test_size=96), at_96(images)):
                assert_same_results(ours, reference, box_tol=1e-3, score_tol=1e-5)
            assert adaptive.spec.test_min_size == 128 and adaptive.spec_at(96).test_min_size == 96
            for ours, reference in zip(adaptive.detect_tensors(tensors), adaptive(images)):
                assert_same_results(ours, reference, box_tol=1e-4, score_tol=1e-6)


def test_a_per_call_test_size_an_artifact_cannot_run_is_refused(runtime_artifacts, images) -> None:
    with Detector.load(runtime_artifacts["onnx"], device="cpu") as fixed:
        tensors = [fixed.to_tensor(images[0])]
        with pytest.raises(ValueError, match="fixed 128x128 inputs.*--dynamic"):
            fixed.detect_tensors(tensors, test_size=200)
        assert len(fixed.detect_tensors(tensors)) == 1  # still working
