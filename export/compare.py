"""Detections of an artifact against eager PyTorch, compared as sets: the one rule every export check uses.

Two runs of the same model in fp32 (eager and ONNX Runtime, eager and an AOTInductor package) give
scores that differ in the last bits. That is enough to swap two detections whose scores nearly tie,
and to move a detection across a boundary it sits on. :func:`match_detections` therefore pairs each
reference detection with one detection of the other output: the same class, boxes within
``box_tol`` px, scores within ``score_tol``; order does not matter (a swap can only happen among
scores within ``2 * score_tol`` of each other, since every pair's scores agree). What is left
unpaired must sit on a boundary, at most one detection per side and image:

- the max-detections boundary: the other output is full (``max_detections`` rows) and the
  detection's score is within ``boundary_eps`` of the other output's lowest score;
- the score threshold: FCOS thresholds the *class probability* (a detection's score is
  sqrt(cls x centerness)), so whether a detection is near it cannot be read off its score; the
  caller passes ``borderline`` (:func:`threshold_borderline`): per image, the reference's candidate
  boxes whose class probability is within ``boundary_eps`` of the threshold.

Anything else (a moved box, another class, a score off by more than ``score_tol``, a missing
detection away from every boundary) fails, with a note naming the first detections that differ.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from msad_deploy.models.head import FCOSOutputs
from msad_deploy.models.postprocess import Detections, clip_boxes, decode
from msad_deploy.models.spec import InferenceSpec

BOX_TOL = 0.01  # px
SCORE_TOL = 1e-4
BOUNDARY_EPS = 1e-4

# Per image: (boxes [N, 4], labels [N]) of candidates whose class probability is near the threshold.
Borderline = Sequence[tuple[Tensor, Tensor]]


@dataclass
class DetectionMatch:
    """The outcome of :func:`match_detections`.

    ``max_box_error`` / ``max_score_error``: the largest differences over the matched pairs (0.0
    when there were none); ``matched``: pairs; ``at_boundary``: detections accepted unpaired because
    they sit on a boundary; ``note``: what was compared, or why it failed."""

    passed: bool
    max_box_error: float
    max_score_error: float
    matched: int
    at_boundary: int
    note: str


def _describe(label: int, score: float, box: Tensor) -> str:
    return f"class {label} score {score:.6f} box [{', '.join(f'{v:.2f}' for v in box.tolist())}]"


class _Rows:
    """One image's unpadded detections of one output, in float64 for the comparisons."""

    def __init__(self, found: Detections, image: int) -> None:
        n = int(found.num_detections[image])
        self.boxes = found.boxes[image, :n].double()
        self.scores = found.scores[image, :n].double()
        self.labels = found.labels[image, :n]
        self.count = n

    def describe(self, rows: list[int]) -> str:
        shown = "; ".join(
            _describe(int(self.labels[i]), float(self.scores[i]), self.boxes[i]) for i in rows[:3]
        )
        return shown + (f" (+{len(rows) - 3} more)" if len(rows) > 3 else "")


def _pair(
    ours: _Rows, ref: _Rows, box_tol: float, score_tol: float
) -> tuple[list[tuple[int, int, float, float]], list[int], list[int]]:
    """Greedy pairing, reference detections by descending score, each with the closest free detection
    of ours that fits (same class, box and score within tolerance): (pairs (ref, ours, box error,
    score error), unpaired reference rows, unpaired rows of ours)."""
    pairs: list[tuple[int, int, float, float]] = []
    lost: list[int] = []
    used = torch.zeros(ours.count, dtype=torch.bool)
    boxes_apart = (ref.boxes[:, None] - ours.boxes[None]).abs().amax(-1)  # [n_ref, n_ours]
    scores_apart = (ref.scores[:, None] - ours.scores[None]).abs()
    for j in torch.argsort(ref.scores, descending=True, stable=True).tolist():
        fits = ~used & (ours.labels == ref.labels[j]) & (boxes_apart[j] <= box_tol)
        fits &= scores_apart[j] <= score_tol
        if not bool(fits.any()):
            lost.append(j)
            continue
        k = int(torch.where(fits, boxes_apart[j], torch.inf).argmin())
        used[k] = True
        pairs.append((j, k, float(boxes_apart[j, k]), float(scores_apart[j, k])))
    return pairs, lost, torch.nonzero(~used).flatten().tolist()


