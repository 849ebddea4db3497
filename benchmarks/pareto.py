"""The latency/accuracy Pareto frontier and the latency-budget query, on plain (latency, AP) points.

A cell is on the frontier when no other cell is both at least as fast and at least as accurate, and
strictly better in one of the two. Cells are compared only with cells of the same device and batch
size (a batch of 8 is not "slower" than one image in any useful sense); callers group them first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """(latency, ap) ``a`` is at least as fast and as accurate as ``b`` and strictly better in one."""
    return a[0] <= b[0] and a[1] >= b[1] and (a[0] < b[0] or a[1] > b[1])


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For each (latency, ap) point: True when no other point dominates it (equal points both stay)."""
    # Sort by latency, then best AP first; a point is on the front when its AP beats every faster one.
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    on_front = [False] * len(points)
    best_ap = -float("inf")
    best_latency = None
    for i in order:
        latency, ap = points[i]
        if ap > best_ap or (ap == best_ap and latency == best_latency):
            on_front[i] = True
            if ap > best_ap:
                best_ap, best_latency = ap, latency
    return on_front


@dataclass
class BudgetAnswer(Generic[T]):
    """What a latency budget buys: ``best`` under it, the ``runner_up`` under it (what choosing it
    instead gives up), and ``above``: the most accurate cell over budget (what more time would buy)."""

    budget_ms: float
    best: T | None
    runner_up: T | None
    above: T | None


def budget_query(items: Sequence[T], latency: Any, ap: Any, budget_ms: float) -> BudgetAnswer[T]:
    """The most accurate item with ``latency(item) <= budget_ms`` (ties: the faster), the next one
    in that order, and the most accurate item over the budget if it beats the best under it."""
    under = sorted((i for i in items if latency(i) <= budget_ms), key=lambda i: (-ap(i), latency(i)))
    over = sorted((i for i in items if latency(i) > budget_ms), key=lambda i: (-ap(i), latency(i)))
    best = under[0] if under else None
    runner_up = under[1] if len(under) > 1 else None
    above = over[0] if over and (best is None or ap(over[0]) > ap(best)) else None
    return BudgetAnswer(budget_ms, best, runner_up, above)
