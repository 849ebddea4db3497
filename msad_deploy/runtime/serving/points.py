"""Operating points of a served model: sizes and AP from ``msad bench`` results, run times measured
at start-up on the serving machine.

The bench's AP is a property of the weights at a size and travels; its timings were taken in another
process, perhaps on another machine, so the server times each size itself (batch 1 and a full batch,
on a seeded noise image, which yields more candidate boxes than a blank one and so does not
under-estimate NMS).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from msad_deploy.runtime.artifacts import sha256_file
from msad_deploy.runtime.backends import ALIASES
from msad_deploy.runtime.serving.policy import AdaptivePolicy, OperatingPoint

# Timed runs per size and batch at start-up (after one untimed run); the median is kept.
STARTUP_RUNS = 5


def source_sha256(detector: Any) -> str:
    """SHA-256 of the checkpoint the served artifact came from (its sidecar's, or the checkpoint's own)."""
    metadata = detector.metadata or {}
    return metadata.get("source_sha256") or sha256_file(detector.path)


def bench_accuracy(path: Path, detector: Any) -> dict[int, float]:
    """Test size -> AP of the served model, from the rows of an ``msad bench`` ``results.jsonl``.

    Rows count when they measured AP (status ok, not latency-only) for the same source checkpoint
    (``model_sha256``) at the served precision and padding (``size_divisibility``: it changes what the
    network sees, so AP too); rows of the served backend are preferred over other backends' (the
    exports are verified to keep AP). ``ValueError`` naming what the file holds when nothing matches."""
    if not path.is_file():
        raise ValueError(f"--operating-points {path}: no such file (give msad bench's results.jsonl)")
    sha = source_sha256(detector)
    precision = str(detector.info().get("precision", "fp32"))
    divisibility = detector.spec.size_divisibility
    found: dict[int, tuple[bool, float]] = {}
    seen: set[str] = set()
    other_padding: set[int] = set()
    with path.open() as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"--operating-points {path}: line {number} is not JSON ({error.msg})"
                ) from None
            if not isinstance(row, dict):
                raise ValueError(f"--operating-points {path}: line {number} is not a bench row")
            seen.add(f"{row.get('model')} ({str(row.get('model_sha256'))[:12]}, {row.get('precision')})")
            ap = (row.get("metrics") or {}).get("AP")
            if (
                row.get("model_sha256") != sha
                or row.get("precision") != precision
                or row.get("status") != "ok"
                or ap is None
                or not isinstance(row.get("size"), int)
            ):
                continue
            if row.get("size_divisibility", divisibility) != divisibility:
                other_padding.add(row["size_divisibility"])
                continue
            backend = str(row.get("backend"))
            same_backend = ALIASES.get(backend, backend) == detector.backend_name  # bench says "eager"
            size = row["size"]
            if size not in found or (same_backend and not found[size][0]):
                found[size] = (same_backend, float(ap))
    if not found and other_padding:
        padding = " or ".join(map(str, sorted(other_padding)))
        raise ValueError(
            f"--operating-points {path} measured this model with inputs padded to {padding}, this server pads to "
            f"{divisibility}: serve with --size-divisibility {padding} to deploy what was measured"
        )
    if not found:
        holds = ", ".join(sorted(seen)) or "no rows"
        raise ValueError(
            f"--operating-points {path} has no AP for this model ({sha[:12]}, {precision}); it holds {holds}"
        )
    return {size: ap for size, (_, ap) in sorted(found.items())}


def measure_points(
    detector: Any,
    sizes: Sequence[int],
    accuracy: dict[int, float] | None,
    max_batch: int,
    runs: int = STARTUP_RUNS,
) -> list[OperatingPoint]:
    """One :class:`OperatingPoint` per size: AP from ``accuracy`` (None where absent), run times timed
    here: the median of ``runs`` model runs at batch 1 and at ``max_batch`` on a square image of the
    Detector's loaded test size. A size the artifact cannot run at is a ``ValueError`` (from
    :meth:`Detector.spec_at`)."""
    side = max(detector.spec.test_min_size, detector.min_side)
    image = detector.to_tensor(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))
    points = []
    for size in sizes:
        detector.spec_at(size)
        times = {}
        for batch in sorted({1, max_batch}):
            images = [image] * batch
            detector.detect_tensors(images, test_size=size)
            samples = []
            for _ in range(runs):
                started = time.perf_counter()
                detector.detect_tensors(images, test_size=size)
                samples.append(1000.0 * (time.perf_counter() - started))
            times[batch] = statistics.median(samples)
        ap = None if accuracy is None else accuracy.get(size)
        full = max(times[max_batch], times[1])  # a full batch never costs less than one image
        points.append(OperatingPoint(size, ap, times[1], full, max_batch))
    return points


def adaptive_policy(detector: Any, options: Any) -> AdaptivePolicy | None:
    """The :class:`AdaptivePolicy` that ``options`` (a validated ServeOptions) ask for, or None.

    Sizes are ``options.sizes``, else every size ``options.operating_points`` has AP for; with both, each
    size must have AP there. The Detector is set to the largest size (what decoding and the pixel limits
    follow: every point resizes down from it) and each size is timed on it."""
    if not options.adaptive:
        return None
    accuracy = bench_accuracy(options.operating_points, detector) if options.operating_points else None
    sizes = tuple(options.sizes) if options.sizes else tuple(accuracy or ())
    if accuracy is not None:
        missing = [size for size in sizes if size not in accuracy]
        if missing:
            raise ValueError(
                f"--operating-points {options.operating_points} has no AP for size(s) "
                f"{','.join(map(str, missing))}; it has {','.join(map(str, accuracy))}"
            )
    if len(sizes) < 2:
        raise ValueError(f"adaptive serving needs two or more sizes to choose among, got {list(sizes)}")
    largest = max(sizes)
    if detector.spec.test_min_size != largest:
        detector.set_test_size(largest)
    points = measure_points(detector, sorted(sizes), accuracy, options.max_batch)
    return AdaptivePolicy(points, options.slo_ms, options.max_batch, hold_s=options.hold_ms / 1000.0)
