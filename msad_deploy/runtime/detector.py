"""``Detector``: load any artifact, feed it images of any kind, get detections in original pixels.

    from msad_deploy.runtime import Detector

    with Detector.load("student.onnx") as detector:      # or .pt, .pt2, .engine, .xml
        result = detector("street.jpg")                  # a Result
        results = detector([frame_a, frame_b], bgr=True)  # OpenCV frames, one batch
    print(result.boxes, result.class_names, result.to_coco(image_id=1))

Every backend gets the same pre- and post-processing, read from the artifact's inference spec
(:mod:`msad_deploy.runtime.preprocess`): resize (short side to the test size), pad to the size
divisibility, normalise, downsample by the input shift; decode-frame boxes are mapped back to
original pixels. Fixed-size artifacts get images padded up to their size (an image whose padded
size exceeds it is an error); fixed-batch artifacts get batches split and the last one padded.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from msad_deploy.data.coco import DEFAULT_MAX_IMAGE_PIXELS
from msad_deploy.data.transforms import inference_size
from msad_deploy.models.postprocess import Detections, rescale_boxes
from msad_deploy.models.spec import InferenceSpec
from msad_deploy.runtime.backends import Backend, open_backend
from msad_deploy.runtime.images import MIN_IMAGE_SIDE, InvalidImageError, describe, to_rgb_tensor
from msad_deploy.runtime.preprocess import pad_to_size, padded_input_size, prepare_batch, resize_and_pad
from msad_deploy.runtime.results import Result

DEFAULT_MAX_BATCH = 8


class Detector:
    """Detections from any msad-deploy artifact (see :meth:`load`), safe to call from many threads.

    Calling it with one image returns a :class:`~msad_deploy.runtime.results.Result`; with a list,
    a list of them (run as batches of at most ``max_batch``). Images: a path, encoded bytes, a PIL
    image, a uint8 numpy array ``[H, W, 3]`` RGB (``bgr=True`` for OpenCV frames; gray and RGBA are
    converted), or a uint8 torch tensor ``[H, W, 3]`` (or ``[3, H, W]``; see
    :mod:`msad_deploy.runtime.images`). A bad input raises a ``ValueError`` naming it (``OSError``
    for a missing file) and leaves the Detector working for the next call.

    Images of a list are grouped by padded size and each group runs as one batch, so an image's
    detections do not depend on which other images share its call.

    Thread safety: the Detector keeps no per-call state; decoding, resizing and result building run in
    the calling thread, and the backend serialises or parallelises the model run (PyTorch: a lock
    around the network; ONNX Runtime: one thread-safe session; TensorRT: a pool of execution contexts;
    AOTInductor: its model container; OpenVINO: a pool of infer requests). ``Detector.thread_safety`` says which.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        max_batch: int | None = None,
        score_thresh: float | None = None,
        max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        min_side: int = MIN_IMAGE_SIDE,
        warmup: bool = True,
        test_size: int | None = None,
        size_divisibility: int | None = None,
    ) -> None:
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if score_thresh is not None and not 0.0 <= score_thresh <= 1.0:
            raise ValueError(f"score_thresh must be within [0, 1], got {score_thresh}")
        self.backend = backend
        self._set_input(test_size, size_divisibility)
        limits = [v for v in (max_batch or DEFAULT_MAX_BATCH, backend.max_batch) if v]
        self.max_batch = min(limits)
        self.score_thresh = score_thresh
        self.max_pixels = max_pixels
        self.min_side = min_side
        self._closed = False
        self._close_lock = threading.Lock()
        if warmup:
            self.warmup()

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device = "auto",
        backend: str = "auto",
        *,
        max_batch: int | None = None,
        score_thresh: float | None = None,
        max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        min_side: int = MIN_IMAGE_SIDE,
        warmup: bool = True,
        test_size: int | None = None,
        size_divisibility: int | None = None,
        **options: Any,
    ) -> Detector:
        """Open an artifact, picking the backend from its suffix: ``.pt`` / ``.pth`` checkpoints (PyTorch
        eager), ``.onnx`` (ONNX Runtime), ``.engine`` / ``.plan`` (TensorRT), ``.pt2`` (AOTInductor), ``.xml``
        (OpenVINO IR, with its ``.bin``).

        ``device``: "auto" (CUDA when available and the artifact can use it, else the CPU), "cpu",
        "cuda" or "cuda:N". ``options`` go to the backend (an unknown one is an error listing the valid
        ones): PyTorch ``compile``, ``compile_options``, ``cuda_graphs``, ``channels_last``,
        ``precision`` ("fp32", "bf16", "fp16"), ``branch``, ``overrides``; ONNX Runtime ``providers``,
        ``intra_op_threads``, ``inter_op_threads``, ``graph_optimization_level``; TensorRT ``contexts``;
        AOTInductor ``runners``; OpenVINO ``threads``, ``performance_hint`` ("latency", "throughput"),
        ``streams`` (its ``device`` may also name an OpenVINO device: "GPU", "NPU", ...). ``score_thresh`` drops detections below it (on top of the spec's own
        threshold); ``max_pixels`` bounds every image's pixel count (decompression bombs; None: no limit);
        ``min_side`` is the smallest image side accepted. ``warmup`` runs one blank image at load.

        ``test_size`` runs the model at another input resolution: the spec's ``test_min_size`` becomes
        ``test_size`` (HR frame; a student sees half of it) and ``test_max_size`` scales with it (800/1333
        at 640: 640/1066). Checkpoints and dynamic artifacts take any test size; an artifact exported for
        a fixed input size that this test size does not give (or with in-graph preprocessing) is a
        ``ValueError`` at load. For a checkpoint it equals the config overrides of both sizes.

        A mismatch between the artifact and its metadata (another model's sidecar, class count, input
        size, precision, detection count) is an error here, not a wrong answer later.
        """
        opened = open_backend(path, device, backend, **options)
        try:
            return cls(
                opened,
                max_batch=max_batch,
                score_thresh=score_thresh,
                max_pixels=max_pixels,
                min_side=min_side,
                warmup=warmup,
                test_size=test_size,
                size_divisibility=size_divisibility,
            )
        except BaseException:
            opened.close()
            raise

    # -- properties ------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.backend.device

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def path(self) -> Path:
        return self.backend.path

    @property
    def class_names(self) -> list[str]:
        return self.spec.label_names()

    @property
    def category_ids(self) -> list[int]:
        return self.spec.label_category_ids()

    @property
    def metadata(self) -> dict[str, Any] | None:
        """The artifact's sidecar (None for a checkpoint)."""
        return self.backend.metadata

    @property
    def config(self):
        """The training config of a checkpoint (None for exported artifacts)."""
        return getattr(self.backend, "config", None)

    @property
    def takes_frames(self) -> bool:
        """True for artifacts with in-graph preprocessing (uint8 frames of one fixed size)."""
        return self.backend.takes_frames

    @property
    def thread_safety(self) -> str:
        return self.backend.thread_safety

    def info(self) -> dict[str, Any]:
        return {
            **self.backend.describe(),
            "max_batch": self.max_batch,
            "test_size": [self.spec.test_min_size, self.spec.test_max_size],
            "num_classes": self.spec.num_classes,
            "class_names": self.class_names,
            "thread_safety": self.thread_safety,
        }

    def __repr__(self) -> str:
        state = "closed" if self._closed else str(self.device)
        return f"Detector({self.path.name}, backend={self.backend_name}, {state})"

    # -- lifecycle -------------------------------------------------------------------------------

    def warmup(self) -> None:
        """Run one blank image through the whole path (allocations, kernel selection, compilation)."""
        height, width = self.backend.input_size or (self.spec.test_min_size, self.spec.test_min_size)
        height, width = max(height, self.min_side), max(width, self.min_side)
        self.detect_tensors([torch.zeros(3, height, width, dtype=torch.uint8)])

    def close(self) -> None:
        """Release the backend (sessions, engines, GPU memory); later calls raise."""
        with self._close_lock:
            if not self._closed:
                self._closed = True
                self.backend.close()

    def __enter__(self) -> Detector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self!r} is closed; load the artifact again")

    # -- input -----------------------------------------------------------------------------------

    def to_tensor(self, image: Any, *, bgr: bool = False) -> Tensor:
        """One input -> uint8 RGB [3, H, W], checked against what this artifact can take."""
        tensor = to_rgb_tensor(image, bgr=bgr, max_pixels=self.max_pixels, min_side=self.min_side)
        height, width = int(tensor.shape[1]), int(tensor.shape[2])
        label = describe(image)
        if self.takes_frames:
            expected = self.backend.input_size
            if expected is not None and (height, width) != expected:
                raise InvalidImageError(
                    f"{label}: {self.path.name} was exported with in-graph preprocessing for {expected[1]}x"
                    f"{expected[0]} frames (width x height); this image is {width}x{height} (export with "
                    "--preprocess --dynamic for frames of any size)"
                )
            self._check_fits((height, width), label)
            return tensor
        resized = inference_size(height, width, self.spec.test_min_size, self.spec.test_max_size)
        if min(resized) < 1:
            raise InvalidImageError(
                f"{label}: a {width}x{height} image resizes to {resized[1]}x{resized[0]} at test size "
                f"{self.spec.test_min_size}/{self.spec.test_max_size}; its aspect ratio is too extreme"
            )
        self._check_fits(padded_input_size(height, width, self.spec), label)
        return tensor

    def _check_fits(self, padded: tuple[int, int], label: Any) -> None:
        limit = self.backend.input_size or self.backend.max_input_size
        if limit is not None and (padded[0] > limit[0] or padded[1] > limit[1]):
            kind = "was exported for" if self.backend.input_size else "takes at most"
            raise InvalidImageError(
                f"{label}: {self.path.name} {kind} {limit[0]}x{limit[1]} inputs (padded HR frame, height x "
                f"width); this image needs {padded[0]}x{padded[1]} after resizing per the spec (export with "
                "--dynamic or a larger --input-size)"
            )

    # -- inference -------------------------------------------------------------------------------

    def __call__(
        self, images: Any, *, bgr: bool = False, score_thresh: float | None = None
    ) -> Result | list[Result]:
        """One image -> :class:`Result`; a list (or tuple) of images -> a list of Results."""
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        if not items:
            return []
        tensors = [self.to_tensor(image, bgr=bgr) for image in items]
        results = self.detect_tensors(tensors, score_thresh=score_thresh)
        return results[0] if single else results

    predict = __call__

    def _set_input(self, test_size: int | None, size_divisibility: int | None = None) -> None:
        if test_size is not None or size_divisibility is not None:
            self.backend.set_input_spec(self.backend.spec.at_input(test_size, size_divisibility))
        self.spec: InferenceSpec = self.backend.spec
        self._specs: dict[int, InferenceSpec] = {self.spec.test_min_size: self.spec}

    def set_test_size(self, test_size: int) -> None:
        """Run at HR-frame test size ``test_size`` from now on (as ``Detector.load(..., test_size=)``);
        not while other threads are calling the Detector."""
        self._set_input(test_size)

    def spec_at(self, test_size: int) -> InferenceSpec:
        """This Detector's spec at HR-frame test size ``test_size`` (:meth:`InferenceSpec.at_input`),
        checked once against the artifact (a fixed-size or in-graph-preprocessing artifact runs at its
        own size only: ``ValueError``). An operating point of adaptive serving is such a size."""
        spec = self._specs.get(test_size)
        if spec is None:
            spec = self.spec.at_input(test_size)
            self.backend.check_input_spec(spec)
            self._specs[test_size] = spec
        return spec

    def detect_tensors(
        self, images: Sequence[Tensor], score_thresh: float | None = None, *, test_size: int | None = None
    ) -> list[Result]:
        """Checked uint8 RGB tensors [3, H, W] (see :meth:`to_tensor`) -> one Result each.

        ``test_size`` runs this call at another HR-frame test size (:meth:`spec_at`) without changing the
        Detector: an image checked by :meth:`to_tensor` at the loaded size fits any smaller test size."""
        self._check_open()
        if not images:
            return []
        spec = self.spec if test_size is None else self.spec_at(test_size)
        thresh = self.score_thresh if score_thresh is None else score_thresh
        found: list[tuple[Tensor, Tensor, Tensor] | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(images):
            height, width = int(image.shape[1]), int(image.shape[2])
            if self.takes_frames:  # frames are stacked as they are: one group per frame size
                key = (height, width)
            else:
                key = self.backend.input_size or padded_input_size(height, width, spec)
            groups.setdefault(key, []).append(index)
        for indices in groups.values():
            for start in range(0, len(indices), self.max_batch):
                chunk = indices[start : start + self.max_batch]
                batch = [images[i] for i in chunk]
                if self.takes_frames:
                    detections = self._run_frames(torch.stack([image.permute(1, 2, 0) for image in batch]))
                else:
                    detections = self.detect_padded(*resize_and_pad(batch, spec, self.device), spec=spec)
                for position, index in enumerate(chunk):
                    n = int(detections.num_detections[position])
                    found[index] = (
                        detections.boxes[position, :n],
                        detections.scores[position, :n],
                        detections.labels[position, :n],
                    )
        names, categories = self.class_names, self.category_ids
        return [
            Result.from_tensors(*found[i], tuple(image.shape[1:]), names, categories, thresh)
            for i, image in enumerate(images)
        ]

    def _chunks(self, count: int) -> list[tuple[int, int]]:
        step = self.backend.batch or self.max_batch
        return [(start, min(start + step, count)) for start in range(0, count, step)]

    def _pad_batch(self, tensors: list[Tensor]) -> tuple[list[Tensor], int]:
        """Repeat the last item up to a fixed batch; returns the tensors and the real count."""
        count = len(tensors[0])
        missing = (self.backend.batch or 0) - count
        if missing <= 0:
            return tensors, count
        return [torch.cat([t, t[-1:].expand(missing, *t.shape[1:])]) for t in tensors], count

    def _run_frames(self, frames: Tensor) -> Detections:
        parts = []
        for start, end in self._chunks(len(frames)):
            (chunk,), count = self._pad_batch([frames[start:end]])
            found = self.backend.infer_frames(chunk.to(self.device))
            parts.append(Detections(*(t[:count].cpu() for t in found)))
        return Detections(*(torch.cat(ts) for ts in zip(*parts, strict=True)))

    def _padded_frames(self, padded: Tensor, image_sizes: Tensor) -> Detections:
        """Unresized images in a padded batch -> per-size groups of frames -> Detections in batch order."""
        expected = self.backend.input_size
        groups: dict[tuple[int, int], list[int]] = {}
        for index, (height, width) in enumerate(image_sizes.tolist()):
            if expected is not None and (height, width) != tuple(expected):
                raise ValueError(
                    f"{self.path.name} takes {expected[1]}x{expected[0]} frames (in-graph preprocessing); got a "
                    f"{width}x{height} image"
                )
            groups.setdefault((height, width), []).append(index)
        rows: list[Detections | None] = [None] * len(padded)
        for (height, width), indices in groups.items():
            frames = padded[indices, :, :height, :width].permute(0, 2, 3, 1).contiguous()
            found = self._run_frames(frames)
            for position, index in enumerate(indices):
                rows[index] = Detections(*(t[position : position + 1] for t in found))
        return Detections(*(torch.cat(ts) for ts in zip(*rows, strict=True)))

    def detect_padded(
        self, padded: Tensor, image_sizes: Tensor, original_sizes: Tensor, spec: InferenceSpec | None = None
    ) -> Detections:
        """A padded uint8 HR-frame batch [B, 3, H, W] of resized images (``image_sizes`` [B, 2] (h, w)
        before padding; ``original_sizes`` [B, 2] before resizing), as the evaluation loader collates
        it -> Detections in original pixels, on the CPU.

        Pads further to a fixed-size artifact's size, splits into the artifact's batch (the last
        chunk padded with copies), and runs the backend. For an artifact with in-graph preprocessing,
        the batch must hold unresized frames of its size (``image_sizes`` = ``original_sizes``).
        ``spec``: the spec the batch was resized by (default this Detector's; see :meth:`spec_at`).
        """
        self._check_open()
        spec = spec or self.spec
        original_sizes = original_sizes.cpu()
        if self.takes_frames:
            return self._padded_frames(padded, image_sizes)
        if self.backend.input_size is not None:
            padded = pad_to_size(padded, self.backend.input_size, self.path.name)
        else:
            self._check_fits(tuple(padded.shape[-2:]), "the batch")
            low = self.backend.min_input_size
            if low is not None and (padded.shape[-2] < low[0] or padded.shape[-1] < low[1]):
                padded = pad_to_size(
                    padded, (max(low[0], padded.shape[-2]), max(low[1], padded.shape[-1])), ""
                )
        parts = []
        for start, end in self._chunks(len(padded)):
            (chunk, sizes), count = self._pad_batch([padded[start:end], image_sizes[start:end]])
            batch = prepare_batch(chunk.to(self.device), sizes.to(self.device), sizes, spec)
            found = self.backend.infer(batch)
            parts.append(Detections(*(t[:count].cpu() for t in found)))
        merged = Detections(*(torch.cat(ts) for ts in zip(*parts, strict=True)))
        frame_sizes = image_sizes.cpu() * spec.frame_scale
        return merged._replace(boxes=rescale_boxes(merged.boxes, frame_sizes, original_sizes))
