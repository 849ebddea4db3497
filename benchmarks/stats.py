"""Latency measurement: warm-up, then timed runs until both a minimum count and a minimum time are met.

A timer turns one call into seconds. On the CPU that is ``time.perf_counter`` around the call; on
CUDA the device is synchronised first, then CUDA events are recorded around the call and read after
synchronising again, so queued kernels are neither missed nor counted twice. The clock is injectable
so the statistics can be tested on a synthetic timing source with a known distribution.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from msad_deploy.evaluation.bootstrap import percentile_interval

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class TimingPolicy:
    """How long to measure one figure: ``warmup`` untimed calls, then timed calls until at least
    ``min_runs`` calls *and* ``min_time_s`` seconds, stopping at ``max_runs`` or ``max_time_s``."""

    warmup: int = 5
    min_runs: int = 20
    min_time_s: float = 1.0
    max_runs: int = 10_000
    max_time_s: float = 30.0

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.min_runs < 1 or self.max_runs < self.min_runs:
            raise ValueError(
                f"timing needs warmup >= 0 and 1 <= min_runs <= max_runs, got warmup={self.warmup}, "
                f"min_runs={self.min_runs}, max_runs={self.max_runs}"
            )
        if self.min_time_s < 0 or self.max_time_s < self.min_time_s:
            raise ValueError(
                f"timing needs 0 <= min_time_s <= max_time_s, got {self.min_time_s} and {self.max_time_s}"
            )


def perf_counter_timer(
    clock: Callable[[], float] = time.perf_counter,
) -> Callable[[Callable[[], Any]], float]:
    """A timer measuring one call of ``fn`` with ``clock`` (seconds)."""

    def time_call(fn: Callable[[], Any]) -> float:
        start = clock()
        fn()
        return clock() - start

    return time_call


def cuda_event_timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    """A timer for CUDA work: synchronise, record events around the call, synchronise, read (seconds)."""

    def time_call(fn: Callable[[], Any]) -> float:
        torch.cuda.synchronize(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0

    return time_call


def timer_for(device: torch.device | str) -> Callable[[Callable[[], Any]], float]:
    device = torch.device(device)
    return cuda_event_timer(device) if device.type == "cuda" else perf_counter_timer()


def measure_interleaved(
    fns: Sequence[Callable[[], Any]],
    policy: TimingPolicy,
    timer: Callable[[Callable[[], Any]], float] | None = None,
    elapsed: Callable[[], float] = time.perf_counter,
) -> list[list[float]]:
    """Durations (seconds) of timed calls of each of ``fns``, called in turn (a, b, a, b, ...) after
    ``policy.warmup`` untimed rounds: figures that are compared (end-to-end against model-only) see
    the same moments of a machine whose speed drifts. Stops once every function has both
    ``min_runs`` calls and ``min_time_s`` of measured time, or at ``max_runs`` rounds or
    ``max_time_s`` of wall time (``elapsed``) for all of them together, whichever comes first."""
    timer = timer or perf_counter_timer()
    for _ in range(policy.warmup):
        for fn in fns:
            fn()
    durations: list[list[float]] = [[] for _ in fns]
    measured = [0.0] * len(fns)
    started = elapsed()
    while len(durations[0]) < policy.max_runs:
        for i, fn in enumerate(fns):
            duration = timer(fn)
            durations[i].append(duration)
            measured[i] += duration
        if len(durations[0]) >= policy.min_runs and min(measured) >= policy.min_time_s:
            break
        if elapsed() - started >= policy.max_time_s:
            break
    return durations


def percentile(values: list[float], q: float) -> float:
    """numpy's linear-interpolation percentile of ``values``; ``q`` in [0, 100]."""
    if not values:
        raise ValueError("percentile of no values")
    return float(np.percentile(values, q))


@dataclass(frozen=True)
class LatencyStats:
    """Milliseconds per call of ``batch`` images; ``throughput``: images per second at the mean."""

    runs: int
    batch: int
    mean_ms: float
    std_ms: float
    min_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    throughput: float
    p50_ci95: tuple[float, float] | None = None  # bootstrap interval of p50_ms over the runs

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.p50_ci95 is None:
            del data["p50_ci95"]
        else:
            data["p50_ci95"] = [round(v, 4) for v in self.p50_ci95]
        return data


