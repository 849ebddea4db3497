"""Aligned multi-scale teacher: HR, LR and fused branches through one backbone, FPN and head."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from msad_deploy.models.backbones import Backbone
from msad_deploy.models.fpn import FPN
from msad_deploy.models.fusion import CrossFeatureFusion
from msad_deploy.models.head import FCOSHead, FCOSOutputs
from msad_deploy.models.pyramid import HR_STRIDES, make_lr_batch, pyramid_levels

TEACHER_BRANCHES = ("fused", "hr", "lr")


class TeacherOutputs(NamedTuple):
    """Raw outputs of the three branches (all in the HR frame) and the fused features F3..F7."""

    hr: FCOSOutputs
    lr: FCOSOutputs
    fused: FCOSOutputs
    fused_features: list[Tensor]


def _split_outputs(outputs: FCOSOutputs, parts: int) -> list[FCOSOutputs]:
    # unflatten, not chunk: chunk's ceil-division size makes torch.export specialise a dynamic batch
    chunks = [[t.unflatten(0, (parts, -1)).unbind(0) for t in field] for field in outputs]
    return [FCOSOutputs(*[[level[p] for level in field] for field in chunks]) for p in range(parts)]


class AlignedMultiScaleTeacher(nn.Module):
    """MSAD teacher (METHOD.md sections 1-3).

    The HR input uses P3..P7, the 1/2**k LR input P(3-k)..P(7-k); aligned pairs are fused by C-FF,
    and the three branches share one head (run once on the three branches stacked along the batch).
    Inference uses the fused branch.

    ``forward(hr_images [B, 3, H, W], lr_images [B, 3, H / 2**k, W / 2**k]) -> TeacherOutputs``.
    """

    def __init__(
        self, backbone: Backbone, fpn: FPN, head: FCOSHead, fusion: CrossFeatureFusion, lr_shift: int = 1
    ) -> None:
        super().__init__()
        if lr_shift < 1:
            raise ValueError(f"the teacher's LR branch needs a pyramid shift >= 1, got {lr_shift}")
        self.hr_levels = pyramid_levels(0)
        self.lr_levels = pyramid_levels(lr_shift)
        self.lr_shift = lr_shift
        needed = tuple(range(self.lr_levels[0], self.hr_levels[-1] + 1))
        if tuple(fpn.levels) != needed:
            raise ValueError(f"teacher FPN must provide levels {needed}, got {fpn.levels}")
        self.backbone = backbone
        self.fpn = fpn
        self.head = head
        self.fusion = fusion

    @property
    def strides(self) -> tuple[int, ...]:
        return HR_STRIDES

    def extract_features(
        self, hr_images: Tensor, lr_images: Tensor
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """(HR P3..P7, LR P(3-k)..P(7-k), fused F3..F7), aligned level by level."""
        hr_features = self.fpn(self.backbone(hr_images), self.hr_levels)
        lr_features = self.fpn(self.backbone(lr_images), self.lr_levels)
        return hr_features, lr_features, self.fusion(hr_features, lr_features)

    def forward(self, hr_images: Tensor, lr_images: Tensor) -> TeacherOutputs:
        hr_features, lr_features, fused_features = self.extract_features(hr_images, lr_images)
        stacked = [
            torch.cat(levels, dim=0) for levels in zip(hr_features, lr_features, fused_features, strict=True)
        ]
        hr, lr, fused = _split_outputs(self.head(stacked), 3)
        return TeacherOutputs(hr, lr, fused, fused_features)


class TeacherBranch(nn.Module):
    """One branch of a teacher as a detector: ``forward(hr_images [B, 3, H, W]) -> FCOSOutputs``.

    Makes the LR input inside (``make_lr_batch`` of the normalised HR batch, as in training), so
    the teacher's fused branch evaluates and exports like any single-input detector.
    """

    def __init__(
        self, teacher: AlignedMultiScaleTeacher, branch: str = "fused", lr_mode: str = "nearest"
    ) -> None:
        super().__init__()
        if branch not in TEACHER_BRANCHES:
            raise ValueError(f"teacher branch must be one of {TEACHER_BRANCHES}, got {branch!r}")
        self.teacher = teacher
        self.branch = branch
        self.lr_mode = lr_mode

    def forward(self, hr_images: Tensor) -> FCOSOutputs:
        lr_images = make_lr_batch(hr_images, self.teacher.lr_shift, self.lr_mode)
        return getattr(self.teacher(hr_images, lr_images), self.branch)
