"""Image transforms, batch collation and the LR batch: the input side of the aligned pyramid.

Per image (on uint8 tensors, boxes follow through torchvision.transforms.v2): resize by short
side (sampled from a list when training) with a max size, optional horizontal flip. Per batch:
pad to a multiple of ``size_divisibility`` (128 keeps every 1/2 level aligned with its HR
partner), normalise on the device. The LR batch is made from the padded HR batch by
:func:`msad_deploy.models.pyramid.make_lr_batch` (the teacher makes its own, so it lives in models).
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


def inference_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(h, w) an image is resized to at test time: short side ``min_size``, long side at most ``max_size``.

    torchvision's RandomShortestSize rule (which training uses), floor(side x ratio), computed in
    exact integers: floor(side x min(a, b)) = min(floor(side x a), floor(side x b)), so Python and an
    exported graph (torch.sym_min on symbolic sizes) agree where float rounding (97 x 128 / 97 =
    127.99...) would not. Works on ints and on torch.export's symbolic sizes alike.
    """
    short, long = torch.sym_min(height, width), torch.sym_max(height, width)
    return (
        torch.sym_min(height * min_size // short, height * max_size // long),
        torch.sym_min(width * min_size // short, width * max_size // long),
    )


def resize_image(image: Tensor, min_size: int, max_size: int) -> Tensor:
    """Test-time resize of one uint8 image [3, H, W] -> [3, h, w]: antialiased bilinear in float32,
    rounded back to uint8.

    The float resize (not torchvision's fixed-point uint8 kernel, which rounds differently on a few
    percent of pixels by one level) is what an exported graph's Resize computes, so evaluation, the
    runtime and in-graph preprocessing give the same pixels.
    """
    size = inference_size(image.shape[-2], image.shape[-1], min_size, max_size)
    if tuple(image.shape[-2:]) == size:
        return image
    resized = F.interpolate(
        image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True
    )
    return resized[0].round_().clamp_(0, 255).to(torch.uint8)


class InferenceTransform:
    """The test transform: :func:`resize_image` on the image, boxes scaled with it (no randomness)."""

    def __init__(self, min_size: int, max_size: int) -> None:
        self.min_size = min_size
        self.max_size = max_size

    def __call__(self, image: Tensor, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        height, width = image.shape[-2:]
        image = resize_image(image, self.min_size, self.max_size)
        scale = torch.tensor([image.shape[-1] / width, image.shape[-2] / height] * 2)
        boxes = target["boxes"] * scale if "boxes" in target else None
        target = {**target, "image_size": tuple(image.shape[-2:])}
        if boxes is not None:
            target["boxes"] = boxes
        return image, target


def build_transform(input_cfg, train: bool) -> DetectionTransform | InferenceTransform:
    """Training or test transform from an :class:`~msad_deploy.config.InputConfig`."""
    if train:
        return DetectionTransform(
            input_cfg.train_min_sizes, input_cfg.train_max_size, input_cfg.horizontal_flip
        )
    return InferenceTransform(input_cfg.test_min_size, input_cfg.test_max_size)


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


def pad_images(images: Sequence[Tensor], size_divisibility: int) -> tuple[Tensor, Tensor]:
    """Images [3, h_i, w_i] -> (batch [B, 3, H, W] zero-padded at bottom/right to a multiple of
    ``size_divisibility``, image sizes [B, 2] (h, w) int64 before padding)."""
    max_h = max(image.shape[-2] for image in images)
    max_w = max(image.shape[-1] for image in images)
    height, width = padded_size(max_h, max_w, size_divisibility)
    batch = images[0].new_zeros(len(images), 3, height, width)
    for i, image in enumerate(images):
        batch[i, :, : image.shape[-2], : image.shape[-1]] = image
    sizes = torch.tensor([tuple(image.shape[-2:]) for image in images], dtype=torch.int64)
    return batch, sizes


class Collate:
    """Pad a list of (image, target) into a :class:`DetectionBatch` (picklable for DataLoader workers)."""

    def __init__(self, size_divisibility: int = 128) -> None:
        self.size_divisibility = size_divisibility

    def __call__(self, samples: list[tuple[Tensor, dict[str, Any]]]) -> DetectionBatch:
        images, sizes = pad_images([image for image, _ in samples], self.size_divisibility)
        return DetectionBatch(images, sizes, [target for _, target in samples])


def normalize_images(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 [B, 3, H, W] (0..255) -> float32 (x / 255 - mean) / std, on the tensor's device."""
    mean_t = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean_t) / std_t
