"""msad export aoti: a .pt2 package that runs without the project's code and matches eager PyTorch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from msad_deploy.export.compare import match_detections
from msad_deploy.export.metadata import base_metadata

from msad_deploy.cli import main
from msad_deploy.models.postprocess import Detections
from msad_deploy.runtime.artifacts import read_sidecar
from msad_deploy.runtime.preprocess import inference_network, postprocess, preprocess
from tests.test_export_onnx import _checkpoint

RUNNER = """
import sys
sys.modules["msad_deploy"] = None  # the project's code must not be needed (nor importable)
import torch, torchvision  # torchvision registers the NMS op the package calls
run = torch._inductor.aoti_load_package(sys.argv[1])
inputs = torch.load(sys.argv[2])
torch.save(tuple(run(inputs["images"], inputs["image_sizes"])), sys.argv[3])
"""


def test_aoti_round_trip_on_cpu_without_project_code(tmp_path: Path) -> None:
    from msad_deploy.models import load_model

    checkpoint = _checkpoint(tmp_path / "student.pt", shift=1)
    package = tmp_path / "student.pt2"
    assert main(["export", "aoti", str(checkpoint), "--out", str(package), "--batch", "2"]) == 0
    metadata = read_sidecar(package)
    assert metadata["kind"] == "aoti" and metadata["verify"]["passed"]
    common = base_metadata("aoti", package, load_model(checkpoint).spec, checkpoint)
    assert {key: metadata[key] for key in common if key != "created"} == {
        key: value for key, value in common.items() if key != "created"
    }
    assert [o["name"] for o in metadata["outputs"]] == ["boxes", "scores", "labels", "num_detections"]

    loaded = load_model(checkpoint)
    images = [
        torch.randint(0, 256, (3, 128, 128), dtype=torch.uint8),
        torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8),
    ]
    batch = preprocess(images, loaded.spec)
    torch.save({"images": batch.inputs, "image_sizes": batch.image_sizes.float()}, tmp_path / "inputs.pt")
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, str(package), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    boxes, scores, labels, num = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        reference = postprocess(
            inference_network(loaded.model, loaded.spec)(batch.inputs), batch, loaded.spec
        )
    ratio = (batch.original_sizes / batch.image_sizes)[:, None, [1, 0, 1, 0]]
    match = match_detections(Detections(boxes * ratio, scores, labels, num), reference)
    assert match.passed, match.note
    assert num.sum() > 0


def test_aoti_bad_output_name(tmp_path: Path, capsys) -> None:
    checkpoint = _checkpoint(tmp_path / "student.pt", shift=1)
    assert main(["export", "aoti", str(checkpoint), "--out", str(tmp_path / "model.so")]) == 2
    assert "must end in .pt2" in capsys.readouterr().err
