"""Counters and histograms in the Prometheus text exposition format (0.0.4), without a client library.

Thread-safe (one lock per metric); ``render()`` writes ``# HELP`` / ``# TYPE`` lines and the samples,
histograms as cumulative ``_bucket{le=...}`` samples plus ``_sum`` and ``_count``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Counter:
    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.label_names = name, help, labels
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        with self._lock:
            return self._values.get(labels, 0.0)

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        with self._lock:
            items = sorted(self._values.items())
        for labels, value in items:
            yield f"{self.name}{_labels(self.label_names, labels)} {_number(value)}"


class Gauge(Counter):
    def set(self, value: float, *labels: str) -> None:
        with self._lock:
            self._values[labels] = float(value)

    def render(self) -> Iterable[str]:
        lines = list(super().render())
        lines[1] = f"# TYPE {self.name} gauge"
        return lines


class Histogram:
    def __init__(self, name: str, help: str, buckets: Iterable[float], labels: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.label_names = name, help, labels
        self.buckets = sorted(float(b) for b in buckets)
        self._series: dict[tuple[str, ...], list[float]] = {}  # bucket counts..., sum, count
        self._lock = threading.Lock()

    def observe(self, value: float, *labels: str) -> None:
        with self._lock:
            series = self._series.setdefault(labels, [0.0] * (len(self.buckets) + 2))
            for index, bound in enumerate(self.buckets):
                if value <= bound:
                    series[index] += 1
            series[-2] += value
            series[-1] += 1

    def snapshot(self, *labels: str) -> dict[str, float]:
        """``{"le=<bound>": cumulative count, ..., "sum": s, "count": n}`` of one series."""
        with self._lock:
            series = list(self._series.get(labels, [0.0] * (len(self.buckets) + 2)))
        out = {f"le={_number(b)}": series[i] for i, b in enumerate(self.buckets)}
        out.update(sum=series[-2], count=series[-1])
        return out

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._series.items())
        for labels, series in items:
            for bound, count in zip(self.buckets, series):
                le = f'le="{_number(bound)}"'
                yield f"{self.name}_bucket{_labels(self.label_names, labels, le)} {_number(count)}"
            inf = 'le="+Inf"'
            yield f"{self.name}_bucket{_labels(self.label_names, labels, inf)} {_number(series[-1])}"
            yield f"{self.name}_sum{_labels(self.label_names, labels)} {_number(series[-2])}"
            yield f"{self.name}_count{_labels(self.label_names, labels)} {_number(series[-1])}"


class ServerMetrics:
    """What ``msad serve`` exposes at ``/metrics``."""

    def __init__(self) -> None:
        self.requests = Counter(
            "msad_requests_total", "HTTP requests answered, by route and status code.", ("route", "code")
        )
        self.errors = Counter(
            "msad_request_errors_total",
            "HTTP requests answered with an error (4xx or 5xx), by route and status code.",
            ("route", "code"),
        )
        self.latency = Histogram(
            "msad_request_duration_seconds",
            "Time from request to response, by route.",
            (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            ("route",),
        )
        self.batch_size = Histogram(
            "msad_batch_size", "Images per model run (dynamic micro-batching).", (1, 2, 4, 8, 16, 32, 64, 128)
        )
        self.inference = Histogram(
            "msad_inference_duration_seconds",
            "Time of one batched model run, pre- and post-processing included.",
            (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
        )
        self.in_flight = Gauge("msad_requests_in_flight", "Requests being handled now.")
        self.images = Counter("msad_images_total", "Images run through the model.")
        # adaptive resolution (msad serve --slo-ms); the size label is the HR-frame test size
        self.point_images = Counter(
            "msad_operating_point_images_total", "Images run at each operating point (test size).", ("size",)
        )
        self.point_requests = Counter(
            "msad_operating_point_requests_total",
            "Inference requests answered, by the operating point (test size) that served them.",
            ("size",),
        )
        self.point = Gauge(
            "msad_operating_point_size", "Test size of the latest model run (adaptive serving)."
        )
        self.overload_batches = Counter(
            "msad_overload_batches_total",
            "Model runs at the fastest point because no point could meet the objective given the queue.",
        )
        self.objective_requests = Counter(
            "msad_objective_requests_total", "Inference requests answered (200) under a latency objective."
        )
        self.objective_misses = Counter(
            "msad_objective_misses_total",
            "Inference requests answered (200) later than the latency objective, as the server measures them.",
        )

    def observe_request(self, route: str, code: int, seconds: float) -> None:
        self.requests.inc(route, str(code))
        if code >= 400:
            self.errors.inc(route, str(code))
        self.latency.observe(seconds, route)

    def render(self) -> str:
        metrics = (
            self.requests,
            self.errors,
            self.latency,
            self.batch_size,
            self.inference,
            self.images,
            self.in_flight,
            self.point_images,
            self.point_requests,
            self.point,
            self.overload_batches,
            self.objective_requests,
            self.objective_misses,
        )
        return "\n".join(line for metric in metrics for line in metric.render()) + "\n"
