"""Detector building blocks: backbones, FPN, pyramid shift, FCOS head, C-FF, teacher, losses, decoding."""

from msad_deploy.models.backbones import SUPPORTED_BACKBONES, Backbone, build_backbone
from msad_deploy.models.build import (
    build_detector,
    build_model,
    build_teacher,
    load_model,
    save_model_checkpoint,
)
from msad_deploy.models.cost import ModelCost, model_cost
from msad_deploy.models.fcos import FCOSDetector
from msad_deploy.models.fpn import FPN
from msad_deploy.models.fusion import CrossFeatureFusion
from msad_deploy.models.head import FCOSHead, FCOSOutputs
from msad_deploy.models.losses import fcos_losses, feature_distillation_loss
from msad_deploy.models.postprocess import postprocess_detections
from msad_deploy.models.pyramid import HR_STRIDES, compute_locations, pyramid_levels, size_divisibility
from msad_deploy.models.targets import FCOSTargets, compute_fcos_targets
from msad_deploy.models.teacher import AlignedMultiScaleTeacher, TeacherOutputs

__all__ = [
    "HR_STRIDES",
    "SUPPORTED_BACKBONES",
    "AlignedMultiScaleTeacher",
    "Backbone",
    "CrossFeatureFusion",
    "FCOSDetector",
    "FCOSHead",
    "FCOSOutputs",
    "FCOSTargets",
    "FPN",
    "ModelCost",
    "TeacherOutputs",
    "build_backbone",
    "build_detector",
    "build_model",
    "build_teacher",
    "compute_fcos_targets",
    "compute_locations",
    "fcos_losses",
    "feature_distillation_loss",
    "load_model",
    "model_cost",
    "postprocess_detections",
    "pyramid_levels",
    "save_model_checkpoint",
    "size_divisibility",
]
