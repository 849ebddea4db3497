"""COCO evaluation: exact AP on a hand-made ground truth, validation, conversion, gathering, inference."""

from __future__ import annotations

import copy
import json
import math
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools.coco import COCO

from msad_deploy.evaluation import (
    METRIC_NAMES,
    evaluate_detections,
    format_metrics_table,
    gather_predictions,
    inference_on_dataset,
    predictions_to_coco,
    save_metrics,
)

CAT, DOG = 3, 7  # non-contiguous category ids; contiguous labels 0 -> 3, 1 -> 7
LABEL_TO_CATEGORY = [CAT, DOG]

# (id, image_id, category_id, xywh): COCO area ranges are small < 32^2 <= medium < 96^2 <= large.
GT_BOXES = [
    (1, 1, CAT, [10.0, 10.0, 20.0, 20.0]),  # small, area 400
    (2, 1, DOG, [100.0, 100.0, 50.0, 50.0]),  # medium, area 2500
    (3, 2, CAT, [50.0, 60.0, 200.0, 150.0]),  # large, area 30000
    (4, 2, DOG, [300.0, 200.0, 120.0, 100.0]),  # large, area 12000
]
# Image 3 has no objects: detections there can only be false positives.


def gt_dataset() -> dict:
    return {
        "images": [{"id": i, "width": 640, "height": 480, "file_name": f"{i}.jpg"} for i in (1, 2, 3)],
        "categories": [{"id": CAT, "name": "cat"}, {"id": DOG, "name": "dog"}],
        "annotations": [
            {"id": a, "image_id": img, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for a, img, c, b in GT_BOXES
        ],
    }


def make_coco(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = copy.deepcopy(dataset)
    coco.createIndex()
    return coco


@pytest.fixture
def coco_gt() -> COCO:
    return make_coco(gt_dataset())


def det(image_id: int, category_id: int, bbox: list[float], score: float = 0.9) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": list(bbox), "score": score}


def perfect(keep=lambda ann_id: True) -> list[dict]:
    return [det(img, c, b) for a, img, c, b in GT_BOXES if keep(a)]


def assert_metrics(metrics: dict[str, float], expected: dict[str, float]) -> None:
    assert set(metrics) == set(METRIC_NAMES)
    for name, value in expected.items():
        if math.isnan(value):
            assert math.isnan(metrics[name]), (name, metrics[name])
        else:
            assert metrics[name] == pytest.approx(value, abs=1e-6), (name, metrics)


# --- (a) exact metrics -------------------------------------------------------------------------


def test_perfect_detections_score_100(coco_gt):
    assert_metrics(evaluate_detections(coco_gt, perfect()), dict.fromkeys(METRIC_NAMES, 100.0))


def test_area_range_scale_moves_size_bounds(coco_gt):
    """Scale 0.16 (256-px images): bounds become 163.84 / 1474.56 px^2, so the 400 px^2 cat is medium."""
    cats_only = [d for d in perfect() if d["category_id"] == CAT]
    standard = evaluate_detections(coco_gt, cats_only)
    scaled = evaluate_detections(coco_gt, cats_only, area_range_scale=0.16)
    assert_metrics(standard, {"APs": 100.0, "APm": 0.0})
    # No GT is small any more; the detected cat is the only medium object; dogs are now large and missed.
    assert_metrics(scaled, {"APs": math.nan, "APm": 100.0, "APl": 50.0, "AP": 50.0})


def test_one_category_detected_halves_ap(coco_gt):
    """AP averages over categories: cat perfect (small + large), dog never detected."""
    metrics = evaluate_detections(coco_gt, [d for d in perfect() if d["category_id"] == CAT])
    expected = {"AP": 50.0, "AP50": 50.0, "AP75": 50.0, "AR100": 50.0}
    # Only cat has small GT, only dog has medium GT, both have large GT.
    expected |= {"APs": 100.0, "APm": 0.0, "APl": 50.0}
    assert_metrics(metrics, expected)


def test_iou_two_thirds_passes_050_to_065_only(coco_gt):
    """Shifting every box by 0.2 * width gives IoU 0.8 / 1.2 = 2/3: matched at IoU 0.50..0.65 only."""
    shifted = [det(img, c, [x + 0.2 * w, y, w, h]) for _, img, c, (x, y, w, h) in GT_BOXES]
    metrics = evaluate_detections(coco_gt, shifted)
    assert_metrics(metrics, {"AP50": 100.0, "AP75": 0.0} | dict.fromkeys(("AP", "APs", "APm", "APl"), 40.0))
    assert metrics["AR100"] == pytest.approx(40.0)


def test_missed_medium_box_uses_101_point_interpolation(coco_gt):
    """Dog: 1 of 2 GT found at precision 1 -> precision 1 at the 51 recall thresholds 0.00..0.50."""
    metrics = evaluate_detections(coco_gt, perfect(keep=lambda a: a != 2))
    dog_ap = 100.0 * 51 / 101
    expected = {"AP": (100.0 + dog_ap) / 2, "AP50": (100.0 + dog_ap) / 2, "AR100": 75.0}
    assert_metrics(metrics, expected | {"APs": 100.0, "APm": 0.0, "APl": 100.0})


def test_false_positive_on_empty_image_and_image_ids_restriction(coco_gt):
    """A top-scoring cat FP on image 3 (no GT) costs cat precision 2/3 unless image 3 is excluded."""
    dets = perfect() + [det(3, CAT, [0.0, 0.0, 20.0, 20.0], score=0.95)]
    metrics = evaluate_detections(coco_gt, dets)
    # cat: FP, TP, TP -> interpolated precision 2/3 everywhere; in "small" only FP, TP -> 1/2.
    cat_ap = 200.0 / 3
    expected = {"AP": (cat_ap + 100) / 2, "AP50": (cat_ap + 100) / 2, "APs": 50.0, "APm": 100.0}
    assert_metrics(metrics, expected | {"APl": 100.0, "AR100": 100.0})

    assert_metrics(evaluate_detections(coco_gt, dets, image_ids=[1, 2]), dict.fromkeys(METRIC_NAMES, 100.0))


def test_area_range_without_gt_is_nan(coco_gt):
    """pycocotools' -1 (no GT in that area range) is reported as NaN, never as a score."""
    metrics = evaluate_detections(coco_gt, perfect(), image_ids=[2])
    assert_metrics(metrics, {"APs": math.nan, "APm": math.nan, "APl": 100.0, "AP": 100.0, "AR100": 100.0})
    assert_metrics(evaluate_detections(coco_gt, [], image_ids=[3]), dict.fromkeys(METRIC_NAMES, math.nan))


def test_ar100_counts_up_to_100_detections_per_image_and_category():
    """Two dogs on image 2: AR@100 finds both (AR@1 would stop at one)."""
    dataset = gt_dataset()
    second_dog = [500.0, 300.0, 100.0, 100.0]
    dataset["annotations"].append(
        {"id": 5, "image_id": 2, "category_id": DOG, "bbox": second_dog, "area": 1e4, "iscrowd": 0}
    )
    metrics = evaluate_detections(make_coco(dataset), perfect() + [det(2, DOG, second_dog, score=0.5)])
    assert_metrics(metrics, dict.fromkeys(METRIC_NAMES, 100.0))


def test_gt_and_detections_from_files_and_inputs_not_mutated(tmp_path, coco_gt):
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps(gt_dataset()))
    dets = perfect(keep=lambda a: a != 2)
    dets_file = tmp_path / "dets.json"
    dets_file.write_text(json.dumps(dets))
    before = copy.deepcopy(dets)

    from_objects = evaluate_detections(coco_gt, dets)
    assert dets == before  # pycocotools' loadRes adds keys in place; we must hand it copies
    assert evaluate_detections(gt_file, dets_file) == from_objects
    assert evaluate_detections(str(gt_file), str(dets_file)) == from_objects


# --- (b) empty detections ----------------------------------------------------------------------


def test_empty_detections_give_zeros(coco_gt, tmp_path):
    assert_metrics(evaluate_detections(coco_gt, []), dict.fromkeys(METRIC_NAMES, 0.0))
    empty_file = tmp_path / "empty.json"
    empty_file.write_text("[]")
    assert_metrics(evaluate_detections(coco_gt, empty_file), dict.fromkeys(METRIC_NAMES, 0.0))


# --- (c) validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"annotations": []}), "expected a JSON list"),
        (json.dumps([{"image_id": 1, "category_id": CAT, "bbox": [0, 0, 1, 1]}]), "record 0 is not a result"),
        (json.dumps([det(1, CAT, [0, 0, 1])]), "record 0 needs integer ids, bbox"),
        (json.dumps([det(1, CAT, [0, 0, 1, 1], score="high")]), "numeric score"),
        (json.dumps([det(1, CAT, [0, 0, 1, 1]), det(99, CAT, [0, 0, 1, 1])]), r"image_id\(s\) not in .*99"),
        (json.dumps([det(1, 1, [0, 0, 1, 1])]), r"category_id\(s\) not in .*\[1\]"),
    ],
)
def test_bad_detections_file_errors_name_the_file(tmp_path, coco_gt, content, message):
    path = tmp_path / "bad_dets.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as excinfo:
        evaluate_detections(coco_gt, path)
    assert str(path) in str(excinfo.value)


