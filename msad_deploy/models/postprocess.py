"""FCOS post-processing as separate steps, so export can stop after any of them.

1. ``decode`` (traceable): raw per-level outputs -> boxes [B, L, 4] xyxy in the decode frame and
   scores [B, L, C] = sqrt(cls * centerness) where cls > score_thresh, else 0. L concatenates the
   levels finest first (the same flattening the losses use).
2. ``topk_candidates`` + ``clip_boxes`` (traceable, static shapes): the top-k scores per level
   (FCOS's pre-NMS top-k), each a (box, score, label) candidate, clipped to its image.
3. ``nms_select`` (eager or torch.export): class-aware NMS and the best ``max_detections`` per image, padded into
   the output contract :class:`Detections`. Exported graphs replace this step with ONNX
   NonMaxSuppression or TensorRT's NMS.
``postprocess_detections`` chains them and maps boxes back to original pixels;
``predictions_to_coco`` turns one image's unpadded detections into COCO result records (for
evaluation and the runtime's ``Result.to_coco`` alike).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torchvision.ops import nms

from msad_deploy.models.head import FCOSOutputs
from msad_deploy.models.pyramid import HR_STRIDES, compute_locations


class Detections(NamedTuple):
    """The output contract of every backend and artifact, padded to K = max detections per image.

    boxes [B, K, 4] float32 xyxy; scores [B, K] float32 (descending); labels [B, K] int64 contiguous
    class indices; num_detections [B] int64. Rows past ``num_detections[b]`` are padding: boxes and
    scores 0, labels -1.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    num_detections: Tensor

    def per_image(self) -> list[dict[str, Tensor]]:
        """Unpadded ``{"boxes" [N, 4], "scores" [N], "labels" [N]}`` per image."""
        return [
            {"boxes": self.boxes[i, :n], "scores": self.scores[i, :n], "labels": self.labels[i, :n]}
            for i, n in enumerate(self.num_detections.tolist())
        ]


def flatten_outputs(outputs: FCOSOutputs) -> tuple[Tensor, Tensor, Tensor]:
    """Concatenate levels: (cls logits [B, L, C], box regression [B, L, 4], centerness logits [B, L])."""

    def flat(levels: list[Tensor]) -> Tensor:
        return torch.cat([t.permute(0, 2, 3, 1).reshape(t.shape[0], -1, t.shape[1]) for t in levels], dim=1)

    return flat(outputs.cls_logits), flat(outputs.box_regression), flat(outputs.centerness).squeeze(2)


def ltrb_to_boxes(ltrb: Tensor, points: Tensor | None = None) -> Tensor:
    """The box coder: (l, t, r, b) distances [..., 4] around ``points`` [..., 2] (x, y) -> xyxy.

    Without points the boxes sit around the origin, which is all the IoU losses need.
    """
    if points is None:
        return torch.cat([-ltrb[..., :2], ltrb[..., 2:]], dim=-1)
    return torch.cat([points - ltrb[..., :2], points + ltrb[..., 2:]], dim=-1)


def level_sizes(outputs: FCOSOutputs) -> list[int]:
    """Locations per level (h_i * w_i), in the order ``decode`` concatenates them."""
    return [t.shape[-2] * t.shape[-1] for t in outputs.cls_logits]


def decode(
    outputs: FCOSOutputs, strides: tuple[int, ...] = HR_STRIDES, score_thresh: float = 0.05
) -> tuple[Tensor, Tensor]:
    """Raw outputs -> (boxes [B, L, 4] xyxy in the decode frame, scores [B, L, C]), float32.

    A score is sqrt(sigmoid(cls) * sigmoid(centerness)) where sigmoid(cls) > ``score_thresh`` (FCOS
    thresholds the class probability alone) and exactly 0 elsewhere. Traceable: no data-dependent
    shapes.
    """
    cls_logits, box_regression, centerness = flatten_outputs(outputs)
    device = cls_logits.device
    shapes = [tuple(t.shape[-2:]) for t in outputs.cls_logits]
    points = torch.cat(compute_locations(shapes, strides, device))  # [L, 2]
    point_strides = torch.cat(
        [torch.full((h * w,), float(s), device=device) for (h, w), s in zip(shapes, strides, strict=True)]
    )  # [L]
    boxes = ltrb_to_boxes(box_regression.float() * point_strides[:, None], points)
    cls_prob = cls_logits.float().sigmoid()
    ctr_prob = centerness.float().sigmoid()[..., None]
    scores = torch.where(cls_prob > score_thresh, (cls_prob * ctr_prob).sqrt(), torch.zeros_like(cls_prob))
    return boxes, scores


