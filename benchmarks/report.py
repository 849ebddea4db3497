"""Benchmark outputs: ``results.jsonl`` / ``results.csv`` / ``results.md``, the Pareto frontier, the
budget answer and ``pareto.png``.

Rows are the dicts :class:`~msad_deploy.benchmarks.runner.BenchRunner` makes, one per cell. Latency
on the plot and in the frontier and the budget query is the end-to-end p50 per call; accuracy is
COCO AP. Only cells of the same device and batch size are compared with each other.

AP noise: each row carries ``AP_ci95`` (a bootstrap interval over the evaluated images) and the path
of its per-image matching. :class:`APStatistics` resamples every row on the same images, so two rows
compare paired: the key pairs (student - lr/hr, int8 - fp32, ...) are listed with the interval of
their difference, and a frontier point or budget answer whose AP cannot be told from a faster cell's
(the interval of the difference holds 0) says "within noise of" that cell.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from msad_deploy.evaluation.bootstrap import PerImageEval, ap_samples, interval_text, percentile_interval
from msad_deploy.runtime.artifacts import atomic_path

from .pareto import budget_query, pareto_front

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
LATENCY_KEYS = ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "throughput", "runs")
COST_PARTS = ("backbone", "fpn", "head", "fusion")
CSV_FIELDS = (
    [
        "cell_id",
        "model",
        "size",
        "backend",
        "precision",
        "batch",
        "device",
        "status",
        "reason",
        "pareto",
        "within_noise_of",
    ]
    + ["AP", "AP_ci95", *METRICS[1:]]
    + [f"e2e_{k}" for k in LATENCY_KEYS]
    + [f"model_{k}" for k in LATENCY_KEYS]
    + [f"gflops_{p}" for p in COST_PARTS]
    + [
        "gflops_total",
        "params_m",
        "network_input",
        "artifact_mb",
        "verified",
        "e2e_p50_ci95",
        "unstable",
        "latency_only",
        "threads",
        "artifact",
        "cpu",
        "gpu",
    ]
)


def measured(row: dict[str, Any]) -> bool:
    """A finished cell with an AP and an end-to-end latency (a point of the plot)."""
    return row.get("status") == "ok" and bool(row.get("metrics")) and bool(row.get("e2e_ms"))


def latency(row: dict[str, Any]) -> float:
    return float(row["e2e_ms"]["p50_ms"])


def accuracy(row: dict[str, Any]) -> float:
    return float(row["metrics"]["AP"])


def groups(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Measured rows by (device, batch)."""
    found: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        if measured(row):
            found.setdefault((row["device"], int(row["batch"])), []).append(row)
    return found


def mark_pareto(rows: list[dict[str, Any]]) -> None:
    """Set ``row["pareto"]``: True on the frontier of its (device, batch) group, False off it, None
    for cells without both numbers."""
    for row in rows:
        row["pareto"] = None
    for members in groups(rows).values():
        for row, on in zip(members, pareto_front([(latency(r), accuracy(r)) for r in members]), strict=True):
            row["pareto"] = on


def flatten(row: dict[str, Any]) -> dict[str, Any]:
    """One CSV line of a row (nested latency, metrics and cost spread into columns; AP_ci95 as
    "low-high")."""
    flat = {key: row.get(key) for key in CSV_FIELDS}
    flat["reason"] = row.get("reason") or row.get("error")
    flat["within_noise_of"] = (row.get("within_noise_of") or {}).get("label")
    for key in METRICS:
        flat[key] = (row.get("metrics") or {}).get(key)
    flat["AP_ci95"] = interval_text((row.get("metrics") or {}).get("AP_ci95"), 4)
    flat["e2e_p50_ci95"] = interval_text((row.get("e2e_ms") or {}).get("p50_ci95"), 4)
    flat["unstable"] = "; ".join(row.get("unstable") or []) or None
    for prefix in ("e2e", "model"):
        stats = row.get(f"{prefix}_ms") or {}
        for key in LATENCY_KEYS:
            flat[f"{prefix}_{key}"] = stats.get(key)
    cost = row.get("cost") or {}
    for part in COST_PARTS:
        flat[f"gflops_{part}"] = (cost.get("gflops") or {}).get(part)
    flat["gflops_total"] = cost.get("gflops_total")
    flat["params_m"] = cost.get("params_m")
    flat["network_input"] = "x".join(str(v) for v in cost.get("network_input") or []) or None
    env = row.get("env") or {}
    flat["cpu"] = env.get("cpu")
    flat["gpu"] = (env.get("gpu") or {}).get("name")
    return flat


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _size_text(row: dict[str, Any]) -> str:
    cost = row.get("cost") or {}
    net = cost.get("network_input")
    size = row.get("size") if row.get("size") is not None else "native"
    return f"{size} ({net[0]}x{net[1]})" if net else str(size)


