"""Adaptive resolution: per micro-batch, the most accurate input size that still meets the latency
objective, given the queue.

One exported model spans a latency/accuracy curve through its input size (``msad bench`` measures
it). An :class:`OperatingPoint` is one size of it with its measured AP and the measured time of a
model run at batch 1 and at the full batch. Before each micro-batch the batcher asks
:meth:`AdaptivePolicy.choose` with the arrival times of the images waiting, oldest first; the policy
simulates serving them in full batches at each point, most accurate first, and takes the first point
under which every batch's oldest image completes within ``headroom`` x the objective (the rest of
the objective is left to decoding, encoding and the network) and whose throughput covers the recent
arrival rate (so a steady overload does not alternate between draining and refilling the queue).
No point qualifying is overload: the fastest point serves.

Hysteresis: a switch to a less accurate point happens at once (the queue would miss otherwise);
a switch back to a more accurate one only after that point has qualified with a stricter margin
(``up_margin`` of the objective, ``up_load`` of its throughput) for ``hold_s`` seconds without
interruption. A run's measured time corrects all predictions through one running ratio
(measured / predicted), since what slows one size on a busy machine slows the others alike.

The policy has no threads and no I/O: the clock is a callable, so tests drive it with known
arrivals and a synthetic clock.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class OperatingPoint:
    """One input size of the served model: HR-frame test size ``size`` (a student sees half),
    ``ap`` as measured by ``msad bench`` (None: unknown, larger sizes rank as more accurate), and the
    measured milliseconds of one model run at batch 1 (``one_ms``) and at ``full_batch`` (``full_ms``)."""

    size: int
    ap: float | None
    one_ms: float
    full_ms: float
    full_batch: int

    def run_ms(self, images: int) -> float:
        """Predicted milliseconds of one model run of ``images`` images (linear between the two measured)."""
        if self.full_batch <= 1 or images <= 1:
            return self.one_ms
        step = (self.full_ms - self.one_ms) / (self.full_batch - 1)
        return self.one_ms + step * (images - 1)

    @property
    def images_per_s(self) -> float:
        """Throughput at full batches (what the server can sustain at this point)."""
        return 1000.0 * self.full_batch / self.full_ms

    def describe(self) -> dict[str, float | int | None]:
        return {
            "size": self.size,
            "ap": self.ap,
            "run_ms": {"1": round(self.one_ms, 3), str(self.full_batch): round(self.full_ms, 3)},
            "images_per_s": round(self.images_per_s, 1),
        }


# A less accurate point is kept only when it is this much faster than every more accurate point.
MIN_SPEEDUP = 1.05


def rank_points(points: Sequence[OperatingPoint]) -> list[OperatingPoint]:
    """Most accurate first (AP, else size), without dominated points: a point not ``MIN_SPEEDUP`` x
    faster than every more accurate point, at batch 1 or at a full batch, buys no time for the
    accuracy it gives up (e.g. 96 and 128 padded to the same input) and is dropped. Sizes must be
    distinct."""
    sizes = [p.size for p in points]
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"operating point sizes must be distinct, got {sizes}")
    ordered = sorted(points, key=lambda p: (p.ap if p.ap is not None else -math.inf, p.size), reverse=True)
    kept: list[OperatingPoint] = []
    for point in ordered:
        if all(
            point.images_per_s >= MIN_SPEEDUP * better.images_per_s
            or better.one_ms >= MIN_SPEEDUP * point.one_ms
            for better in kept
        ):
            kept.append(point)
    return kept


@dataclass(frozen=True)
class Choice:
    """What :meth:`AdaptivePolicy.choose` decided: the point, and whether it was the overload fallback."""

    point: OperatingPoint
    overload: bool


class AdaptivePolicy:
    """Chooses an :class:`OperatingPoint` per micro-batch to meet ``slo_ms`` (see the module)."""

    def __init__(
        self,
        points: Sequence[OperatingPoint],
        slo_ms: float,
        max_batch: int,
        *,
        headroom: float = 0.8,
        up_margin: float = 0.6,
        up_load: float = 0.8,
        hold_s: float = 1.0,
        rate_window_s: float = 1.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if slo_ms <= 0:
            raise ValueError(f"the latency objective must be positive, got {slo_ms} ms")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if not 0 < up_margin <= headroom <= 1:
            raise ValueError(f"need 0 < up_margin <= headroom <= 1, got {up_margin} and {headroom}")
        self.points = rank_points(points)
        if not self.points:
            raise ValueError("adaptive serving needs at least one operating point")
        self.dropped = [point for point in points if point not in self.points]  # dominated
        self.slo_s = slo_ms / 1000.0
        self.max_batch = max_batch
        self.headroom, self.up_margin, self.up_load = headroom, up_margin, up_load
        self.hold_s, self.rate_window_s = hold_s, rate_window_s
        self.clock = clock
        self.current = 0  # index into points: start at the most accurate
        self.scale = 1.0  # measured / predicted run time, a running ratio
        self._arrivals: deque[tuple[float, int]] = deque()
        self._up_since: float | None = None  # since when a more accurate point has qualified

    @property
    def point(self) -> OperatingPoint:
        return self.points[self.current]

    # -- inputs ----------------------------------------------------------------------------------

    def arrived(self, images: int, at: float | None = None) -> None:
        """``images`` arrived at ``at`` (default now): feeds the arrival-rate estimate."""
        self._arrivals.append((self.clock() if at is None else at, images))

    def observe(self, point: OperatingPoint, images: int, seconds: float) -> None:
        """A run of ``images`` at ``point`` took ``seconds``: corrects later predictions."""
        predicted = point.run_ms(images) / 1000.0
        if predicted > 0 and seconds > 0:
            ratio = min(max(seconds / predicted, 0.25), 4.0)  # one outlier moves it a little only
            self.scale = 0.8 * self.scale + 0.2 * ratio

    def rate(self, now: float) -> float:
        """Images per second that arrived during the last ``rate_window_s``."""
        while self._arrivals and self._arrivals[0][0] < now - self.rate_window_s:
            self._arrivals.popleft()
        return sum(n for _, n in self._arrivals) / self.rate_window_s

    # -- decision --------------------------------------------------------------------------------

    def _fits(
        self, index: int, waiting: Sequence[float], now: float, margin: float, load: float, rate: float
    ) -> bool:
        point = self.points[index]
        if rate > load * point.images_per_s / self.scale:
            return False
        finish = now
        for start in range(0, len(waiting), self.max_batch):
            chunk = waiting[start : start + self.max_batch]
            finish += self.scale * point.run_ms(len(chunk)) / 1000.0
            if finish > chunk[0] + margin * self.slo_s:
                return False
        return True

    def choose(self, waiting: Sequence[float]) -> Choice:
        """The point for the next micro-batch, given the arrival times (same clock) of the images
        waiting, oldest first (the next batch's images included)."""
        now = self.clock()
        rate = self.rate(now)
        fitting = next(
            (i for i in range(len(self.points)) if self._fits(i, waiting, now, self.headroom, 1.0, rate)),
            None,
        )
        if fitting is None:  # overload: the fastest point, at once
            self.current, self._up_since = len(self.points) - 1, None
            return Choice(self.point, overload=True)
        if fitting > self.current:  # the current point would miss: step down now
            self.current, self._up_since = fitting, None
        elif fitting < self.current:
            better = next(
                i
                for i in range(len(self.points))
                if i == self.current or self._fits(i, waiting, now, self.up_margin, self.up_load, rate)
            )
            if better == self.current:
                self._up_since = None
            elif self._up_since is None:
                self._up_since = now
            if self._up_since is not None and now - self._up_since >= self.hold_s:
                self.current, self._up_since = better, None
        else:
            self._up_since = None
        return Choice(self.point, overload=False)