def topk_candidates(
    boxes: Tensor, scores: Tensor, sizes: list[int], topk_per_level: int = 1000, clamp_k: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """The ``topk_per_level`` best (location, class) pairs of each level.

    boxes [B, L, 4], scores [B, L, C], ``sizes`` locations per level -> candidate boxes [B, N, 4],
    scores [B, N] and labels [B, N] int64, N = sum_i min(k, sizes_i * C). Candidates with score 0
    are not detections (``nms_select`` drops them). ``clamp_k=False`` skips the min (the caller
    guarantees every level holds at least k pairs), which keeps an exported k free of shape guards.
    """
    num_classes = scores.shape[-1]
    all_boxes, all_scores, all_labels = [], [], []
    for level_boxes, level_scores in zip(boxes.split(sizes, 1), scores.split(sizes, 1), strict=True):
        flat = level_scores.flatten(1)  # [B, HW * C]
        k = min(topk_per_level, flat.shape[1]) if clamp_k else topk_per_level
        values, index = flat.topk(k, dim=1)
        location = index // num_classes
        all_boxes.append(level_boxes.gather(1, location[..., None].expand(-1, -1, 4)))
        all_scores.append(values)
        all_labels.append(index % num_classes)
    return torch.cat(all_boxes, 1), torch.cat(all_scores, 1), torch.cat(all_labels, 1)


def clip_boxes(boxes: Tensor, image_sizes: Tensor) -> Tensor:
    """Clip boxes [B, N, 4] xyxy to each image's (h, w) in ``image_sizes`` [B, 2]."""
    sizes = image_sizes.to(device=boxes.device, dtype=boxes.dtype)
    limits = torch.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], dim=1)[:, None]  # [B, 1, 4]
    return torch.minimum(boxes.clamp(min=0), limits)


def nms_select(
    boxes: Tensor, scores: Tensor, labels: Tensor, nms_thresh: float = 0.6, max_detections: int = 100
) -> Detections:
    """Class-aware NMS per image, then the best ``max_detections``, padded (torchvision NMS).

    boxes [B, N, 4], scores [B, N] (0 = no candidate), labels [B, N] -> :class:`Detections`.
    Class-aware through the coordinate offset of torchvision's ``batched_nms`` (each (image, class)
    pair moved by its own multiple of the largest coordinate, so pairs never overlap): the same
    algorithm the exported ONNX graph runs. Only tensor ops with no Python-side sizes, so
    ``torch.export`` can capture it (the number of kept boxes stays symbolic).
    """
    batch, num, _ = boxes.shape
    device = boxes.device
    valid = scores > 0
    image_index = torch.arange(batch, device=device)[:, None].expand(batch, num)[valid]
    flat_labels, flat_boxes, flat_scores = labels[valid], boxes[valid], scores[valid]
    groups = (image_index * (labels.max() + 1) + flat_labels).to(boxes.dtype)
    offsets = groups * (boxes.max() + 1)
    keep = nms(flat_boxes + offsets[:, None], flat_scores, nms_thresh)  # sorted by score
    # Stable sort by image keeps the score order inside each image; then each image's rank.
    keep = keep[torch.argsort(image_index[keep], stable=True)]
    kept_images = image_index[keep]
    counts = torch.zeros(batch, dtype=torch.int64, device=device).scatter_add_(
        0, kept_images, torch.ones_like(kept_images)
    )
    rank = torch.arange(keep.shape[0], device=device) - (torch.cumsum(counts, 0) - counts)[kept_images]
    inside = rank < max_detections
    keep, kept_images, rank = keep[inside], kept_images[inside], rank[inside]
    out = Detections(
        boxes=boxes.new_zeros(batch, max_detections, 4),
        scores=scores.new_zeros(batch, max_detections),
        labels=torch.full((batch, max_detections), -1, dtype=torch.int64, device=device),
        num_detections=counts.clamp(max=max_detections),
    )
    out.boxes[kept_images, rank] = flat_boxes[keep]
    out.scores[kept_images, rank] = flat_scores[keep]
    out.labels[kept_images, rank] = flat_labels[keep].to(torch.int64)
    return out


