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
from typing import NamedTuple

import torch
from torch import Tensor, nn

from msad_deploy.data.transforms import make_lr_batch, normalize_images, pad_images, resize_image
from msad_deploy.models.fcos import FCOSDetector
from msad_deploy.models.head import FCOSOutputs
from msad_deploy.models.postprocess import Detections, decode, level_sizes, rescale_boxes, select
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


def preprocess(
    images: Sequence[Tensor], spec: InferenceSpec, device: torch.device | str | None = None
) -> PreparedBatch:
    """uint8 RGB images [3, H_i, W_i] of any sizes -> :class:`PreparedBatch` on ``device``."""
    if not images:
        raise ValueError("preprocess needs at least one image")
    device = torch.device(device) if device is not None else images[0].device
    original = torch.tensor([tuple(image.shape[-2:]) for image in images], dtype=torch.int64)
    resized = [resize_image(image.to(device), spec.test_min_size, spec.test_max_size) for image in images]
    padded, sizes = pad_images(resized, spec.size_divisibility)
    return prepare_batch(padded, sizes, original, spec)


def inference_network(model: nn.Module, spec: InferenceSpec) -> nn.Module:
    """The module that maps a network input to raw outputs: the detector, or a teacher branch."""
    if isinstance(model, AlignedMultiScaleTeacher):
        return TeacherBranch(model, spec.teacher_branch, spec.lr_mode)
    if isinstance(model, (FCOSDetector, TeacherBranch)):
        return model
    raise TypeError(f"cannot run inference with a {type(model).__name__}")


def postprocess(outputs: FCOSOutputs, batch: PreparedBatch, spec: InferenceSpec) -> Detections:
    """Raw outputs of a prepared batch -> :class:`Detections` in original pixels (eager NMS)."""
    boxes, scores = decode(outputs, spec.strides, spec.score_thresh)
    detections = select(
        boxes,
        scores,
        level_sizes(outputs),
        batch.image_sizes,
        spec.topk_per_level,
        spec.nms_thresh,
        spec.max_detections,
    )
    return detections._replace(boxes=rescale_boxes(detections.boxes, batch.image_sizes, batch.original_sizes))