def _p50_text(row: dict[str, Any]) -> str:
    """e2e p50 with its 95 % interval as +-half width in percent, and a warning sign when unstable."""
    e2e = row.get("e2e_ms") or {}
    text = _fmt(e2e.get("p50_ms"), 2)
    interval = e2e.get("p50_ci95")
    if interval and e2e.get("p50_ms"):
        text += f" ±{(interval[1] - interval[0]) / 2 / e2e['p50_ms']:.0%}"
    return text + (" ⚠" if row.get("unstable") else "")


def _ap_text(row: dict[str, Any]) -> str:
    return "latency only" if row.get("latency_only") else _fmt((row.get("metrics") or {}).get("AP"))


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Measured cells (frontier marked; e2e p50 with its 95 % interval, ⚠ where the timing was
    unstable), then the cells that were skipped or failed, with why, and the timing notes."""
    lines = [
        "| model | size (net input) | backend | precision | batch | device | AP | AP_ci95 | AP50 | APs | e2e p50 ms "
        "| e2e p99 ms | model p50 ms | img/s | GFLOPs backbone/FPN/head | params M | MB | frontier |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.get("status") != "ok":
            continue
        metrics, e2e, model = row.get("metrics") or {}, row.get("e2e_ms") or {}, row.get("model_ms") or {}
        cost = row.get("cost") or {}
        split = cost.get("gflops") or {}
        flops = "/".join(_fmt(split.get(p), 2) for p in ("backbone", "fpn", "head")) if split else "-"
        if split.get("fusion"):
            flops += f" (+{split['fusion']:.2f} fusion)"
        lines.append(
            f"| {row['model']} | {_size_text(row)} | {row['backend']}"
            f"{' (verification failed)' if row.get('verified') is False else ''} | {row['precision']} | {row['batch']} | "
            f"{row['device']} | {_ap_text(row)} | {interval_text(metrics.get('AP_ci95')) or '-'} | "
            f"{_fmt(metrics.get('AP50'))} | {_fmt(metrics.get('APs'))} | "
            f"{_p50_text(row)} | {_fmt(e2e.get('p99_ms'), 2)} | {_fmt(model.get('p50_ms'), 2)} | "
            f"{_fmt(e2e.get('throughput'), 0)} | {flops} | {_fmt(cost.get('params_m'), 2)} | "
            f"{_fmt(row.get('artifact_mb'), 1)} | {_frontier_cell(row)} |"
        )
    others = [row for row in rows if row.get("status") != "ok"]
    if others:
        lines += ["", "Not measured:", "", "| cell | status | why |", "|---|---|---|"]
        for row in others:
            why = (row.get("reason") or row.get("error") or "").replace("|", "\\|")
            lines.append(f"| {row['label']} | {row['status']} | {why} |")
    notes = timing_notes(rows)
    if notes:
        lines += ["", notes]
    return "\n".join(lines) + "\n"


def timing_notes(rows: list[dict[str, Any]]) -> str:
    """What msad bench did about unstable timing: the cells it measured again, and those still unstable
    after that (published, marked ⚠, with the reasons)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    again = [r for r in ok if (r.get("timing") or {}).get("remeasured")]
    unstable = [r for r in ok if r.get("unstable")]
    lines = []
    if again:
        settled = len([r for r in again if not r.get("unstable")])
        lines.append(
            f"Timing: {len(again)} cells were measured a second time because their size's first pass was "
            f"unstable; {settled} of them were stable then."
        )
    if unstable:
        lines.append(f"⚠ Timing unstable ({len(unstable)} cells; compare their latencies with care):")
        lines += [f"- {r['label']}: {'; '.join(r['unstable'])}" for r in unstable]
    return "\n".join(lines)


def latency_ratios(rows: list[dict[str, Any]], reference: str = "hr") -> dict[tuple, dict[str, Any]]:
    """e2e p50 of each model over ``reference``'s at the same backend, precision, size, batch and
    device (the two were timed together): {(model, backend, precision, batch, device, size): {"ratio",
    "unstable"}}."""
    ok = {
        (r["model"], r["backend"], r["precision"], r["batch"], r["device"], r.get("size")): r
        for r in rows
        if r.get("status") == "ok" and r.get("e2e_ms")
    }
    ratios = {}
    for (model, *rest), row in ok.items():
        base = ok.get((reference, *rest))
        if model == reference or base is None:
            continue
        ratios[(model, *rest)] = {
            "ratio": latency(row) / latency(base),
            "unstable": bool(row.get("unstable") or base.get("unstable")),
        }
    return ratios


