"""The one input path: uint8 images of any size -> network input + what maps boxes back.

Evaluation, export verification, the runtime and the benchmarks all feed models through these
functions, with the settings of the model's :class:`~msad_deploy.models.spec.InferenceSpec`, so
accuracy is always measured through the path that is deployed:

    resize (short side to the test size, antialiased) -> pad to the size divisibility ->
    normalise -> downsample by 2**input_shift (make_lr_batch, as in training)

Evaluation resizes in DataLoader workers (the dataset's test transform is the same
``resize_image``) and calls :func:`prepare_batch`; a service calls :func:`preprocess`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from msad_deploy.data.transforms import (
    inference_size,
    normalize_images,
    pad_images,
    padded_size,
    resize_image,
)
from msad_deploy.models.fcos import FCOSDetector
from msad_deploy.models.head import FCOSOutputs
from msad_deploy.models.postprocess import Detections, decode, level_sizes, rescale_boxes, select
from msad_deploy.models.pyramid import make_lr_batch
from msad_deploy.models.spec import InferenceSpec
from msad_deploy.models.teacher import AlignedMultiScaleTeacher, TeacherBranch


class PreparedBatch(NamedTuple):
    """inputs: float32 [B, 3, H / d, W / d] network input (d = 2**input_shift, H, W padded);
    image_sizes: [B, 2] (h, w) of each resized image in the decode frame, before padding;
    original_sizes: [B, 2] (h, w) of each image as given."""

    inputs: Tensor
    image_sizes: Tensor
    original_sizes: Tensor


def network_input(padded: Tensor, spec: InferenceSpec) -> Tensor:
    """Padded uint8 HR-frame batch [B, 3, H, W] -> normalised network input [B, 3, H / d, W / d]."""
    images = normalize_images(padded, spec.pixel_mean, spec.pixel_std)
    return make_lr_batch(images, spec.input_shift, spec.lr_mode)


def prepare_batch(
    padded: Tensor, image_sizes: Tensor, original_sizes: Tensor, spec: InferenceSpec
) -> PreparedBatch:
    """A padded uint8 batch of resized images (HR frame; ``image_sizes`` [B, 2]) -> :class:`PreparedBatch`."""
    frame_sizes = image_sizes.to(padded.device) * spec.frame_scale
    return PreparedBatch(network_input(padded, spec), frame_sizes, original_sizes.to(padded.device))


def resize_and_pad(
    images: Sequence[Tensor], spec: InferenceSpec, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """uint8 RGB images [3, H_i, W_i] -> (padded uint8 HR-frame batch [B, 3, H, W] on ``device``,
    resized sizes [B, 2], original sizes [B, 2]): the first half of :func:`preprocess`, the form
    the evaluation loader's batches have (what the runtime pads further for fixed-size artifacts)."""
    if not images:
        raise ValueError("preprocess needs at least one image")
    device = torch.device(device) if device is not None else images[0].device
    original = torch.tensor([tuple(image.shape[-2:]) for image in images], dtype=torch.int64)
    resized = [resize_image(image.to(device), spec.test_min_size, spec.test_max_size) for image in images]
    padded, sizes = pad_images(resized, spec.size_divisibility)
    return padded, sizes, original


def preprocess(
    images: Sequence[Tensor], spec: InferenceSpec, device: torch.device | str | None = None
) -> PreparedBatch:
    """uint8 RGB images [3, H_i, W_i] of any sizes -> :class:`PreparedBatch` on ``device``."""
    return prepare_batch(*resize_and_pad(images, spec, device), spec)


def pad_to_size(padded: Tensor, size: tuple[int, int], source: Any) -> Tensor:
    """Zero-pad a uint8 batch [B, 3, h, w] at bottom/right to ``size`` (H, W); error when it does not fit."""
    height, width = size
    if padded.shape[-2] > height or padded.shape[-1] > width:
        raise ValueError(
            f"{source} takes inputs of {height}x{width} (padded HR frame); this image needs "
            f"{padded.shape[-2]}x{padded.shape[-1]} after resizing per the spec (export with --dynamic or a "
            "larger --input-size)"
        )
    if tuple(padded.shape[-2:]) == (height, width):
        return padded
    return torch.nn.functional.pad(padded, (0, width - padded.shape[-1], 0, height - padded.shape[-2]))


def padded_input_size(height: int, width: int, spec: InferenceSpec) -> tuple[int, int]:
    """The padded HR-frame size an image of ``height`` x ``width`` gets (resized, then padded)."""
    resized = inference_size(height, width, spec.test_min_size, spec.test_max_size)
    return padded_size(*resized, spec.size_divisibility)


def level_sizes_for(spec: InferenceSpec, padded_hw: Sequence[int]) -> list[int]:
    """Locations per pyramid level of a padded HR-frame batch of size ``padded_hw`` (decode frame),
    the split of the L axis of raw ``boxes`` [B, L, 4] / ``scores`` [B, L, C] artifact outputs."""
    height, width = (int(v * spec.frame_scale) for v in padded_hw)
    return [-(-height // s) * -(-width // s) for s in spec.strides]


def inference_network(model: nn.Module, spec: InferenceSpec) -> nn.Module:
    """The module that maps a network input to raw outputs: the detector, or a teacher branch."""
    if isinstance(model, AlignedMultiScaleTeacher):
        return TeacherBranch(model, spec.teacher_branch, spec.lr_mode)
    if isinstance(model, (FCOSDetector, TeacherBranch)):
        return model
    raise TypeError(f"cannot run inference with a {type(model).__name__}")


def frame_detections(outputs: FCOSOutputs, image_sizes: Tensor, spec: InferenceSpec) -> Detections:
    """Raw outputs -> :class:`Detections` in the decode frame (decode, per-level top-k, clip to
    ``image_sizes`` [B, 2], eager NMS): the output contract of the exported artifacts."""
    boxes, scores = decode(outputs, spec.strides, spec.score_thresh)
    return select_decoded(boxes, scores, level_sizes(outputs), image_sizes, spec)


def select_decoded(
    boxes: Tensor, scores: Tensor, sizes: list[int], image_sizes: Tensor, spec: InferenceSpec
) -> Detections:
    """Decoded ``boxes`` [B, L, 4] / ``scores`` [B, L, C] (``sizes`` locations per level) -> Detections
    with the spec's top-k, NMS threshold and detection count (what ``--nms none`` artifacts leave to us)."""
    return select(
        boxes, scores, sizes, image_sizes, spec.topk_per_level, spec.nms_thresh, spec.max_detections
    )


def postprocess(outputs: FCOSOutputs, batch: PreparedBatch, spec: InferenceSpec) -> Detections:
    """Raw outputs of a prepared batch -> :class:`Detections` in original pixels (eager NMS)."""
    detections = frame_detections(outputs, batch.image_sizes, spec)
    return detections._replace(boxes=rescale_boxes(detections.boxes, batch.image_sizes, batch.original_sizes))
