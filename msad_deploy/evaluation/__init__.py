"""COCO-style evaluation: inference over a loader, distributed gathering, pycocotools metrics."""

from msad_deploy.evaluation.coco_eval import (
    METRIC_NAMES,
    evaluate_detections,
    format_metrics_table,
    gather_predictions,
    inference_on_dataset,
    predictions_to_coco,
    save_metrics,
)

__all__ = [
    "METRIC_NAMES",
    "evaluate_detections",
    "format_metrics_table",
    "gather_predictions",
    "inference_on_dataset",
    "predictions_to_coco",
    "save_metrics",
]