def match_detections(
    ours: Detections,
    reference: Detections,
    *,
    box_tol: float = BOX_TOL,
    score_tol: float = SCORE_TOL,
    boundary_eps: float = BOUNDARY_EPS,
    max_detections: int | None = None,
    borderline: Borderline | Callable[[], Borderline] | None = None,
) -> DetectionMatch:
    """Compare two padded :class:`Detections` batches as sets per image (see the module docstring).

    ``max_detections`` defaults to the padded width K of the outputs; ``borderline`` may be a
    callable, called only when some detection is left unpaired (it usually runs the network again).
    """
    if ours.num_detections.shape != reference.num_detections.shape:
        note = f"batch of {ours.num_detections.numel()} vs {reference.num_detections.numel()} images"
        return DetectionMatch(False, float("inf"), float("inf"), 0, 0, note)
    limit = int(max_detections if max_detections is not None else reference.boxes.shape[1])
    ours = Detections(*(t.detach().cpu() for t in ours))
    reference = Detections(*(t.detach().cpu() for t in reference))
    near: list[Borderline] = []  # computed once, on the first unpaired detection

    def at_threshold(image: int, rows: _Rows, row: int) -> bool:
        if borderline is None:
            return False
        if not near:
            near.append(borderline() if callable(borderline) else borderline)
        boxes, labels = near[0][image]
        close = (boxes.double().cpu() - rows.boxes[row]).abs().amax(-1) <= box_tol
        return bool((close & (labels.cpu() == rows.labels[row])).any())

    def at_max_detections(rows: _Rows, row: int, other: _Rows) -> bool:
        return other.count >= limit > 0 and abs(float(rows.scores[row] - other.scores.min())) <= boundary_eps

    box_error = score_error = 0.0
    matched = at_boundary = 0
    problems: list[str] = []
    for image in range(len(reference.num_detections)):
        mine, theirs = _Rows(ours, image), _Rows(reference, image)
        pairs, lost, new = _pair(mine, theirs, box_tol, score_tol)
        matched += len(pairs)
        for _, _, box, score in pairs:
            box_error, score_error = max(box_error, box), max(score_error, score)
        for side, rows, unpaired, other in (("eager", theirs, lost, mine), ("artifact", mine, new, theirs)):
            if not unpaired:
                continue
            row = unpaired[0]
            if len(unpaired) == 1 and (at_max_detections(rows, row, other) or at_threshold(image, rows, row)):
                at_boundary += 1
                continue
            problems.append(
                f"image {image}: {len(unpaired)} {side} detection(s) without a match in the other output "
                f"(same class, box within {box_tol:g} px, score within {score_tol:g}): {rows.describe(unpaired)}"
            )
    if problems:
        return DetectionMatch(False, box_error, score_error, matched, at_boundary, "; ".join(problems[:3]))
    note = f"{int(reference.num_detections.sum())} detections"
    note += f", {at_boundary} entering/leaving at a boundary" if at_boundary else ""
    return DetectionMatch(True, box_error, score_error, matched, at_boundary, note)


def threshold_borderline(
    outputs: FCOSOutputs,
    spec: InferenceSpec,
    image_sizes: Tensor,
    eps: float = BOUNDARY_EPS,
    box_scale: Tensor | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """Per image, the (boxes [N, 4], labels [N]) of the raw outputs' candidates whose class probability
    lies within ``eps`` of the spec's score threshold: the detections that may enter or leave at it.

    Boxes are decoded and clipped to ``image_sizes`` [B, 2] (decode frame) as the detections' are,
    then multiplied by ``box_scale`` [B, 4] when the detections are in other pixels (frames)."""
    boxes, low = decode(outputs, spec.strides, spec.score_thresh - eps)
    _, high = decode(outputs, spec.strides, spec.score_thresh + eps)
    near = (low > 0) & (high == 0)  # [B, L, C]
    boxes = clip_boxes(boxes, image_sizes)
    if box_scale is not None:
        boxes = boxes * box_scale.to(boxes)[:, None]
    result = []
    for image in range(boxes.shape[0]):
        location, label = torch.nonzero(near[image], as_tuple=True)
        result.append((boxes[image, location].detach().cpu(), label.cpu()))
    return result


def graph_borderline(
    graph: torch.nn.Module, inputs: Tensor, image_sizes: Tensor | None = None, eps: float = BOUNDARY_EPS
) -> list[tuple[Tensor, Tensor]]:
    """:func:`threshold_borderline` of an ``ExportGraph``'s network on the graph's own inputs (the
    network input and ``image_sizes``, or uint8 frames with in-graph preprocessing)."""
    scale = None
    with torch.no_grad():
        if graph.preprocess is not None:
            inputs, image_sizes, scale = graph.preprocess(inputs)
        raw = graph.network(inputs.half() if graph.half else inputs)
    assert image_sizes is not None, "the candidates stage needs image_sizes"
    return threshold_borderline(raw, graph.spec, image_sizes, eps, scale)
