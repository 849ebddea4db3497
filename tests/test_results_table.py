"""The docs/RESULTS.md table: means, spreads, missing rows and the goal lines."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
from msad_deploy.training.results import TABLE_MARKERS, _gap, main, paired_gap, render, table_markers

from msad_deploy.evaluation.bootstrap import PerImageEval


def _write(root: Path, seed: int, name: str, ap: float, aps: float | None = 10.0) -> None:
    path = root / f"seed{seed}" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    metrics = {"AP": ap, "AP50": ap + 20, "AP75": ap, "APs": aps, "APm": ap, "APl": ap, "AR100": ap}
    path.write_text(json.dumps(metrics))


def test_table_means_spreads_and_goals(tmp_path: Path) -> None:
    _write(tmp_path, 0, "msad_student", 30.0)
    _write(tmp_path, 1, "msad_student", 34.0, aps=None)
    _write(tmp_path, 0, "lr_shifted_control", 29.0)
    _write(tmp_path, 0, "lr_baseline_single", 20.0)
    _write(tmp_path, 0, "hr_baseline", 33.5)
    (tmp_path / "seed0" / "wall_times.jsonl").write_text(
        '{"run": "msad_student", "seed": 0, "wall_s": 500}\n{"run": "msad_student", "seed": 0, "wall_s": 100}\n'
    )
    text = render(tmp_path)
    student = next(line for line in text.splitlines() if line.startswith("| MSAD student"))
    assert "| 2 | 32.0 (30.0..34.0) | 52.0 (50.0..54.0) |" in student
    assert "| 10.0 |" in student  # the seed without APs does not count as zero
    assert student.endswith("| 10.0 |")  # 500 s + 100 s of a resumed run = 10 minutes
    assert "not run" in next(
        line for line in text.splitlines() if line.startswith("| aligned teacher, fused")
    )
    assert "best LR baseline (lr_shifted_control): +3.0 AP, met" in text
    assert "vs HR baseline: -1.5 AP, missed" in text


def test_budget_checks_are_reported_beside_the_goal(tmp_path: Path) -> None:
    _write(tmp_path, 0, "msad_student", 30.0)
    _write(tmp_path, 0, "lr_shifted_control", 25.0)
    _write(tmp_path, 0, "lr_shifted_control_long", 29.5)
    text = render(tmp_path)
    # The goal compares with the equal-schedule LR baselines; the longer control is its own line.
    assert "best LR baseline (lr_shifted_control): +5.0 AP, met" in text
    assert "shifted control on the 2x schedule (teacher + student iterations): +0.5 AP" in text
    assert "initialised from the teacher without KD: n/a (not run yet)" in text
    assert "vs HR baseline: n/a (not run yet)" in text


def test_update_rewrites_only_the_marked_table(tmp_path: Path) -> None:
    _write(tmp_path, 0, "msad_student", 30.0)
    page = tmp_path / "RESULTS.md"
    begin, end = TABLE_MARKERS
    page.write_text(f"# Results\nintro\n{begin}\nold table\n{end}\nanalysis\n")
    main([str(tmp_path), "--update", str(page)])
    text = page.read_text()
    assert text.startswith(f"# Results\nintro\n{begin}\n| model |")
    assert text.endswith(f"{end}\nanalysis\n")
    assert "old table" not in text and "| MSAD student (P2..P6) | LR 64 | 1 | 30.0 |" in text
    main([str(tmp_path), "--update", str(page)])  # idempotent
    assert page.read_text() == text


def test_update_refuses_a_page_without_markers(tmp_path: Path) -> None:
    page = tmp_path / "RESULTS.md"
    page.write_text("no markers here\n")
    with pytest.raises(SystemExit, match="RESULTS.md: needs exactly one"):
        main([str(tmp_path), "--update", str(page)])
    assert page.read_text() == "no markers here\n"


def _per_image(root: Path, seed: int, name: str, found: np.ndarray) -> None:
    """One category, one object per image; ``found`` [I] bool: the image's one detection hits it
    (a true positive at every IoU threshold) or misses (a false positive)."""
    images = len(found)
    thresholds = 10
    PerImageEval(
        image_ids=np.arange(1, images + 1),
        category_ids=np.array([1]),
        offsets=np.array([0, images]),
        image_index=np.arange(images),
        tp=np.tile(found, (thresholds, 1)),
        fp=np.tile(~found, (thresholds, 1)),
        gt_count=np.ones((1, images), dtype=np.int64),
        rec_thrs=np.linspace(0.0, 1.0, 101),
    ).save(root / f"seed{seed}" / "per_image" / f"{name}.npz")


def test_goal_checks_are_paired_differences_with_intervals(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    hits = rng.random(200) < 0.6
    for seed in (0, 1):
        _write(tmp_path, seed, "msad_student", 30.0)
        _write(tmp_path, seed, "hr_baseline", 30.0)
        _write(tmp_path, seed, "lr_shifted_control", 10.0)
        _per_image(tmp_path, seed, "msad_student", hits)
        _per_image(tmp_path, seed, "hr_baseline", hits)  # the same detections: zero-width difference
        _per_image(tmp_path, seed, "lr_shifted_control", hits & (rng.random(200) < 0.5))
    text = render(tmp_path)
    assert "vs HR baseline: +0.0 AP [+0.0, +0.0] (paired over 2 seeds), met" in text
    line = next(x for x in text.splitlines() if "best LR baseline" in x)
    gap, low, high = (float(v) for v in re.findall(r"[+-]\d+\.\d", line)[:3])
    assert low < gap < high and low > 2.0 and line.endswith("met (goal: at least +2.0)")


def test_paired_gap_verdicts_and_seed_overlap() -> None:
    rng = np.random.default_rng(1)
    hits = rng.random(100) < 0.5

    def evaluation(found):
        return {
            "seed0": PerImageEval(
                image_ids=np.arange(100),
                category_ids=np.array([1]),
                offsets=np.array([0, 100]),
                image_index=np.arange(100),
                tp=np.tile(found, (10, 1)),
                fp=np.tile(~found, (10, 1)),
                gt_count=np.ones((1, 100), dtype=np.int64),
                rec_thrs=np.linspace(0.0, 1.0, 101),
            )
        }

    a, b = evaluation(hits), evaluation(hits & (rng.random(100) < 0.9))
    gap = paired_gap(a, b)
    assert gap is not None and gap[0] > 0 and gap[1][0] <= gap[0] <= gap[1][1] and gap[2] == 1
    assert paired_gap(a, {}) is None  # no seed has both rows
    # a goal inside the interval is not resolved either way
    straddled = _gap(0.0, 0.0, goal=gap[0], paired=gap)
    assert "not resolved: the estimate is above the goal" in straddled
    assert _gap(0.0, 0.0, goal=gap[1][1] + 1, paired=gap).endswith(", missed")
    other = {"seed0": dataclasses.replace(a["seed0"], image_ids=np.arange(1, 101))}
    with pytest.raises(ValueError, match="different images"):
        paired_gap(a, other)


def test_named_sections_have_their_own_markers(tmp_path: Path) -> None:
    _write(tmp_path, 0, "msad_student", 30.0)
    page = tmp_path / "RESULTS.md"
    begin, end = table_markers("objects")
    page.write_text(f"{TABLE_MARKERS[0]}\nshapes table\n{TABLE_MARKERS[1]}\n{begin}\nold\n{end}\n")
    main([str(tmp_path), "--update", str(page), "--section", "objects"])
    text = page.read_text()
    assert "shapes table" in text and "old" not in text and "| MSAD student (P2..P6) |" in text
    with pytest.raises(SystemExit, match="no such results directory"):
        main([str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="plain name"):
        main([str(tmp_path), "--update", str(page), "--section", "a b"])
