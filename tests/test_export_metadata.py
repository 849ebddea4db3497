"""What every export shares: the sidecar's common fields (export/metadata.py), the traced example inputs,
and the documentation of the intermediate tensors verification reads."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import torch
from msad_deploy.export.metadata import base_metadata
from msad_deploy.export.onnx import _example_inputs
from msad_deploy.export.wrappers import ExportGraph

from msad_deploy.models import build_model, load_model
from msad_deploy.runtime.artifacts import FORMAT, FORMAT_VERSION, sha256_file
from tests.conftest import tiny_model_config
from tests.test_export_onnx import _checkpoint

REPO = Path(__file__).resolve().parent.parent


def test_base_metadata_holds_the_common_sidecar_fields(tmp_path: Path) -> None:
    checkpoint = _checkpoint(tmp_path / "student.pt", shift=1)
    spec = load_model(checkpoint).spec
    metadata = base_metadata("onnx", tmp_path / "out" / "student.onnx", spec, checkpoint)
    assert metadata["format"] == FORMAT and metadata["format_version"] == FORMAT_VERSION
    assert metadata["kind"] == "onnx" and metadata["artifact"] == "student.onnx"
    assert metadata["spec"] == spec.to_dict()
    assert metadata["source_checkpoint"] == str(checkpoint)
    assert metadata["source_sha256"] == sha256_file(checkpoint)
    assert metadata["versions"]["torch"] and "onnxruntime" in metadata["versions"]
    created = dt.datetime.fromisoformat(metadata["created"])
    assert created.utcoffset() == dt.timedelta(0)
    assert abs(dt.datetime.now(dt.timezone.utc) - created) < dt.timedelta(minutes=5)


def _graph(preprocess: bool = False) -> tuple[ExportGraph, object]:
    from msad_deploy.config import Config, InputConfig
    from msad_deploy.models.spec import InferenceSpec

    config = Config(
        model=tiny_model_config(num_classes=3, pyramid_shift=1),
        input=InputConfig(test_min_size=128, test_max_size=128),
    )
    spec = InferenceSpec.from_config(config)
    return ExportGraph(build_model(config.model).eval(), spec, "candidates", preprocess=preprocess), spec


def test_dynamic_exports_trace_at_batch_2_and_two_padding_steps() -> None:
    graph, spec = _graph()
    images, sizes = _example_inputs(graph, spec, (128, 128), 1, dynamic=True)
    assert images.shape == (2, 3, 128, 128) and sizes.shape == (2, 2)  # 256 x 256 HR frame, 1/2 input
    images, sizes = _example_inputs(graph, spec, (128, 256), 3)
    assert images.shape == (3, 3, 64, 128) and sizes.tolist() == [[128.0, 256.0]] * 3
    frames_graph, _ = _graph(preprocess=True)
    (frames,) = _example_inputs(frames_graph, spec, (200, 256), 1, dynamic=True)
    assert frames.shape == (2, 256, 256, 3) and frames.dtype == torch.uint8


def test_the_output_contract_documents_the_verification_only_tensors() -> None:
    graph, _ = _graph(preprocess=True)
    contract = {"cand_boxes", "cand_scores", "cand_labels", "scale"}  # consumed by the appended NMS
    intermediates = set(graph.output_names()) - contract
    assert intermediates == {"decoded_boxes", "decoded_scores", "network_input"}
    text = (REPO / "docs" / "EXPORT.md").read_text()
    section = text[text.index("## The output contract") : text.index("## NMS modes")]
    for name in sorted(intermediates):
        assert f"`{name}`" in section, f"docs/EXPORT.md's output contract does not mention {name}"