def test_bad_detections_list_and_image_ids(coco_gt):
    with pytest.raises(ValueError, match=r"detections list: .*category_id"):
        evaluate_detections(coco_gt, [det(1, 5, [0, 0, 1, 1])])
    with pytest.raises(ValueError, match="image_ids not in the ground truth"):
        evaluate_detections(coco_gt, perfect(), image_ids=[1, 42])
    with pytest.raises(ValueError, match="no images selected"):
        evaluate_detections(coco_gt, perfect(), image_ids=[])


# --- (d) conversion ----------------------------------------------------------------------------


def test_predictions_to_coco_maps_labels_and_converts_xyxy_to_xywh():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0], [1.234567, 2.0, 11.0, 3.5]])
    records = predictions_to_coco(5, boxes, torch.tensor([0.5, 0.123456789]), torch.tensor([1, 0]), [3, 7])
    assert records == [
        {"image_id": 5, "category_id": 7, "bbox": [10.0, 20.0, 20.0, 40.0], "score": 0.5},
        {"image_id": 5, "category_id": 3, "bbox": [1.23, 2.0, 9.77, 1.5], "score": 0.12346},
    ]
    assert all(type(v) is float for r in records for v in (*r["bbox"], r["score"]))
    assert type(records[0]["category_id"]) is int and type(records[0]["image_id"]) is int


