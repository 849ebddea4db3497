"""Evaluate a detector (or a teacher branch) on a COCO-format dataset, sharded over DDP ranks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler

from msad_deploy.config import Config
from msad_deploy.data.coco import CocoDetection, DataError
from msad_deploy.data.guard import CheckedLoader, GuardedSamples
from msad_deploy.data.transforms import Collate, build_transform, make_lr_batch, normalize_images
from msad_deploy.evaluation.coco_eval import evaluate_detections, gather_predictions, inference_on_dataset
from msad_deploy.models.fcos import FCOSDetector
from msad_deploy.models.postprocess import postprocess_detections
from msad_deploy.models.pyramid import decode_frame_scale, resolve_input_shift
from msad_deploy.models.teacher import AlignedMultiScaleTeacher

TEACHER_BRANCHES = ("fused", "hr", "lr")


class BatchPredictor:
    """The PyTorch inference path: padded uint8 HR-frame batch -> detections in original pixels.

    Normalises on the model's device, downsamples by the model's input shift (a student sees the
    1/2**k batch, exactly as in training), runs the model and decodes in its frame (the HR frame
    for every aligned model).
    ``teacher_branch`` picks which teacher output is decoded ("fused" is the teacher's inference path).
    """

    def __init__(self, model: nn.Module, config: Config, teacher_branch: str = "fused") -> None:
        if teacher_branch not in TEACHER_BRANCHES:
            raise ValueError(f"teacher_branch must be one of {TEACHER_BRANCHES}, got {teacher_branch!r}")
        self.model = model
        self.config = config
        self.teacher_branch = teacher_branch
        self.device = next(model.parameters()).device

    def __call__(
        self, images: Tensor, image_sizes: Tensor, targets: list[dict[str, Any]]
    ) -> list[dict[str, Tensor]]:
        inputs = self.config.input
        hr_images = normalize_images(
            images.to(self.device, non_blocking=True), inputs.pixel_mean, inputs.pixel_std
        )
        if isinstance(self.model, AlignedMultiScaleTeacher):
            lr_images = make_lr_batch(hr_images, self.model.lr_shift, inputs.lr_mode)
            outputs = getattr(self.model(hr_images, lr_images), self.teacher_branch)
        elif isinstance(self.model, FCOSDetector):
            input_shift = resolve_input_shift(self.model.pyramid_shift, inputs.input_shift)
            outputs = self.model(make_lr_batch(hr_images, input_shift, inputs.lr_mode))
            image_sizes = image_sizes * decode_frame_scale(self.model.pyramid_shift, inputs.input_shift)
        else:
            raise TypeError(f"cannot evaluate a {type(self.model).__name__}")
        post = self.config.postprocess
        original_sizes = torch.tensor([t["orig_size"] for t in targets])
        return postprocess_detections(
            outputs,
            image_sizes,
            original_sizes,
            score_thresh=post.score_thresh,
            topk_per_level=post.topk_per_level,
            nms_thresh=post.nms_thresh,
            max_detections=post.max_detections,
        )


def build_eval_loader(
    config: Config,
    image_dir: str | Path,
    ann_file: str | Path,
    batch_size: int = 4,
    num_workers: int | None = None,
    progress: bool = True,
) -> tuple[CocoDetection, CheckedLoader]:
    """Test-time dataset and loader; sharded with a DistributedSampler when a process group is up.

    The dataset follows ``config.data`` (on_bad, verify_images, max_image_pixels). An image that turns
    out unreadable while loading stops evaluation with a one-line DataError (on_bad="error"), or with
    on_bad="skip" is left out of the batch with a warning and listed in the loader's
    ``failed_image_ids``: :func:`evaluate_model` then excludes it from scoring, as ``verify_images``
    would have excluded it from the dataset (it neither counts as a miss nor gets detections).
    """
    data = config.data
    dataset = CocoDetection(
        image_dir,
        ann_file,
        build_transform(config.input, train=False),
        on_bad=data.on_bad,
        verify_images=data.verify_images,
        max_image_pixels=data.max_image_pixels,
        progress=progress,
    )
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    sampler = DistributedSampler(dataset, shuffle=False) if distributed else None
    loader = DataLoader(
        GuardedSamples(dataset),
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=data.num_workers if num_workers is None else num_workers,
        collate_fn=Collate(config.input.size_divisibility),
    )
    return dataset, CheckedLoader(loader, drop_unreadable=data.on_bad == "skip")


def _all_failed_image_ids(local: list[int]) -> set[int]:
    """Image ids left out as unreadable on any rank."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return set(local)
    per_rank: list[list[int] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, local)
    return {image_id for ids in per_rank for image_id in ids or []}


def evaluate_model(
    model: nn.Module,
    config: Config,
    image_dir: str | Path,
    ann_file: str | Path,
    batch_size: int = 4,
    num_workers: int | None = None,
    teacher_branch: str = "fused",
    progress: bool = True,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """COCO bbox metrics (percent) and the gathered detection records of ``model`` on a dataset.

    Scored on the dataset's images less those found unreadable while loading (on_bad="skip").
    """
    dataset, loader = build_eval_loader(config, image_dir, ann_file, batch_size, num_workers, progress)
    was_training = model.training
    model.eval()
    try:
        predictor = BatchPredictor(model, config, teacher_branch)
        records = inference_on_dataset(predictor, loader, dataset.label_to_category_id, progress=progress)
    finally:
        model.train(was_training)
    records = gather_predictions(records)
    failed = _all_failed_image_ids(loader.failed_image_ids)
    image_ids = [image_id for image_id in dataset.image_ids if image_id not in failed]
    if not image_ids:
        raise DataError(
            f"no image of {ann_file} could be loaded for evaluation ({len(failed)} unreadable, named in the "
            "warnings above); fix the image files"
        )
    metrics = evaluate_detections(
        dataset.coco, records, image_ids=image_ids, area_range_scale=config.data.eval_area_range_scale
    )
    return metrics, records
