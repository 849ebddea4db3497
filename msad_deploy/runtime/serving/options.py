"""``msad serve`` options and the per-request limits they resolve to for one model.

Limits bound what one request may cost: body bytes (and all bodies held at once), images per request (``max_images``, by default
``max_batch``: one request is at most one model run), pixels decoded per image and images decoded at
once. The pixel limit follows the model unless given: an image is resized to the model's input size
anyway, so by default it may have at most ``PIXEL_SIDE_FACTOR`` times the model's long input side
per side (a 128-px model: 4096 x 4096 = 16.8 MP; never above PIL's 89 MP default).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from msad_deploy.data.coco import DEFAULT_MAX_IMAGE_PIXELS
from msad_deploy.runtime.images import MIN_IMAGE_SIDE

# Images beyond 32x the model's side per side carry nothing its input keeps; decoding them costs memory.
PIXEL_SIDE_FACTOR = 32
DEFAULT_DECODE_WORKERS_CAP = 4
# Request bodies held at once by default, in units of the body limit (20 MiB: 80 MiB in flight).
INFLIGHT_BODIES = 4


def default_decode_workers() -> int:
    """Concurrent decodes by default: the usable CPU cores, at most 4 (decoding is CPU-bound)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(DEFAULT_DECODE_WORKERS_CAP, cores))


def model_max_pixels(detector: Any) -> int:
    """The default pixel limit for ``detector``: (PIXEL_SIDE_FACTOR x its long input side)^2, capped at
    DEFAULT_MAX_IMAGE_PIXELS. The long side is the spec's test_max_size (a frames artifact's frame side)."""
    spec = detector.spec
    sides = [spec.test_min_size, spec.test_max_size]
    if detector.takes_frames and detector.backend.input_size is not None:
        sides = list(detector.backend.input_size)
    return min(DEFAULT_MAX_IMAGE_PIXELS, (PIXEL_SIDE_FACTOR * max(sides)) ** 2)


@dataclass
class ServeOptions:
    """What ``msad serve`` is asked for. ``max_pixels``: None follows the model (:func:`model_max_pixels`),
    0 disables the limit; ``max_images``: None is ``max_batch``; ``decode_workers``: None is
    :func:`default_decode_workers`."""

    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_body_bytes: int = 20 * 1024 * 1024
    max_pixels: int | None = None
    min_side: int = MIN_IMAGE_SIDE
    model_name: str | None = None
    max_images: int | None = None
    decode_workers: int | None = None
    max_inflight_bytes: int | None = None  # None: INFLIGHT_BODIES x max_body_bytes
    # adaptive resolution (see .policy): an objective, and the sizes to choose among and/or bench rows
    slo_ms: float | None = None
    sizes: tuple[int, ...] | None = None
    operating_points: Path | None = None
    hold_ms: float = 1000.0

    @property
    def adaptive(self) -> bool:
        return self.slo_ms is not None

    def validate(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"--max-batch must be >= 1, got {self.max_batch}")
        if self.max_wait_ms < 0:
            raise ValueError(f"--max-wait-ms must be >= 0, got {self.max_wait_ms}")
        if self.max_body_bytes < 1:
            raise ValueError(f"--max-body-mb must be positive, got {self.max_body_bytes} bytes")
        if self.max_pixels is not None and self.max_pixels < 0:
            raise ValueError(f"--max-pixels must be >= 0 (0: no limit), got {self.max_pixels}")
        if self.min_side < 1:
            raise ValueError(f"--min-side must be >= 1, got {self.min_side}")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"--max-images must be >= 1, got {self.max_images}")
        if self.decode_workers is not None and self.decode_workers < 1:
            raise ValueError(f"--decode-workers must be >= 1, got {self.decode_workers}")
        if self.max_inflight_bytes is not None and self.max_inflight_bytes < 1:
            raise ValueError(f"--max-inflight-mb must be positive, got {self.max_inflight_bytes} bytes")
        if self.slo_ms is not None and not self.slo_ms > 0:
            raise ValueError(f"--slo-ms must be a positive number of milliseconds, got {self.slo_ms}")
        if self.hold_ms < 0:
            raise ValueError(f"--hold-ms must be >= 0, got {self.hold_ms}")
        if self.sizes is not None:
            if not self.sizes or any(
                isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.sizes
            ):
                raise ValueError(
                    f"--sizes must be positive integers (test sizes in pixels), got {self.sizes}"
                )
            if len(set(self.sizes)) != len(self.sizes):
                raise ValueError(f"--sizes must be distinct, got {','.join(map(str, self.sizes))}")
        if self.slo_ms is None and (self.sizes is not None or self.operating_points is not None):
            raise ValueError(
                "--sizes and --operating-points are the points adaptive serving chooses among to meet "
                "--slo-ms: give --slo-ms too (to serve one fixed size, use --test-size)"
            )
        if self.slo_ms is not None and self.sizes is None and self.operating_points is None:
            raise ValueError(
                "--slo-ms needs operating points to choose among: --sizes 96,128,160 (timed at start-up) "
                "and/or --operating-points BENCH/results.jsonl (sizes and AP measured by msad bench)"
            )

    def detector_max_pixels(self) -> int | None:
        """The limit to load the Detector with: the explicit one (0: None), else PIL's default (the
        serving layer applies the model's tighter limit itself, see :meth:`limits_for`)."""
        if self.max_pixels is None:
            return DEFAULT_MAX_IMAGE_PIXELS
        return self.max_pixels or None

    def limits_for(self, detector: Any) -> Limits:
        self.validate()
        if self.max_pixels is None:
            max_pixels: int | None = model_max_pixels(detector)
        else:
            max_pixels = self.max_pixels or None
        return Limits(
            max_body_bytes=self.max_body_bytes,
            max_images=self.max_images or self.max_batch,
            max_pixels=max_pixels,
            decode_workers=self.decode_workers or default_decode_workers(),
            max_inflight_bytes=self.max_inflight_bytes or INFLIGHT_BODIES * self.max_body_bytes,
        )


@dataclass(frozen=True)
class Limits:
    """Resolved per-request limits (``max_pixels`` None: no limit)."""

    max_body_bytes: int
    max_images: int
    max_pixels: int | None
    decode_workers: int
    max_inflight_bytes: int
