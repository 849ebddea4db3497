"""Decoding and NMS as pure functions over raw head outputs (export can stop before any step)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from msad_deploy.models.head import FCOSOutputs
from msad_deploy.models.pyramid import HR_STRIDES, compute_locations


def decode_level(box_regression: Tensor, locations: Tensor, stride: int) -> Tensor:
    """(l, t, r, b) in stride units [B, 4, h, w] + cell centres [h*w, 2] -> xyxy boxes [B, h*w, 4] (HR frame)."""
    ltrb = box_regression.flatten(2).transpose(1, 2) * stride
    return torch.cat([locations[None] - ltrb[..., :2], locations[None] + ltrb[..., 2:]], dim=2)


def postprocess_detections(
    outputs: FCOSOutputs,
    image_sizes: Tensor,
    original_sizes: Tensor | None = None,
    strides: tuple[int, ...] = HR_STRIDES,
    score_thresh: float = 0.05,
    topk_per_level: int = 1000,
    nms_thresh: float = 0.6,
    max_detections: int = 100,
) -> list[dict[str, Tensor]]:
    """FCOS inference: per level keep locations with cls prob > ``score_thresh``, the top-k of
    cls * centerness, decode with the HR strides, clip to the image, class-aware NMS, keep the best
    ``max_detections`` per image, and map boxes back to original pixels.

    Args:
        outputs: raw head outputs for a batch of B images.
        image_sizes: [B, 2] (h, w) of each resized image in the HR frame, before padding (for a
            model with pyramid shift k: its input size x 2**k).
        original_sizes: [B, 2] (h, w) of the images before resizing; None keeps HR-frame boxes.

    Returns:
        per image a dict with ``boxes`` [N, 4] xyxy, ``scores`` [N] = sqrt(cls * centerness) and
        ``labels`` [N] contiguous classes, sorted by score, N <= max_detections.
    """
    batch = outputs.cls_logits[0].shape[0]
    num_classes = outputs.cls_logits[0].shape[1]
    device = outputs.cls_logits[0].device
    shapes = [tuple(t.shape[-2:]) for t in outputs.cls_logits]
    locations = compute_locations(shapes, strides, device)
    all_boxes, all_scores, all_labels, all_valid = [], [], [], []
    for cls_logits, box_regression, centerness, points, stride in zip(
        outputs.cls_logits, outputs.box_regression, outputs.centerness, locations, strides, strict=True
    ):
        cls_prob = cls_logits.float().sigmoid().flatten(2).transpose(1, 2)  # [B, HW, C]
        ctr_prob = centerness.float().sigmoid().flatten(2).transpose(1, 2)  # [B, HW, 1]
        candidate = cls_prob > score_thresh
        ranking = torch.where(candidate, cls_prob * ctr_prob, -1.0).flatten(1)  # [B, HW*C]
        k = min(topk_per_level, ranking.shape[1])
        top_values, top_index = ranking.topk(k, dim=1)
        location_index = top_index // num_classes
        boxes = decode_level(box_regression.float(), points, stride)
        all_boxes.append(boxes.gather(1, location_index[..., None].expand(-1, -1, 4)))
        all_scores.append(top_values.clamp(min=0).sqrt())
        all_labels.append(top_index % num_classes)
        all_valid.append(top_values >= 0)
    boxes, scores = torch.cat(all_boxes, 1), torch.cat(all_scores, 1)
    labels, valid = torch.cat(all_labels, 1), torch.cat(all_valid, 1)

    image_index = torch.arange(batch, device=device)[:, None].expand_as(labels)[valid]
    boxes, scores, labels = boxes[valid], scores[valid], labels[valid]
    limits = image_sizes.to(device=device, dtype=boxes.dtype)[image_index]  # [N, 2] (h, w)
    boxes = torch.stack(
        [
            boxes[:, 0].clamp(min=0).minimum(limits[:, 1]),
            boxes[:, 1].clamp(min=0).minimum(limits[:, 0]),
            boxes[:, 2].clamp(min=0).minimum(limits[:, 1]),
            boxes[:, 3].clamp(min=0).minimum(limits[:, 0]),
        ],
        dim=1,
    )
    keep = batched_nms(boxes, scores, image_index * num_classes + labels, nms_thresh)  # sorted by score
    # Stable sort by image keeps the score order inside each image; then cut each image at max_detections.
    keep = keep[torch.argsort(image_index[keep], stable=True)]
    kept_images = image_index[keep]
    counts = torch.bincount(kept_images, minlength=batch)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(keep), device=device) - starts[kept_images]
    keep = keep[rank < max_detections]
    boxes, scores, labels, image_index = boxes[keep], scores[keep], labels[keep], image_index[keep]
    if original_sizes is not None:
        ratio = original_sizes.to(device=device, dtype=boxes.dtype) / image_sizes.to(
            device=device, dtype=boxes.dtype
        )
        boxes = boxes * ratio[image_index][:, [1, 0, 1, 0]]
    per_image = torch.bincount(image_index, minlength=batch).tolist()
    return [
        {"boxes": b, "scores": s, "labels": c}
        for b, s, c in zip(
            boxes.split(per_image), scores.split(per_image), labels.split(per_image), strict=True
        )
    ]
