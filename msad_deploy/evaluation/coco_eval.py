"""COCO bbox evaluation: model outputs -> COCO result records -> pycocotools metrics (in percent).

Flow: ``inference_on_dataset`` runs a predict function over a loader and turns each image's
``boxes/scores/labels`` into COCO records with ``predictions_to_coco``; ``gather_predictions`` joins
the per-rank records under torch.distributed; ``evaluate_detections`` scores them with pycocotools'
``COCOeval`` and reports ``METRIC_NAMES`` in percent like detectron2.

Undefined metrics: pycocotools reports -1 when an area range (or the whole selection) has no ground
truth. We report those as ``float("nan")`` (as detectron2 does) so that they can never be averaged
or plotted as a real score; ``save_metrics`` writes them as JSON ``null``.

Intervals: ``evaluate_detections(..., per_image=True)`` also hands back pycocotools' per-image matching,
from which :mod:`msad_deploy.evaluation.bootstrap` draws a 95 % interval of AP over the images
(``AP_ci95`` [low, high]) and paired differences between result sets on the same images.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from numbers import Integral, Real
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from msad_deploy.evaluation.bootstrap import interval_text
from msad_deploy.models.postprocess import predictions_to_coco

if TYPE_CHECKING:  # pycocotools is imported where it is used, so importing this module stays light
    from pycocotools.coco import COCO

    from msad_deploy.evaluation.bootstrap import PerImageEval

logger = logging.getLogger(__name__)

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
# Index of each reported metric in COCOeval.stats (bbox/segm layout; 6-7 are AR@1 and AR@10).
_STATS_INDEX = {"AP": 0, "AP50": 1, "AP75": 2, "APs": 3, "APm": 4, "APl": 5, "AR100": 8}
_RESULT_KEYS = ("image_id", "category_id", "bbox", "score")

__all__ = [
    "METRIC_NAMES",
    "evaluate_detections",
    "format_metrics_table",
    "gather_predictions",
    "inference_on_dataset",
    "predictions_to_coco",
    "save_metrics",
]


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def gather_predictions(predictions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All ranks' COCO records on every rank; identity when torch.distributed is not initialised.

    DistributedSampler pads the last round by repeating images, so an image may be predicted on two
    ranks (possibly with slightly different outputs from different batch padding). Each image keeps
    the records of the lowest rank that has any for it; records are ordered by rank, then as produced.
    """
    if not _dist_ready() or dist.get_world_size() == 1:
        return predictions
    per_rank: list[list[dict[str, Any]] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, predictions)
    owner: dict[int, int] = {}
    merged: list[dict[str, Any]] = []
    for rank, records in enumerate(per_rank):
        for record in records or []:
            if owner.setdefault(record["image_id"], rank) == rank:
                merged.append(record)
    return merged


def _load_gt(coco_gt: COCO | str | Path) -> COCO:
    from pycocotools.coco import COCO

    if isinstance(coco_gt, COCO):
        return coco_gt
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(coco_gt))


def _load_detections(detections: list[dict[str, Any]] | str | Path) -> tuple[Any, str]:
    """The raw detections list and a name for error messages (the file, or "detections list")."""
    if not isinstance(detections, (str, Path)):
        return detections, "detections list"
    source = str(detections)
    try:
        with open(source, "rb") as f:
            loaded = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"detections file {source} is not valid JSON ({e}); write a JSON list of COCO results"
        ) from e
    return loaded, source


