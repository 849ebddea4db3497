"""FCOS detection loss and the MSAD feature-distillation loss (torchvision.ops underneath)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from msad_deploy.models.head import FCOSOutputs
from msad_deploy.models.postprocess import flatten_outputs, ltrb_to_boxes
from msad_deploy.models.targets import FCOSTargets


def _mean_over_ranks(value: Tensor) -> Tensor:
    """Average a normaliser over DDP ranks (FCOS normalises by the global positive count)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value


def fcos_losses(
    outputs: FCOSOutputs, targets: FCOSTargets, focal_alpha: float = 0.25, focal_gamma: float = 2.0
) -> dict[str, Tensor]:
    """FCOS loss of one branch.

    loss_cls: sigmoid focal loss summed / N_pos; loss_box: GIoU weighted by the centerness target /
    sum of centerness targets; loss_ctr: centerness BCE summed / N_pos. Computed in float32.
    """
    cls_logits, box_regression, centerness = (t.float() for t in flatten_outputs(outputs))
    if cls_logits.shape[1] != targets.labels.shape[1]:
        raise ValueError(
            f"outputs have {cls_logits.shape[1]} locations but targets {targets.labels.shape[1]}: "
            "branches must be aligned with the HR levels the targets were built from"
        )
    positive = targets.labels >= 0
    num_pos = _mean_over_ranks(positive.sum().float()).clamp(min=1.0)
    one_hot = torch.zeros_like(cls_logits)
    one_hot[positive, targets.labels[positive]] = 1.0
    loss_cls = (
        sigmoid_focal_loss(cls_logits, one_hot, alpha=focal_alpha, gamma=focal_gamma, reduction="sum")
        / num_pos
    )

    ctr_targets = targets.centerness[positive]
    ctr_norm = _mean_over_ranks(ctr_targets.sum()).clamp(min=1e-6)
    giou = generalized_box_iou_loss(
        ltrb_to_boxes(box_regression[positive]),
        ltrb_to_boxes(targets.box_targets[positive]),
        reduction="none",
    )
    loss_box = (giou * ctr_targets).sum() / ctr_norm
    loss_ctr = (
        F.binary_cross_entropy_with_logits(centerness[positive], ctr_targets, reduction="sum") / num_pos
    )
    return {"loss_cls": loss_cls, "loss_box": loss_box, "loss_ctr": loss_ctr}


def feature_distillation_loss(
    student_features: list[Tensor],
    teacher_features: list[Tensor],
    alpha: float = 0.2,
    temperature: float = 3.0,
    kind: str = "l1",
) -> Tensor:
    """MSAD KD: sum over levels of alpha * T**2 * mean|s / T - t / T| ("l1") or mean squared ("mse").

    With the reference alpha 0.2, T 3 and L1 this is 0.6 x the mean absolute difference per level.
    The caller applies the warm-up factor and detaches the teacher.
    """
    if len(student_features) != len(teacher_features):
        raise ValueError(f"{len(student_features)} student levels vs {len(teacher_features)} teacher levels")
    total = student_features[0].new_zeros(())
    for level, (student, teacher) in enumerate(zip(student_features, teacher_features, strict=True)):
        if student.shape != teacher.shape:
            raise ValueError(
                f"level {level}: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}"
            )
        diff = student.float() / temperature - teacher.float() / temperature
        if kind == "l1":
            per_level = diff.abs().mean()
        elif kind == "mse":
            per_level = diff.pow(2).mean()
        else:
            raise ValueError(f"unknown distillation loss {kind!r}; use 'l1' or 'mse'")
        total = total + alpha * temperature**2 * per_level
    return total
