"""msad eval --model ARTIFACT (checkpoint, ONNX, .pt2 through the Detector: the same detections and
metrics) and msad predict (annotated images, detections JSON, unreadable inputs reported)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from msad_deploy.cli import main
from msad_deploy.data.synth import generate_synthetic_coco
from msad_deploy.runtime import Detector, Result
from tests.runtime_fixtures import CATEGORY_IDS, assert_same_results, frame_images, sample_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runtime_data")
    generate_synthetic_coco(root, num_train=1, num_val=4, image_size=128, seed=3, progress=False)
    return root


def _records_by_image(path: Path) -> dict[int, Result]:
    """COCO result records -> one Result per image (xywh back to xyxy), for set comparison."""
    grouped: dict[int, list[dict]] = {}
    for record in json.loads(path.read_text()):
        grouped.setdefault(record["image_id"], []).append(record)
    out = {}
    for image_id, records in grouped.items():
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in records)], np.float32)
        scores = np.array([r["score"] for r in records], np.float32)
        labels = np.array([r["category_id"] for r in records], np.int64)
        out[image_id] = Result(boxes, scores, labels, (), labels, (0, 0))
    return out


def test_eval_runs_every_artifact_through_the_detector(runtime_artifacts, data, tmp_path, capsys) -> None:
    metrics, detections = {}, {}
    for key in ("checkpoint", "onnx", "pt2"):
        out, saved = tmp_path / f"{key}.json", tmp_path / f"{key}_detections.json"
        args = ["eval", "--model", str(runtime_artifacts[key]), "--data", str(data), "--no-progress"]
        assert main([*args, "--out", str(out), "--save-detections", str(saved), "--batch-size", "3"]) == 0
        metrics[key] = json.loads(out.read_text())
        detections[key] = _records_by_image(saved)
    printed = capsys.readouterr().out
    # the artifact takes its data settings (area ranges) from its source checkpoint, when that is at hand
    assert f"data settings: from {runtime_artifacts['checkpoint']}" in printed
    assert sum(len(r) for r in detections["checkpoint"].values()) > 0
    for key in ("onnx", "pt2"):
        assert metrics[key]["AP"] == pytest.approx(metrics["checkpoint"]["AP"], abs=0.1)
        assert metrics[key]["AR100"] == pytest.approx(metrics["checkpoint"]["AR100"], abs=0.1)
        assert detections[key].keys() == detections["checkpoint"].keys()
        for image_id, result in detections[key].items():  # records are rounded to 0.01 px / 1e-5
            assert_same_results(result, detections["checkpoint"][image_id], box_tol=0.011, score_tol=2e-5)


def _frames_dataset(root: Path) -> tuple[Path, Path]:
    """Three 200x256 images (the frames artifact's size) with two boxes each, the model's 8 categories."""
    images_dir = root / "frames"
    images_dir.mkdir()
    records, annotations = [], []
    for index, image in enumerate(frame_images(), start=1):
        Image.fromarray(image).save(images_dir / f"{index}.png")
        records.append({"id": index, "file_name": f"{index}.png", "height": 200, "width": 256})
        for k, box in enumerate(([20, 20, 80, 60], [120, 80, 100, 100])):
            annotations.append(
                {
                    "id": index * 10 + k,
                    "image_id": index,
                    "category_id": CATEGORY_IDS[k],
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": c, "name": f"c{c}"} for c in CATEGORY_IDS]
    ann_file = root / "frames.json"
    ann_file.write_text(json.dumps({"images": records, "annotations": annotations, "categories": categories}))
    return images_dir, ann_file


def test_eval_of_an_in_graph_preprocessing_artifact(runtime_artifacts, tmp_path) -> None:
    # The loader leaves the 200x256 images unresized for it (the graph takes 200x256 frames only) and
    # resizes them to 100x128 for the checkpoint: the same detections.
    images_dir, ann_file = _frames_dataset(tmp_path)
    found = {}
    for key in ("checkpoint", "frames_onnx"):
        saved = tmp_path / f"{key}.json"
        args = ["eval", "--model", str(runtime_artifacts[key]), "--images", str(images_dir)]
        args += ["--annotations", str(ann_file), "--save-detections", str(saved), "--no-progress"]
        assert main(args) == 0
        found[key] = _records_by_image(saved)
    assert found["frames_onnx"].keys() == found["checkpoint"].keys() == {1, 2, 3}
    for image_id, result in found["frames_onnx"].items():
        assert_same_results(result, found["checkpoint"][image_id], box_tol=0.011, score_tol=2e-5)


def test_eval_refuses_what_an_artifact_cannot_change(runtime_artifacts, data, capsys) -> None:
    onnx = str(runtime_artifacts["onnx"])
    base = ["eval", "--model", onnx, "--data", str(data), "--no-progress"]
    assert main([*base, "input.test_min_size=64"]) == 2
    assert "only data.* overrides apply" in capsys.readouterr().err
    assert main([*base, "--branch", "hr"]) == 2
    assert "--branch applies to teacher checkpoints" in capsys.readouterr().err
    assert main(["eval", "--model", str(Path(onnx).with_name("missing.onnx")), "--data", str(data)]) == 2
    assert "no such model file" in capsys.readouterr().err


def test_predict_writes_annotated_images_and_detections(runtime_checkpoint, tmp_path, capsys) -> None:
    images = sample_images(4, seed=7)
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    paths = [folder / "a.png", folder / "nested" / "b.jpg", folder / "c.png"]
    Image.fromarray(images[0]).save(paths[0])
    Image.fromarray(images[1]).save(paths[1], quality=95)
    Image.fromarray(images[2]).save(paths[2])
    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray(images[3]).save(other / "a.png")  # same name as photos/a.png
    (other / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    code = main(
        [
            "predict",
            str(runtime_checkpoint),
            str(folder),
            str(other / "*.png"),
            "--out",
            str(out),
            "--score-thresh",
            "0.55",
            "--batch",
            "2",
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert code == 1, "an unreadable input makes the exit code 1"
    captured = capsys.readouterr()
    assert "skipping" in captured.err and "broken.png" in captured.err
    report = json.loads((out / "detections.json").read_text())
    assert report["backend"] == "pytorch" and report["score_thresh"] == 0.55
    assert [Path(e["file"]).name for e in report["errors"]] == ["broken.png"]
    files = [Path(entry["file"]) for entry in report["images"]]
    assert files == [
        p.resolve() for p in (folder / "a.png", folder / "c.png", folder / "nested" / "b.jpg")
    ] + [(other / "a.png").resolve()]
    names = [entry["annotated"] for entry in report["images"]]
    assert len(set(names)) == 4 and names[0] == "a.png" and names[3] == "other_a.png"
    with Detector.load(runtime_checkpoint, device="cpu", score_thresh=0.55) as detector:
        for entry, source in zip(report["images"], files):
            expected = detector(source)
            assert len(entry["detections"]) == len(expected) > 0
            assert all(d["score"] >= 0.55 for d in entry["detections"])
            boxes = np.array([d["box"] for d in entry["detections"]], np.float32)
            assert np.abs(boxes - expected.boxes).max() <= 1e-4
            drawn = np.asarray(Image.open(out / entry["annotated"]))
            original = np.asarray(Image.open(source).convert("RGB"))
            assert drawn.shape == original.shape
            assert (drawn != original).any(axis=2).mean() > 0.01, "boxes are drawn on the image"
    assert "4 images" in captured.out


def test_predict_bad_arguments(runtime_checkpoint, tmp_path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", str(runtime_checkpoint), str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "holds no images" in capsys.readouterr().err
    assert (
        main(["predict", str(runtime_checkpoint), str(tmp_path / "*.jpg"), "--out", str(tmp_path / "o")]) == 2
    )
    assert "no file matches" in capsys.readouterr().err
    assert main(["predict", str(runtime_checkpoint), "missing.png", "--out", str(tmp_path / "o")]) == 2
    assert "no such file or folder: missing.png" in capsys.readouterr().err


def test_predict_max_pixels_and_no_empty_out_on_a_failed_load(runtime_checkpoint, tmp_path, capsys) -> None:
    image = tmp_path / "a.png"
    Image.fromarray(sample_images(1, seed=1)[0]).save(image)  # 96 x 128 = 12,288 pixels
    out = tmp_path / "out"
    assert main(["predict", str(tmp_path / "missing.pt"), str(image), "--out", str(out)]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert not out.exists(), "a failed load must not leave an empty output folder"
    assert (
        main(["predict", str(runtime_checkpoint), str(image), "--out", str(out), "--max-pixels", "-1"]) == 2
    )
    assert "--max-pixels must be >= 0 (0: no limit), got -1" in capsys.readouterr().err
    args = ["predict", str(runtime_checkpoint), str(image), "--out", str(out), "--no-progress", "--no-draw"]
    assert main([*args, "--max-pixels", "10000"]) == 1
    err = capsys.readouterr().err
    assert "12,288 pixels, over the limit of 10,000" in err and "--max-pixels" in err
    assert main([*args, "--max-pixels", "12288"]) == 0


def test_serve_option_errors_are_one_line(runtime_checkpoint, capsys) -> None:
    for option, value, message in [
        ("--max-images", "0", "--max-images must be >= 1, got 0"),
        ("--decode-workers", "0", "--decode-workers must be >= 1, got 0"),
        ("--max-pixels", "-5", "--max-pixels must be >= 0 (0: no limit), got -5"),
    ]:
        assert main(["serve", str(runtime_checkpoint), option, value]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--max-images" in text and "--decode-workers" in text and "follows the model" in text