def _validate_detections(records: Any, source: str, coco_gt: COCO) -> list[dict[str, Any]]:
    """Check COCO result records against the GT and return copies (pycocotools mutates its input)."""
    if not isinstance(records, list):
        raise ValueError(f"{source}: expected a JSON list of COCO result dicts, got {type(records).__name__}")
    clean: list[dict[str, Any]] = []
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping) or any(k not in rec for k in _RESULT_KEYS):
            raise ValueError(f"{source}: record {i} is not a result dict with keys {_RESULT_KEYS}: {rec!r}")
        ids, bbox, score = (rec["image_id"], rec["category_id"]), rec["bbox"], rec["score"]
        if (
            not all(isinstance(v, Integral) for v in ids)
            or not isinstance(bbox, (list, tuple))
            or len(bbox) != 4
            or not all(isinstance(v, Real) for v in (*bbox, score))
        ):
            raise ValueError(
                f"{source}: record {i} needs integer ids, bbox [x, y, w, h] and a numeric score: {rec!r}"
            )
        box = [float(v) for v in bbox]
        if not all(math.isfinite(v) for v in (*box, float(score))):
            raise ValueError(f"{source}: record {i} has a non-finite bbox or score: {rec!r}; drop or fix it")
        if box[2] < 0 or box[3] < 0:
            raise ValueError(
                f"{source}: record {i} has a negative width or height (bbox is [x, y, w, h], not xyxy?): "
                f"{rec!r}"
            )
        clean.append(
            {"image_id": int(ids[0]), "category_id": int(ids[1]), "bbox": box, "score": float(score)}
        )
    for key, known in (("image_id", coco_gt.getImgIds()), ("category_id", coco_gt.getCatIds())):
        unknown = sorted({r[key] for r in clean} - set(known))
        if unknown:
            raise ValueError(f"{source}: {len(unknown)} {key}(s) not in the ground truth, e.g. {unknown[:5]}")
    return clean


def _empty_results(coco_gt: COCO) -> COCO:
    """A result set with no detections (``COCO.loadRes`` indexes ``anns[0]`` and fails on [])."""
    from pycocotools.coco import COCO

    res = COCO()
    res.dataset = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"]}
    res.dataset["annotations"] = []
    with contextlib.redirect_stdout(io.StringIO()):
        res.createIndex()
    return res


@overload
def evaluate_detections(
    coco_gt: COCO | str | Path,
    detections: list[dict[str, Any]] | str | Path,
    image_ids: Sequence[int] | None = ...,
    area_range_scale: float = ...,
    per_image: Literal[False] = ...,
) -> dict[str, float]: ...


@overload
def evaluate_detections(
    coco_gt: COCO | str | Path,
    detections: list[dict[str, Any]] | str | Path,
    image_ids: Sequence[int] | None = ...,
    area_range_scale: float = ...,
    per_image: Literal[True] = ...,
) -> tuple[dict[str, float], PerImageEval]: ...


def evaluate_detections(
    coco_gt: COCO | str | Path,
    detections: list[dict[str, Any]] | str | Path,
    image_ids: Sequence[int] | None = None,
    area_range_scale: float = 1.0,
    per_image: bool = False,
) -> dict[str, float] | tuple[dict[str, float], PerImageEval]:
    """COCO bbox metrics of ``detections`` against ``coco_gt``, in percent, keyed by METRIC_NAMES.

    ``area_range_scale`` multiplies COCO's small/medium/large bounds (32**2, 96**2): images much
    smaller than COCO's ~640 px (the synthetic presets) use (side / 640)**2 so APs/APm/APl keep
    their meaning. 1.0 is standard COCO.

    ``detections`` are COCO result records (a list or a JSON file of one); ``image_ids`` restricts the
    evaluation (default: every GT image, so images with no detections count as misses). Metrics that
    pycocotools cannot define (-1: no GT in that area range) are NaN. No detections give 0 for every
    defined metric.

    ``per_image=True`` also returns the evaluation's per-image matching as a
    :class:`~msad_deploy.evaluation.bootstrap.PerImageEval` (for AP intervals and paired comparisons
    without evaluating twice).
    """
    from pycocotools.cocoeval import COCOeval

    gt = _load_gt(coco_gt)
    records, source = _load_detections(detections)
    records = _validate_detections(records, source, gt)
    if image_ids is None:
        img_ids = sorted(gt.getImgIds())
    else:
        img_ids = sorted({int(i) for i in image_ids})
        unknown = sorted(set(img_ids) - set(gt.getImgIds()))
        if unknown:
            raise ValueError(f"image_ids not in the ground truth, e.g. {unknown[:5]}")
    if not img_ids:
        # pycocotools reads an empty imgIds as "all annotations" and then evaluates nothing.
        raise ValueError("nothing to evaluate: no images selected from the ground truth")

    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        dt = gt.loadRes(records) if records else _empty_results(gt)
        coco_eval = COCOeval(gt, dt, iouType="bbox")
        coco_eval.params.imgIds = img_ids
        if area_range_scale != 1.0:
            coco_eval.params.areaRng = [
                [lo * area_range_scale, hi * area_range_scale] for lo, hi in coco_eval.params.areaRng
            ]
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    logger.debug("pycocotools output:\n%s", log.getvalue())
    stats = coco_eval.stats
    metrics = {
        name: float(stats[idx] * 100.0) if stats[idx] >= 0 else math.nan for name, idx in _STATS_INDEX.items()
    }
    if not per_image:
        return metrics
    from msad_deploy.evaluation.bootstrap import PerImageEval

    return metrics, PerImageEval.from_cocoeval(coco_eval)


