"""The docs/RESULTS.md table: means, spreads, missing rows and the goal lines."""

from __future__ import annotations

import json
from pathlib import Path

from msad_deploy.training.results import render


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


def test_longer_shifted_control_counts_as_an_lr_baseline(tmp_path: Path) -> None:
    _write(tmp_path, 0, "msad_student", 30.0)
    _write(tmp_path, 0, "lr_shifted_control", 25.0)
    _write(tmp_path, 0, "lr_shifted_control_long", 27.5)
    text = render(tmp_path)
    assert "best LR baseline (lr_shifted_control_long): +2.5 AP, met" in text
    assert "vs HR baseline: n/a (not run yet)" in text