def ratio_table(rows: list[dict[str, Any]], reference: str = "hr") -> str:
    """Markdown: each model's e2e p50 over ``reference``'s, by engine/precision (rows) and size
    (columns): how the latency saved by a smaller input changes with the frame size."""
    ratios = latency_ratios(rows, reference)
    if not ratios:
        return ""
    sizes = sorted({key[5] for key in ratios}, key=lambda v: (v is None, v or 0))
    lines_of: dict[tuple, dict[Any, str]] = {}
    for (model, backend, precision, batch, device, size), value in ratios.items():
        where = (model, backend, precision, batch, device)
        lines_of.setdefault(where, {})[size] = f"{value['ratio']:.2f}" + (" ⚠" if value["unstable"] else "")
    head = " | ".join(str(s if s is not None else "native") for s in sizes)
    lines = [
        f"End-to-end p50 over {reference}'s at the same size, engine and precision (timed together):",
        "",
        f"| model | backend | precision | batch | device | {head} |",
        "|---|---|---|---|---|" + "---|" * len(sizes),
    ]
    for (model, backend, precision, batch, device), cells in lines_of.items():
        values = " | ".join(cells.get(size, "-") for size in sizes)
        lines.append(f"| {model} | {backend} | {precision} | {batch} | {device} | {values} |")
    return "\n".join(lines) + "\n"


def _frontier_cell(row: dict[str, Any]) -> str:
    if not row.get("pareto"):
        return ""
    noise = row.get("within_noise_of")
    return "**yes**" + (f" (within noise of {noise['label']})" if noise else "")


def describe(row: dict[str, Any]) -> str:
    return f"{row['label']} (AP {accuracy(row):.1f} at {latency(row):.2f} ms)"


# -- AP noise ------------------------------------------------------------------------------------


class APStatistics:
    """AP bootstrap samples of bench rows, all drawn on the same image resamples (``resamples``,
    ``seed``), so that any two rows scored on the same images compare paired.

    Samples come from a row's saved per-image matching (``row["ap_per_image"]``, relative to
    ``folder``). Rows without one (measured before intervals existed, or a results.jsonl copied without
    its eval/ folder) fall back to their ``AP_ci95``: unpaired, overlapping intervals count as noise.
    """

    def __init__(self, folder: Path | None, resamples: int = 1000, seed: int = 0) -> None:
        self.folder = folder
        self.resamples = resamples
        self.seed = seed
        self._loaded: dict[str, tuple[PerImageEval, np.ndarray] | None] = {}

    def _matching(self, row: dict[str, Any]) -> tuple[PerImageEval, np.ndarray] | None:
        """(per-image matching, AP samples [resamples]) of ``row``, or None when it has none."""
        relative = row.get("ap_per_image")
        if not relative or self.folder is None or not self.resamples:
            return None
        if relative not in self._loaded:
            path = self.folder / relative
            try:
                matching = PerImageEval.load(path)
            except (OSError, ValueError):
                self._loaded[relative] = None
            else:
                self._loaded[relative] = (matching, ap_samples(matching, self.resamples, self.seed))
        return self._loaded[relative]

    def compare(self, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any] | None:
        """AP(a) - AP(b): ``{"difference", "ci95", "paired", "within_noise"}``. Paired (both resampled on
        the same images): ci95 is the difference's 95 % interval, noise when it holds 0. Otherwise, from
        the rows' own intervals: ci95 None, noise when they overlap. None: nothing to judge by (or the
        bootstrap is off)."""
        if not self.resamples:
            return None
        difference = accuracy(a) - accuracy(b)
        first, second = self._matching(a), self._matching(b)
        if first and second and np.array_equal(first[0].image_ids, second[0].image_ids):
            low, high = percentile_interval(first[1] - second[1])
            return {
                "difference": round(difference, 4),
                "ci95": [round(low, 4), round(high, 4)],
                "paired": True,
                "within_noise": bool(low <= 0.0 <= high),
            }
        intervals = [(row.get("metrics") or {}).get("AP_ci95") for row in (a, b)]
        if not all(interval and None not in interval for interval in intervals):
            return None
        (low_a, high_a), (low_b, high_b) = intervals
        overlap = low_a <= high_b and low_b <= high_a
        return {"difference": round(difference, 4), "ci95": None, "paired": False, "within_noise": overlap}


