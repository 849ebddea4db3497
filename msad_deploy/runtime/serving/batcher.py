"""Dynamic micro-batching with fair interleaving: many requests' images, one model run at a time.

A request submits its images as one job. Batches are filled round-robin, one image per job per turn
in the order jobs are waiting (a job with images left goes to the back), so a request of 400 images
runs as many micro-batches interleaved with everyone else's, and a single image arriving meanwhile
waits for at most the batches already formed, not for the whole large request. A batch waits up to
``max_wait_ms`` from its first image for more, up to ``max_batch``.

The model runs on one worker thread, off the event loop, through ``run(images, test_size)``
(``Detector.detect_tensors``: it groups images by padded size, so batching does not change an image's
detections). With an :class:`~msad_deploy.runtime.serving.policy.AdaptivePolicy`, each batch's test
size is the policy's choice given the arrival times of the images waiting; without one it is None
(the size the model was loaded at). Every image's result comes back with the size that served it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from msad_deploy.runtime.metrics import ServerMetrics
from msad_deploy.runtime.serving.errors import RequestError
from msad_deploy.runtime.serving.policy import AdaptivePolicy


@dataclass(eq=False)
class Job:
    """One request's images; ``future`` gets their results, in order, when the last one has run."""

    images: Sequence[Any]
    future: Any
    arrived: float = 0.0  # perf_counter seconds when the request came in (the objective counts from it)
    results: list[Any] = field(default_factory=list)
    sizes: list[int | None] = field(default_factory=list)
    taken: int = 0
    finished: int = 0

    def __post_init__(self) -> None:
        self.results = [None] * len(self.images)
        self.sizes = [None] * len(self.images)

    @property
    def abandoned(self) -> bool:
        return self.future.done()  # cancelled (client gone) or failed: nothing left to run for it


class FairQueue:
    """Jobs waiting for the model; :meth:`take` fills a batch round-robin across them."""

    def __init__(self) -> None:
        self.jobs: deque[Job] = deque()
        self.pending = 0  # images submitted and not yet taken (abandoned jobs' included until met)

    def add(self, job: Job) -> None:
        if job.images:
            self.jobs.append(job)
            self.pending += len(job.images)

    def take(self, limit: int) -> list[tuple[Job, int]]:
        """Up to ``limit`` (job, image index) pairs: one per job per turn, oldest job first, rotating."""
        batch: list[tuple[Job, int]] = []
        while len(batch) < limit and self.jobs:
            job = self.jobs.popleft()
            if job.abandoned:
                self.pending -= len(job.images) - job.taken
                continue
            batch.append((job, job.taken))
            job.taken += 1
            self.pending -= 1
            if job.taken < len(job.images):
                self.jobs.append(job)
        return batch

    def waiting(self) -> list[float]:
        """Arrival times of the images not yet taken, oldest first (abandoned jobs' left out)."""
        return sorted(
            job.arrived for job in self.jobs if not job.abandoned for _ in range(len(job.images) - job.taken)
        )

    def drop(self, job: Job) -> None:
        if job in self.jobs:
            self.jobs.remove(job)
            self.pending -= len(job.images) - job.taken


class MicroBatcher:
    """Runs submitted images in batches of at most ``max_batch`` on one worker thread (see the module)."""

    def __init__(
        self,
        run: Callable[[list[Any], int | None], list[Any]],
        max_batch: int,
        max_wait_ms: float,
        metrics: ServerMetrics,
        policy: AdaptivePolicy | None = None,
        loaded_size: int | None = None,
    ) -> None:
        self.run = run
        self.policy = policy
        self.loaded_size = loaded_size  # the size reported for batches run without a policy
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.metrics = metrics
        self.queue = FairQueue()
        self.arrived: asyncio.Event | None = None
        self.task: asyncio.Task | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="msad-infer")
        self.running = False
        self.stopping = False

    async def start(self) -> None:
        self.arrived = asyncio.Event()
        self.task = asyncio.create_task(self._loop())
        self.running = True

    async def stop(self) -> None:
        """Finish what is queued, then stop the worker."""
        self.running = False
        self.stopping = True
        if self.arrived is not None and self.task is not None:
            self.arrived.set()
            await self.task
        self.executor.shutdown(wait=True)

    async def submit(
        self, images: Sequence[Any], arrived: float | None = None
    ) -> tuple[list[Any], list[int | None]]:
        """One request's images -> (their results, the test size that served each), in order (an error
        of their batch is raised). ``arrived``: when the request came in (perf_counter; default now)."""
        if not self.running or self.arrived is None:
            raise RequestError(503, "the server is shutting down")
        if not images:
            return [], []
        arrived = time.perf_counter() if arrived is None else arrived
        job = Job(images, asyncio.get_running_loop().create_future(), arrived)
        if self.policy is not None:
            self.policy.arrived(len(images), arrived)
        self.queue.add(job)
        self.arrived.set()
        await job.future
        return job.results, job.sizes

    async def _window(self) -> None:
        """Wait up to max_wait for the queue to hold a full batch."""
        assert self.arrived is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while self.queue.pending < self.max_batch and not self.stopping:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), remaining)
            except (asyncio.TimeoutError, TimeoutError):
                return

    async def _loop(self) -> None:
        assert self.arrived is not None
        loop = asyncio.get_running_loop()
        while True:
            if self.queue.pending <= 0:
                if self.stopping:
                    return
                self.arrived.clear()
                await self.arrived.wait()
                continue
            await self._window()
            choice = self.policy.choose(self.queue.waiting()) if self.policy is not None else None
            batch = self.queue.take(self.max_batch)
            if not batch:
                continue
            size = choice.point.size if choice is not None else None
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(
                    self.executor, self.run, [job.images[index] for job, index in batch], size
                )
            except Exception as error:  # the batch failed: each of its requests gets the error
                for job, _ in batch:
                    self.queue.drop(job)
                    if not job.future.done():
                        job.future.set_exception(error)
                continue
            seconds = time.perf_counter() - started
            self.metrics.inference.observe(seconds)
            self.metrics.batch_size.observe(len(batch))
            self.metrics.images.inc(amount=len(batch))
            if choice is not None:
                assert self.policy is not None
                self.policy.observe(choice.point, len(batch), seconds)
                self.metrics.point_images.inc(str(size), amount=len(batch))
                self.metrics.point.set(float(size))
                if choice.overload:
                    self.metrics.overload_batches.inc()
            served = size if size is not None else self.loaded_size
            for (job, index), result in zip(batch, results):
                job.results[index] = result
                job.sizes[index] = served
                job.finished += 1
                if job.finished == len(job.images) and not job.future.done():
                    job.future.set_result(None)
