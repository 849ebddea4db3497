"""Decoding, thresholds, NMS, per-image limits and the mapping back to original pixels."""

from __future__ import annotations

import torch

from msad_deploy.models import FCOSOutputs, postprocess_detections
from msad_deploy.models.pyramid import level_shapes, pyramid_levels

NUM_CLASSES = 3
LOW = -12.0  # sigmoid(-12) ~ 6e-6: below any threshold


def _empty_outputs(batch: int, height: int, width: int) -> FCOSOutputs:
    shapes = level_shapes(height, width, pyramid_levels(0))
    return FCOSOutputs(
        [torch.full((batch, NUM_CLASSES, h, w), LOW) for h, w in shapes],
        [torch.ones(batch, 4, h, w) for h, w in shapes],
        [torch.full((batch, 1, h, w), 12.0) for h, w in shapes],
    )


def _place(
    outputs: FCOSOutputs, image: int, level: int, row: int, col: int, cls: int, ltrb, logit=12.0, ctr=12.0
):
    outputs.cls_logits[level][image, cls, row, col] = logit
    outputs.box_regression[level][image, :, row, col] = torch.tensor(ltrb, dtype=torch.float32)
    outputs.centerness[level][image, 0, row, col] = ctr


def test_single_detection_decoded_and_mapped_to_original_pixels() -> None:
    outputs = _empty_outputs(1, 256, 256)
    # P3 cell (row 2, col 3) sits at (28, 20); ltrb (1, 1, 2, 2) strides -> box (20, 12, 44, 36) in the HR frame.
    _place(outputs, 0, 0, 2, 3, cls=2, ltrb=(1, 1, 2, 2), logit=2.0, ctr=0.0)
    detections = postprocess_detections(
        outputs, image_sizes=torch.tensor([[200, 240]]), original_sizes=torch.tensor([[400, 480]])
    )
    assert len(detections) == 1
    result = detections[0]
    torch.testing.assert_close(result["boxes"], torch.tensor([[40.0, 24.0, 88.0, 72.0]]))  # x2 to original
    expected_score = (torch.sigmoid(torch.tensor(2.0)) * 0.5).sqrt()
    torch.testing.assert_close(result["scores"], expected_score[None])
    assert result["labels"].tolist() == [2]


def test_boxes_are_clipped_to_the_unpadded_image() -> None:
    outputs = _empty_outputs(1, 256, 256)
    # P4 cell (row 12, col 12) at (200, 200) with ltrb 5 strides (80 px): extends past a 220x210 image.
    _place(outputs, 0, 1, 12, 12, cls=0, ltrb=(5, 5, 5, 5))
    (result,) = postprocess_detections(outputs, image_sizes=torch.tensor([[220, 210]]))
    torch.testing.assert_close(result["boxes"], torch.tensor([[120.0, 120.0, 210.0, 220.0]]))


def test_score_threshold_is_on_class_probability_only() -> None:
    outputs = _empty_outputs(1, 256, 256)
    below = torch.logit(torch.tensor(0.04)).item()
    above = torch.logit(torch.tensor(0.06)).item()
    _place(outputs, 0, 0, 1, 1, cls=0, ltrb=(1, 1, 1, 1), logit=below)
    _place(
        outputs, 0, 0, 20, 20, cls=1, ltrb=(1, 1, 1, 1), logit=above, ctr=-12.0
    )  # tiny centerness still kept
    (result,) = postprocess_detections(outputs, image_sizes=torch.tensor([[256, 256]]))
    assert result["labels"].tolist() == [1]


def test_nms_is_class_aware_and_per_image() -> None:
    outputs = _empty_outputs(2, 256, 256)
    # Neighbouring P3 cells (8 px apart): x 68..100 and 68..108, same rows, IoU 32 / 40 = 0.8, well
    # above nms_thresh 0.6 (two 32-px boxes 8 px apart would sit exactly at IoU 0.6).
    # Two overlapping boxes of the same class in image 0: the weaker one goes.
    _place(outputs, 0, 0, 10, 10, cls=1, ltrb=(2, 2, 2, 2), logit=5.0)
    _place(outputs, 0, 0, 10, 11, cls=1, ltrb=(3, 2, 2, 2), logit=3.0)
    # The same overlap but different classes: both stay.
    _place(outputs, 0, 0, 20, 20, cls=0, ltrb=(2, 2, 2, 2), logit=5.0)
    _place(outputs, 0, 0, 20, 21, cls=2, ltrb=(3, 2, 2, 2), logit=3.0)
    # Image 1 has a box identical to image 0's first: NMS must not cross images.
    _place(outputs, 1, 0, 10, 10, cls=1, ltrb=(2, 2, 2, 2), logit=5.0)
    results = postprocess_detections(outputs, image_sizes=torch.tensor([[256, 256], [256, 256]]))
    assert sorted(results[0]["labels"].tolist()) == [0, 1, 2]
    assert results[1]["labels"].tolist() == [1]
    assert (results[0]["scores"][:-1] >= results[0]["scores"][1:]).all()


def test_max_detections_and_topk_per_level() -> None:
    outputs = _empty_outputs(2, 256, 256)
    logits = torch.linspace(0.0, 6.0, 32 * 32).reshape(32, 32)
    outputs.cls_logits[0][:, 0] = logits  # 1024 well separated candidates (boxes of 2x2 px) on P3
    outputs.box_regression[0].fill_(0.1)
    results = postprocess_detections(
        outputs, image_sizes=torch.tensor([[256, 256], [256, 256]]), topk_per_level=50, max_detections=7
    )
    for result in results:
        assert len(result["scores"]) == 7
        torch.testing.assert_close(
            result["scores"][0],
            torch.sigmoid(torch.tensor(6.0)) ** 0.5 * torch.sigmoid(torch.tensor(12.0)) ** 0.5,
        )
    few = postprocess_detections(
        outputs, image_sizes=torch.tensor([[256, 256], [256, 256]]), topk_per_level=5
    )
    assert [len(r["scores"]) for r in few] == [5, 5]


def test_no_candidates_gives_empty_results() -> None:
    results = postprocess_detections(
        _empty_outputs(2, 128, 128), image_sizes=torch.tensor([[128, 128], [100, 90]])
    )
    assert [r["boxes"].shape for r in results] == [(0, 4), (0, 4)]