def mark_noise(rows: list[dict[str, Any]], stats: APStatistics | None) -> None:
    """Set ``row["within_noise_of"]`` on each frontier row whose AP cannot be told from a faster row's of
    its (device, batch) group: the fastest such row's label with :meth:`APStatistics.compare`'s numbers;
    None elsewhere (or without ``stats``). Call after :func:`mark_pareto`."""
    for row in rows:
        row["within_noise_of"] = None
    if stats is None:
        return
    for members in groups(rows).values():
        by_speed = sorted(members, key=latency)
        for row in by_speed:
            if not row.get("pareto"):
                continue
            for faster in by_speed:
                if latency(faster) >= latency(row):
                    break
                verdict = stats.compare(row, faster)
                if verdict is not None and verdict["within_noise"]:
                    row["within_noise_of"] = {"label": faster["label"], **verdict}
                    break


PAIR_MATCHES = ("size", "input")


def default_model_pairs(names: list[str]) -> list[tuple[str, str, str]]:
    """Every model named *student* against ``lr`` on the same network input (the method's claim: more
    AP from the same pixels) and against ``hr`` at the same HR-frame size (what the full-resolution
    model makes of the same image), those of them in ``names``."""
    pairs = []
    for a in names:
        if "student" in a:
            pairs += [
                (a, b, match) for b, match in (("lr", "input"), ("hr", "size")) if b in names and b != a
            ]
    return pairs


def parse_model_pairs(texts: list[str], names: list[str]) -> list[tuple[str, str, str]]:
    """``A-B`` (B at the same HR-frame size) or ``A-B@input`` (B where its network input equals A's)
    texts as (A, B, match) (a name may hold "-": split where both sides are names)."""
    pairs = []
    for text in texts:
        body, _, match = text.partition("@")
        match = match or "size"
        found = [
            (body[:i], body[i + 1 :])
            for i, char in enumerate(body)
            if char == "-" and body[:i] in names and body[i + 1 :] in names
        ]
        if len(found) != 1 or match not in PAIR_MATCHES:
            raise ValueError(
                f"compare {text!r}: expected A-B or A-B@input with A and B two of the models {names}"
            )
        pairs.append((*found[0], match))
    return pairs


def _network_input(row: dict[str, Any]) -> int | None:
    """The short side the network sees: the HR-frame size halved ``input_shift`` times (None: native)."""
    size = row.get("size")
    return None if size is None else size >> int(row.get("input_shift") or 0)


def paired_differences(
    rows: list[dict[str, Any]], stats: APStatistics | None, model_pairs: list[tuple[str, str, str]]
) -> list[dict[str, Any]]:
    """The key AP comparisons, each on the same images: ``model_pairs`` (A - B) at every size, backend,
    precision and device both have (B at A's HR-frame size, or with ``input`` at the size where B's
    network input equals A's), and each model's fp16/bf16/int8 - fp32 at the same size, backend and
    device. Rows that differ only in batch size share their AP, so each pair is listed once."""
    if stats is None:
        return []
    scored: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        if row.get("status") == "ok" and (row.get("metrics") or {}).get("AP") is not None:
            scored.setdefault(
                (row["model"], row.get("size"), row["backend"], row["precision"], row["device"]), row
            )
    entries = []

    def add(what: str, where: str, a: dict[str, Any], b: dict[str, Any]) -> None:
        verdict = stats.compare(a, b)
        entries.append({"what": what, "where": where, "a": a["label"], "b": b["label"], "verdict": verdict})

    for first, second, match in model_pairs:
        for (model, size, backend, precision, device), row in scored.items():
            if model != first:
                continue
            if match == "input":
                other = next(
                    (
                        r
                        for (m, _, b, p, d), r in scored.items()
                        if (m, b, p, d) == (second, backend, precision, device)
                        and _network_input(r) == _network_input(row)
                    ),
                    None,
                )
            else:
                other = scored.get((second, size, backend, precision, device))
            if other is None:
                continue
            where = f"@{size or 'native'}" + (
                f" vs @{other.get('size')} (same input)" if match == "input" else ""
            )
            add(f"{first} - {second}", f"{where} {backend} {precision} {device}", row, other)
    for (model, size, backend, precision, device), row in scored.items():
        reference = scored.get((model, size, backend, "fp32", device))
        if precision != "fp32" and reference is not None:
            add(f"{precision} - fp32", f"{model}@{size or 'native'} {backend} {device}", row, reference)
    return entries