def test_predictions_to_coco_empty_and_errors():
    empty = predictions_to_coco(1, torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), [3])
    assert empty == []
    with pytest.raises(ValueError, match=r"labels \[2\] outside"):
        predictions_to_coco(1, torch.zeros(1, 4), torch.ones(1), torch.tensor([2]), [3, 7])
    with pytest.raises(ValueError, match=r"boxes must be \[N, 4\]"):
        predictions_to_coco(1, torch.zeros(2, 5), torch.ones(2), torch.zeros(2, dtype=torch.long), [3])
    with pytest.raises(ValueError, match="scores and labels"):
        predictions_to_coco(1, torch.zeros(2, 4), torch.ones(3), torch.zeros(2, dtype=torch.long), [3])


def test_round_trip_xyxy_predictions_score_100(coco_gt):
    records = []
    for image_id in (1, 2):
        anns = [(c, b) for _, img, c, b in GT_BOXES if img == image_id]
        xyxy = torch.tensor([[x, y, x + w, y + h] for _, (x, y, w, h) in anns])
        labels = torch.tensor([LABEL_TO_CATEGORY.index(c) for c, _ in anns])
        records += predictions_to_coco(
            image_id, xyxy, torch.full((len(anns),), 0.8), labels, LABEL_TO_CATEGORY
        )
    assert_metrics(evaluate_detections(coco_gt, records), dict.fromkeys(METRIC_NAMES, 100.0))


# --- (e) gathering -----------------------------------------------------------------------------


def test_gather_predictions_is_identity_without_distributed():
    records = perfect()
    assert not dist.is_initialized()
    assert gather_predictions(records) is records


# DistributedSampler over 3 images on 2 ranks: rank 0 gets [1, 3], rank 1 gets [2, 1] (1 is padding,
# predicted again with a slightly different score, as different batch padding can cause).
RANK_RECORDS = [
    [det(1, CAT, [1, 1, 5, 5], 0.9), det(1, DOG, [2, 2, 5, 5], 0.8), det(3, CAT, [3, 3, 5, 5], 0.7)],
    [det(2, DOG, [4, 4, 5, 5], 0.6), det(1, CAT, [1, 1, 5, 5], 0.91)],
]


