"""Latency measurement: warm-up, then timed runs until both a minimum count and a minimum time are met.

A timer turns one call into seconds. On the CPU that is ``time.perf_counter`` around the call; on
CUDA the device is synchronised first, then CUDA events are recorded around the call and read after
synchronising again, so queued kernels are neither missed nor counted twice. The clock is injectable
so the statistics can be tested on a synthetic timing source with a known distribution.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

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

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def summarize(durations_s: list[float], batch: int = 1) -> LatencyStats:
    """Statistics of call durations (seconds) of a batch of ``batch`` images."""
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
    )
