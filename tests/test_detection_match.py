"""Detections compared as sets (export/compare.py), the rule of ONNX verification and of the AOTInductor
export's check: hand-built detections, then the AOTInductor check wired to it (no compilation)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from msad_deploy.export.compare import match_detections, threshold_borderline

from msad_deploy.models.head import FCOSOutputs
from msad_deploy.models.postprocess import Detections
from msad_deploy.models.spec import InferenceSpec


def _detections(*images: list[tuple[list[float], float, int]], k: int = 4) -> Detections:
    """Padded Detections from per-image rows (box, score, label)."""
    batch = len(images)
    boxes, scores = torch.zeros(batch, k, 4), torch.zeros(batch, k)
    labels, num = torch.full((batch, k), -1, dtype=torch.int64), torch.zeros(batch, dtype=torch.int64)
    for i, rows in enumerate(images):
        for j, (box, score, label) in enumerate(rows):
            boxes[i, j], scores[i, j], labels[i, j] = torch.tensor(box), score, label
        num[i] = len(rows)
    return Detections(boxes, scores, labels, num)


A = ([10.0, 10.0, 50.0, 60.0], 0.61, 2)
B = ([30.0, 5.0, 70.0, 40.0], 0.40, 5)
C = ([0.0, 20.0, 20.0, 90.0], 0.25, 1)


def _with(row, box=None, score=None, label=None):
    return (box or row[0], row[1] if score is None else score, row[2] if label is None else label)


def test_equal_detections_match() -> None:
    match = match_detections(_detections([A, B, C], [B]), _detections([A, B, C], [B]))
    assert match.passed and match.matched == 4 and match.max_box_error == 0.0, match


def test_a_swap_of_near_tied_scores_passes() -> None:
    # eager: A 0.40000 before B 0.39998; the compiled code scores them 0.39998 / 0.40000: rows swap
    reference = _detections([_with(A, score=0.40000), _with(B, score=0.39998), C])
    ours = _detections([_with(B, score=0.40000, box=[30.004, 5.0, 70.0, 40.0]), _with(A, score=0.39998), C])
    match = match_detections(ours, reference)
    assert match.passed, match.note
    assert match.matched == 3 and math.isclose(match.max_box_error, 0.004, abs_tol=1e-5)
    assert match.max_score_error == pytest.approx(2e-5, abs=1e-6)


def test_a_moved_box_fails() -> None:
    reference = _detections([A, B, C])
    ours = _detections([A, _with(B, box=[30.0, 5.0, 70.5, 40.0]), C])  # half a pixel
    match = match_detections(ours, reference)
    assert not match.passed
    assert "eager detection(s) without a match" in match.note and "class 5" in match.note, match.note


def test_a_different_class_fails() -> None:
    match = match_detections(_detections([A, _with(B, label=6)]), _detections([A, B]))
    assert not match.passed and "class 5" in match.note and "class 6" in match.note, match.note


def test_a_score_beyond_tolerance_fails() -> None:
    match = match_detections(_detections([A, _with(B, score=0.401)]), _detections([A, B]))
    assert not match.passed, match.note


def test_a_missing_detection_away_from_every_boundary_fails() -> None:
    match = match_detections(_detections([A, C]), _detections([A, B, C]))
    assert not match.passed and "1 eager detection(s)" in match.note, match.note


def test_one_detection_may_trade_places_at_the_max_detections_boundary() -> None:
    # K = 3, both full: eager keeps C (0.25000), the package keeps D (0.24996) instead
    d = ([60.0, 60.0, 90.0, 95.0], 0.24996, 3)
    reference = _detections([A, B, _with(C, score=0.25)], k=3)
    ours = _detections([A, B, d], k=3)
    match = match_detections(ours, reference)
    assert match.passed and match.at_boundary == 2, match.note
    far = _detections([A, B, _with(d, score=0.2)], k=3)  # 0.05 below the boundary: not a near tie
    assert not match_detections(far, reference).passed
    # with room left (K = 4) neither output was cut at K: no boundary
    assert not match_detections(_detections([A, B, d]), _detections([A, B, _with(C, score=0.25)])).passed


def test_one_detection_may_enter_at_the_score_threshold_when_it_is_borderline() -> None:
    reference = _detections([A, B], [C])
    ours = _detections([A, B, C], [C])  # C crossed the class-probability threshold in image 0
    assert not match_detections(ours, reference).passed
    near = [
        (torch.tensor([C[0]]), torch.tensor([C[2]])),
        (torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)),
    ]
    match = match_detections(ours, reference, borderline=near)
    assert match.passed and match.at_boundary == 1, match.note
    calls = []
    lazy = match_detections(ours, reference, borderline=lambda: calls.append(1) or near)
    assert lazy.passed and calls == [1]
    match_detections(reference, reference, borderline=lambda: calls.append(1) or near)
    assert calls == [1], "the borderline set is computed only when a detection is unpaired"
    elsewhere = [(torch.tensor([B[0]]), torch.tensor([B[2]])), near[1]]  # another box is borderline
    assert not match_detections(ours, reference, borderline=elsewhere).passed
    two = _detections([A, B, C, _with(C, box=[1.0, 20.0, 21.0, 90.0])], [C])
    assert not match_detections(two, reference, borderline=near).passed, "one detection at most"


def test_threshold_borderline_finds_class_probabilities_near_the_threshold() -> None:
    spec = InferenceSpec(arch="fcos", num_classes=2, score_thresh=0.05)
    logit = math.log(0.05 / 0.95)  # sigmoid(logit) == 0.05
    cls = [torch.full((1, 2, 1, 1), -10.0) for _ in range(5)]
    cls[0][0, 1, 0, 0] = logit + 1e-4  # within 1e-4 of the threshold in probability
    cls[1][0, 0, 0, 0] = logit + 0.5  # clearly above
    outputs = FCOSOutputs(cls, [torch.ones(1, 4, 1, 1) for _ in range(5)], [torch.zeros(1, 1, 1, 1)] * 5)
    ((boxes, labels),) = threshold_borderline(outputs, spec, torch.tensor([[128.0, 128.0]]))
    assert labels.tolist() == [1]
    assert boxes.tolist() == [[0.0, 0.0, 12.0, 12.0]]  # location (4, 4), 8 px each side, clipped at 0


def test_the_aoti_check_pairs_detections_as_sets(tmp_path: Path, monkeypatch) -> None:
    """compare_package on a stand-in for the compiled package: reordered rows pass, a moved box fails."""
    from msad_deploy.export import aoti
    from msad_deploy.export.onnx import _example_inputs, load_for_export
    from msad_deploy.export.wrappers import ExportGraph

    from msad_deploy.runtime.preprocess import inference_network
    from tests.test_export_onnx import _checkpoint

    loaded, spec = load_for_export(_checkpoint(tmp_path / "student.pt", shift=1), None)
    graph = ExportGraph(inference_network(loaded.model.eval(), spec).eval(), spec, "candidates").eval()
    module = aoti.DetectionsGraph(graph).eval()
    example = _example_inputs(graph, spec, (128, 128), 1)
    with torch.no_grad():
        reference = Detections(*module(*example))
    n = int(reference.num_detections[0])
    assert n >= 2 and len(set(reference.labels[0, :n].tolist())) > 1
    order = torch.cat([torch.arange(n).flip(0), torch.arange(n, reference.boxes.shape[1])])
    swapped = Detections(reference.boxes[:, order], reference.scores[:, order], reference.labels[:, order],
                         reference.num_detections)  # fmt: skip
    package = {"outputs": swapped}
    monkeypatch.setattr(
        torch._inductor, "aoti_load_package", lambda path, **kwargs: lambda *inputs: package["outputs"]
    )
    check = aoti.compare_package(tmp_path / "model.pt2", module, example)
    assert check["passed"] and check["max_box_error_px"] == 0.0 and check["detections"] == n
    moved = swapped.boxes.clone()
    moved[0, n - 1] += 0.5  # the best detection (the lowest could leave at the max-detections boundary)
    package["outputs"] = swapped._replace(boxes=moved)
    with pytest.raises(RuntimeError, match="disagrees with eager PyTorch"):
        aoti.compare_package(tmp_path / "model.pt2", module, example)
