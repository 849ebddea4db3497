"""Datasets for detection: COCO-format loading with validation, and a synthetic COCO generator."""

from msad_deploy.data.coco import CocoDetection, DataError
from msad_deploy.data.synth import SYNTH_CLASSES, generate_synthetic_coco

__all__ = [
    "SYNTH_CLASSES",
    "CocoDetection",
    "DataError",
    "generate_synthetic_coco",
]
