"""AP bootstrap intervals: exact pycocotools AP on the identity resample, paired differences, coverage."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from msad_deploy.evaluation.bootstrap import (
    PerImageEval,
    ap_interval,
    ap_samples,
    paired_ap_difference,
    percentile_interval,
    resample_counts,
    with_ap_interval,
)
from msad_deploy.evaluation.coco_eval import evaluate_detections

REC_THRS = np.linspace(0.0, 1.0, 101)


def coco(dataset: dict) -> COCO:
    gt = COCO()
    gt.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def cocoeval(dataset: dict, detections: list[dict]) -> COCOeval:
    """pycocotools' own evaluate + accumulate + summarize."""
    gt = coco(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(gt, gt.loadRes(detections), iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation


def dataset_of(images: int, annotations: list[dict], categories=(1, 2, 3)) -> dict:
    return {
        "images": [{"id": i, "width": 200, "height": 200} for i in range(1, images + 1)],
        "categories": [{"id": c, "name": str(c)} for c in categories],
        "annotations": [{"id": n, "area": a["bbox"][2] * a["bbox"][3], "iscrowd": 0, **a} for n, a in
                        enumerate(annotations, 1)],
    }  # fmt: skip


def hand_built() -> tuple[dict, list[dict]]:
    """Category 1: three objects in images 1-3 and a crowd region in image 1; ranked TP, FP, TP, TP
    (precision 1, 1/2, 2/3, 3/4: the envelope lifts the FP's 1/2 to 3/4), and a detection on the crowd
    (ignored). Category 2: a false positive only (no ground truth: left out). Image 4: nothing."""
    box = {1: [10, 10, 40, 40], 2: [60, 60, 30, 50], 3: [100, 20, 50, 30]}
    annotations = [{"image_id": i, "category_id": 1, "bbox": b} for i, b in box.items()]
    annotations.append({"image_id": 1, "category_id": 1, "bbox": [120, 120, 60, 60], "iscrowd": 1})
    detections = [
        {"image_id": 1, "category_id": 1, "bbox": box[1], "score": 0.9},
        {"image_id": 2, "category_id": 1, "bbox": [150, 150, 20, 20], "score": 0.8},
        {"image_id": 2, "category_id": 1, "bbox": box[2], "score": 0.7},
        {"image_id": 3, "category_id": 1, "bbox": box[3], "score": 0.6},
        {"image_id": 1, "category_id": 1, "bbox": [125, 125, 40, 40], "score": 0.95},  # inside the crowd
        {"image_id": 3, "category_id": 2, "bbox": [0, 0, 30, 30], "score": 0.5},
    ]
    return dataset_of(4, annotations), detections


def random_case(seed: int, images: int = 30, ties: bool = False) -> tuple[dict, list[dict]]:
    """Objects of 3 categories, 70 % found with jittered boxes (some with the wrong class), plus clutter;
    ``ties``: scores rounded to 0.1, so many detections tie across images."""
    rng = np.random.default_rng(seed)
    annotations, detections = [], []

    def score() -> float:
        return float(np.round(rng.random(), 1) if ties else rng.random())

    for image in range(1, images + 1):
        for _ in range(rng.integers(0, 5)):
            x, y, w, h = *rng.uniform(0, 140, 2), *rng.uniform(8, 50, 2)
            category = int(rng.integers(1, 4))
            annotations.append(
                {
                    "image_id": image,
                    "category_id": category,
                    "bbox": [x, y, w, h],
                    "iscrowd": int(rng.random() < 0.05),
                }
            )
            if rng.random() < 0.7:
                jitter = rng.normal(0, 3, 4) * [1, 1, 0.5, 0.5]
                found = [x + jitter[0], y + jitter[1], abs(w + jitter[2]) + 1, abs(h + jitter[3]) + 1]
                label = category if rng.random() < 0.9 else int(rng.integers(1, 4))
                detections.append({"image_id": image, "category_id": label, "bbox": found, "score": score()})
        for _ in range(rng.integers(0, 6)):
            x, y, w, h = *rng.uniform(0, 140, 2), *rng.uniform(8, 50, 2)
            detections.append(
                {
                    "image_id": image,
                    "category_id": int(rng.integers(1, 4)),
                    "bbox": [x, y, w, h],
                    "score": score(),
                }
            )
    return dataset_of(images, annotations), detections


# -- exactness -------------------------------------------------------------------------------------


def test_identity_resample_is_pycocotools_ap_on_a_hand_built_case() -> None:
    dataset, detections = hand_built()
    evaluation = cocoeval(dataset, detections)
    per_image = PerImageEval.from_cocoeval(evaluation)
    # recall levels 0..0.33 at precision 1, 0.34..1 at the envelope's 3/4, at every IoU threshold
    expected = (34 * 1.0 + 67 * 0.75) / 101 * 100
    assert evaluation.stats[0] * 100 == pytest.approx(expected, abs=1e-9)
    assert per_image.ap() == pytest.approx(evaluation.stats[0] * 100, abs=1e-9)
    assert per_image.gt_count.tolist() == [[1, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert per_image.offsets.tolist() == [0, 4, 5, 5]  # the detection on the crowd is ignored: dropped
    # the same numbers through evaluate_detections
    metrics, again = evaluate_detections(coco(dataset), detections, per_image=True)
    assert metrics["AP"] == pytest.approx(again.ap(), abs=1e-9)


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True)])
def test_identity_resample_is_pycocotools_ap_on_random_cases(seed, ties) -> None:
    dataset, detections = random_case(seed, ties=ties)
    evaluation = cocoeval(dataset, detections)
    per_image = PerImageEval.from_cocoeval(evaluation)
    # the AP summary, and pycocotools' precision table (the interpolated, enveloped curve) behind it
    assert per_image.ap() == pytest.approx(evaluation.stats[0] * 100, abs=1e-9)
    precision = evaluation.eval["precision"][:, :, :, 0, -1]  # [T, R, K], area all, 100 detections
    assert per_image.ap() == pytest.approx(precision[precision > -1].mean() * 100, abs=1e-9)


def test_a_resample_is_the_ap_of_the_images_duplicated() -> None:
    """Weighting an image by its count gives pycocotools' AP of a dataset holding that many copies."""
    dataset, detections = random_case(2, images=20)
    per_image = PerImageEval.from_cocoeval(cocoeval(dataset, detections))
    for counts in resample_counts(20, 2, seed=3):
        images, annotations, copies = [], [], []
        for index, count in enumerate(counts):
            for _ in range(count):
                new_id = len(images) + 1
                images.append({"id": new_id, "width": 200, "height": 200})
                annotations += [
                    {**a, "image_id": new_id} for a in dataset["annotations"] if a["image_id"] == index + 1
                ]
                copies += [{**d, "image_id": new_id} for d in detections if d["image_id"] == index + 1]
        for number, annotation in enumerate(annotations, 1):
            annotation["id"] = number
        duplicated = {"images": images, "categories": dataset["categories"], "annotations": annotations}
        expected = cocoeval(duplicated, copies).stats[0] * 100
        assert per_image.resampled_ap(counts[None])[0] == pytest.approx(expected, abs=1e-9)


# -- intervals -------------------------------------------------------------------------------------


def test_identical_detections_give_a_zero_width_paired_difference() -> None:
    dataset, detections = random_case(4)
    a = PerImageEval.from_cocoeval(cocoeval(dataset, detections))
    b = PerImageEval.from_cocoeval(cocoeval(dataset, list(reversed(detections))))
    difference, (low, high) = paired_ap_difference(a, b, resamples=200, seed=1)
    assert difference == 0.0 and low == 0.0 and high == 0.0
    low, high = ap_interval(a, resamples=200, seed=1)
    assert low < a.ap() < high  # each alone still has a spread


def test_half_perfect_half_missed_images_spread_like_a_binomial() -> None:
    """100 images with one object each, found perfectly on 50, missed on 50: a resample finding m of
    its 100 objects has recall m / 100 at precision 1, so AP = (m + 1) / 101 levels, and m is
    Binomial(100, 1/2): 2.5 and 97.5 % quantiles 40 and 60."""
    box = [20, 20, 50, 50]
    dataset = dataset_of(100, [{"image_id": i, "category_id": 1, "bbox": box} for i in range(1, 101)], (1,))
    detections = [{"image_id": i, "category_id": 1, "bbox": box, "score": 0.9} for i in range(1, 51)]
    metrics, per_image = evaluate_detections(coco(dataset), detections, per_image=True)
    assert metrics["AP"] == pytest.approx(51 / 101 * 100, abs=1e-9)
    samples = ap_samples(per_image, resamples=2000, seed=0)
    found = np.round(samples / 100 * 101 - 1)  # m of each resample
    assert np.allclose(samples, (found + 1) / 101 * 100)  # on the lattice
    assert abs(found.mean() - 50) < 0.5 and abs(found.std() - 5.0) < 0.3
    low, high = percentile_interval(samples)
    assert (40 - 1.5 + 1) / 101 * 100 <= low <= (40 + 1.5 + 1) / 101 * 100
    assert (60 - 1.5 + 1) / 101 * 100 <= high <= (60 + 1.5 + 1) / 101 * 100


def _synthetic_images(rng: np.random.Generator, count: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Per image: 1 + Poisson(2) objects, each found with an image-level probability ~ Beta(4, 2) (easy
    and hard images), true positives scored ~ Beta(3, 1.5), Poisson(1.5) false positives ~ Beta(1.5, 3)."""
    images = []
    for objects, found in zip(1 + rng.poisson(2, count), rng.beta(4, 2, count)):
        hits = int((rng.random(objects) < found).sum())
        images.append((int(objects), rng.beta(3, 1.5, hits), rng.beta(1.5, 3, rng.poisson(1.5))))
    return images


def _per_image(images: list[tuple[int, np.ndarray, np.ndarray]]) -> PerImageEval:
    """A one-category, one-threshold PerImageEval straight from per-image scores."""
    scores = np.concatenate([np.concatenate([tp, fp]) for _, tp, fp in images])
    index = np.concatenate([np.full(len(tp) + len(fp), i) for i, (_, tp, fp) in enumerate(images)])
    hit = np.concatenate([np.arange(len(tp) + len(fp)) < len(tp) for _, tp, fp in images])
    order = np.argsort(-scores, kind="mergesort")
    return PerImageEval(
        image_ids=np.arange(len(images)),
        category_ids=np.array([1]),
        offsets=np.array([0, len(scores)]),
        image_index=index[order],
        tp=hit[order][None],
        fp=~hit[order][None],
        gt_count=np.array([[objects for objects, _, _ in images]]),
        rec_thrs=REC_THRS,
    )


def test_interval_covers_the_population_ap_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(0)
    population = _per_image(_synthetic_images(rng, 20000)).ap()  # the model's AP, to ~0.1
    trials = 120
    covered = 0
    for trial in range(trials):
        low, high = ap_interval(_per_image(_synthetic_images(rng, 60)), resamples=200, seed=trial)
        covered += low <= population <= high
    # 0.967 with these seeds (0.92-0.97 with others); a 1-in-20 miss rate is what a 95 % interval promises
    assert 0.88 <= covered / trials <= 0.99, covered / trials


def test_same_seed_same_interval_different_seed_different() -> None:
    dataset, detections = random_case(5, images=40)
    per_image = PerImageEval.from_cocoeval(cocoeval(dataset, detections))
    first = ap_interval(per_image, resamples=300, seed=7)
    assert ap_interval(per_image, resamples=300, seed=7) == first
    assert ap_interval(per_image, resamples=300, seed=8) != first
    assert np.array_equal(resample_counts(40, 5, 7), resample_counts(40, 5, 7))


def test_saved_and_loaded_per_image_evaluation_gives_the_same_samples(tmp_path) -> None:
    dataset, detections = random_case(6)
    per_image = PerImageEval.from_cocoeval(cocoeval(dataset, detections))
    per_image.save(tmp_path / "run.npz")
    loaded = PerImageEval.load(tmp_path / "run.npz")
    assert np.array_equal(ap_samples(loaded, 50, 1), ap_samples(per_image, 50, 1))


def test_metrics_get_the_interval_after_ap() -> None:
    dataset, detections = random_case(7)
    metrics, per_image = evaluate_detections(coco(dataset), detections, per_image=True)
    with_interval = with_ap_interval(metrics, per_image, resamples=100, seed=0)
    assert list(with_interval)[:3] == ["AP", "AP_ci95", "AP50"]
    low, high = with_interval["AP_ci95"]
    assert low <= metrics["AP"] <= high
    assert with_ap_interval(metrics, per_image, resamples=0) == metrics


def test_no_ground_truth_gives_nan() -> None:
    dataset = dataset_of(2, [])
    detections = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.5}]
    per_image = PerImageEval.from_cocoeval(cocoeval(dataset, detections))
    assert math.isnan(per_image.ap())
    assert all(math.isnan(v) for v in ap_interval(per_image, resamples=10))


# -- bad inputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"resamples": 0}, "resamples must be an integer >= 1"),
        ({"resamples": -5}, "resamples must be an integer >= 1"),
        ({"resamples": 2.5}, "resamples must be an integer >= 1"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"confidence": 1.5}, "confidence must be in"),
    ],
)
def test_bad_bootstrap_arguments_are_one_clear_value_error(kwargs, message) -> None:
    dataset, detections = hand_built()
    per_image = PerImageEval.from_cocoeval(cocoeval(dataset, detections))
    with pytest.raises(ValueError, match=message):
        ap_interval(per_image, **{"resamples": 10, **kwargs})


def test_paired_comparison_needs_the_same_images() -> None:
    dataset, detections = random_case(8, images=10)
    a = PerImageEval.from_cocoeval(cocoeval(dataset, detections))
    smaller = dataset_of(9, [x for x in dataset["annotations"] if x["image_id"] <= 9])
    b = PerImageEval.from_cocoeval(cocoeval(smaller, [d for d in detections if d["image_id"] <= 9]))
    with pytest.raises(ValueError, match="same images"):
        paired_ap_difference(a, b, resamples=10)
    with pytest.raises(ValueError, match=r"counts must be \[B, 10\]"):
        a.resampled_ap(np.ones((3, 9)))
