"""Aggregate the synthetic experiment's per-seed metrics into the tables of docs/RESULTS.md.

    python -m msad_deploy.training.results docs/results/objects [--update docs/RESULTS.md --section objects]

Reads ``RESULTS/seed*/ROW.json`` (written by ``msad eval --out``), prints a Markdown table with
mean and spread (min..max) over seeds, each seed's AP interval, and the goal checks of the
experiment. Where ``RESULTS/seed*/per_image/ROW.npz`` exist (``msad eval --save-per-image``), each
check is a paired difference: both rows resampled on the same validation images, averaged over
the seeds both have, with its 95 % bootstrap interval. ``--update`` rewrites the part of a
Markdown page between the section's two marker lines instead.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import numpy as np

from msad_deploy.evaluation.bootstrap import (
    DEFAULT_RESAMPLES,
    PerImageEval,
    percentile_interval,
    resample_counts,
)

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


def table_markers(section: str | None = None) -> tuple[str, str]:
    """The begin/end marker lines of a page's table; a named section has its own pair."""
    if section is None:
        return TABLE_MARKERS
    if not section.replace("-", "").replace("_", "").isalnum():
        raise SystemExit(f"--section must be a plain name (letters, digits, - or _), got {section!r}")
    return (f"<!-- results-table:begin {section} -->", f"<!-- results-table:end {section} -->")


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


def load_per_image(results_dir: Path) -> dict[str, dict[str, PerImageEval]]:
    """ROW -> seed directory name -> its per-image evaluation (rows evaluated with --save-per-image)."""
    found: dict[str, dict[str, PerImageEval]] = {}
    for path in sorted(results_dir.glob("seed*/per_image/*.npz")):
        found.setdefault(path.stem, {})[path.parent.parent.name] = PerImageEval.load(path)
    return found


