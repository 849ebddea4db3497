"""A 95 % interval for COCO AP: a bootstrap over the evaluated images, on pycocotools' own matching.

pycocotools' ``COCOeval.evaluate()`` matches detections to ground truth per (category, area range,
image) (``evalImgs``); ``accumulate()`` then pools the images. A bootstrap resample is a multiset of
the images, so only the pooling is redone here, with each image's detections and ground truth
weighted by how often the image was drawn: the matcher never runs again. :class:`PerImageEval` keeps
what that needs (AP at IoU .50:.95, area "all", 100 detections) and re-accumulates any number of
resamples at once in numpy; on the identity resample it gives pycocotools' AP to ~1e-12.

Comparisons are paired: :func:`resample_counts` depends only on the number of images and the seed,
so two result sets on the same images see the same resamples, and their AP difference gets its own
interval (:func:`paired_ap_difference`), much narrower than the two intervals side by side.

Why re-accumulating with weights is exact: a detection of an image drawn w times enters the pooled,
score-sorted list as a run of w equal copies. Inside a run of true positives precision only rises and
recall only grows, so its last point stands for the run in the precision envelope and in the
101-point recall lookup; false positives never start a recall level and lower precision, so only true
positives need to be visited (with the false positives ranked before them counted in). Tied
scores: the copies of one image stay together, where duplicating the images for pycocotools would
interleave tied detections of different copies; pycocotools' order among ties is arbitrary anyway
(without ties the two agree to ~1e-12, see tests/test_bootstrap.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_RESAMPLES",
    "PerImageEval",
    "ap_interval",
    "ap_samples",
    "check_bootstrap",
    "interval_text",
    "paired_ap_difference",
    "percentile_interval",
    "resample_counts",
    "with_ap_interval",
]

DEFAULT_RESAMPLES = 1000
_CHUNK_ELEMENTS = 250_000  # resamples x IoU thresholds x points handled at once (cache-sized)


def check_bootstrap(resamples: Any, seed: Any = 0, confidence: Any = 0.95) -> None:
    """One clear ValueError for a resample count below 1, a negative or non-integer seed, or a
    confidence outside (0, 1)."""
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or resamples < 1:
        raise ValueError(
            f"bootstrap resamples must be an integer >= 1 (0 disables it upstream), got {resamples!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"bootstrap seed must be an integer >= 0, got {seed!r}")
    if not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ValueError(f"bootstrap confidence must be in (0, 1), got {confidence!r}")


def resample_counts(num_images: int, resamples: int, seed: int = 0) -> np.ndarray:
    """[resamples, num_images] int64: how often each image is drawn (with replacement, num_images
    draws per resample). Depends only on its arguments, so result sets on the same images pair."""
    check_bootstrap(resamples, seed)
    if num_images < 1:
        raise ValueError(f"bootstrap needs at least one image, got {num_images}")
    rng = np.random.default_rng(seed)
    return rng.multinomial(num_images, np.full(num_images, 1.0 / num_images), size=resamples)


@dataclass(frozen=True)
class PerImageEval:
    """One result set's per-image matching, pooled per category in pycocotools' order.

    ``image_ids`` [I] the evaluated images; ``category_ids`` [K]; category k's detections are
    ``offsets[k]:offsets[k + 1]`` of the [N] arrays, sorted by score (descending, stable over images
    in ``image_ids`` order, as ``accumulate()`` sorts them): ``image_index`` [N] their image (index
    into ``image_ids``), ``tp`` / ``fp`` [T, N] matched / unmatched and not ignored at each IoU
    threshold. ``gt_count`` [K, I] non-ignored ground truth; ``rec_thrs`` [R] pycocotools' recall
    levels. Detections ignored at every threshold are dropped (they change nothing).
    """

    image_ids: np.ndarray
    category_ids: np.ndarray
    offsets: np.ndarray
    image_index: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    gt_count: np.ndarray
    rec_thrs: np.ndarray

    def __post_init__(self) -> None:
        i, k, n = len(self.image_ids), len(self.category_ids), len(self.image_index)
        if (
            self.offsets.shape != (k + 1,)
            or (k + 1 and (self.offsets[0] != 0 or self.offsets[-1] != n))
            or np.any(np.diff(self.offsets) < 0)
            or self.tp.ndim != 2
            or self.tp.shape[1] != n
            or self.fp.shape != self.tp.shape
            or self.gt_count.shape != (k, i)
            or self.rec_thrs.ndim != 1
            or (n and (self.image_index.min() < 0 or self.image_index.max() >= i))
        ):
            raise ValueError(
                f"inconsistent per-image evaluation: {i} images, {k} categories, {n} detections, offsets "
                f"{self.offsets.shape}, tp {self.tp.shape}, fp {self.fp.shape}, gt_count {self.gt_count.shape}"
            )

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @classmethod
    def from_cocoeval(cls, coco_eval: Any, max_dets: int = 100) -> PerImageEval:
        """From a ``COCOeval`` after ``evaluate()``: area "all", the first ``max_dets`` detections per image."""
        params = coco_eval._paramsEval if getattr(coco_eval, "_paramsEval", None) else coco_eval.params
        if not coco_eval.evalImgs:
            raise ValueError("run COCOeval.evaluate() before taking its per-image results")
        if max_dets not in params.maxDets:
            raise ValueError(f"max_dets {max_dets} is not one of the evaluation's maxDets {params.maxDets}")
        cat_ids = list(params.catIds) if params.useCats else [-1]
        img_ids = list(params.imgIds)
        n_img, n_area = len(img_ids), len(params.areaRng)
        area = params.areaRngLbl.index("all")
        n_thr = len(params.iouThrs)
        gt_count = np.zeros((len(cat_ids), n_img), dtype=np.int64)
        offsets, image_index, tps, fps = [0], [], [], []
        for k in range(len(cat_ids)):
            scores, images, tp, fp = [], [], [], []
            base = k * n_area * n_img + area * n_img
            for i in range(n_img):
                entry = coco_eval.evalImgs[base + i]
                if entry is None:
                    continue
                gt_count[k, i] = int(np.count_nonzero(np.asarray(entry["gtIgnore"]) == 0))
                matches = np.asarray(entry["dtMatches"])[:, :max_dets].reshape(n_thr, -1)
                ignored = np.asarray(entry["dtIgnore"])[:, :max_dets].reshape(n_thr, -1).astype(bool)
                scores.append(np.asarray(entry["dtScores"][:max_dets], dtype=np.float64))
                images.append(np.full(matches.shape[1], i, dtype=np.int64))
                tp.append((matches != 0) & ~ignored)
                fp.append((matches == 0) & ~ignored)
            if scores:
                order = np.argsort(-np.concatenate(scores), kind="mergesort")  # accumulate()'s order
                tp_k, fp_k = np.concatenate(tp, axis=1)[:, order], np.concatenate(fp, axis=1)[:, order]
                keep = (tp_k | fp_k).any(axis=0)
                image_index.append(np.concatenate(images)[order][keep])
                tps.append(tp_k[:, keep])
                fps.append(fp_k[:, keep])
            offsets.append(offsets[-1] + (int(keep.sum()) if scores else 0))
        return cls(
            image_ids=np.asarray(img_ids, dtype=np.int64),
            category_ids=np.asarray(cat_ids, dtype=np.int64),
            offsets=np.asarray(offsets, dtype=np.int64),
            image_index=np.concatenate(image_index) if image_index else np.zeros(0, np.int64),
            tp=np.concatenate(tps, axis=1) if tps else np.zeros((n_thr, 0), bool),
            fp=np.concatenate(fps, axis=1) if fps else np.zeros((n_thr, 0), bool),
            gt_count=gt_count,
            rec_thrs=np.asarray(params.recThrs, dtype=np.float64),
        )

    # -- persistence (msad bench pairs rows of earlier runs) -------------------------------------

    def save(self, path: str | Path) -> None:
        """Write a compressed ``.npz`` (a few hundred kB for thousands of detections)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            np.savez_compressed(handle, **{name: getattr(self, name) for name in self.__dataclass_fields__})

    @classmethod
    def load(cls, path: str | Path) -> PerImageEval:
        with np.load(path, allow_pickle=False) as data:
            missing = [name for name in cls.__dataclass_fields__ if name not in data]
            if missing:
                raise ValueError(f"{path}: not a per-image evaluation (missing {missing})")
            return cls(**{name: data[name] for name in cls.__dataclass_fields__})

    # -- re-accumulation -------------------------------------------------------------------------

    def ap(self) -> float:
        """AP (percent) of the evaluated images themselves: pycocotools' AP; NaN when no ground truth."""
        return float(self.resampled_ap(np.ones((1, self.num_images), dtype=np.int64))[0])

    def resampled_ap(self, counts: np.ndarray) -> np.ndarray:
        """AP in percent [B] for image multiplicities ``counts`` [B, I] (NaN where a resample has no
        ground truth). Categories without ground truth in a resample are left out, as pycocotools does."""
        counts = np.asarray(counts)
        if counts.ndim != 2 or counts.shape[1] != self.num_images:
            raise ValueError(f"counts must be [B, {self.num_images}], got shape {counts.shape}")
        # one extra zero-weight image: the padding points' image
        weights = np.concatenate([counts.astype(np.float64), np.zeros((len(counts), 1))], axis=1)
        total = np.zeros(len(weights))
        valid = np.zeros(len(weights), dtype=np.int64)
        for k in range(len(self.category_ids)):
            gt = weights[:, :-1] @ self.gt_count[k].astype(np.float64)  # [B]
            present = gt > 0
            if not present.any():
                continue
            valid += present
            points = self._points(k)
            if points is None:
                continue  # ground truth, no true positive: precision 0 at every recall level
            step = max(1, _CHUNK_ELEMENTS // (points[0].size + len(points[2])))
            for start in range(0, len(weights), step):
                rows = slice(start, start + step)
                sums = self._precision_sums(weights[rows], gt[rows], *points)
                total[rows] += np.where(present[rows], sums, 0.0)
        n_thr, n_rec = self.tp.shape[0], len(self.rec_thrs)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(valid > 0, 100.0 * total / (valid * n_thr * n_rec), math.nan)

    def _points(self, k: int) -> tuple[np.ndarray, ...] | None:
        """Category k's true positives ("points") per IoU threshold, and the false positives ranked
        before each, in index form (None: no true positive at any threshold).

        ``tp_image`` [T, P] the image of each point (P: the most points at any threshold; padding
        points have image I, of weight 0) and ``real`` [T, P] which are points; the false positives
        between point p - 1 and point p of threshold t, summed per image: ``fp_image`` / ``fp_count``
        [M] grouped by ``fp_slot`` [S] (t * P + p) starting at ``fp_start`` [S] (for ``np.add.reduceat``).
        """
        cache = self.__dict__.setdefault("_point_cache", {})
        if k in cache:
            return cache[k]
        lo, hi = self.offsets[k], self.offsets[k + 1]
        images, tp, fp = self.image_index[lo:hi], self.tp[:, lo:hi], self.fp[:, lo:hi]
        n_img, n_thr = self.num_images, tp.shape[0]
        width = int(tp.sum(axis=1).max()) if hi > lo else 0
        if width == 0:
            cache[k] = None
            return None
        tp_image = np.full((n_thr, width), n_img, dtype=np.int64)
        keys = []
        for t in range(n_thr):
            where = np.flatnonzero(tp[t])
            tp_image[t, : len(where)] = images[where]
            false = np.flatnonzero(fp[t])
            before = np.searchsorted(where, false)  # the point each false positive precedes
            kept = before < len(where)  # ranked after the last point: changes no point
            keys.append((t * width + before[kept]) * (n_img + 1) + images[false[kept]])
        key, fp_count = np.unique(np.concatenate(keys), return_counts=True)
        slots = key // (n_img + 1)
        fp_slot, fp_start = np.unique(slots, return_index=True)
        real = np.arange(width) < tp.sum(axis=1)[:, None]
        cache[k] = (tp_image, real, key % (n_img + 1), fp_count.astype(np.float64), fp_slot, fp_start)
        return cache[k]

    def _precision_sums(
        self,
        weights: np.ndarray,
        gt: np.ndarray,
        tp_image: np.ndarray,
        real: np.ndarray,
        fp_image: np.ndarray,
        fp_count: np.ndarray,
        fp_slot: np.ndarray,
        fp_start: np.ndarray,
    ) -> np.ndarray:
        """Sum over IoU thresholds and recall levels of the interpolated precision, per resample [b]
        (``weights`` [b, I + 1], ``gt`` [b]; the rest from :meth:`_points`)."""
        n_thr, width = tp_image.shape
        n_rec = len(self.rec_thrs)
        tp = np.cumsum(weights[:, tp_image], axis=-1)  # [b, T, P]; integer-valued, so exact
        fp = np.zeros((len(weights), n_thr * width))
        if len(fp_image):
            fp[:, fp_slot] = np.add.reduceat(weights[:, fp_image] * fp_count, fp_start, axis=1)
        fp = np.cumsum(fp.reshape(-1, n_thr, width), axis=-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = tp / gt[:, None, None]
            # pycocotools' arithmetic; padding points: precision 0
            precision = np.where(real, tp / (fp + tp + np.spacing(1)), 0.0)
        envelope = np.maximum.accumulate(precision[..., ::-1], axis=-1)[..., ::-1]
        envelope = np.concatenate([envelope, np.zeros(envelope.shape[:-1] + (1,))], axis=-1)
        # recall level r's first point (recall >= rec_thrs[r]) = how many points have at most r levels at
        # or below their recall (recall never falls along the points); padding points count as above all
        levels = np.where(real, np.searchsorted(self.rec_thrs, recall, side="right"), n_rec + 1)
        rows = np.arange(levels.shape[0] * n_thr).reshape(-1, n_thr, 1)
        histogram = np.bincount((rows * (n_rec + 2) + levels).ravel(), minlength=rows.size * (n_rec + 2))
        first = np.cumsum(histogram.reshape(-1, n_thr, n_rec + 2), axis=-1)[..., :n_rec]
        return np.take_along_axis(envelope, first, axis=-1).sum(axis=(1, 2))


def ap_samples(per_image: PerImageEval, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> np.ndarray:
    """AP (percent) of ``resamples`` bootstrap resamples of the images [resamples]; the same seed and
    images give the same resamples, so two result sets' samples pair element by element."""
    return per_image.resampled_ap(resample_counts(per_image.num_images, resamples, seed))


def percentile_interval(
    samples: Sequence[float] | np.ndarray, confidence: float = 0.95
) -> tuple[float, float]:
    """The central ``confidence`` percentile interval of ``samples`` (NaN samples left out; NaN, NaN
    when none is left)."""
    check_bootstrap(1, 0, confidence)
    values = np.asarray(samples, dtype=np.float64)
    values = values[~np.isnan(values)]
    if not len(values):
        return math.nan, math.nan
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def ap_interval(
    per_image: PerImageEval, resamples: int = DEFAULT_RESAMPLES, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """(low, high) percentile bootstrap interval of AP (percent) over the images."""
    check_bootstrap(resamples, seed, confidence)
    return percentile_interval(ap_samples(per_image, resamples, seed), confidence)


def paired_ap_difference(
    a: PerImageEval,
    b: PerImageEval,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, tuple[float, float]]:
    """AP(a) - AP(b) in percent points and its interval, both resampled on the SAME images."""
    check_bootstrap(resamples, seed, confidence)
    if not np.array_equal(a.image_ids, b.image_ids):
        raise ValueError(
            f"a paired comparison needs the same images: {a.num_images} vs {b.num_images} images"
            + (", different ids" if a.num_images == b.num_images else "")
        )
    counts = resample_counts(a.num_images, resamples, seed)
    difference = a.resampled_ap(counts) - b.resampled_ap(counts)
    return a.ap() - b.ap(), percentile_interval(difference, confidence)


def interval_text(interval: Any, digits: int = 1) -> str | None:
    """[low, high] as "low-high" (tables, CSV); None when there is none."""
    if not interval or any(v is None for v in interval):
        return None
    low, high = interval
    return f"{float(low):.{digits}f}-{float(high):.{digits}f}"


def with_ap_interval(
    metrics: Mapping[str, float], per_image: PerImageEval, resamples: int, seed: int = 0
) -> dict[str, Any]:
    """``metrics`` with ``AP_ci95`` [low, high] (percent) right after ``AP``; unchanged when
    ``resamples`` is 0 (the bootstrap is off)."""
    if resamples == 0:
        return dict(metrics)
    low, high = ap_interval(per_image, resamples, seed)
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        out[key] = value
        if key == "AP":
            out["AP_ci95"] = [low, high]
    out.setdefault("AP_ci95", [low, high])
    return out