def _rank() -> int:
    return dist.get_rank() if _dist_ready() else 0


def inference_on_dataset(
    predict: Callable[..., list[dict[str, Tensor]]],
    data_loader: Iterable[tuple[Any, ...]],
    label_to_category_id: Sequence[int],
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run ``predict`` over this rank's batches and return its COCO records.

    A batch is a tuple whose last field is the list of per-image targets: ``(images, targets)`` or a
    :class:`~msad_deploy.data.transforms.DetectionBatch`. ``predict(*batch)`` must return one dict per target with "boxes" [N, 4] xyxy in original
    pixels, "scores" [N] and "labels" [N] (contiguous); targets need "image_id". Runs under
    ``torch.inference_mode``; the progress bar shows on rank 0 only. Use ``gather_predictions`` on the
    result to evaluate a distributed run.
    """
    total = len(data_loader) if hasattr(data_loader, "__len__") else None
    records: list[dict[str, Any]] = []
    bar = tqdm(data_loader, total=total, desc="inference", disable=not progress or _rank() != 0)
    with torch.inference_mode():
        for batch in bar:
            targets = batch[-1]
            outputs = predict(*batch)
            if len(outputs) != len(targets):
                raise ValueError(f"predict returned {len(outputs)} outputs for {len(targets)} images")
            for target, out in zip(targets, outputs):
                records.extend(
                    predictions_to_coco(
                        int(target["image_id"]),
                        out["boxes"],
                        out["scores"],
                        out["labels"],
                        label_to_category_id,
                    )
                )
    return records


def _cell(value: Any) -> str:
    """2 decimals; an interval [low, high] as "low-high"."""
    if isinstance(value, (list, tuple)):
        return interval_text(value, 2) or "-"
    return f"{float(value):.2f}"


def format_metrics_table(metrics: Mapping[str, Any], title: str | None = None) -> str:
    """Metrics as a two-row text table (names over values, 2 decimals), optionally titled.

    ``METRIC_NAMES`` come first in their usual order (``AP_ci95``, an interval shown "low-high", right
    after AP), then any extra keys sorted; NaN shows as "nan".
    """
    order = [*METRIC_NAMES[:1], "AP_ci95", *METRIC_NAMES[1:]]
    names = [n for n in order if n in metrics] + sorted(k for k in metrics if k not in order)
    values = [_cell(metrics[n]) for n in names]
    widths = [max(len(n), len(v)) for n, v in zip(names, values)]
    lines = [
        "  ".join(n.rjust(w) for n, w in zip(names, widths)),
        "  ".join(v.rjust(w) for v, w in zip(values, widths)),
    ]
    if title:
        lines.insert(0, title)
    return "\n".join(lines)


def _json_value(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def save_metrics(metrics: Mapping[str, Any], path: str | Path) -> None:
    """Write metrics as JSON with sorted keys, creating parent dirs; NaN becomes ``null`` (also inside
    an interval such as ``AP_ci95``).

    Strict JSON (``NaN`` is not valid JSON) so that any tool can read the file back.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: _json_value(v) for k, v in metrics.items()}
    path.write_text(json.dumps(clean, sort_keys=True, indent=2, allow_nan=False) + "\n")