def paired_text(entries: list[dict[str, Any]], stats: APStatistics | None) -> str:
    """The comparisons of :func:`paired_differences` as lines for the console and results.md ("" when
    none can be judged, e.g. every row is from a run before AP intervals)."""
    judged = [e for e in entries if e["verdict"] is not None]
    if not judged or stats is None:
        return ""
    lines = [
        f"AP differences, paired on the same images (95 % interval over {stats.resamples} resamples, "
        f"seed {stats.seed}; 'within noise' when it holds 0):"
    ]
    width = max(len(e["what"]) for e in judged)
    place = max(len(e["where"]) for e in judged)
    for entry in judged:
        verdict = entry["verdict"]
        head = f"  {entry['what']:<{width}}  {entry['where']:<{place}}  "
        if verdict["paired"]:
            low, high = verdict["ci95"]
            noise = "  within noise" if verdict["within_noise"] else ""
            lines.append(head + f"{verdict['difference']:+.2f} [{low:+.2f}, {high:+.2f}]{noise}")
        else:
            noise = "overlap: within noise" if verdict["within_noise"] else "apart"
            lines.append(head + f"{verdict['difference']:+.2f} (unpaired, AP_ci95 intervals {noise})")
    if len(judged) < len(entries):
        lines.append(
            f"  ({len(entries) - len(judged)} more pairs lack per-image results: rows from a run before AP "
            "intervals; msad bench --fresh measures them again)"
        )
    return "\n".join(lines)


def _noise_line(row: dict[str, Any], rows: list[dict[str, Any]]) -> str | None:
    """'  within noise of X: ...' for a row :func:`mark_noise` annotated."""
    noise = row.get("within_noise_of")
    if not noise:
        return None
    faster = next((r for r in rows if r.get("label") == noise["label"] and measured(r)), None)
    gain = f", {latency(row) - latency(faster):.2f} ms faster" if faster is not None else ""
    if noise["paired"]:
        low, high = noise["ci95"]
        why = f"AP {noise['difference']:+.1f} [{low:+.1f}, {high:+.1f}] (paired 95 % interval holds 0)"
    else:
        why = f"AP {noise['difference']:+.1f}, AP_ci95 intervals overlap (unpaired)"
    return f"  within noise of {noise['label']}{gain}: {why}."


def parse_budget(text: str) -> float | tuple[float, str, int | None]:
    """``--budget-ms``: milliseconds (``10``), or a fraction of a reference cell's latency
    (``0.5xhr@128``: half the end-to-end p50 of the fastest measured cell of model ``hr`` at size 128,
    per device and batch; ``0.5xhr`` for a model measured at its own size)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*x\s*([^@\s]+)(?:@(\d+))?\s*", text)
    if match:
        return float(match.group(1)), match.group(2), int(match.group(3)) if match.group(3) else None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(
            f"--budget-ms {text!r}: expected milliseconds (10) or a fraction of a cell (0.5xhr@128)"
        ) from None
    if value <= 0:
        raise ValueError(f"--budget-ms must be positive, got {text}")
    return value


def _resolve_budget(budget: float | tuple, members: list[dict[str, Any]]) -> tuple[float | None, str]:
    if not isinstance(budget, tuple):
        return float(budget), f"{budget:g} ms"
    fraction, model, size = budget
    reference = [r for r in members if r["model"] == model and (size is None or r.get("size") == size)]
    if not reference:
        return None, f"{fraction:g} x {model}{f'@{size}' if size else ''}"
    fastest = min(reference, key=latency)
    return fraction * latency(
        fastest
    ), f"{fraction * latency(fastest):.2f} ms ({fraction:g} x {describe(fastest)})"


def budget_text(rows: list[dict[str, Any]], budget: float | tuple) -> str:
    """The answer to "the most accurate cell under the budget end-to-end", per (device, batch); the
    budget in ms, or relative to a reference cell (see :func:`parse_budget`)."""
    lines = []
    for (device, batch), members in sorted(groups(rows).items()):
        budget_ms, what = _resolve_budget(budget, members)
        head = f"Budget {what} end-to-end p50 ({device}, batch {batch}):"
        if budget_ms is None:
            lines.append(f"{head} no measured cell of that model and size to take the budget from.")
            continue
        answer = budget_query(members, latency, accuracy, budget_ms)
        if answer.best is None:
            fastest = min(members, key=latency)
            lines.append(f"{head} no cell fits; the fastest is {describe(fastest)}.")
            continue
        best = answer.best
        lines.append(f"{head} {describe(best)}.")
        noise = _noise_line(best, members)
        if noise:
            lines.append(noise)
        lines += _timing_caveats(best, budget_ms, "its")
        if answer.runner_up is not None:
            other = answer.runner_up
            same = (best.get("within_noise_of") or {}).get("label") == other["label"]
            lines.append(
                f"  next best under budget: {describe(other)}: gives up {accuracy(best) - accuracy(other):.1f} AP"
                f"{' (within AP noise)' if same else ''}, {abs(latency(other) - latency(best)):.2f} ms "
                f"{'faster' if latency(other) <= latency(best) else 'slower'}."
            )
        if answer.above is not None:
            above = answer.above
            lines.append(
                f"  over budget: {describe(above)} would add {accuracy(above) - accuracy(best):.1f} AP for "
                f"{latency(above) - budget_ms:.2f} ms more than the budget."
            )
            low = ((above.get("e2e_ms") or {}).get("p50_ci95") or [math.inf])[0]
            if low <= budget_ms:
                lines.append(
                    f"  within timing noise of the budget: {above['label']}'s p50 95 % interval starts at "
                    f"{low:.2f} ms, under it; re-measure both before ruling it out."
                )
    return "\n".join(lines) or "Budget: no measured cell (nothing has both AP and latency)."


def _timing_caveats(row: dict[str, Any], budget_ms: float, whose: str) -> list[str]:
    """Lines saying when a budget answer's latency is itself uncertain: unstable timing, or a p50
    interval reaching over the budget."""
    lines = []
    if row.get("unstable"):
        lines.append(f"  ⚠ {whose} timing was unstable: {'; '.join(row['unstable'])}.")
    interval = (row.get("e2e_ms") or {}).get("p50_ci95")
    if interval and interval[1] > budget_ms:
        lines.append(
            f"  {whose} p50 95 % interval [{interval[0]:.2f}, {interval[1]:.2f}] ms reaches over the budget."
        )
    return lines


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


def append_jsonl(row: dict[str, Any], path: Path) -> None:
    """Add one row as soon as its cell finishes (a killed run keeps its finished cells)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_jsonl(path: Path) -> dict[str, dict[str, Any]]:
    """Rows of a previous run by cell id (the last line of a cell wins; a torn last line is ignored)."""
    rows: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "cell_id" in row:
            rows[row["cell_id"]] = row
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for row in rows:
        writer.writerow(flatten(row))
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())