def _gather_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        merged = gather_predictions(RANK_RECORDS[rank])
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(merged))
    finally:
        dist.destroy_process_group()


def test_gather_predictions_two_process_gloo(tmp_path):
    mp.spawn(_gather_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    expected = RANK_RECORDS[0] + RANK_RECORDS[1][:1]  # image 1 kept from rank 0 only
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected


# --- (f) inference loop ------------------------------------------------------------------------


def fake_predict(images: torch.Tensor, targets: list[dict]) -> list[dict]:
    """One box per image at (image_id, image_id) with label image_id % 2, ignoring image content."""
    assert torch.is_inference_mode_enabled()
    assert images.shape[0] == len(targets)
    outs = []
    for t in targets:
        i = float(t["image_id"])
        outs.append(
            {
                "boxes": torch.tensor([[i, i, i + 10, i + 20]]),
                "scores": torch.tensor([0.5]),
                "labels": torch.tensor([int(t["image_id"]) % 2]),
            }
        )
    return outs


def test_inference_on_dataset_collects_coco_records():
    loader = [
        (torch.zeros(2, 3, 8, 8), [{"image_id": 1}, {"image_id": torch.tensor(2)}]),
        (torch.zeros(1, 3, 8, 8), [{"image_id": 3}]),
    ]
    records = inference_on_dataset(fake_predict, loader, LABEL_TO_CATEGORY, progress=False)
    assert records == [
        {
            "image_id": i,
            "category_id": LABEL_TO_CATEGORY[i % 2],
            "bbox": [float(i), float(i), 10.0, 20.0],
            "score": 0.5,
        }
        for i in (1, 2, 3)
    ]


def test_inference_on_dataset_rejects_missing_outputs():
    loader = [(torch.zeros(2, 3, 8, 8), [{"image_id": 1}, {"image_id": 2}])]
    with pytest.raises(ValueError, match="1 outputs for 2 images"):
        inference_on_dataset(lambda images, targets: fake_predict(images[:1], targets[:1]), loader, [3, 7])


# --- reporting ---------------------------------------------------------------------------------


def test_format_metrics_table_orders_and_aligns():
    metrics = {"zeta": 1.0, "AP50": 55.556, "AP": 38.2, "APs": math.nan, "AR100": 100.0}
    table = format_metrics_table(metrics, title="bbox @ val")
    lines = table.splitlines()
    assert lines[0] == "bbox @ val"
    assert lines[1].split() == ["AP", "AP50", "APs", "AR100", "zeta"]
    assert lines[2].split() == ["38.20", "55.56", "nan", "100.00", "1.00"]
    assert len(lines[1]) == len(lines[2])
    for name in lines[1].split():  # every value is right-aligned under its name
        assert lines[2][lines[1].index(name) + len(name) - 1] != " "
    assert format_metrics_table({"AP": 1.0}).splitlines() == ["  AP", "1.00"]


def test_save_metrics_writes_strict_sorted_json(tmp_path):
    path = tmp_path / "a" / "b" / "metrics.json"
    save_metrics({"AP50": 60.0, "AP": 40.5, "APs": math.nan}, path)
    text = path.read_text()

    def reject(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant}")

    loaded = json.loads(text, parse_constant=reject)
    assert loaded == {"AP": 40.5, "AP50": 60.0, "APs": None}
    assert list(loaded) == ["AP", "AP50", "APs"]


def test_ap_interval_shows_after_ap_and_saves_as_a_pair(tmp_path):
    metrics = {"AP50": 55.0, "AP": 38.2, "AP_ci95": [35.125, 41.0]}
    lines = format_metrics_table(metrics).splitlines()
    assert lines[0].split() == ["AP", "AP_ci95", "AP50"]
    assert lines[1].split() == ["38.20", "35.12-41.00", "55.00"]
    path = tmp_path / "metrics.json"
    save_metrics({**metrics, "AP_ci95": [math.nan, math.nan]}, path)
    assert json.loads(path.read_text())["AP_ci95"] == [None, None]
