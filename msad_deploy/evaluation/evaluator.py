"""Evaluate a detector (or a teacher branch) on a COCO-format dataset, sharded over DDP ranks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler

from msad_deploy.config import Config
from msad_deploy.data.coco import CocoDetection
from msad_deploy.data.transforms import Collate, build_transform
from msad_deploy.evaluation.coco_eval import evaluate_detections, gather_predictions, inference_on_dataset
from msad_deploy.models.spec import InferenceSpec
from msad_deploy.runtime.preprocess import inference_network, postprocess, prepare_batch


class BatchPredictor:
    """The PyTorch inference path on a padded uint8 HR-frame batch -> detections in original pixels.

    Uses the model's :class:`InferenceSpec` through :mod:`msad_deploy.runtime.preprocess`, the same
    functions the runtime and export verification use: normalise, downsample by the input shift
    (a student sees the 1/2**k batch, exactly as in training), run, decode, select.
    """

    def __init__(self, model: nn.Module, spec: InferenceSpec) -> None:
        self.network = inference_network(model, spec)
        self.spec = spec
        self.device = next(model.parameters()).device

    def __call__(
        self, images: Tensor, image_sizes: Tensor, targets: list[dict[str, Any]]
    ) -> list[dict[str, Tensor]]:
        original_sizes = torch.tensor([t["orig_size"] for t in targets])
        batch = prepare_batch(
            images.to(self.device, non_blocking=True), image_sizes, original_sizes, self.spec
        )
        return postprocess(self.network(batch.inputs), batch, self.spec).per_image()


def check_model_matches_data(
    spec: InferenceSpec, dataset: CocoDetection, model_source: str = "the model"
) -> None:
    """Refuse to score a model on data with other classes (count or category ids), naming both files."""
    if spec.num_classes != dataset.num_classes:
        raise ValueError(
            f"{model_source} predicts {spec.num_classes} classes but {dataset.ann_file} has "
            f"{dataset.num_classes} categories; evaluate it on the dataset it was trained for"
        )
    if spec.category_ids and list(spec.category_ids) != list(dataset.category_ids):
        raise ValueError(
            f"{model_source} was trained on category ids {spec.category_ids} but {dataset.ann_file} has "
            f"{dataset.category_ids}; its labels would be scored as the wrong classes"
        )


def build_eval_loader(
    config: Config,
    image_dir: str | Path,
    ann_file: str | Path,
    batch_size: int = 4,
    num_workers: int | None = None,
) -> tuple[CocoDetection, DataLoader]:
    """Test-time dataset and loader; sharded with a DistributedSampler when a process group is up."""
    dataset = CocoDetection(
        image_dir, ann_file, build_transform(config.input, train=False), on_bad=config.data.on_bad
    )
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    sampler = DistributedSampler(dataset, shuffle=False) if distributed else None
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=config.data.num_workers if num_workers is None else num_workers,
        collate_fn=Collate(config.input.size_divisibility),
    )
    return dataset, loader


def evaluate_model(
    model: nn.Module,
    config: Config,
    image_dir: str | Path,
    ann_file: str | Path,
    batch_size: int = 4,
    num_workers: int | None = None,
    teacher_branch: str = "fused",
    progress: bool = True,
    spec: InferenceSpec | None = None,
    model_source: str = "the model",
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """COCO bbox metrics (percent) and the gathered detection records of ``model`` on a dataset.

    ``spec`` defaults to the one ``config`` implies (with ``teacher_branch`` for a teacher); the
    dataset settings (on_bad, area ranges, workers) come from ``config.data``.
    """
    if spec is None:
        spec = InferenceSpec.from_config(config, teacher_branch=teacher_branch)
    dataset, loader = build_eval_loader(config, image_dir, ann_file, batch_size, num_workers)
    check_model_matches_data(spec, dataset, model_source)
    was_training = model.training
    model.eval()
    try:
        predictor = BatchPredictor(model, spec)
        records = inference_on_dataset(predictor, loader, dataset.label_to_category_id, progress=progress)
    finally:
        model.train(was_training)
    records = gather_predictions(records)
    metrics = evaluate_detections(
        dataset.coco, records, image_ids=dataset.image_ids, area_range_scale=config.data.eval_area_range_scale
    )
    return metrics, records
