"""FCOS head shared by every level (and, in the teacher, by every branch)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FCOSOutputs(NamedTuple):
    """Raw head outputs, one tensor per pyramid level (listed in HR-level order P3..P7 equivalents).

    cls_logits: [B, num_classes, h_i, w_i]; box_regression: [B, 4, h_i, w_i] as (l, t, r, b) in units
    of the level's HR stride, non-negative; centerness: [B, 1, h_i, w_i] logits.
    """

    cls_logits: list[Tensor]
    box_regression: list[Tensor]
    centerness: list[Tensor]


class Scale(nn.Module):
    """A learnable scalar multiplier (one per level position in FCOS)."""

    def __init__(self, init: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


HEAD_NORMS = ("gn", "bn", "bn_per_level")


def _tower(in_channels: int, channels: int, num_convs: int, norm_groups: int, norm: str) -> nn.Sequential:
    """conv3x3 + norm + ReLU per layer; with ``bn_per_level`` the norm slot is an Identity (the
    per-level BatchNorms live beside the tower, see :func:`_level_norms`)."""
    layers: list[nn.Module] = []
    for i in range(num_convs):
        if norm == "gn":
            norm_layer: nn.Module = nn.GroupNorm(norm_groups, channels)
        elif norm == "bn":
            norm_layer = nn.BatchNorm2d(channels)
        else:
            norm_layer = nn.Identity()
        layers += [
            nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1),
            norm_layer,
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


def _level_norms(channels: int, num_convs: int, num_levels: int) -> nn.ModuleList:
    """One BatchNorm per tower layer per level: [num_levels][num_convs]."""
    return nn.ModuleList(
        nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(num_convs)) for _ in range(num_levels)
    )


def _run_tower(tower: nn.Sequential, norms: nn.ModuleList | None, feature: Tensor) -> Tensor:
    if norms is None:
        return tower(feature)
    for index, layer in enumerate(tower):
        feature = norms[index // 3](feature) if index % 3 == 1 else layer(feature)
    return feature


class FCOSHead(nn.Module):
    """Classification tower and box tower (conv3x3 + GroupNorm or BatchNorm + ReLU each), centerness on the
    box tower.

    Level position ``i`` (0 = finest of the five used levels) has its own learnable scale, so LR level
    P2 shares scale and meaning with HR level P3: they are trained in the same HR frame.

    Args:
        in_channels: FPN channels.
        num_classes: foreground classes (sigmoid outputs, no background class).
        channels: tower width (head cost scales with channels**2 on maps as large as HR P3).
        num_convs: tower depth (4 in FCOS).
        num_levels: number of pyramid levels the head sees.
        norm_groups: GroupNorm groups (32 in FCOS; must divide ``channels``).
        norm: "gn" (GroupNorm, as FCOS), "bn" (BatchNorm2d, its statistics shared across levels like
            the tower's weights) or "bn_per_level" (one BatchNorm per level and layer, the convolutions
            still shared: levels differ in statistics). At inference a BatchNorm folds into the
            preceding convolution, so the exported graph has no normalisation op (GroupNorm costs
            ONNX Runtime five nodes per layer).
        prior_prob: initial foreground probability of the classifier bias.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 256,
        num_convs: int = 4,
        num_levels: int = 5,
        norm_groups: int = 32,
        prior_prob: float = 0.01,
        norm: str = "gn",
    ) -> None:
        super().__init__()
        if norm not in HEAD_NORMS:
            raise ValueError(f"unknown head norm {norm!r}; choose one of {HEAD_NORMS}")
        if norm == "gn" and channels % norm_groups:
            raise ValueError(f"head channels {channels} must be divisible by norm_groups {norm_groups}")
        self.num_classes = num_classes
        self.cls_tower = _tower(in_channels, channels, num_convs, norm_groups, norm)
        self.box_tower = _tower(in_channels, channels, num_convs, norm_groups, norm)
        per_level = norm == "bn_per_level"
        self.cls_norms = _level_norms(channels, num_convs, num_levels) if per_level else None
        self.box_norms = _level_norms(channels, num_convs, num_levels) if per_level else None
        tower_out = channels if num_convs > 0 else in_channels
        self.cls_logits = nn.Conv2d(tower_out, num_classes, 3, padding=1)
        self.box_pred = nn.Conv2d(tower_out, 4, 3, padding=1)
        self.centerness = nn.Conv2d(tower_out, 1, 3, padding=1)
        self.scales = nn.ModuleList(Scale() for _ in range(num_levels))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))
        # Start every box at one stride per side (what exp(0) gave the original FCOS). With a zero bias,
        # boxes that start larger than tiny targets are pushed through the ReLU to zero, where GIoU has
        # no gradient: training from scratch on small objects then never learns to regress.
        nn.init.constant_(self.box_pred.bias, 1.0)

    def forward(self, features: list[Tensor]) -> FCOSOutputs:
        if len(features) != len(self.scales):
            raise ValueError(f"head built for {len(self.scales)} levels got {len(features)}")
        cls_logits, box_regression, centerness = [], [], []
        for level, (feature, scale) in enumerate(zip(features, self.scales, strict=True)):
            cls_feature = _run_tower(self.cls_tower, self.cls_norms and self.cls_norms[level], feature)
            box_feature = _run_tower(self.box_tower, self.box_norms and self.box_norms[level], feature)
            cls_logits.append(self.cls_logits(cls_feature))
            box_regression.append(F.relu(scale(self.box_pred(box_feature))))
            centerness.append(self.centerness(box_feature))
        return FCOSOutputs(cls_logits, box_regression, centerness)
