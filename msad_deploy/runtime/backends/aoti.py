"""AOTInductor backend: ``.pt2`` packages written by ``msad export aoti`` (NMS inside, torchvision's op).

The package runs on the device it was compiled for (its sidecar's ``device``); ``device="auto"``
picks it. ``runners`` (default 1) is the number of model instances the AOTInductor container holds.

Thread safety: the AOTInductor model container synchronises concurrent runs itself (it hands each
call a free model instance and waits when none is free; ``run_single_threaded`` stays off), so
callers need no lock; with ``runners=N``, N calls run at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from msad_deploy.models.postprocess import Detections
from msad_deploy.runtime.artifacts import DETECTION_OUTPUTS, ONNX_METADATA_KEY, read_sidecar, sidecar_path
from msad_deploy.runtime.backends.base import (
    Backend,
    artifact_spec,
    check_io_against_spec,
    load_metadata,
    parse_embedded,
    resolve_device,
)
from msad_deploy.runtime.preprocess import PreparedBatch


class AotiBackend(Backend):
    name = "aoti"
    thread_safety = "the AOTInductor model container serialises runs itself (runners=N lets N run at once)"

    def __init__(self, path: str | Path, device: str | torch.device = "auto", runners: int = 1) -> None:
        import torchvision  # noqa: F401  (registers torchvision::nms, which the package calls)

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(2, "no such AOTInductor package", str(path))
        try:  # the device the package was compiled for, before loading it
            sidecar_device = read_sidecar(path).get("device") if sidecar_path(path).is_file() else None
        except ValueError:
            sidecar_device = None  # load_metadata below reports what is wrong with the sidecar
        device = resolve_device(device, default=sidecar_device or "cpu")
        if sidecar_device is not None and device.type != sidecar_device:
            raise ValueError(
                f"{path} was compiled for {sidecar_device}; it cannot run on {device} (AOTInductor packages "
                f"run where they were compiled: re-export with `msad export aoti --device {device.type}`)"
            )
        if int(runners) < 1:
            raise ValueError(f"runners must be >= 1, got {runners}")
        try:
            from torch._inductor.package import load_package

            index = device.index if device.index is not None else -1
            runner = load_package(str(path), "model", False, int(runners), index)
        except Exception as err:  # zip errors, missing model, a package built for another torch
            first = " ".join(str(err).split())[:300]
            raise ValueError(
                f"{path} is not a loadable AOTInductor package ({type(err).__name__}: {first}); re-export it "
                "with `msad export aoti` using this torch version"
            ) from err
        embedded = parse_embedded(runner.get_metadata().get(ONNX_METADATA_KEY), path)
        metadata = load_metadata(path, embedded)
        if metadata.get("kind") not in (None, "aoti"):
            raise ValueError(
                f"{path}'s metadata describes a {metadata.get('kind')!r} artifact, not an AOTInductor package"
            )
        spec = artifact_spec(metadata, path)
        super().__init__(path, spec, metadata, device)
        self._layout_from_metadata(metadata)
        self.runner = runner
        self.input_names = [entry["name"] for entry in metadata["inputs"]]
        io = {
            entry["name"]: (entry["dtype"], [d if isinstance(d, int) else None for d in entry["shape"]])
            for entry in metadata["inputs"] + metadata["outputs"]
        }
        check_io_against_spec(io, metadata, spec, path)

    def _run(self, *inputs: Tensor) -> Detections:
        outputs = self.runner(*inputs)
        if not isinstance(outputs, (tuple, list)) or len(outputs) != len(DETECTION_OUTPUTS):
            raise ValueError(f"{self.path} returned {type(outputs).__name__}, not the four contract outputs")
        found = Detections(*(t.to("cpu") for t in outputs))
        if found.boxes.shape[1:] != (self.spec.max_detections, 4):
            raise ValueError(
                f"{self.path} returned boxes of shape {tuple(found.boxes.shape)}; its spec says "
                f"max_detections={self.spec.max_detections} (the package belongs to another model)"
            )
        return found

    def infer(self, batch: PreparedBatch) -> Detections:
        inputs = batch.inputs.to(self.device).contiguous()
        sizes = batch.image_sizes.to(self.device, torch.float32).contiguous()
        return self._run(inputs, sizes)

    def infer_frames(self, frames: Tensor) -> Detections:
        return self._run(frames.to(self.device).contiguous())

    def close(self) -> None:
        self.runner = None

    def describe(self) -> dict[str, Any]:
        return super().describe()