def paired_gap(
    a: dict[str, PerImageEval],
    b: dict[str, PerImageEval],
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> tuple[float, tuple[float, float], int] | None:
    """AP(a) - AP(b) averaged over the seeds both rows have, with its 95 % interval over images.

    Every seed evaluates the same validation images, so one set of image resamples [B, I] serves all
    of them: each resample's difference is the mean over seeds of the two rows' resampled APs. The
    interval covers which images were drawn; the seeds' spread is the table's min..max. Returns
    (difference, (low, high), seeds used), or None when no seed has both rows.
    """
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    ids = a[seeds[0]].image_ids
    for s in seeds:
        for side in (a[s], b[s]):
            if not np.array_equal(side.image_ids, ids):
                raise ValueError(f"{s}: rows were evaluated on different images; re-run their evaluation")
    counts = resample_counts(len(ids), resamples, seed)
    samples = np.mean([a[s].resampled_ap(counts) - b[s].resampled_ap(counts) for s in seeds], axis=0)
    point = statistics.fmean(a[s].ap() - b[s].ap() for s in seeds)
    return point, percentile_interval(samples), len(seeds)


def _ci_cell(runs: list[dict]) -> str:
    """Each seed's AP_ci95 as "low-high", seeds separated by " / "; "-" when none was recorded."""
    cells = [f"{r['AP_ci95'][0]:.1f}-{r['AP_ci95'][1]:.1f}" for r in runs if r.get("AP_ci95")]
    return " / ".join(cells) or "-"


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


def _gap(student: float, reference: float, goal: float | None = None, paired=None) -> str:
    """'+2.4 AP', with ', met' / ', missed' when a goal is given, or 'n/a' when a side has no run yet.

    With ``paired`` (from :func:`paired_gap`) the figure is the paired difference with its interval,
    and a goal is "met" / "missed" only when the interval lies on one side of it; otherwise the
    verdict says the interval straddles the goal."""
    if paired is not None:
        gap, (low, high), seeds = paired
        text = f"{gap:+.1f} AP [{low:+.1f}, {high:+.1f}] (paired over {seeds} seed{'s' if seeds > 1 else ''})"
        if goal is None:
            return text
        if low >= goal:
            return f"{text}, met"
        if high < goal:
            return f"{text}, missed"
        side = "above" if gap >= goal else "below"
        return f"{text}, not resolved: the estimate is {side} the goal, the interval spans it"
    if math.isnan(student) or math.isnan(reference):
        return "n/a (not run yet)"
    gap = student - reference
    verdict = "" if goal is None else (", met" if gap >= goal else ", missed")
    return f"{gap:+.1f} AP{verdict}"


def render(results_dir: Path) -> str:
    table = load_results(results_dir)
    wall = load_wall_times(results_dir)
    per_image = load_per_image(results_dir)
    with_ci = any(r.get("AP_ci95") for runs in table.values() for r in runs)
    ci_head = " AP_ci95 per seed |" if with_ci else ""
    lines = [
        "| model | evaluated at | seeds | AP |" + ci_head + " " + " | ".join(COLUMNS[1:]) + " | train min |",
        "|---|---|---|" + "---|" * (len(COLUMNS) + 1 + with_ci),
    ]
    for name, label, where, run in ROWS:
        runs = table.get(name, [])
        cells = [_cell([r[c] for r in runs]) for c in COLUMNS] if runs else ["not run"] * len(COLUMNS)
        if with_ci:
            cells.insert(1, _ci_cell(runs))
        minutes = _cell([s / 60 for s in wall.get(run, [])]) if wall.get(run) else "-"
        lines.append(f"| {label} | {where} | {len(runs)} | " + " | ".join(cells) + f" | {minutes} |")

    def paired(a: str, b: str):
        return paired_gap(per_image[a], per_image[b]) if a in per_image and b in per_image else None

    student = mean_ap(table.get("msad_student", []))
    best_lr_name = max(LR_BASELINES, key=lambda n: mean_ap(table.get(n, [])) if table.get(n) else -1)
    best_lr = mean_ap(table.get(best_lr_name, []))
    hr = mean_ap(table.get("hr_baseline", []))
    lines += [
        "",
        f"- MSAD student vs best LR baseline ({best_lr_name}): "
        f"{_gap(student, best_lr, 2.0, paired('msad_student', best_lr_name))} (goal: at least +2.0)",
        f"- MSAD student vs HR baseline: {_gap(student, hr, -1.0, paired('msad_student', 'hr_baseline'))} "
        "(goal: no worse than -1.0)",
    ]
    for name, description in BUDGET_CHECKS:
        gap = _gap(student, mean_ap(table.get(name, [])), paired=paired("msad_student", name))
        lines.append(f"- MSAD student vs {description}: {gap}")
    lines += [
        "",
        "Cells: mean over seeds (min..max). AP in percent, COCO definitions with the small/medium/large "
        "area bounds scaled to 128-px images (data.eval_area_range_scale=0.04).",
    ]
    if with_ci:
        lines.append(
            "AP_ci95: each seed's 95 % bootstrap interval over the validation images (msad eval, 1000 "
            "resamples). Differences in [brackets]: paired on the same images and resamples, averaged "
            "over the seeds; they cover the choice of images, not of training seeds."
        )
    return "\n".join(lines)


def update_page(page: Path, table: str, section: str | None = None) -> None:
    """Replace the text between the section's two marker lines of ``page`` with ``table``."""
    text = page.read_text()
    begin, end = table_markers(section)
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise SystemExit(f"{page}: needs exactly one '{begin}' line followed by one '{end}' line")
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    page.write_text(f"{head}{begin}\n{table}\n{end}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Render the synthetic MSAD experiment table from per-seed metrics JSON."
    )
    parser.add_argument("results", type=Path, help="directory holding seed*/ROW.json (docs/results/objects)")
    parser.add_argument(
        "--update",
        type=Path,
        metavar="PAGE",
        help="write the table into PAGE between its results-table markers instead of printing it",
    )
    parser.add_argument(
        "--section",
        metavar="NAME",
        help="with --update: the table between '<!-- results-table:begin NAME -->' and its end line "
        "(default: the unnamed markers)",
    )
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        raise SystemExit(
            f"{args.results}: no such results directory (scripts/synth_experiment.sh writes one)"
        )
    table = render(args.results)
    if args.update:
        update_page(args.update, table, args.section)
    else:
        print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
