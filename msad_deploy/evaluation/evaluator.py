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


class DetectorPredictor:
    """The same call for a :class:`~msad_deploy.runtime.Detector` (any backend): the loader's padded
    uint8 batches go through ``Detector.detect_padded``, so one DataLoader serves every artifact and
    accuracy is measured through the path that is deployed."""

    def __init__(self, detector: Any) -> None:
        self.detector = detector

    def __call__(
        self, images: Tensor, image_sizes: Tensor, targets: list[dict[str, Any]]
    ) -> list[dict[str, Tensor]]:
        original_sizes = torch.tensor([t["orig_size"] for t in targets])
        return self.detector.detect_padded(images, image_sizes, original_sizes).per_image()


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
    progress: bool = True,
    resize: bool = True,
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
        # resize=False: images as stored (artifacts that resize inside their graph)
        build_transform(config.input, train=False) if resize else None,
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
    spec: InferenceSpec | None = None,
    model_source: str = "the model",
    per_image: bool = False,
) -> tuple[dict[str, float], list[dict[str, Any]]] | tuple[dict[str, float], list[dict[str, Any]], Any]:
    """COCO bbox metrics (percent) and the gathered detection records of ``model`` on a dataset.

    ``spec`` defaults to the one ``config`` implies (with ``teacher_branch`` for a teacher); the
    dataset settings (on_bad, area ranges, workers) come from ``config.data``. Scored on the
    dataset's images less those found unreadable while loading (on_bad="skip"). ``per_image=True``
    adds a third item, the :class:`~msad_deploy.evaluation.bootstrap.PerImageEval` (AP intervals).
    """
    if spec is None:
        spec = InferenceSpec.from_config(config, teacher_branch=teacher_branch)
    dataset, loader = build_eval_loader(config, image_dir, ann_file, batch_size, num_workers, progress)
    check_model_matches_data(spec, dataset, model_source)
    was_training = model.training
    model.eval()
    try:
        predictor = BatchPredictor(model, spec)
        records = inference_on_dataset(predictor, loader, dataset.label_to_category_id, progress=progress)
    finally:
        model.train(was_training)
    return _score(records, dataset, loader, config, ann_file, per_image)


def evaluate_detector(
    detector: Any,
    config: Config,
    image_dir: str | Path,
    ann_file: str | Path,
    batch_size: int = 4,
    num_workers: int | None = None,
    progress: bool = True,
    model_source: str | None = None,
    per_image: bool = False,
) -> tuple[dict[str, float], list[dict[str, Any]]] | tuple[dict[str, float], list[dict[str, Any]], Any]:
    """COCO bbox metrics (percent) and detection records of a :class:`~msad_deploy.runtime.Detector`.

    Any backend (checkpoint, ONNX, TensorRT, AOTInductor): the evaluation loader (``config.data``
    settings; ``config.input`` must be the detector's spec sizes) collates padded uint8 batches and
    the Detector runs them as deployed. Artifacts with in-graph preprocessing get the images unresized.
    ``per_image=True`` adds a third item, the per-image matching (see :func:`evaluate_model`).
    """
    source = model_source or str(detector.path)
    resize = not detector.takes_frames
    dataset, loader = build_eval_loader(
        config, image_dir, ann_file, batch_size, num_workers, progress, resize=resize
    )
    check_model_matches_data(detector.spec, dataset, source)
    records = inference_on_dataset(
        DetectorPredictor(detector), loader, dataset.label_to_category_id, progress=progress
    )
    return _score(records, dataset, loader, config, ann_file, per_image)


def _score(
    records: list[dict[str, Any]],
    dataset: CocoDetection,
    loader: CheckedLoader,
    config: Config,
    ann_file: str | Path,
    per_image: bool = False,
) -> tuple[dict[str, float], list[dict[str, Any]]] | tuple[dict[str, float], list[dict[str, Any]], Any]:
    """Gather records over ranks and score them on the images that could be loaded."""
    records = gather_predictions(records)
    failed = _all_failed_image_ids(loader.failed_image_ids)
    image_ids = [image_id for image_id in dataset.image_ids if image_id not in failed]
    if not image_ids:
        raise DataError(
            f"no image of {ann_file} could be loaded for evaluation ({len(failed)} unreadable, named in the "
            "warnings above); fix the image files"
        )
    scored = evaluate_detections(
        dataset.coco,
        records,
        image_ids=image_ids,
        area_range_scale=config.data.eval_area_range_scale,
        per_image=per_image,
    )
    if per_image:
        metrics, matching = scored
        return metrics, records, matching
    return scored, records


def artifact_eval_config(
    spec: InferenceSpec, metadata: dict[str, Any] | None, overrides: list[str] | None = None
) -> tuple[Config, str]:
    """The evaluation config of an exported artifact, and a note saying where its data settings came from.

    Input sizes come from the artifact's spec (they are fixed at export). Data settings (area ranges,
    on_bad, workers, pixel limit) come from the source checkpoint's config when that file is still
    where the sidecar says and has the recorded SHA-256, else from the defaults; ``overrides`` may
    change ``data.*`` only.
    """
    from msad_deploy.config import apply_overrides, config_to_dict, from_dict
    from msad_deploy.models.build import load_model_checkpoint
    from msad_deploy.runtime.artifacts import sha256_file

    overrides = list(overrides or [])
    fixed = [item for item in overrides if not item.startswith("data.")]
    if fixed:
        raise ValueError(
            f"{' '.join(fixed)}: an exported artifact's model, input and postprocess settings are fixed at "
            "export; only data.* overrides apply (re-export to change the others)"
        )
    data = config_to_dict(Config())
    note = "data settings: defaults"
    source = Path(str((metadata or {}).get("source_checkpoint") or ""))
    if source.name and source.is_file() and sha256_file(source) == (metadata or {}).get("source_sha256"):
        try:
            data["data"] = dict(load_model_checkpoint(source)["config"].get("data") or data["data"])
            note = f"data settings: from {source}"
        except ValueError:
            pass
    data["input"].update(
        test_min_size=spec.test_min_size,
        test_max_size=spec.test_max_size,
        size_divisibility=spec.size_divisibility,
        pixel_mean=list(spec.pixel_mean),
        pixel_std=list(spec.pixel_std),
    )
    config = from_dict(Config, apply_overrides(data, overrides), "evaluation config")
    if overrides:
        note += f", overridden by {' '.join(overrides)}"
    return config, note
