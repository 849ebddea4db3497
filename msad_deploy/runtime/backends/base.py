"""What every backend shares: the interface the Detector drives, artifact metadata checks, output decoding.

A backend runs one artifact on one device. The :class:`~msad_deploy.runtime.Detector` does
everything around it with the same functions for every backend (decode and check images, resize,
pad, split and pad batches to what the artifact takes, normalise with
:func:`~msad_deploy.runtime.preprocess.prepare_batch`, map boxes back to original pixels); the backend
only turns a :class:`~msad_deploy.runtime.preprocess.PreparedBatch` into
:class:`~msad_deploy.models.postprocess.Detections` in the decode frame (the artifacts' output
contract), or, for artifacts with in-graph preprocessing, uint8 frames into Detections in frame pixels.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from msad_deploy.data.transforms import padded_size
from msad_deploy.models.postprocess import Detections
from msad_deploy.models.spec import InferenceSpec
from msad_deploy.runtime.artifacts import (
    DETECTION_OUTPUTS,
    RAW_OUTPUTS,
    check_metadata,
    metadata_spec,
    read_sidecar,
    sidecar_path,
)
from msad_deploy.runtime.preprocess import (
    PreparedBatch,
    level_sizes_for,
    pad_to_size,
    padded_input_size,
    prepare_batch,
    select_decoded,
)

# Sidecar keys that must agree with the metadata embedded in the artifact itself: what decides how the
# artifact is fed and read. (``artifact`` and ``created`` may differ: a Triton repository copy renames it.)
DESCRIBING_KEYS = (
    "kind",
    "spec",
    "inputs",
    "outputs",
    "nms",
    "preprocess",
    "precision",
    "input_size",
    "batch",
    "dynamic",
    "source_sha256",
)


class BackendUnavailableError(ImportError, ValueError):
    """A backend's library does not import here; the message names the pip extra that installs it.

    A ValueError too, so ``msad`` prints it as one line."""


def import_optional(module: str, extra: str, what: str) -> ModuleType:
    """``import module`` or a :class:`BackendUnavailableError` naming ``pip install msad-deploy[extra]``."""
    try:
        return importlib.import_module(module)
    except (ImportError, OSError) as err:  # OSError: the wheel is there but a shared library is not
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BackendUnavailableError(
            f"{what} needs the `{module}` package, which does not import here ({first}); "
            f"install it with `pip install 'msad-deploy[{extra}]'`",
            name=module,
        ) from err


def resolve_device(device: str | torch.device, default: str | None = None) -> torch.device:
    """``"auto"`` -> ``default`` or CUDA when torch sees a GPU, else the CPU; CUDA asked for without a GPU
    is an error naming the fix."""
    if str(device) == "auto":
        return torch.device(default or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but torch sees no CUDA device here; use cpu")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: the runtime runs on cpu or cuda")
    return resolved


def load_metadata(path: Path, embedded: dict[str, Any] | None) -> dict[str, Any]:
    """The sidecar of ``path``, checked against the metadata embedded in the artifact (when it has any).

    Without a sidecar the embedded copy is used. A sidecar that disagrees with the artifact on how it
    is fed or read (another export's sidecar, or an edited one) is an error at load.
    """
    if embedded is not None:
        embedded = check_metadata(embedded, f"the metadata embedded in {path}")
    if not sidecar_path(path).is_file() and embedded is not None:
        return embedded
    metadata = read_sidecar(path)
    if embedded is not None:
        differ = [key for key in DESCRIBING_KEYS if metadata.get(key) != embedded.get(key)]
        if differ:
            raise ValueError(
                f"{sidecar_path(path)} does not describe {path}: {', '.join(differ)} differ from the metadata "
                "embedded in the artifact (the sidecar belongs to another export, or was edited); copy the "
                "sidecar written with this artifact, or re-export it"
            )
    return metadata


def parse_embedded(text: str | None, path: Path) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"the metadata embedded in {path} is not valid JSON ({err}); re-export it") from err


class Backend:
    """One artifact on one device. Subclasses set the attributes and implement ``infer``.

    Attributes: ``spec``; ``metadata`` (the sidecar, None for checkpoints); ``device``;
    ``batch`` (the only batch size the artifact takes, or None); ``max_batch`` (the largest, or None);
    ``input_size`` (the padded HR-frame size [H, W] a fixed-size artifact takes, or the frame size of
    a fixed in-graph-preprocessing artifact; None: any); ``max_input_size`` / ``min_input_size`` (bounds on
    dynamic sizes, e.g. a TensorRT profile's, or None); ``takes_frames`` (in-graph preprocessing: uint8 frames [B, H, W, 3] in, frame pixels out).
    """

    name: ClassVar[str] = ""
    thread_safety: ClassVar[str] = ""

    def __init__(
        self, path: Path, spec: InferenceSpec, metadata: dict[str, Any] | None, device: torch.device
    ):
        self.path = path
        self.spec = spec
        self.metadata = metadata
        self.device = device
        self.batch: int | None = None
        self.max_batch: int | None = None
        self.input_size: tuple[int, int] | None = None
        self.max_input_size: tuple[int, int] | None = None
        self.min_input_size: tuple[int, int] | None = None
        self.takes_frames = False
        self.nms = "eager"

    def _layout_from_metadata(self, metadata: dict[str, Any]) -> None:
        """batch, input_size, takes_frames and nms from an artifact sidecar."""
        self.takes_frames = bool(metadata.get("preprocess"))
        self.nms = metadata.get("nms", "ort")
        dynamic = bool(metadata.get("dynamic"))
        if not dynamic:
            batch = metadata.get("batch")
            self.batch = int(batch) if batch is not None else None
            self.max_batch = self.batch
        size = metadata.get("input_size")
        if size is not None and not dynamic:  # dynamic graphs (frames too) take any size
            self.input_size = (int(size[0]), int(size[1]))

    def set_input_spec(self, spec: InferenceSpec) -> None:
        """Run with the test size and padding of ``spec`` (this backend's spec at another input, see
        :meth:`InferenceSpec.at_input`).

        A dynamic artifact takes any size. An artifact whose input size was fixed at export for another
        size, or whose graph resizes frames itself (in-graph preprocessing), is an error naming it."""
        self.check_input_spec(spec)
        self.spec = spec

    def check_input_spec(self, spec: InferenceSpec) -> None:
        """Raise the error :meth:`set_input_spec` would for ``spec``; change nothing."""
        old, new = self.spec, spec
        if (new.test_min_size, new.test_max_size, new.size_divisibility) == (
            old.test_min_size,
            old.test_max_size,
            old.size_divisibility,
        ):
            return
        sizes = (
            f"test size {new.test_min_size}/{new.test_max_size} padded to {new.size_divisibility} (was "
            f"{old.test_min_size}/{old.test_max_size} padded to {old.size_divisibility})"
        )
        if self.takes_frames:
            raise ValueError(
                f"{self.path.name} resizes and pads frames inside its graph as it was exported "
                f"({old.test_min_size}/{old.test_max_size}, padded to {old.size_divisibility}); it cannot run at "
                f"{sizes}: export it again with --test-size / --size-divisibility, or without --preprocess and "
                "with --dynamic"
            )
        if self.input_size is not None:
            needed = padded_size(new.test_min_size, new.test_max_size, new.size_divisibility)
            if tuple(needed) != tuple(self.input_size):
                raise ValueError(
                    f"{self.path.name} was exported for fixed {self.input_size[0]}x{self.input_size[1]} inputs "
                    f"(padded HR frame, height x width); {sizes} needs {needed[0]}x{needed[1]}: export it with "
                    "--dynamic to run it at any test size"
                )

    def infer(self, batch: PreparedBatch) -> Detections:
        """A prepared batch (padded to what the artifact takes) -> Detections in the decode frame."""
        raise NotImplementedError(f"the {self.name} backend does not take network inputs")

    def infer_frames(self, frames: Tensor) -> Detections:
        """uint8 frames [B, H, W, 3] -> Detections in frame pixels (in-graph preprocessing artifacts)."""
        raise NotImplementedError(f"the {self.name} backend does not take raw frames")

    def close(self) -> None:
        """Release what the backend holds (sessions, engines, GPU memory)."""

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "device": str(self.device),
            "artifact": str(self.path),
            "batch": self.batch,
            "max_batch": self.max_batch,
            "input_size": list(self.input_size) if self.input_size else None,
            "in_graph_preprocessing": self.takes_frames,
            "nms": self.nms,
            "precision": (self.metadata or {}).get("precision", "fp32"),
        }


class GraphBackend(Backend):
    """A backend that runs an exported graph on numpy arrays by tensor name (ONNX Runtime, OpenVINO).

    Subclasses set ``input_names`` / ``output_names`` and implement :meth:`run`; feeding (``images``
    float32 [B, 3, h, w] network input, ``image_sizes`` float32 [B, 2], or ``frames`` uint8
    [B, H, W, 3]) and reading the outputs (the four contract outputs, or with ``--nms none`` the
    decoded ``boxes`` [B, L, 4] / ``scores`` [B, L, C], selected here) are shared.
    """

    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Raw graph run: input name -> array in, output name -> array out."""
        raise NotImplementedError

    def feeds(self, padded: Tensor, image_sizes: Tensor) -> dict[str, np.ndarray]:
        """Graph inputs of a padded uint8 HR-frame batch (padded further to a fixed export size)."""
        if self.takes_frames:
            raise ValueError("in-graph preprocessing artifacts take raw frames, not padded batches")
        if self.input_size is not None:
            padded = pad_to_size(padded, self.input_size, self.path)
        return self._feeds(prepare_batch(padded, image_sizes, image_sizes, self.spec))

    def _feeds(self, batch: PreparedBatch) -> dict[str, np.ndarray]:
        values = {
            "images": lambda: batch.inputs.detach().cpu().numpy(),
            "image_sizes": lambda: batch.image_sizes.detach().to("cpu", torch.float32).numpy(),
        }
        return {name: values[name]() for name in self.input_names}

    def _detections(self, outputs: dict[str, np.ndarray], batch: PreparedBatch) -> Detections:
        tensors = {name: torch.from_numpy(value) for name, value in outputs.items()}
        if self.nms == "none":
            padded_hw = tuple(int(v) * self.spec.input_divisor for v in batch.inputs.shape[-2:])
            return raw_detections(
                tensors["boxes"], tensors["scores"], padded_hw, batch.image_sizes.cpu().float(), self.spec
            )
        return contract_detections(tensors)

    def infer(self, batch: PreparedBatch) -> Detections:
        return self._detections(self.run(self._feeds(batch)), batch)

    def infer_frames(self, frames: Tensor) -> Detections:
        outputs = self.run({"frames": frames.detach().cpu().numpy()})
        tensors = {name: torch.from_numpy(value) for name, value in outputs.items()}
        if self.nms == "none":  # decoded boxes already in frame pixels
            height, width = frames.shape[1:3]
            sizes = torch.tensor([[height, width]], dtype=torch.float32).expand(frames.shape[0], 2)
            # the level split follows the padded resized frame; boxes are clipped to the frame
            resized_padded = padded_input_size(height, width, self.spec)
            return raw_detections(tensors["boxes"], tensors["scores"], resized_padded, sizes, self.spec)
        return contract_detections(tensors)


def artifact_spec(metadata: dict[str, Any], path: Path) -> InferenceSpec:
    try:
        return metadata_spec(metadata)
    except (TypeError, ValueError) as err:
        raise ValueError(f"the inference spec of {path} is invalid ({err}); re-export the artifact") from err


def contract_detections(outputs: dict[str, Tensor]) -> Detections:
    """The four contract outputs (any numeric dtype) -> Detections (float32 boxes/scores, int64 labels)."""
    boxes, scores, labels, num = (outputs[name] for name in DETECTION_OUTPUTS)
    return Detections(boxes.float(), scores.float(), labels.long(), num.long().reshape(-1))


def raw_detections(
    boxes: Tensor, scores: Tensor, padded_hw: tuple[int, int], image_sizes: Tensor, spec: InferenceSpec
) -> Detections:
    """``--nms none`` outputs: decoded boxes [B, L, 4] / scores [B, L, C] -> Detections (top-k, clip, NMS)."""
    return select_decoded(boxes.float(), scores.float(), level_sizes_for(spec, padded_hw), image_sizes, spec)


def check_output_names(names: list[str], metadata: dict[str, Any], path: Path) -> None:
    expected = RAW_OUTPUTS if metadata.get("nms") == "none" else DETECTION_OUTPUTS
    missing = [n for n in expected if n not in names]
    if missing:
        raise ValueError(
            f"{path} has outputs {names}, without {missing} (nms {metadata.get('nms')!r}): not an msad-deploy "
            "detection artifact, or its sidecar belongs to another export"
        )


def check_io_against_spec(
    io: dict[str, tuple[str, list[Any]]], metadata: dict[str, Any], spec: InferenceSpec, path: Path
) -> None:
    """Tensor names, dtypes and static dims of the real artifact (``io``: name -> (dtype, shape), dims
    int or None) against its sidecar and spec: class count, detection count, input size, channels."""
    listed = {entry["name"]: entry for entry in metadata["inputs"] + metadata["outputs"]}
    for name, entry in listed.items():
        if name not in io:
            raise ValueError(
                f"{path} has no tensor {name!r}, which its metadata lists (it has {sorted(io)}); the sidecar "
                "belongs to another export"
            )
        dtype, shape = io[name]
        if dtype != entry["dtype"]:
            raise ValueError(
                f"{path}: tensor {name!r} is {dtype} but its metadata says {entry['dtype']} (precision "
                f"{metadata.get('precision')!r}); the sidecar belongs to another export"
            )
        listed_shape = entry["shape"]
        if len(shape) != len(listed_shape) or any(
            isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(shape, listed_shape)
        ):
            raise ValueError(
                f"{path}: tensor {name!r} has shape {shape} but its metadata says {listed_shape}; the sidecar "
                "belongs to another export"
            )

    def dim(name: str, axis: int) -> int | None:
        return io[name][1][axis] if name in io and isinstance(io[name][1][axis], int) else None

    what = f"{path} does not match its inference spec"
    if "images" in io:
        if dim("images", 1) not in (None, 3):
            raise ValueError(f"{what}: its images input has {dim('images', 1)} channels, not 3")
        size = metadata.get("input_size")
        if size and not metadata.get("dynamic"):
            expected = [int(v) // spec.input_divisor for v in size]
            actual = [dim("images", 2), dim("images", 3)]
            if None not in actual and actual != expected:
                raise ValueError(
                    f"{what}: its network input is {actual[0]}x{actual[1]}, but input size {size[0]}x{size[1]} "
                    f"with input_shift {spec.input_shift} means {expected[0]}x{expected[1]}"
                )
    if metadata.get("nms") == "none":
        classes = dim("scores", 2)
        if classes is not None and classes != spec.num_classes:
            raise ValueError(f"{what}: it scores {classes} classes, its spec has {spec.num_classes}")
    else:
        k = dim("boxes", 1)
        if k is not None and k != spec.max_detections:
            raise ValueError(
                f"{what}: it returns {k} detections per image, its spec says max_detections={spec.max_detections}"
            )