def median_interval(values: np.ndarray, resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the median of ``values`` (the runs resampled with
    replacement ``resamples`` times). Treats runs as independent: drift across a cell is what the
    interleaving and the unstable checks of msad bench catch, not this interval."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0 or resamples < 1:
        raise ValueError("median_interval needs values and at least one resample")
    picks = np.random.default_rng(seed).integers(0, values.size, (resamples, values.size))
    return percentile_interval(np.median(values[picks], axis=1))


def summarize(durations_s: list[float], batch: int = 1, resamples: int = 0, seed: int = 0) -> LatencyStats:
    """Statistics of call durations (seconds) of a batch of ``batch`` images; with ``resamples`` > 0 also
    the p50's 95 % bootstrap interval (:func:`median_interval`)."""
    if not durations_s:
        raise ValueError("no timed runs to summarise")
    values = np.asarray(durations_s, dtype=np.float64) * 1000.0
    mean = float(values.mean())
    p50, p90, p99 = (float(v) for v in np.percentile(values, PERCENTILES))
    return LatencyStats(
        runs=len(values),
        batch=batch,
        mean_ms=mean,
        std_ms=float(values.std()),
        min_ms=float(values.min()),
        p50_ms=p50,
        p90_ms=p90,
        p99_ms=p99,
        max_ms=float(values.max()),
        throughput=batch * 1000.0 / mean if mean > 0 else math.inf,
        p50_ci95=median_interval(values, resamples, seed) if resamples > 0 else None,
    )


def relative_spread(stats: LatencyStats) -> float | None:
    """Width of the p50's interval relative to the p50 (0.1: the interval spans 10 % of it)."""
    if stats.p50_ci95 is None or stats.p50_ms <= 0:
        return None
    return (stats.p50_ci95[1] - stats.p50_ci95[0]) / stats.p50_ms


def cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine since boot, CPU seconds of this process), or None where
    /proc/stat is missing (not Linux). Busy counts user, nice, system, irq, softirq and steal (time the
    hypervisor gave to another guest), so the difference of two readings minus this process's own
    share is what everything else took from the cores while we measured."""
    try:
        with open("/proc/stat") as handle:
            fields = handle.readline().split()
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    except (OSError, ValueError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    times = os.times()
    return (user + nice + system + irq + softirq + steal) / ticks, times.user + times.system


def other_load(
    before: tuple[float, float] | None, after: tuple[float, float] | None, wall_s: float
) -> float | None:
    """Cores' worth of CPU time that other processes (and the hypervisor's steal) used between two
    :func:`cpu_seconds` readings ``wall_s`` apart (0.5: half a core on average), or None."""
    if before is None or after is None or wall_s <= 0:
        return None
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / wall_s)


def unstable_reasons(
    names: Sequence[str],
    stats: Sequence[LatencyStats],
    twin_keys: Sequence[Any],
    busy_cores: float | None,
    max_spread: float,
    twin_tolerance: float,
    max_busy: float,
) -> list[list[str]]:
    """Why each of several figures timed together cannot be trusted (an empty list: it can):

    * its p50 interval spans more than ``max_spread`` of the p50 (:func:`relative_spread`);
    * a twin (an equal, non-None entry of ``twin_keys``: the same network on the same input, which
      must cost the same) differs by more than ``twin_tolerance`` (0.2: the slower is over 1.2x);
    * other processes used more than ``max_busy`` cores' worth of CPU meanwhile (:func:`other_load`).
    """
    reasons: list[list[str]] = [[] for _ in stats]
    for why, figure in zip(reasons, stats, strict=True):
        spread = relative_spread(figure)
        if spread is not None and spread > max_spread:
            low, high = figure.p50_ci95 or (0.0, 0.0)
            why.append(f"p50 interval [{low:.2f}, {high:.2f}] ms spans {spread:.0%} of it")
    for a, b in itertools.combinations(range(len(stats)), 2):
        if twin_keys[a] is None or twin_keys[a] != twin_keys[b]:
            continue
        pa, pb = stats[a].p50_ms, stats[b].p50_ms
        if max(pa, pb) > (1 + twin_tolerance) * min(pa, pb):
            for me, other, mine, theirs in ((a, b, pa, pb), (b, a, pb, pa)):
                reasons[me].append(
                    f"{mine:.2f} ms against {theirs:.2f} ms for {names[other]}, the same network on the same input"
                )
    if busy_cores is not None and busy_cores > max_busy:
        for why in reasons:
            why.append(f"other processes used {busy_cores:.2f} cores while it was timed")
    return reasons