# Mantissas of the latency ticks, coarsest first: 1-2-5, then every integer, then tenths.
_TICK_MANTISSAS = ((1, 2, 5), tuple(range(1, 10)), tuple(round(m / 10, 1) for m in range(10, 100)))


def latency_ticks(vmin: float, vmax: float) -> list[float]:
    """Plain millisecond ticks for a log latency axis spanning [vmin, vmax]: 1, 2, 5 x 10**k (decades
    only when more than ten of those fit; every integer, then tenths, when fewer than two do)."""
    vmin, vmax = sorted((float(vmin), float(vmax)))
    if not math.isfinite(vmax) or vmax <= 0:
        return []
    vmin = max(vmin, vmax * 1e-9)
    decades = range(math.floor(math.log10(vmin)), math.ceil(math.log10(vmax)) + 1)

    def inside(mantissas: tuple[float, ...]) -> list[float]:
        return [t for t in (float(f"{m}e{e}") for e in decades for m in mantissas) if vmin <= t <= vmax]

    ticks = inside(_TICK_MANTISSAS[0])
    if len(ticks) > 10:
        return inside((1,))
    for mantissas in _TICK_MANTISSAS[1:]:
        if len(ticks) >= 2:
            break
        ticks = inside(mantissas)
    return ticks


def plain_number(value: float, _pos: Any = None) -> str:
    """0.5 -> "0.5", 20.0 -> "20", 1000.0 -> "1000" (never 2x10^1 or 1e+03)."""
    return f"{value:.6f}".rstrip("0").rstrip(".")


def _plain_log_latency_axis(ax: Any) -> None:
    """Log x axis labelled 2, 5, 10, 20, 50, ... ms; unlabelled minor ticks at the other integers."""
    from matplotlib import ticker

    class PlainLogLocator(ticker.Locator):
        def __call__(self) -> list[float]:
            return self.tick_values(*self.axis.get_view_interval())

        def tick_values(self, vmin: float, vmax: float) -> list[float]:
            return latency_ticks(vmin, vmax)

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(PlainLogLocator())
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(plain_number))
    ax.xaxis.set_minor_locator(ticker.LogLocator(base=10, subs=tuple(range(2, 10))))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())


def plot_pareto(rows: list[dict[str, Any]], path: Path, title: str = "") -> bool:
    """Latency (end-to-end p50, log scale) against AP per (device, batch) group, frontier drawn.
    Colour: model; marker: backend; filled: fp32, hollow: fp16/bf16/int8. Frontier points carry their
    whole label (model@size backend precision), the others only their size, so 50 points stay legible;
    returns False when there is nothing to plot."""
    fig = pareto_figure(rows, title)
    if fig is None:
        return False
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130, format="png")
    plt.close(fig)
    return True


