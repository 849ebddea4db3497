"""Aggregate the synthetic experiment's per-seed metrics into the table of docs/RESULTS.md.

    python -m msad_deploy.training.results docs/results [--update docs/RESULTS.md]

Reads ``RESULTS/seed*/ROW.json`` (written by ``msad eval --out``), prints a Markdown table with
mean and spread (min..max) over seeds, and the two goal checks of the experiment. ``--update``
rewrites the part of a Markdown page between the two ``TABLE_MARKERS`` lines instead.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# (result name, row label, evaluated at, training run)
ROWS = (
    ("hr_baseline", "HR baseline (P3..P7)", "HR 128", "hr_baseline"),
    ("lr_baseline_single", "LR baseline, single-scale (P3..P7)", "LR 64", "lr_baseline_single"),
    ("lr_baseline_multi", "LR baseline, multi-scale (P3..P7)", "LR 64", "lr_baseline_multi"),
    ("lr_shifted_control", "LR shifted-pyramid control (P2..P6, no teacher)", "LR 64", "lr_shifted_control"),
    (
        "lr_shifted_control_long",
        "LR shifted-pyramid control, 2x schedule (P2..P6, no teacher)",
        "LR 64",
        "lr_shifted_control_long",
    ),
    ("teacher_fused", "aligned teacher, fused branch", "HR 128 + LR 64", "teacher"),
    ("teacher_lr_branch", "aligned teacher, LR branch", "LR 64", "teacher"),
    ("student_unaligned", "student distilled without alignment (P3..P7)", "LR 64", "student_unaligned"),
    ("student_no_kd", "student initialised from the teacher, no KD (P2..P6)", "LR 64", "student_no_kd"),
    ("msad_student", "MSAD student (P2..P6)", "LR 64", "msad_student"),
)
TABLE_MARKERS = ("<!-- results-table:begin -->", "<!-- results-table:end -->")
# The LR models trained the usual way, on the same schedule as each MSAD stage: the goal's reference.
LR_BASELINES = ("lr_baseline_single", "lr_baseline_multi", "lr_shifted_control")
# Budget checks beside the goal: the student's own stage starts from a teacher that has already had
# a full schedule, so it is also compared with models that get as many iterations in total.
BUDGET_CHECKS = (
    ("lr_shifted_control_long", "the shifted control on the 2x schedule (teacher + student iterations)"),
    ("student_no_kd", "the student initialised from the teacher without KD"),
)


def load_results(results_dir: Path) -> dict[str, list[dict[str, float]]]:
    """ROW -> one metrics dict per seed that has it."""
    table: dict[str, list[dict[str, float]]] = {}
    for seed_dir in sorted(results_dir.glob("seed*")):
        for path in sorted(seed_dir.glob("*.json")):
            metrics = json.loads(path.read_text())
            table.setdefault(path.stem, []).append(
                {k: (math.nan if v is None else v) for k, v in metrics.items()}
            )
    return table


def load_wall_times(results_dir: Path) -> dict[str, list[float]]:
    """RUN -> training wall seconds per seed (parts of a resumed run are added up)."""
    times: dict[str, list[float]] = {}
    for path in sorted(results_dir.glob("seed*/wall_times.jsonl")):
        per_run: dict[str, float] = {}
        for line in path.read_text().splitlines():
            record = json.loads(line)
            per_run[record["run"]] = per_run.get(record["run"], 0.0) + record["wall_s"]
        for run, seconds in per_run.items():
            times.setdefault(run, []).append(seconds)
    return times


def _cell(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ({min(values):.1f}..{max(values):.1f})"


def mean_ap(runs: list[dict[str, float]]) -> float:
    return statistics.fmean(r["AP"] for r in runs) if runs else math.nan


def _gap(student: float, reference: float, goal: float | None = None) -> str:
    """'+2.4 AP', with ', met' / ', missed' when a goal is given, or 'n/a' when a side has no run yet."""
    if math.isnan(student) or math.isnan(reference):
        return "n/a (not run yet)"
    gap = student - reference
    verdict = "" if goal is None else (", met" if gap >= goal else ", missed")
    return f"{gap:+.1f} AP{verdict}"


def render(results_dir: Path) -> str:
    table = load_results(results_dir)
    wall = load_wall_times(results_dir)
    lines = [
        "| model | evaluated at | seeds | " + " | ".join(COLUMNS) + " | train min |",
        "|---|---|---|" + "---|" * (len(COLUMNS) + 1),
    ]
    for name, label, where, run in ROWS:
        runs = table.get(name, [])
        cells = [_cell([r[c] for r in runs]) for c in COLUMNS] if runs else ["not run"] * len(COLUMNS)
        minutes = _cell([s / 60 for s in wall.get(run, [])]) if wall.get(run) else "-"
        lines.append(f"| {label} | {where} | {len(runs)} | " + " | ".join(cells) + f" | {minutes} |")
    student = mean_ap(table.get("msad_student", []))
    best_lr_name = max(LR_BASELINES, key=lambda n: mean_ap(table.get(n, [])) if table.get(n) else -1)
    best_lr = mean_ap(table.get(best_lr_name, []))
    hr = mean_ap(table.get("hr_baseline", []))
    lines += [
        "",
        f"- MSAD student vs best LR baseline ({best_lr_name}): {_gap(student, best_lr, 2.0)} (goal: at least +2.0)",
        f"- MSAD student vs HR baseline: {_gap(student, hr, -1.0)} (goal: no worse than -1.0)",
    ]
    for name, description in BUDGET_CHECKS:
        lines.append(f"- MSAD student vs {description}: {_gap(student, mean_ap(table.get(name, [])))}")
    lines += [
        "",
        "Cells: mean over seeds (min..max). AP in percent, COCO definitions with the small/medium/large "
        "area bounds scaled to 128-px images (data.eval_area_range_scale=0.04).",
    ]
    return "\n".join(lines)


def update_page(page: Path, table: str) -> None:
    """Replace the text between the two ``TABLE_MARKERS`` lines of ``page`` with ``table``."""
    text = page.read_text()
    begin, end = TABLE_MARKERS
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise SystemExit(f"{page}: needs exactly one '{begin}' line followed by one '{end}' line")
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    page.write_text(f"{head}{begin}\n{table}\n{end}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Render the synthetic MSAD experiment table from per-seed metrics JSON."
    )
    parser.add_argument("results", type=Path, help="directory holding seed*/ROW.json (docs/results)")
    parser.add_argument(
        "--update",
        type=Path,
        metavar="PAGE",
        help="write the table into PAGE between its results-table markers instead of printing it",
    )
    args = parser.parse_args(argv)
    table = render(args.results)
    if args.update:
        update_page(args.update, table)
    else:
        print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