def rescale_boxes(boxes: Tensor, image_sizes: Tensor, original_sizes: Tensor) -> Tensor:
    """Boxes [B, K, 4] in the decode frame of images sized ``image_sizes`` [B, 2] (h, w) -> original pixels."""
    ratio = original_sizes.to(device=boxes.device, dtype=boxes.dtype) / image_sizes.to(
        device=boxes.device, dtype=boxes.dtype
    )
    return boxes * ratio[:, None, [1, 0, 1, 0]]


def select(
    boxes: Tensor,
    scores: Tensor,
    sizes: list[int],
    image_sizes: Tensor,
    topk_per_level: int = 1000,
    nms_thresh: float = 0.6,
    max_detections: int = 100,
) -> Detections:
    """Decoded boxes [B, L, 4] / scores [B, L, C] -> :class:`Detections` in the decode frame (eager)."""
    cand_boxes, cand_scores, cand_labels = topk_candidates(boxes, scores, sizes, topk_per_level)
    return nms_select(
        clip_boxes(cand_boxes, image_sizes), cand_scores, cand_labels, nms_thresh, max_detections
    )


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
    """FCOS inference on raw outputs: decode, per-level top-k, clip, class-aware NMS, keep the best
    ``max_detections`` per image, and map boxes back to original pixels.

    Args:
        outputs: raw head outputs for a batch of B images.
        image_sizes: [B, 2] (h, w) of each resized image in the decode frame, before padding.
        original_sizes: [B, 2] (h, w) of the images before resizing; None keeps decode-frame boxes.

    Returns:
        per image a dict with ``boxes`` [N, 4] xyxy, ``scores`` [N] = sqrt(cls * centerness) and
        ``labels`` [N] contiguous classes, sorted by score, N <= max_detections.
    """
    boxes, scores = decode(outputs, strides, score_thresh)
    detections = select(
        boxes, scores, level_sizes(outputs), image_sizes, topk_per_level, nms_thresh, max_detections
    )
    if original_sizes is not None:
        detections = detections._replace(boxes=rescale_boxes(detections.boxes, image_sizes, original_sizes))
    return detections.per_image()


def predictions_to_coco(
    image_id: int,
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    label_to_category_id: Sequence[int],
) -> list[dict[str, Any]]:
    """One image's detections as COCO result records.

    ``boxes`` [N, 4] are xyxy in original-image pixels, ``scores`` [N], ``labels`` [N] contiguous class
    indices into ``label_to_category_id`` (which maps them back to the dataset's category ids). Boxes
    become xywh rounded to 0.01 px and scores to 1e-5: far below any IoU/ranking effect, and it keeps
    result JSON files small.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [N, 4] xyxy, got shape {tuple(boxes.shape)}")
    n = boxes.shape[0]
    if scores.shape != (n,) or labels.shape != (n,):
        raise ValueError(
            f"scores and labels must be [N]={n}, got {tuple(scores.shape)} and {tuple(labels.shape)}"
        )
    if n == 0:
        return []
    labels_list = [int(v) for v in labels.tolist()]
    bad = sorted({v for v in labels_list if not 0 <= v < len(label_to_category_id)})
    if bad:
        raise ValueError(f"labels {bad} outside [0, {len(label_to_category_id)}) of label_to_category_id")
    xyxy = boxes.detach().to("cpu", torch.float64)
    xywh = torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], dim=1).tolist()
    return [
        {
            "image_id": int(image_id),
            "category_id": int(label_to_category_id[label]),
            "bbox": [round(v, 2) for v in box],
            "score": round(score, 5),
        }
        for box, score, label in zip(xywh, scores.detach().to("cpu", torch.float64).tolist(), labels_list)
    ]
