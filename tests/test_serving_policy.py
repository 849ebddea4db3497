"""The adaptive-resolution policy on a synthetic clock and queue: known arrivals in, known choices out."""

from __future__ import annotations

from collections import deque

import pytest

from msad_deploy.runtime.serving.policy import AdaptivePolicy, OperatingPoint, rank_points

# A student at three sizes: the most accurate is the slowest (ms of a run at batch 1 and at 8).
ACCURATE = OperatingPoint(128, 8.0, 10.0, 50.0, 8)  # 160 images/s at full batches
MIDDLE = OperatingPoint(96, 5.0, 6.0, 25.0, 8)  # 320 images/s
FAST = OperatingPoint(64, 1.6, 4.0, 12.0, 8)  # 667 images/s
POINTS = [FAST, ACCURATE, MIDDLE]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def policy(clock: Clock, slo_ms: float = 50.0, **options) -> AdaptivePolicy:
    return AdaptivePolicy(POINTS, slo_ms, 8, clock=clock, **options)


def test_operating_point_run_time_is_linear_between_the_measured_batches() -> None:
    assert ACCURATE.run_ms(1) == 10.0 and ACCURATE.run_ms(8) == 50.0
    assert ACCURATE.run_ms(4) == pytest.approx(10.0 + 3 * 40.0 / 7)
    assert ACCURATE.images_per_s == pytest.approx(160.0)
    single = OperatingPoint(128, None, 7.0, 7.0, 1)
    assert single.run_ms(1) == 7.0 and single.images_per_s == pytest.approx(1000 / 7)


def test_points_rank_by_ap_and_dominated_points_are_dropped() -> None:
    assert [p.size for p in rank_points(POINTS)] == [128, 96, 64]
    # 160 is less accurate than 128 (as the demo student measured) and slower: never worth serving
    dominated = OperatingPoint(160, 7.5, 14.0, 70.0, 8)
    assert [p.size for p in rank_points([*POINTS, dominated])] == [128, 96, 64]
    # 112 is under 5 % faster than 128 at batch 1 and at 8: dropped too
    marginal = OperatingPoint(112, 7.0, 9.7, 48.0, 8)
    assert [p.size for p in rank_points([*POINTS, marginal])] == [128, 96, 64]
    # ... but faster at batch 1 only (or at 8 only) is worth keeping
    for faster in (OperatingPoint(112, 7.0, 8.0, 49.0, 8), OperatingPoint(112, 7.0, 10.0, 40.0, 8)):
        assert [p.size for p in rank_points([*POINTS, faster])] == [128, 112, 96, 64]
    # unknown AP: larger sizes rank as more accurate
    unknown = [OperatingPoint(s, None, s / 10, s / 2, 8) for s in (64, 160, 96)]
    assert [p.size for p in rank_points(unknown)] == [160, 96, 64]
    with pytest.raises(ValueError, match="distinct"):
        rank_points([ACCURATE, ACCURATE])
    chooser = AdaptivePolicy([*POINTS, dominated], 50.0, 8, clock=Clock())
    assert [p.size for p in chooser.points] == [128, 96, 64] and chooser.dropped == [dominated]


def test_low_load_serves_the_most_accurate_point() -> None:
    clock = Clock()
    chooser = policy(clock)
    for step in range(20):
        clock.now = step * 0.1
        chooser.arrived(1)
        choice = chooser.choose([clock.now])
        assert choice.point is ACCURATE and not choice.overload


def test_a_queue_that_would_miss_the_objective_moves_down_at_once() -> None:
    clock = Clock()
    chooser = policy(clock)
    # 8 images waiting since t=0: at 128 one batch takes 50 ms > 0.8 x 50 ms; at 96, 25 ms fits
    assert chooser.choose([0.0] * 8).point is MIDDLE
    # 16 waiting: 96 needs 25 + 25 ms for the second batch (> 40 ms); 64 needs 12 + 12 ms
    assert chooser.choose([0.0] * 16).point is FAST


def test_overload_falls_back_to_the_fastest_point() -> None:
    clock = Clock()
    chooser = policy(clock)
    clock.now = 0.030  # 40 images have waited 30 ms: even the fastest misses the objective
    choice = chooser.choose([0.0] * 40)
    assert choice.point is FAST and choice.overload


