"""What one training step computes for each recipe: baseline, aligned teacher, distilled student.

A task owns the model being trained (``model``), the module that is called and, under DDP,
wrapped (``trainable``: the model itself, or a thin wrapper that also returns FPN features), and
anything frozen (the teacher). Targets are built once per batch in the frame the model decodes in.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msad_deploy.config import Config
from msad_deploy.data.transforms import DetectionBatch, normalize_images
from msad_deploy.models.fcos import FCOSDetector
from msad_deploy.models.head import FCOSOutputs
from msad_deploy.models.losses import fcos_losses, feature_distillation_loss
from msad_deploy.models.pyramid import level_shapes, make_lr_batch, pyramid_levels
from msad_deploy.models.spec import InferenceSpec
from msad_deploy.models.targets import FCOSTargets, compute_fcos_targets
from msad_deploy.models.teacher import AlignedMultiScaleTeacher


def build_targets(batch: DetectionBatch, config: Config, frame_scale: float = 1.0) -> FCOSTargets:
    """FCOS targets of a padded batch in a frame ``frame_scale`` x the HR frame (HR level shapes)."""
    height, width = batch.images.shape[-2:]
    shapes = level_shapes(int(height * frame_scale), int(width * frame_scale), pyramid_levels(0))
    return compute_fcos_targets(
        [t["boxes"] * frame_scale for t in batch.targets],
        [t["labels"] for t in batch.targets],
        shapes,
        center_sampling_radius=config.loss.center_sampling_radius,
    )


def _detection_losses(outputs: FCOSOutputs, targets: FCOSTargets, config: Config) -> dict[str, Tensor]:
    return fcos_losses(outputs, targets, config.loss.focal_alpha, config.loss.focal_gamma)


class Task:
    """Base: ``losses(batch, iteration) -> {name: weighted scalar}``; the total is their sum."""

    model: nn.Module
    trainable: nn.Module

    def __init__(self, config: Config) -> None:
        self.config = config

    def hr_images(self, batch: DetectionBatch) -> Tensor:
        return normalize_images(batch.images, self.config.input.pixel_mean, self.config.input.pixel_std)

    def losses(self, batch: DetectionBatch, iteration: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def train(self) -> None:
        self.trainable.train()


class BaselineTask(Task):
    """A single FCOS detector (HR or LR baseline, shifted LR control) trained on its own input."""

    def __init__(self, model: FCOSDetector, config: Config) -> None:
        super().__init__(config)
        self.model = self.trainable = model
        spec = InferenceSpec.from_config(config)
        self.input_shift, self.frame_scale = spec.input_shift, spec.frame_scale

    def losses(self, batch: DetectionBatch, iteration: int) -> dict[str, Tensor]:
        inputs = make_lr_batch(self.hr_images(batch), self.input_shift, self.config.input.lr_mode)
        return _detection_losses(
            self.trainable(inputs), build_targets(batch, self.config, self.frame_scale), self.config
        )


class TeacherTask(Task):
    """Aligned multi-scale teacher: weighted FCOS losses of the HR, LR and fused branches."""

    def __init__(self, teacher: AlignedMultiScaleTeacher, config: Config) -> None:
        super().__init__(config)
        self.model = self.trainable = teacher

    def losses(self, batch: DetectionBatch, iteration: int) -> dict[str, Tensor]:
        hr = self.hr_images(batch)
        lr = make_lr_batch(hr, self.model.lr_shift, self.config.input.lr_mode)
        outputs = self.trainable(hr, lr)
        targets = build_targets(batch, self.config)
        weights = self.config.teacher
        losses: dict[str, Tensor] = {}
        for branch, weight in (
            ("hr", weights.hr_weight),
            ("lr", weights.lr_weight),
            ("fused", weights.fused_weight),
        ):
            if weight == 0:
                continue
            for name, value in _detection_losses(getattr(outputs, branch), targets, self.config).items():
                losses[f"{branch}_{name}"] = weight * value
        return losses


class StudentWithFeatures(nn.Module):
    """Calls a detector so that DDP sees one forward returning both FPN features and head outputs."""

    def __init__(self, student: FCOSDetector) -> None:
        super().__init__()
        self.student = student

    def forward(self, images: Tensor) -> tuple[list[Tensor], FCOSOutputs]:
        features = self.student.extract_features(images)
        return features, self.student.head(features)


def _describe_mismatch(key: str, student_state: dict[str, Tensor], teacher_state: dict[str, Tensor]) -> str:
    theirs = tuple(teacher_state[key].shape) if key in teacher_state else "missing"
    return f"{key} {tuple(student_state[key].shape)} vs teacher {theirs}"


def describe_fresh_init(
    student: FCOSDetector, teacher_state: dict[str, Tensor], source: str, copied: list[str], fresh: list[str]
) -> str:
    """One log line: how much came from the teacher and which head tensors kept their fresh init."""
    student_state = student.state_dict()
    return (
        f"init from teacher {source}: {len(copied)} of {len(student_state)} tensors copied; "
        f"{len(fresh)} head tensors differ in shape and keep their fresh init: "
        + ", ".join(_describe_mismatch(key, student_state, teacher_state) for key in fresh)
    )


def init_student_from_teacher(
    student: FCOSDetector, teacher_state: dict[str, Tensor], source: str
) -> tuple[list[str], list[str]]:
    """Copy the teacher's backbone, FPN and head weights into the student; returns (copied, fresh) keys.

    The student's FPN is a subset of the teacher's (no P7 for a shifted student, no P2 for an
    unshifted one); C-FF and the levels the student lacks are left behind. The backbone and FPN
    must match tensor for tensor (a ValueError names the first mismatches). The head may differ
    (a lighter student head: fewer channels or convs): its tensors of equal shape are copied, the
    others keep the student's fresh initialisation (the caller logs them: see
    :func:`describe_fresh_init`). The KD loss acts on FPN features, so it does not depend on the head.
    """
    student_state = student.state_dict()

    def matches(key: str) -> bool:
        return key in teacher_state and teacher_state[key].shape == student_state[key].shape

    body_mismatched = [
        _describe_mismatch(k, student_state, teacher_state)
        for k in student_state
        if not k.startswith("head.") and not matches(k)
    ]
    if body_mismatched:
        raise ValueError(
            f"teacher checkpoint {source} does not match the student's backbone/FPN "
            f"({len(body_mismatched)} tensors, e.g. {body_mismatched[:3]}); give the student the teacher's "
            "backbone and FPN settings (model.backbone, model.fpn_channels) or set distill.init_from_teacher=false"
        )
    copied = [key for key in student_state if matches(key)]
    fresh = [key for key in student_state if not matches(key)]
    student.load_state_dict({key: teacher_state[key] for key in copied}, strict=False)
    return copied, fresh


class DistillationTask(Task):
    """MSAD student: its own FCOS loss plus KD of its FPN levels towards frozen teacher features.

    Aligned (default): the 1/2 input through P2..P6 matches the teacher's fused F3..F7 shape for
    shape. Unaligned ablation: a P3..P7 student on the 1/2 input, trained in the 1/2 frame, with
    the teacher's features bilinearly resized to its level sizes.
    """

    def __init__(self, student: FCOSDetector, teacher: AlignedMultiScaleTeacher, config: Config) -> None:
        super().__init__(config)
        distill = config.distill
        if distill.teacher_mode not in ("eval", "train"):
            raise ValueError(f"distill.teacher_mode must be 'eval' or 'train', got {distill.teacher_mode!r}")
        features = distill.teacher_features
        if features == "auto":
            features = "fused" if distill.aligned else "hr"
        if features not in ("fused", "hr", "lr"):
            raise ValueError(f"distill.teacher_features must be auto, fused, hr or lr, got {features!r}")
        self.teacher_features = features
        self.model = student
        self.trainable = StudentWithFeatures(student)
        self.teacher = teacher.requires_grad_(False)
        spec = InferenceSpec.from_config(config)
        self.input_shift, self.frame_scale = spec.input_shift, spec.frame_scale
        if distill.aligned and self.frame_scale != 1.0:
            raise ValueError("aligned distillation needs input.input_shift equal to model.pyramid_shift")

    def train(self) -> None:
        self.trainable.train()
        self.teacher.train(self.config.distill.teacher_mode == "train")

    def _teacher_features(self, hr: Tensor) -> list[Tensor]:
        with torch.no_grad():
            lr = make_lr_batch(hr, self.teacher.lr_shift, self.config.input.lr_mode)
            hr_features, lr_features, fused = self.teacher.extract_features(hr, lr)
        return {"fused": fused, "hr": hr_features, "lr": lr_features}[self.teacher_features]

    def losses(self, batch: DetectionBatch, iteration: int) -> dict[str, Tensor]:
        distill = self.config.distill
        hr = self.hr_images(batch)
        teacher_features = self._teacher_features(hr)
        student_features, outputs = self.trainable(
            make_lr_batch(hr, self.input_shift, self.config.input.lr_mode)
        )
        if not distill.aligned:
            teacher_features = [
                F.interpolate(t, size=s.shape[-2:], mode="bilinear", align_corners=False)
                for t, s in zip(teacher_features, student_features, strict=True)
            ]
        warmup = min(1.0, (iteration + 1) / distill.warmup_iters) if distill.warmup_iters > 0 else 1.0
        kd = feature_distillation_loss(
            student_features,
            [t.detach() for t in teacher_features],
            distill.alpha,
            distill.temperature,
            distill.loss,
        )
        losses = _detection_losses(outputs, build_targets(batch, self.config, self.frame_scale), self.config)
        losses["loss_kd"] = warmup * kd
        return losses


def describe(task: Task) -> dict[str, Any]:
    """Trainable / frozen parameter counts, for the run log."""
    frozen = getattr(task, "teacher", None)
    return {
        "task": type(task).__name__,
        "trainable_params": sum(p.numel() for p in task.model.parameters() if p.requires_grad),
        "frozen_teacher_params": sum(p.numel() for p in frozen.parameters()) if frozen is not None else 0,
    }
