"""FCOS target assignment, always in the HR frame.

Targets are computed once per batch from the HR level shapes and strides 8..128, and serve every
branch: HR P3..P7, LR P2..P6 (same shapes after alignment) and the fused maps. Ground-truth boxes
stay in HR pixels.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from msad_deploy.models.pyramid import HR_SIZES_OF_INTEREST, HR_STRIDES, compute_locations

BACKGROUND = -1


class FCOSTargets(NamedTuple):
    """Per-location targets for a batch, locations of all levels concatenated (L = sum h_i * w_i).

    labels: [B, L] int64 contiguous class or ``BACKGROUND`` (-1); box_targets: [B, L, 4] (l, t, r, b)
    divided by the location's HR stride; centerness: [B, L] in [0, 1] (0 on background).
    """

    labels: Tensor
    box_targets: Tensor
    centerness: Tensor


def centerness_target(ltrb: Tensor) -> Tensor:
    """sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) for [..., 4] distances."""
    left_right = ltrb[..., [0, 2]]
    top_bottom = ltrb[..., [1, 3]]
    ratio = (left_right.min(-1).values / left_right.max(-1).values.clamp(min=1e-6)) * (
        top_bottom.min(-1).values / top_bottom.max(-1).values.clamp(min=1e-6)
    )
    return ratio.clamp(min=0).sqrt()


def compute_fcos_targets(
    gt_boxes: list[Tensor],
    gt_labels: list[Tensor],
    level_shapes: list[tuple[int, int]],
    strides: tuple[int, ...] = HR_STRIDES,
    sizes_of_interest: tuple[tuple[float, float], ...] = HR_SIZES_OF_INTEREST,
    center_sampling_radius: float = 1.5,
) -> FCOSTargets:
    """Assign every location of every level to at most one ground-truth box.

    A location is positive for a box when it lies inside the box's centre region (radius
    ``center_sampling_radius`` x stride, clipped to the box; the whole box when radius is 0) and the
    largest of its (l, t, r, b) distances falls in the level's size of interest. Ties go to the box
    of smallest area.

    Args:
        gt_boxes: per image [G_i, 4] xyxy in HR pixels.
        gt_labels: per image [G_i] contiguous class indices.
        level_shapes: (h, w) of each HR level P3..P7 (equal to the LR levels after alignment).
    """
    device = gt_boxes[0].device if gt_boxes else torch.device("cpu")
    locations = compute_locations(level_shapes, strides, device)
    counts = [len(loc) for loc in locations]
    points = torch.cat(locations)  # [L, 2]
    per_level = torch.tensor(counts, device=device)
    point_strides = torch.tensor(strides, dtype=torch.float32, device=device).repeat_interleave(
        per_level
    )  # [L]
    bounds = torch.tensor(sizes_of_interest, dtype=torch.float32, device=device).repeat_interleave(
        per_level, dim=0
    )
    labels, box_targets, centerness = [], [], []
    for boxes, classes in zip(gt_boxes, gt_labels, strict=True):
        num_points = len(points)
        if len(boxes) == 0:
            labels.append(torch.full((num_points,), BACKGROUND, dtype=torch.long, device=device))
            box_targets.append(torch.zeros(num_points, 4, device=device))
            centerness.append(torch.zeros(num_points, device=device))
            continue
        boxes = boxes.to(torch.float32)
        xs, ys = points[:, 0, None], points[:, 1, None]  # [L, 1]
        ltrb = torch.stack(
            [xs - boxes[:, 0], ys - boxes[:, 1], boxes[:, 2] - xs, boxes[:, 3] - ys], dim=2
        )  # [L, G, 4]
        if center_sampling_radius > 0:
            centers = (boxes[:, :2] + boxes[:, 2:]) / 2  # [G, 2]
            reach = point_strides[:, None, None] * center_sampling_radius  # [L, 1, 1]
            region_min = torch.maximum(centers[None] - reach, boxes[None, :, :2])  # [L, G, 2]
            region_max = torch.minimum(centers[None] + reach, boxes[None, :, 2:])
            inside = (
                torch.cat([points[:, None] - region_min, region_max - points[:, None]], dim=2).min(2).values
                > 0
            )
        else:
            inside = ltrb.min(dim=2).values > 0
        largest = ltrb.max(dim=2).values
        in_level = (largest >= bounds[:, :1]) & (largest <= bounds[:, 1:])
        areas = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[None].expand(num_points, -1)
        areas = torch.where(inside & in_level, areas, torch.full_like(areas, math.inf))
        min_area, assigned = areas.min(dim=1)
        positive = torch.isfinite(min_area)
        chosen = ltrb[torch.arange(num_points, device=device), assigned]  # [L, 4]
        labels.append(torch.where(positive, classes.to(device)[assigned], BACKGROUND))
        box_targets.append(chosen / point_strides[:, None])
        centerness.append(torch.where(positive, centerness_target(chosen), 0.0))
    return FCOSTargets(torch.stack(labels), torch.stack(box_targets), torch.stack(centerness))
