"""The figure of an open-loop ``msad bench serve`` report: the offered rate, then per run the latency
of each request over time (ms, by scheduled arrival) with the bins' p50/p99 and the objective, and
where several operating points served (the adaptive server), the point over time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from msad_deploy.runtime.artifacts import atomic_path

from .serve_profiles import Profile


def _mean_point(bin_points: dict[str, float]) -> float | None:
    """Request-weighted mean size of one bin's shares (None when no answer had a point)."""
    known = {int(k): v for k, v in bin_points.items() if k != "none"}
    total = sum(known.values())
    return sum(size * share for size, share in known.items()) / total if total > 0 else None


def plot_runs(report: dict[str, Any], path: Path, title: str = "") -> None:
    """Write the figure to ``path`` (PNG, matplotlib's Agg backend); ``ImportError`` without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    slo = report.get("slo_ms")
    bin_s = report["bin_s"]
    fig, axes = plt.subplots(
        len(runs) + 1,
        1,
        figsize=(10, 1.6 + 2.4 * len(runs)),
        sharex=True,
        squeeze=False,
        gridspec_kw={"height_ratios": [0.6] + [1.0] * len(runs)},
    )
    rate_ax = axes[0][0]
    series = runs[0]["series"]
    rate_ax.step(
        [b["t_s"] for b in series] + [series[-1]["t_s"] + bin_s],
        [b["arrival_rps"] for b in series] + [series[-1]["arrival_rps"]],
        where="post",
        color="0.3",
        label="arrivals per bin",
    )
    for index, (start, end, rate) in enumerate(report["profile"]["segments"]):
        rate_ax.plot([start, end], [rate, rate], "--", color="tab:orange", label=None if index else "profile")
    rate_ax.legend(loc="upper left", fontsize=7)
    rate_ax.set_ylabel("arrivals\nreq/s")
    rate_ax.set_ylim(bottom=0)
    profile = Profile.from_dict(report["profile"]).describe()
    rate_ax.set_title(title or f"open-loop load: {profile}", fontsize=10)
    latencies = [r["latency_ms"] for run in runs for r in run["requests"] if r["status"] == 200]
    high = max(latencies + [slo or 0.0, 1.0])
    low = min(latencies + [slo or high])
    log = high / max(low, 1e-3) > 20
    for ax, run in zip((row[0] for row in axes[1:]), runs, strict=True):
        ok = [r for r in run["requests"] if r["status"] == 200]
        failed = [r for r in run["requests"] if r["status"] != 200]
        ax.scatter(
            [r["scheduled_s"] for r in ok], [r["latency_ms"] for r in ok], s=4, color="tab:blue", alpha=0.35
        )
        for key, style in (("p50_ms", "-"), ("p99_ms", "--")):
            xs = [b["t_s"] + bin_s / 2 for b in run["series"] if b[key] is not None]
            ys = [b[key] for b in run["series"] if b[key] is not None]
            ax.plot(xs, ys, style, color="tab:blue", label=key.replace("_ms", ""))
        if failed:
            ax.scatter(
                [r["scheduled_s"] for r in failed],
                [high] * len(failed),
                marker="x",
                color="tab:red",
                s=12,
                label=f"errors/dropped ({len(failed)})",
            )
        if slo:
            ax.axhline(slo, color="tab:red", linewidth=1, label=f"objective {slo:g} ms")
        if log:
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, high * 1.1)
        summary = run["summary"]
        within = summary.get("within_slo")
        ax.set_title(
            f"{run['config']}: p99 {summary['p99_ms'] or float('nan'):.1f} ms"
            + (f", {100 * within:.1f}% within objective" if within is not None else ""),
            fontsize=9,
            loc="left",
        )
        ax.set_ylabel("latency ms")
        ax.legend(loc="upper left", fontsize=7)
        sizes = sorted({p["size"] for p in summary["points"] if p["size"] is not None})
        if run["config"] == "adaptive" or len(sizes) > 1:
            twin = ax.twinx()
            served = [r for r in ok if r["point"] is not None]
            twin.scatter(
                [r["scheduled_s"] for r in served],
                [r["point"] for r in served],
                s=3,
                color="tab:green",
                alpha=0.3,
            )
            points = [(b["t_s"], _mean_point(b["points"])) for b in run["series"]]
            points = [(t, p) for t, p in points if p is not None]
            if points:
                twin.step(
                    [t for t, _ in points] + [points[-1][0] + bin_s],
                    [p for _, p in points] + [points[-1][1]],
                    where="post",
                    color="tab:green",
                    label="operating point (dots: each request; line: mean per bin)",
                )
                twin.set_yticks(sizes)
                twin.set_ylim(min(sizes) * 0.9, max(sizes) * 1.1)
                twin.legend(loc="upper right", fontsize=7)
            twin.set_ylabel("size", color="tab:green")
    axes[-1][0].set_xlabel("scheduled arrival, s")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
