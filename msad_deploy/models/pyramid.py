"""Feature-pyramid position shifting: the one place that knows which levels a 1/2**k input uses.

An HR input uses P3..P7 with strides 8..128. A 1/2**k input uses P(3-k)..P(7-k); its level
P(l-k) has exactly the spatial size of HR level P(l) (given the padding of
:func:`size_divisibility`), so every branch is decoded and trained in the HR frame with the HR
strides and sizes of interest. Changing ``k`` is a configuration, not a code change.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

HR_LEVELS: tuple[int, ...] = (3, 4, 5, 6, 7)
HR_STRIDES: tuple[int, ...] = tuple(2**level for level in HR_LEVELS)
# FCOS sizes of interest per HR level, in HR pixels: a location on level i regresses objects whose
# largest side distance lies in [lo, hi).
HR_SIZES_OF_INTEREST: tuple[tuple[float, float], ...] = (
    (-1.0, 64.0),
    (64.0, 128.0),
    (128.0, 256.0),
    (256.0, 512.0),
    (512.0, math.inf),
)
# Levels a torchvision backbone can provide (C2..C5); P6, P7 come from extra stride-2 convs.
MIN_BACKBONE_LEVEL = 2
# How the 1/2**k input is made from the padded, normalised HR batch (``input.lr_mode``).
LR_MODES = ("nearest", "bilinear_aa")


def pyramid_levels(shift: int) -> tuple[int, ...]:
    """Pyramid levels used by a model run on a 1/2**shift input: P(3-shift)..P(7-shift)."""
    if shift < 0:
        raise ValueError(f"pyramid shift must be >= 0, got {shift}")
    levels = tuple(level - shift for level in HR_LEVELS)
    if levels[0] < MIN_BACKBONE_LEVEL:
        raise ValueError(
            f"pyramid shift {shift} needs P{levels[0]}, but backbones provide C{MIN_BACKBONE_LEVEL}..C5; "
            f"use a shift of at most {HR_LEVELS[0] - MIN_BACKBONE_LEVEL}"
        )
    return levels


def input_scale(shift: int) -> int:
    """How much smaller the network input is than the HR frame its outputs are decoded in."""
    return 2**shift


def size_divisibility(shift: int = 1) -> int:
    """Multiple the padded HR batch must have so each 1/2**shift level matches its HR partner.

    HR P7 has stride 128, and the LR input's coarsest level (stride 2**(7-shift) on a 1/2**shift
    input) needs the same multiple of the HR size, so 128 suffices for every shift.
    """
    pyramid_levels(shift)  # validates
    return HR_STRIDES[-1]


def level_shapes(height: int, width: int, levels: tuple[int, ...]) -> list[tuple[int, int]]:
    """Spatial sizes of pyramid levels for an input of (height, width), as strided convs produce them."""
    return [(math.ceil(height / 2**level), math.ceil(width / 2**level)) for level in levels]


def compute_locations(
    shapes: list[tuple[int, int]], strides: tuple[int, ...] = HR_STRIDES, device: torch.device | None = None
) -> list[Tensor]:
    """Centres of every feature-map cell in the HR frame, per level: [H_i * W_i, 2] as (x, y).

    Cell (row r, col c) of a level with HR stride s sits at (c * s + s // 2, r * s + s // 2),
    whatever the input resolution of the branch that produced it.
    """
    locations = []
    for (height, width), stride in zip(shapes, strides, strict=True):
        xs = torch.arange(width, device=device, dtype=torch.float32) * stride + stride // 2
        ys = torch.arange(height, device=device, dtype=torch.float32) * stride + stride // 2
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        locations.append(torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1))
    return locations


def resolve_input_shift(pyramid_shift: int, input_shift: int | None) -> int:
    """Halvings from the HR-frame batch to the network input (default: the pyramid shift)."""
    shift = pyramid_shift if input_shift is None else input_shift
    if shift < pyramid_shift:
        raise ValueError(f"input shift {shift} is smaller than the pyramid shift {pyramid_shift}")
    return shift


def decode_frame_scale(pyramid_shift: int, input_shift: int | None) -> float:
    """Size of the frame a model decodes in, relative to the HR-frame batch: 2**(pyramid - input shift).

    1.0 for every aligned model (baselines, student, teacher); 0.5 for a P3..P7 model fed the 1/2
    batch (the unaligned ablation), whose targets and boxes live in the 1/2 frame.
    """
    return 2.0 ** (pyramid_shift - resolve_input_shift(pyramid_shift, input_shift))


def make_lr_batch(hr_images: Tensor, shift: int = 1, mode: str = "nearest") -> Tensor:
    """The 1/2**shift input from a padded, normalised HR batch [B, 3, H, W] -> [B, 3, H / 2**s, W / 2**s].

    "nearest" keeps every 2**s-th pixel (the reference code's choice); "bilinear_aa" is an
    antialiased bilinear resize. H and W must be divisible by 2**shift (the collate guarantees it).
    """
    if shift == 0:
        return hr_images
    factor = 2**shift
    height, width = hr_images.shape[-2:]
    if height % factor or width % factor:
        raise ValueError(
            f"HR batch {height}x{width} is not divisible by {factor}; pad it with the collate first"
        )
    size = (height // factor, width // factor)
    if mode == "nearest":
        return F.interpolate(hr_images, size=size, mode="nearest")
    if mode == "bilinear_aa":
        return F.interpolate(hr_images, size=size, mode="bilinear", align_corners=False, antialias=True)
    raise ValueError(f"unknown LR mode {mode!r}; choose one of {LR_MODES}")