def test_hysteresis_holds_the_lower_point_before_moving_back_up() -> None:
    clock = Clock()
    chooser = policy(clock, hold_s=1.0)
    assert chooser.choose([0.0] * 8).point is MIDDLE
    for step in range(1, 11):  # light load again from t = 0.1, but not for a full second yet
        clock.now = step * 0.1
        assert chooser.choose([clock.now]).point is MIDDLE
    clock.now = 1.1
    assert chooser.choose([clock.now]).point is ACCURATE
    # back down at once; then an interruption restarts the hold
    assert chooser.choose([clock.now] * 8).point is MIDDLE
    clock.now = 1.5
    assert chooser.choose([clock.now]).point is MIDDLE  # qualifies from 1.5
    clock.now = 1.9
    assert chooser.choose([clock.now] * 8).point is MIDDLE  # interrupted
    clock.now = 2.8
    assert chooser.choose([clock.now]).point is MIDDLE  # qualifies from 2.8, not from 1.5
    clock.now = 3.7
    assert chooser.choose([clock.now]).point is MIDDLE
    clock.now = 3.8
    assert chooser.choose([clock.now]).point is ACCURATE


def test_an_arrival_rate_beyond_a_points_throughput_rules_it_out() -> None:
    clock = Clock()
    chooser = policy(clock)
    for i in range(200):  # 200 images/s over the last second: above 128's 160/s
        chooser.arrived(1, at=i / 200)
    clock.now = 1.0
    assert chooser.choose([clock.now]).point is MIDDLE
    clock.now = 5.0  # the window has emptied
    assert chooser.rate(clock.now) == 0.0


def test_measured_run_times_correct_the_predictions() -> None:
    clock = Clock()
    chooser = policy(clock, slo_ms=20.0)  # budget 16 ms: 128 at batch 1 (10 ms) fits
    assert chooser.choose([0.0]).point is ACCURATE
    for _ in range(20):  # runs take twice as long as measured at start-up (a busy machine)
        chooser.observe(ACCURATE, 1, 0.020)
    assert chooser.scale == pytest.approx(2.0, rel=0.05)
    assert chooser.choose([0.0]).point is MIDDLE  # 2 x 10 ms > 16 ms; 2 x 6 ms fits


def test_bad_policy_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="objective must be positive"):
        AdaptivePolicy(POINTS, 0, 8)
    with pytest.raises(ValueError, match="max_batch"):
        AdaptivePolicy(POINTS, 50, 0)
    with pytest.raises(ValueError, match="up_margin"):
        AdaptivePolicy(POINTS, 50, 8, headroom=0.5, up_margin=0.8)
    with pytest.raises(ValueError, match="at least one"):
        AdaptivePolicy([], 50, 8)


def simulate(chooser: AdaptivePolicy, clock: Clock, arrivals: list[float], max_batch: int = 8):
    """A single-worker server on the synthetic clock: runs take what their point predicts.
    -> (arrival, completion, size) per image."""
    queue: deque[float] = deque()
    done = []
    now, i = 0.0, 0
    while i < len(arrivals) or queue:
        if not queue:
            now = max(now, arrivals[i])
        while i < len(arrivals) and arrivals[i] <= now:
            queue.append(arrivals[i])
            chooser.arrived(1, at=arrivals[i])
            i += 1
        clock.now = now
        point = chooser.choose(list(queue)).point
        batch = [queue.popleft() for _ in range(min(max_batch, len(queue)))]
        now += point.run_ms(len(batch)) / 1000.0
        chooser.observe(point, len(batch), point.run_ms(len(batch)) / 1000.0)
        done += [(arrived, now, point.size) for arrived in batch]
    return done


def test_a_step_load_keeps_the_objective_and_serves_accurately_when_it_can() -> None:
    """50 images/s for 4 s, then 250/s for 4 s (beyond 128's 160/s): adaptive keeps >= 99 % within
    50 ms, serves only 128 at the low rate, and its mean AP beats serving 96 throughout."""
    low = [i / 50 for i in range(200)]
    high = [4.0 + i / 250 for i in range(1000)]
    clock = Clock()
    done = simulate(policy(clock), clock, low + high)
    within = sum(end - start <= 0.050 for start, end, _ in done) / len(done)
    assert within >= 0.99
    assert {size for start, _, size in done if start < 4.0} == {128}
    late_high = [size for start, _, size in done if start > 5.0]
    assert 128 not in late_high[len(late_high) // 2 :]  # the sustained overload of 128 moved off it
    aps = {p.size: p.ap for p in POINTS}
    mean_ap = sum(aps[size] for _, _, size in done) / len(done)
    assert mean_ap > MIDDLE.ap
    # serving 128 throughout misses the objective for most of the high phase
    fixed_clock = Clock()
    fixed = simulate(AdaptivePolicy([ACCURATE], 50.0, 8, clock=fixed_clock), fixed_clock, low + high)
    assert sum(end - start <= 0.050 for start, end, _ in fixed) / len(fixed) < 0.9