def pareto_figure(rows: list[dict[str, Any]], title: str = "") -> Any:
    """The figure :func:`plot_pareto` saves (None when nothing is measured); the caller closes it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = sorted(groups(rows).items())
    if not found:
        return None
    fig, axes = plt.subplots(1, len(found), figsize=(7.5 * len(found), 5.5), squeeze=False)
    models = sorted({r["model"] for _, members in found for r in members})
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(models)}
    markers = {
        "eager": "o",
        "compiled": "s",
        "cudagraphs": "D",
        "onnxruntime": "^",
        "tensorrt": "P",
        "aoti": "X",
    }
    for ax, ((device, batch), members) in zip(axes[0], found, strict=True):
        # neighbouring frontier labels alternate above / below their points
        rank = {id(r): i for i, r in enumerate(sorted((r for r in members if r.get("pareto")), key=latency))}
        for row in members:
            color, front = colors[row["model"]], bool(row.get("pareto"))
            ax.scatter(
                latency(row),
                accuracy(row),
                facecolors=color if row["precision"] == "fp32" else "none",
                edgecolors="black" if front else color,
                linewidths=1.2,
                marker=markers.get(row["backend"], "o"),
                s=64 if front else 30,
                zorder=3,
            )
            size = str(row["size"]) if row.get("size") is not None else "native"
            ax.annotate(
                f"{row['model']}@{size} {row['backend']} {row['precision']}" if front else size,
                (latency(row), accuracy(row)),
                textcoords="offset points",
                xytext=((5, 4) if rank[id(row)] % 2 == 0 else (5, -11)) if front else (3, -8),
                fontsize=7 if front else 5.5,
                color="black" if front else "gray",
                zorder=4,
            )
        front = sorted((r for r in members if r.get("pareto")), key=latency)
        for row in front:  # the frontier's AP intervals: how far apart its steps really are
            interval = (row.get("metrics") or {}).get("AP_ci95")
            if interval and None not in interval:
                low, high = interval
                ax.errorbar(
                    latency(row),
                    accuracy(row),
                    yerr=[[max(accuracy(row) - low, 0.0)], [max(high - accuracy(row), 0.0)]],
                    color=colors[row["model"]],
                    elinewidth=1,
                    capsize=3,
                    zorder=2.5,
                )
        if front:
            ax.step(
                [latency(r) for r in front],
                [accuracy(r) for r in front],
                where="post",
                color="black",
                linewidth=1,
                alpha=0.6,
                zorder=2,
                label="Pareto frontier (bars: AP 95 % interval)",
            )
        _plain_log_latency_axis(ax)
        ax.set_xlabel("end-to-end latency p50 (ms per call, log scale)")
        ax.set_ylabel("COCO AP")
        ax.set_title(f"{title + ': ' if title else ''}{device}, batch {batch}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        handles = [plt.Line2D([], [], color=colors[m], marker="o", linestyle="", label=m) for m in models] + [
            plt.Line2D([], [], color="gray", marker=mk, linestyle="", label=b)
            for b, mk in markers.items()
            if any(r["backend"] == b for r in members)
        ]
        reduced = sorted({r["precision"] for r in members} - {"fp32"})
        if reduced:
            handles.append(
                plt.Line2D(
                    [],
                    [],
                    color="gray",
                    marker="o",
                    markerfacecolor="none",
                    linestyle="",
                    label="hollow: " + "/".join(reduced),
                )
            )
        ax.legend(handles=handles, fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def judge(
    rows: list[dict[str, Any]],
    folder: Path | None,
    bootstrap: int = 1000,
    seed: int = 0,
    model_pairs: list[tuple[str, str, str]] | None = None,
) -> str:
    """Mark the frontier and the frontier rows within noise of a faster one, and return the paired AP
    differences as text (``model_pairs``: default :func:`default_model_pairs`; ``bootstrap``
    resamples of the per-image matching saved under ``folder``, 0: no noise judgements)."""
    stats = APStatistics(folder, bootstrap, seed) if bootstrap else None
    mark_pareto(rows)
    mark_noise(rows, stats)
    if model_pairs is None:
        model_pairs = default_model_pairs(list(dict.fromkeys(r["model"] for r in rows)))
    return paired_text(paired_differences(rows, stats, model_pairs), stats)


def write_outputs(
    out: Path,
    rows: list[dict[str, Any]],
    budget_ms: float | tuple | None = None,
    title: str = "",
    bootstrap: int = 1000,
    seed: int = 0,
    model_pairs: list[tuple[str, str, str]] | None = None,
) -> dict[str, Any]:
    """results.jsonl / .csv / .md and pareto.png in ``out``; returns what was written, the budget text
    and the paired AP differences (``model_pairs``: default :func:`default_model_pairs`; ``bootstrap``
    resamples, 0: no noise judgements)."""
    pairs = judge(rows, out, bootstrap, seed, model_pairs)
    write_jsonl(rows, out / "results.jsonl")
    write_csv(rows, out / "results.csv")
    table = markdown_table(rows)
    ratios = ratio_table(rows)
    budget = budget_text(rows, budget_ms) if budget_ms is not None else None
    page = (
        table
        + (f"\n{ratios}" if ratios else "")
        + (f"\n```\n{pairs}\n```\n" if pairs else "")
        + (f"\n```\n{budget}\n```\n" if budget else "")
    )
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(page)
    plotted = plot_pareto(rows, out / "pareto.png", title)
    counts = {s: sum(r.get("status") == s for r in rows) for s in ("ok", "skipped", "failed")}
    return {
        "table": table,
        "ratios": ratios,
        "pairs": pairs,
        "budget": budget,
        "plot": plotted,
        "counts": counts,
    }


def machine_line(rows: list[dict[str, Any]]) -> str:
    """One sentence naming the machine and software of the rows (from the first measured row)."""
    row = next((r for r in rows if r.get("status") == "ok"), rows[0] if rows else {})
    env = row.get("env") or {}
    versions = env.get("versions") or {}
    gpu = env.get("gpu")
    parts = [
        f"{env.get('cpu', '?')} ({env.get('cpu_cores_usable', '?')} cores usable, {env.get('cpu_capability', '?')})"
    ]
    if gpu:
        parts.append(f"{gpu['name']} (driver {gpu.get('driver') or '?'}, CUDA {gpu.get('cuda') or '?'})")
    software = ", ".join(
        f"{name} {versions[name]}" for name in ("torch", "onnxruntime") if versions.get(name)
    )
    threads = sorted({str(r.get("threads")) for r in rows if r.get("status") == "ok"})
    when = (row.get("created") or "")[:10]
    return f"Measured {when} on {'; '.join(parts)}; {software}; {', '.join(threads)} intra-op thread(s)."


def update_page(
    folder: Path,
    page: Path,
    section: str,
    command: str,
    budget: float | tuple | None,
    bootstrap: int = 1000,
    seed: int = 0,
    model_pairs: list[str] | None = None,
) -> None:
    """Write the table of ``folder``'s results (with the machine, the command, the paired AP differences
    and the budget answer) between ``<!-- SECTION:begin -->`` and ``<!-- SECTION:end -->`` in ``page``.
    Rows of runs before AP intervals load as they are (no AP_ci95, no pairs)."""
    rows = list(read_jsonl(folder / "results.jsonl").values())
    if not rows:
        raise ValueError(f"{folder / 'results.jsonl'} holds no rows; run msad bench --out {folder} first")
    names = list(dict.fromkeys(r["model"] for r in rows))
    pairs = parse_model_pairs(model_pairs, names) if model_pairs else None
    paired = judge(rows, folder, bootstrap, seed, pairs)
    text = [f"Command: `{command}`", "", machine_line(rows), "", markdown_table(rows).rstrip()]
    ratios = ratio_table(rows)
    if ratios:
        text += ["", ratios.rstrip()]
    if paired:
        text += ["", "```", paired, "```"]
    if budget is not None:
        text += ["", "```", budget_text(rows, budget), "```"]
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    content = page.read_text()
    if begin not in content or end not in content:
        raise ValueError(f"{page} has no {begin} ... {end} markers")
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    page.write_text(head + begin + "\n" + "\n".join(text) + "\n" + end + tail)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from msad_deploy.cli import add_bootstrap_arguments

    parser = argparse.ArgumentParser(
        prog="python -m msad_deploy.benchmarks.report",
        description="Render an msad bench folder's results into a marked section of a Markdown page.",
    )
    parser.add_argument("folder", type=Path, help="an msad bench --out folder (results.jsonl)")
    parser.add_argument("--update", type=Path, required=True, help="Markdown page to update")
    parser.add_argument(
        "--section", required=True, help="marker name: <!-- NAME:begin --> ... <!-- NAME:end -->"
    )
    parser.add_argument(
        "--command", required=True, help="the command that produced the folder (shown above the table)"
    )
    parser.add_argument("--budget-ms", help="also answer this budget (see msad bench --budget-ms)")
    parser.add_argument(
        "--compare",
        type=lambda text: [v.strip() for v in text.split(",") if v.strip()],
        metavar="A-B[@input],...",
        help="model pairs for the paired AP differences (see msad bench --compare)",
    )
    add_bootstrap_arguments(parser)
    args = parser.parse_args(argv)
    budget = parse_budget(args.budget_ms) if args.budget_ms else None
    update_page(
        args.folder,
        args.update,
        args.section,
        args.command,
        budget,
        args.bootstrap,
        args.bootstrap_seed,
        args.compare,
    )
    print(f"updated {args.update} ({args.section})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
