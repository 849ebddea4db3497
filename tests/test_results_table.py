"""The docs/RESULTS.md table: means, spreads, missing rows and the goal lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from msad_deploy.training.results import TABLE_MARKERS, main, render


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
