"""Runtime backends, one per artifact type; :func:`open_backend` picks one from the file.

| file | backend | library (pip extra) |
|---|---|---|
| ``.pt`` / ``.pth`` checkpoint | ``pytorch`` (eager; optional torch.compile, CUDA graphs) | torch |
| ``.onnx`` | ``onnxruntime`` | onnxruntime (``[onnx]``) |
| ``.xml`` (+ ``.bin``) OpenVINO IR | ``openvino`` (CPU, or an OpenVINO device) | openvino (``[openvino]``) |
| ``.engine`` / ``.plan`` / ``.trt`` | ``tensorrt`` | tensorrt or tensorrt-lean (``[tensorrt]``) |
| ``.pt2`` | ``aoti`` (AOTInductor) | torch, torchvision |

Backend modules import their libraries only when a backend is opened.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch

from msad_deploy.runtime.backends.base import (
    Backend,
    BackendUnavailableError,
    import_optional,
    resolve_device,
)

SUFFIXES = {
    ".pt": "pytorch",
    ".pth": "pytorch",
    ".onnx": "onnxruntime",
    ".engine": "tensorrt",
    ".plan": "tensorrt",
    ".trt": "tensorrt",
    ".pt2": "aoti",
    ".xml": "openvino",
}
BACKEND_NAMES = ("pytorch", "onnxruntime", "tensorrt", "aoti", "openvino")
ALIASES = {
    "torch": "pytorch",
    "eager": "pytorch",
    "ort": "onnxruntime",
    "onnx": "onnxruntime",
    "trt": "tensorrt",
    "ov": "openvino",
}


def _backend_class(name: str) -> type[Backend]:
    if name == "pytorch":
        from msad_deploy.runtime.backends.pytorch import TorchBackend

        return TorchBackend
    if name == "onnxruntime":
        from msad_deploy.runtime.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend
    if name == "tensorrt":
        from msad_deploy.runtime.backends.tensorrt import TensorRTBackend

        return TensorRTBackend
    if name == "openvino":
        from msad_deploy.runtime.backends.openvino import OpenVinoBackend

        return OpenVinoBackend
    from msad_deploy.runtime.backends.aoti import AotiBackend

    return AotiBackend


def backend_for(path: str | Path, backend: str = "auto") -> str:
    """The backend name for ``path``: from its suffix, or ``backend`` checked against it."""
    path = Path(path)
    by_suffix = SUFFIXES.get(path.suffix.lower())
    if backend == "auto":
        if by_suffix is None:
            raise ValueError(
                f"cannot tell the artifact type of {path} from its suffix {path.suffix!r}; expected one of "
                f"{', '.join(sorted(SUFFIXES))} (or pass backend=...)"
            )
        return by_suffix
    name = ALIASES.get(backend, backend)
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}; choose auto or one of {', '.join(BACKEND_NAMES)}")
    if by_suffix is not None and by_suffix != name:
        raise ValueError(
            f"{path} is a {by_suffix} artifact (by its suffix); the {name} backend cannot run it"
        )
    return name


def backend_options(name: str) -> list[str]:
    """Keyword options the named backend's constructor takes (beyond path and device)."""
    signature = inspect.signature(_backend_class(name).__init__)
    return [
        p for p in signature.parameters if p not in ("self", "path", "device", "metadata", "extra_outputs")
    ]


def host_threads(backend: str, device: str | torch.device) -> int | None:
    """Torch intra-op threads to use around ``backend`` on ``device``; None: keep torch's setting.

    When ONNX Runtime runs the network (with decode and NMS) on the CPU, torch only resizes, pads
    and normalises the input and maps boxes back; with its own OpenMP pool on the same cores as
    ORT's spinning pool, end-to-end p90 reached twice p50 on 2 cores. One thread avoids the fight.

    OpenVINO is the same case: its CPU plugin runs the whole graph on its own thread pool (TBB
    workers, pinned to cores by default on Linux) over all physical cores, and torch's share is the
    same light input and output handling; a second full-width OpenMP pool on those cores can only
    contend with it. So one torch thread there too (chosen by that reasoning, not yet measured for
    OpenVINO). Its Detector's device is always the CPU (host tensors), whatever OpenVINO device
    runs the graph, and one torch thread suffices for the input handling then as well.
    """
    if backend in ("onnxruntime", "openvino") and torch.device(device).type == "cpu":
        return 1
    return None


def open_backend(path: str | Path, device: str = "auto", backend: str = "auto", **options: Any) -> Backend:
    """Open ``path`` with its backend on ``device``; unknown options are an error naming the valid ones."""
    name = backend_for(path, backend)
    allowed = backend_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"the {name} backend has no option {', '.join(unknown)}; its options: {', '.join(allowed) or 'none'}"
        )
    path = Path(path)
    if name != "pytorch" and not path.exists():  # checkpoints: load_model names the missing file itself
        raise FileNotFoundError(2, "no such model file", str(path))
    return _backend_class(name)(path, device=device, **options)


__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "BackendUnavailableError",
    "SUFFIXES",
    "backend_for",
    "backend_options",
    "import_optional",
    "open_backend",
    "resolve_device",
]
