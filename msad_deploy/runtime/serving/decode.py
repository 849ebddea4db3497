"""Bounded decoding: encoded images and v2 arrays -> checked tensors, at most ``workers`` at a time, at
no more pixels than the model can use.

Decoding runs on its own pool of ``decode_workers`` threads: that pool is the cap on concurrent
decodes (and so on the memory full-size decodes take at once); requests beyond it wait, holding only
their encoded bytes. Images are decoded reduced (:func:`~msad_deploy.runtime.images.decode_image_reduced`:
JPEG DCT scaling, else an integer box-filter reduce) to no less than ``OVERSAMPLE`` times the size
the model resizes them to, so what waits in the batcher's queue is small too. Results are mapped
back to the original pixels with :func:`to_original`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from msad_deploy.data.transforms import inference_size
from msad_deploy.runtime.images import decode_image, decode_image_reduced
from msad_deploy.runtime.results import Result
from msad_deploy.runtime.serving.errors import image_error

# The model's antialiased resize sees at least 2x its input size per side, as from the full image.
OVERSAMPLE = 2


@dataclass(frozen=True)
class Decoded:
    """A checked uint8 RGB tensor [3, h, w] and the (H, W) of the image as sent."""

    tensor: Any
    original_size: tuple[int, int]


def needed_size(detector: Any) -> Callable[[int, int], tuple[int, int]] | None:
    """(H, W) -> the smallest (h, w) worth decoding for ``detector``; None when it must get images as
    they are (in-graph preprocessing artifacts take frames of one fixed size)."""
    if detector.takes_frames:
        return None
    spec, min_side = detector.spec, detector.min_side

    def needed(height: int, width: int) -> tuple[int, int]:
        resized_h, resized_w = inference_size(height, width, spec.test_min_size, spec.test_max_size)
        return max(OVERSAMPLE * resized_h, min_side), max(OVERSAMPLE * resized_w, min_side)

    return needed


def to_original(result: Result, decoded: Decoded) -> Result:
    """``result`` of the reduced tensor -> boxes and image size in the original image's pixels."""
    height, width = int(decoded.tensor.shape[1]), int(decoded.tensor.shape[2])
    original_h, original_w = decoded.original_size
    if (height, width) == (original_h, original_w):
        return result
    scale = np.array([original_w / width, original_h / height] * 2, np.float32)
    boxes = np.ascontiguousarray(result.boxes * scale, dtype=np.float32)
    return replace(result, boxes=boxes, image_size=(original_h, original_w))


class Decoder:
    """Decodes on a pool of ``workers`` threads (the concurrency cap) with the pixel limit ``max_pixels``."""

    def __init__(self, detector: Any, max_pixels: int | None, workers: int) -> None:
        self.detector = detector
        self.max_pixels = max_pixels
        self.needed = needed_size(detector)
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="msad-decode")

    def _decode(self, data: bytes) -> Decoded:
        try:
            if self.needed is None:
                pixels = decode_image(data, self.max_pixels)
                original = (int(pixels.shape[0]), int(pixels.shape[1]))
            else:
                pixels, original = decode_image_reduced(data, self.max_pixels, self.needed)
            return Decoded(self.detector.to_tensor(pixels), original)
        except (ValueError, OSError) as error:
            raise image_error(error) from error

    def _from_array(self, pixels: np.ndarray) -> Decoded:
        try:
            return Decoded(self.detector.to_tensor(pixels), (int(pixels.shape[0]), int(pixels.shape[1])))
        except (ValueError, OSError) as error:
            raise image_error(error) from error

    async def image(self, data: bytes) -> Decoded:
        """Encoded bytes (JPEG, PNG, ...) -> :class:`Decoded`; a bad image is a RequestError (4xx)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._decode, data)

    async def arrays(self, images: np.ndarray) -> list[Decoded]:
        """uint8 [B, H, W, 3] -> one :class:`Decoded` per image (checked and copied on the pool)."""
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, lambda: [self._from_array(image) for image in images]
        )

    def close(self) -> None:
        self.executor.shutdown(wait=True)


class BodyBudget:
    """At most ``limit`` bytes of request bodies held at once, from reading a body to the end of its
    decoding: a request that would pass it waits before reading, its bytes left in the client's and
    the kernel's buffers. Without it, 64 concurrent 20 MiB bodies would sit in memory (1.3 GB) before
    the decoders got to them. A body larger than the whole budget waits until it can be held alone."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._changed: asyncio.Condition | None = None  # made in the server's event loop

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int) -> AsyncIterator[None]:
        """Hold ``nbytes`` (capped at the budget) for the ``async with`` block."""
        nbytes = min(max(nbytes, 0), self.limit)
        if self._changed is None:
            self._changed = asyncio.Condition()
        async with self._changed:
            await self._changed.wait_for(lambda: self.held + nbytes <= self.limit)
            self.held += nbytes
        try:
            yield
        finally:
            async with self._changed:
                self.held -= nbytes
                self._changed.notify_all()


def declared_bytes(headers: Any, limit: int) -> int:
    """What a request's body will hold: its Content-Length when valid (the body limit refuses more
    later), else ``limit`` (chunked or unknown length)."""
    try:
        return min(int(headers.get("content-length")), limit)
    except (TypeError, ValueError):
        return limit
