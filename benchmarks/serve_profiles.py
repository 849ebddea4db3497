"""``msad bench serve --profile``: open-loop load against ``msad serve`` on this machine.

Requests are sent at scheduled arrival times whether or not earlier ones were answered, so queueing
shows in the latency (a closed loop slows its clients down instead). A :class:`Profile` is a
piecewise-constant rate in requests per second (constant, a step from A to B, or bursts of R with
idle gaps); arrivals are Poisson (seeded) or evenly spaced. Per request: the scheduled and actual
send times (seconds from the start), latency (ms, from the scheduled send to the answer, so a client
that falls behind does not hide queueing: no coordinated omission), HTTP status and the operating
point (the ``x-msad-operating-point`` header: the HR-frame test size that served it; None when
absent). Reports: latency percentiles, the share within the objective (errors and drops count as
misses), the share per operating point, the request-weighted mean AP of the points served, and a
time series.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .serve_load import KEEPALIVE_S, check_loopback, content_type, default_image, server_model, warm_up
from .stats import percentile, summarize

# -- open loop: profiles, arrival schedules, the client ---------------------------------------------

PROFILES = ("constant", "step", "bursty")
ARRIVALS = ("poisson", "even")
POINT_HEADER = "x-msad-operating-point"
MAX_IN_FLIGHT = 256  # requests awaiting an answer at most; an arrival beyond it is dropped, not delayed
LATE_MS = 10.0  # a request sent more than this after its scheduled time counts as late


@dataclass(frozen=True)
class Profile:
    """An open-loop load: arrival rate in requests/s, piecewise constant over ``duration_s`` seconds.

    ``constant``: ``rates[0]`` throughout. ``step``: ``rates[0]`` until ``step_at_s`` (default half
    the duration), then ``rates[1]``. ``bursty``: ``rates[0]`` for ``on_s`` seconds, idle for
    ``off_s``, repeated. ``arrivals``: ``poisson`` (exponential gaps drawn with ``seed``) or ``even``
    (1/rate apart, the first at the start of each piece)."""

    kind: str
    rates: tuple[float, ...]
    duration_s: float
    step_at_s: float | None = None
    on_s: float | None = None
    off_s: float | None = None
    arrivals: str = "poisson"
    seed: int = 0

    def segments(self) -> list[tuple[float, float, float]]:
        """(start_s, end_s, rate) pieces covering the busy part of [0, duration_s)."""
        d = self.duration_s
        if self.kind == "constant":
            return [(0.0, d, self.rates[0])]
        if self.kind == "step":
            at = d / 2 if self.step_at_s is None else self.step_at_s
            return [(0.0, at, self.rates[0]), (at, d, self.rates[1])]
        on, period = float(self.on_s or 0.0), float(self.on_s or 0.0) + float(self.off_s or 0.0)
        starts = [k * period for k in range(math.ceil(d / period - 1e-9))]
        return [(start, min(start + on, d), self.rates[0]) for start in starts]

    def rate_at(self, t: float) -> float:
        return next((rate for start, end, rate in self.segments() if start <= t < end), 0.0)

    def describe(self) -> str:
        rates = "->".join(f"{r:g}" for r in self.rates)
        where = ""
        if self.kind == "step":
            where = f" at {self.segments()[0][1]:g} s"
        elif self.kind == "bursty":
            where = f" ({self.on_s:g} s on, {self.off_s:g} s off)"
        return f"{self.kind} {rates} req/s{where} for {self.duration_s:g} s, {self.arrivals} arrivals (seed {self.seed})"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rates": list(self.rates), "segments": [list(s) for s in self.segments()]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        fields = {k: v for k, v in data.items() if k != "segments"}
        return cls(**{**fields, "rates": tuple(fields["rates"])})


def _positive(name: str, value: float | None, zero_ok: bool = False) -> None:
    if value is not None and (not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok)):
        raise ValueError(f"{name} must be {'>= 0' if zero_ok else 'positive'}, got {value:g}")


def parse_profile(
    kind: str,
    rate: str | None,
    duration_s: float,
    *,
    step_at_s: float | None = None,
    on_s: float | None = None,
    off_s: float | None = None,
    arrivals: str = "poisson",
    seed: int = 0,
) -> Profile:
    """A :class:`Profile` from the command line's words; ``ValueError`` naming the option at fault.

    ``rate``: requests/s, ``R`` (constant, bursty) or ``A:B`` (step); ``on_s``/``off_s`` default to
    1 s each for bursty and are refused elsewhere, as is ``step_at_s`` outside a step."""
    if kind not in PROFILES:
        raise ValueError(f"--profile {kind!r} is not one of {', '.join(PROFILES)}")
    if arrivals not in ARRIVALS:
        raise ValueError(f"--arrivals {arrivals!r} is not one of {', '.join(ARRIVALS)}")
    if rate is None:
        example = "10:60" if kind == "step" else "20"
        raise ValueError(f"--profile {kind} needs --rate (requests per second, e.g. --rate {example})")
    parts = rate.split(":")
    try:
        rates = tuple(float(p) for p in parts)
    except ValueError:
        rates = ()
    if kind == "step" and len(parts) != 2 or kind != "step" and len(parts) != 1 or not rates:
        form = "A:B, e.g. 10:60 (A until --step-at, then B)" if kind == "step" else "one number, e.g. 20"
        raise ValueError(f"--rate {rate!r}: a {kind} profile's rate is {form}, in requests per second")
    for value in rates:
        _positive(f"--rate {rate!r}: a rate", value, zero_ok=kind == "step")
    if not any(rates):
        raise ValueError(f"--rate {rate!r}: at least one rate must be positive")
    _positive("--duration", duration_s)
    if step_at_s is not None:
        if kind != "step":
            raise ValueError("--step-at applies to --profile step only")
        if not 0 < step_at_s < duration_s:
            raise ValueError(f"--step-at {step_at_s:g} must lie within the --duration of {duration_s:g} s")
    if kind == "bursty":
        on_s = 1.0 if on_s is None else on_s
        off_s = 1.0 if off_s is None else off_s
        _positive("--on-s", on_s)
        _positive("--off-s", off_s, zero_ok=True)
    elif on_s is not None or off_s is not None:
        raise ValueError("--on-s and --off-s apply to --profile bursty only")
    return Profile(kind, rates, float(duration_s), step_at_s, on_s, off_s, arrivals, int(seed))


def arrival_times(profile: Profile) -> list[float]:
    """Scheduled send times in seconds from the start, ascending: per piece of :meth:`Profile.segments`,
    evenly spaced (``start + k / rate``) or Poisson (one seeded generator across the pieces)."""
    rng = np.random.default_rng(profile.seed)
    times: list[float] = []
    for start, end, rate in profile.segments():
        if rate <= 0:
            continue
        if profile.arrivals == "even":
            count = math.ceil((end - start) * rate - 1e-9)
            times += [start + k / rate for k in range(count)]
        else:
            t = start + rng.exponential(1.0 / rate)
            while t < end:
                times.append(float(t))
                t += rng.exponential(1.0 / rate)
    return times


@dataclass
class RequestRecord:
    """One scheduled request. ``sent_s`` None: dropped (``max_in_flight`` reached at its time);
    ``status`` None: no HTTP answer (dropped or a transport error); ``latency_ms``: scheduled send to
    answer (a late send's lag counts, as the arrival it stands for waited too)."""

    scheduled_s: float
    sent_s: float | None = None
    latency_ms: float | None = None
    status: int | None = None
    point: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.latency_ms is not None

    @property
    def late(self) -> bool:
        return self.sent_s is not None and (self.sent_s - self.scheduled_s) * 1000.0 > LATE_MS


def _point(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


async def open_loop(
    url: str,
    images: list[bytes],
    schedule: list[float],
    timeout_s: float = 60.0,
    max_in_flight: int = MAX_IN_FLIGHT,
) -> tuple[list[RequestRecord], float]:
    """POST ``images`` (in turn) to ``url/v1/detect`` at the ``schedule``'s times; returns the records
    and the seconds from the start until the last answer."""
    import httpx

    records = [RequestRecord(t) for t in schedule]
    in_flight = 0

    async def send(client: Any, record: RequestRecord, body: bytes, began: float) -> None:
        nonlocal in_flight
        try:
            response = await client.post(
                f"{url}/v1/detect", content=body, headers={"content-type": content_type(body)}
            )
        except httpx.HTTPError as err:
            record.error = f"{type(err).__name__}: {err}"
        else:
            record.latency_ms = (time.perf_counter() - began) * 1000.0
            record.status = response.status_code
            record.point = _point(response.headers.get(POINT_HEADER))
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {response.text[:200]}"
        finally:
            in_flight -= 1

    limits = httpx.Limits(
        max_connections=max_in_flight, max_keepalive_connections=max_in_flight, keepalive_expiry=KEEPALIVE_S
    )
    tasks = []
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        start = time.perf_counter()
        for index, record in enumerate(records):
            await asyncio.sleep(max(0.0, start + record.scheduled_s - time.perf_counter()))
            if in_flight >= max_in_flight:
                record.error = f"dropped: {max_in_flight} requests in flight"
                continue
            now = time.perf_counter()
            record.sent_s = now - start
            in_flight += 1
            body = images[index % len(images)]
            tasks.append(asyncio.create_task(send(client, record, body, start + record.scheduled_s)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    return records, elapsed


# -- open loop: report maths ------------------------------------------------------------------------


def ap_by_size(model: dict[str, Any] | None) -> dict[int, float | None]:
    """Size -> AP from ``/v1/model``'s ``serve.adaptive``: the points it serves and those it dropped as
    dominated (a fixed server may still run at those); empty for a fixed server."""
    adaptive = ((model or {}).get("serve") or {}).get("adaptive") or {}
    points = [*(adaptive.get("points") or []), *(adaptive.get("dropped") or [])]
    return {int(p["size"]): p.get("ap") for p in points if "size" in p}


def point_shares(records: list[RequestRecord]) -> list[dict[str, Any]]:
    """Per operating point (None: no header) of the answered requests: {size, requests, share}."""
    answered = [r for r in records if r.ok]
    counts: dict[int | None, int] = {}
    for record in answered:
        counts[record.point] = counts.get(record.point, 0) + 1
    order = sorted(counts, key=lambda size: (size is None, -(size or 0)))
    return [{"size": s, "requests": counts[s], "share": counts[s] / len(answered)} for s in order]


def mean_ap(records: list[RequestRecord], aps: dict[int, float | None]) -> float | None:
    """Mean AP of what was served, weighted by answered requests; None if any of them has no known AP
    (no operating point, or a point without AP) or nothing was answered."""
    values = [aps.get(r.point) if r.point is not None else None for r in records if r.ok]
    if not values or any(v is None for v in values):
        return None
    return float(sum(values) / len(values))


def within_share(records: list[RequestRecord], slo_ms: float | None) -> float | None:
    """Share of all scheduled requests answered (200) within ``slo_ms``: errors and drops are misses."""
    if slo_ms is None or not records:
        return None
    return sum(r.ok and r.latency_ms <= slo_ms for r in records) / len(records)


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def run_summary(
    records: list[RequestRecord],
    elapsed_s: float,
    duration_s: float,
    slo_ms: float | None,
    aps: dict[int, float | None],
) -> dict[str, Any]:
    """The figures of one run: latencies in ms of the answered (200) requests; ``within_slo`` over all
    scheduled requests; rates in requests/s, ``offered`` scheduled over the duration, ``achieved``
    answered over the duration or the time until the last answer, whichever is longer."""
    answered = [r for r in records if r.ok]
    stats = summarize([r.latency_ms / 1000.0 for r in answered]) if answered else None
    lags = [(r.sent_s - r.scheduled_s) * 1000.0 for r in records if r.sent_s is not None]
    errors = [r for r in records if not r.ok]
    return {
        "requests": len(records),
        "answered": len(answered),
        "errors": len(errors),
        "dropped": sum(r.sent_s is None for r in records),
        "late": sum(r.late for r in records),
        "max_lag_ms": _r(max(lags)) if lags else None,
        "p50_ms": _r(stats and stats.p50_ms),
        "p90_ms": _r(stats and stats.p90_ms),
        "p99_ms": _r(stats and stats.p99_ms),
        "max_ms": _r(stats and stats.max_ms),
        "mean_ms": _r(stats and stats.mean_ms),
        "slo_ms": slo_ms,
        "within_slo": _r(within_share(records, slo_ms), 4),
        "points": [
            {**p, "share": round(p["share"], 4), "ap": aps.get(p["size"])} for p in point_shares(records)
        ],
        "mean_ap": _r(mean_ap(records, aps), 4),
        "offered_rps": round(len(records) / duration_s, 2),
        "achieved_rps": round(len(answered) / max(elapsed_s, duration_s), 2),
        "elapsed_s": round(elapsed_s, 3),
        "first_error": errors[0].error if errors else None,
    }


def time_series(
    records: list[RequestRecord], duration_s: float, bin_s: float, slo_ms: float | None
) -> list[dict[str, Any]]:
    """Per ``bin_s`` bin of scheduled time: arrival rate (requests/s), answered, errors, p50/p99 latency
    (ms) of the answered, share within the objective and share per operating point (key: the size,
    ``none`` for no header)."""
    count = max(1, math.ceil(duration_s / bin_s - 1e-9))
    bins: list[list[RequestRecord]] = [[] for _ in range(count)]
    for record in records:
        bins[min(int(record.scheduled_s // bin_s), count - 1)].append(record)
    series = []
    for index, members in enumerate(bins):
        latencies = [r.latency_ms for r in members if r.ok]
        series.append(
            {
                "t_s": round(index * bin_s, 6),
                "arrival_rps": round(len(members) / bin_s, 3),
                "answered": len(latencies),
                "errors": len(members) - len(latencies),
                "p50_ms": _r(percentile(latencies, 50)) if latencies else None,
                "p99_ms": _r(percentile(latencies, 99)) if latencies else None,
                "within_slo": _r(within_share(members, slo_ms), 4),
                "points": {
                    "none" if p["size"] is None else str(p["size"]): round(p["share"], 4)
                    for p in point_shares(members)
                },
            }
        )
    return series


def run_report(
    config: str,
    records: list[RequestRecord],
    elapsed_s: float,
    profile: Profile,
    slo_ms: float | None,
    aps: dict[int, float | None],
    bin_s: float,
) -> dict[str, Any]:
    """{config, summary, series, requests}: one run's report (``requests``: the records as dicts)."""
    return {
        "config": config,
        "summary": run_summary(records, elapsed_s, profile.duration_s, slo_ms, aps),
        "series": time_series(records, profile.duration_s, bin_s, slo_ms),
        "requests": [
            {
                **asdict(r),
                "sent_s": _r(r.sent_s, 6),
                "scheduled_s": round(r.scheduled_s, 6),
                "latency_ms": _r(r.latency_ms),
            }
            for r in records
        ],
    }


def open_loop_test(
    url: str,
    profile: Profile,
    images: list[bytes] | None = None,
    slo_ms: float | None = None,
    timeout_s: float = 60.0,
    warmup: int = 4,
    bin_s: float = 1.0,
    max_in_flight: int = MAX_IN_FLIGHT,
    progress: Any = None,
) -> dict[str, Any]:
    """One open-loop run of ``profile`` against a running server at ``url`` (loopback only). The
    objective defaults to the adaptive server's own ``slo_ms``. Returns the shape of
    :func:`compare_servers` with one run (config ``url``); ``progress``: called with a line before
    and after the run."""
    url = check_loopback(url)
    check_run_options(timeout_s, warmup, bin_s, max_in_flight, slo_ms)
    images = images or [default_image()]
    model = server_model(url)
    adaptive = ((model or {}).get("serve") or {}).get("adaptive") or {}
    slo_ms = slo_ms if slo_ms is not None else adaptive.get("slo_ms")
    aps = ap_by_size(model)
    warm_up(url, images, warmup, timeout_s)
    say = progress or (lambda line: None)
    schedule = arrival_times(profile)
    say(f"{url}: {len(schedule)} requests, {profile.describe()}")
    records, elapsed = asyncio.run(open_loop(url, images, schedule, timeout_s, max_in_flight))
    run = run_report("url", records, elapsed, profile, slo_ms, aps, bin_s)
    say(f"{url}: {summary_line(run['summary'])}")
    return {
        "profile": profile.to_dict(),
        "slo_ms": slo_ms,
        "bin_s": bin_s,
        "ap_by_size": {str(k): v for k, v in aps.items()},
        "runs": [{**run, "url": url, "model": model}],
    }


def check_run_options(timeout_s: float, warmup: int, bin_s: float, max_in_flight: int, slo_ms: float | None):
    _positive("--timeout", timeout_s)
    _positive("--bin-s", bin_s)
    _positive("--slo-ms", slo_ms)
    if warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {warmup}")
    if max_in_flight < 1:
        raise ValueError(f"--max-in-flight must be >= 1, got {max_in_flight}")


# -- open loop: text ---------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def share_text(points: list[dict[str, Any]]) -> str:
    """``128: 60%, 96: 40%`` (``?``: answers without an operating point); ``-`` when none was answered."""
    if not points:
        return "-"
    return ", ".join(f"{'?' if p['size'] is None else p['size']}: {100 * p['share']:.0f}%" for p in points)


def summary_line(summary: dict[str, Any]) -> str:
    within = summary["within_slo"]
    return (
        f"{summary['answered']}/{summary['requests']} answered, p50 {_fmt(summary['p50_ms'])} ms, "
        f"p99 {_fmt(summary['p99_ms'])} ms"
        + (f", {100 * within:.1f}% within {summary['slo_ms']:g} ms" if within is not None else "")
        + (f", {summary['dropped']} dropped" if summary["dropped"] else "")
        + (f", {summary['late']} sent late" if summary["late"] else "")
    )


def format_runs(report: dict[str, Any]) -> str:
    """The markdown table of an open-loop report, one row per run (errors: requests not answered
    with 200, drops included; p50/p99 of the answered)."""
    slo = report.get("slo_ms")
    lines = [
        f"| config | requests | errors | achieved req/s | p50 ms | p99 ms | within {f'{slo:g}' if slo else '-'} ms % "
        "| share per point | mean AP |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        s = run["summary"]
        within = None if s["within_slo"] is None else 100 * s["within_slo"]
        dropped = f" ({s['dropped']} dropped)" if s["dropped"] else ""
        lines.append(
            f"| {run['config']} | {s['requests']} | {s['errors']}{dropped} | {_fmt(s['achieved_rps'])} | "
            f"{_fmt(s['p50_ms'])} | {_fmt(s['p99_ms'])} | {_fmt(within)} | {share_text(s['points'])} | "
            f"{_fmt(s['mean_ap'], 2)} |"
        )
    return "\n".join(lines)
