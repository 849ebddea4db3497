"""Image transforms, batch collation and the LR batch: the input side of the aligned pyramid.

Per image (on uint8 tensors, boxes follow through torchvision.transforms.v2): resize by short
side (sampled from a list when training) with a max size, optional horizontal flip. Per batch:
pad to a multiple of ``size_divisibility`` (128 keeps every 1/2 level aligned with its HR
partner), normalise on the device, and make the LR batch from the padded HR batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

LR_MODES = ("nearest", "bilinear_aa")


class DetectionTransform:
    """Resize by short side (random choice from ``min_sizes`` when more than one) and optionally flip.

    Called as ``(image uint8 [3, H, W], target) -> (image uint8 [3, h, w], target)``; the target's
    ``boxes`` [N, 4] xyxy are resized/flipped with the image and ``image_size`` (h, w) is set.
    """

    def __init__(self, min_sizes: Sequence[int], max_size: int, horizontal_flip: bool = False) -> None:
        steps: list[Any] = [
            v2.RandomShortestSize(min_size=list(min_sizes), max_size=max_size, antialias=True)
        ]
        if horizontal_flip:
            steps.append(v2.RandomHorizontalFlip(p=0.5))
        self.pipeline = v2.Compose(steps)

    def __call__(self, image: Tensor, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        height, width = image.shape[-2:]
        boxes = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(height, width))
        image, boxes = self.pipeline(tv_tensors.Image(image), boxes)
        target = {**target, "boxes": boxes.as_subclass(Tensor), "image_size": tuple(image.shape[-2:])}
        return image.as_subclass(Tensor), target


def build_transform(input_cfg, train: bool) -> DetectionTransform:
    """Training or test transform from an :class:`~msad_deploy.config.InputConfig`."""
    if train:
        return DetectionTransform(
            input_cfg.train_min_sizes, input_cfg.train_max_size, input_cfg.horizontal_flip
        )
    return DetectionTransform([input_cfg.test_min_size], input_cfg.test_max_size, horizontal_flip=False)


class DetectionBatch(NamedTuple):
    """A collated batch. images: uint8 [B, 3, H, W] padded with zeros at bottom/right to a multiple of
    the size divisibility; image_sizes: [B, 2] (h, w) before padding; targets: per-image dicts."""

    images: Tensor
    image_sizes: Tensor
    targets: list[dict[str, Any]]

    def to(self, device: torch.device | str) -> DetectionBatch:
        def move(value: Any) -> Any:
            return value.to(device, non_blocking=True) if isinstance(value, Tensor) else value

        targets = [{k: move(v) for k, v in t.items()} for t in self.targets]
        return DetectionBatch(move(self.images), move(self.image_sizes), targets)


def padded_size(height: int, width: int, size_divisibility: int) -> tuple[int, int]:
    """Smallest (H, W) >= (height, width) divisible by ``size_divisibility``."""
    d = size_divisibility
    return math.ceil(height / d) * d, math.ceil(width / d) * d


class Collate:
    """Pad a list of (image, target) into a :class:`DetectionBatch` (picklable for DataLoader workers)."""

    def __init__(self, size_divisibility: int = 128) -> None:
        self.size_divisibility = size_divisibility

    def __call__(self, samples: list[tuple[Tensor, dict[str, Any]]]) -> DetectionBatch:
        max_h = max(image.shape[-2] for image, _ in samples)
        max_w = max(image.shape[-1] for image, _ in samples)
        height, width = padded_size(max_h, max_w, self.size_divisibility)
        images = samples[0][0].new_zeros(len(samples), 3, height, width)
        for i, (image, _) in enumerate(samples):
            images[i, :, : image.shape[-2], : image.shape[-1]] = image
        sizes = torch.tensor([image.shape[-2:] for image, _ in samples], dtype=torch.int64)
        return DetectionBatch(images, sizes, [target for _, target in samples])


def normalize_images(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 [B, 3, H, W] (0..255) -> float32 (x / 255 - mean) / std, on the tensor's device."""
    mean_t = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean_t) / std_t


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
