"""TensorRT backend: serialized engines (``.engine`` / ``.plan``) built by ``msad export tensorrt``.

Written against the TensorRT 10 / 11 runtime API: ``Runtime.deserialize_cuda_engine``, named I/O
tensors (``num_io_tensors``, ``get_tensor_name/mode/dtype/shape``, ``get_tensor_profile_shape``),
``IExecutionContext.set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3`` on a torch
CUDA stream. Inputs and outputs live in torch CUDA tensors (no pycuda). Imports ``tensorrt``, or
``tensorrt_lean`` (the runtime-only package) when the full one is missing.

Before deserialising, the engine's sidecar is checked against this machine: an engine built by
another TensorRT version (unless built version-compatible) or for a GPU of another compute capability
is refused with a message naming both, instead of TensorRT's generic deserialisation failure.

Thread safety: a pool of ``contexts`` execution contexts (default 2), each with its own CUDA stream;
a call takes a free context (waiting when all are busy) and returns it after its stream finishes, so
each concurrent caller has its own context and buffers.
"""

from __future__ import annotations

import queue
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from msad_deploy.models.postprocess import Detections
from msad_deploy.runtime.backends.base import (
    Backend,
    BackendUnavailableError,
    artifact_spec,
    check_io_against_spec,
    check_output_names,
    contract_detections,
    load_metadata,
    raw_detections,
    resolve_device,
)
from msad_deploy.runtime.preprocess import PreparedBatch

SUPPORTED_MAJORS = (10, 11)
INSTALL_HINT = (
    "install TensorRT 10 or 11 on a machine with an NVIDIA GPU: `pip install 'msad-deploy[tensorrt]'` (or "
    "'msad-deploy[tensorrt-lean]' for the runtime alone)"
)
# TensorRT DataType member name -> (sidecar dtype, torch dtype)
TRT_DTYPES = {
    "FLOAT": ("float32", torch.float32),
    "HALF": ("float16", torch.float16),
    "BF16": ("bfloat16", torch.bfloat16),
    "INT8": ("int8", torch.int8),
    "UINT8": ("uint8", torch.uint8),
    "INT32": ("int32", torch.int32),
    "INT64": ("int64", torch.int64),
    "BOOL": ("bool", torch.bool),
}


def import_tensorrt():
    """``tensorrt`` (or ``tensorrt_lean``), 10.x or 11.x, or a one-line error naming the extra."""
    errors = []
    for name in ("tensorrt", "tensorrt_lean"):
        try:
            module = __import__(name)
        except (ImportError, OSError) as err:
            errors.append(f"{name}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
            continue
        major = int(str(module.__version__).split(".")[0])
        if major not in SUPPORTED_MAJORS:
            raise BackendUnavailableError(
                f"TensorRT {module.__version__} is installed; the runtime supports TensorRT 10 and 11 "
                "(`pip install 'tensorrt>=10,<12'`)",
                name=name,
            )
        return module
    raise BackendUnavailableError(
        f"the TensorRT backend (.engine / .plan files) needs TensorRT, which does not import here "
        f"({'; '.join(errors)}); {INSTALL_HINT}",
        name="tensorrt",
    )


def check_engine_compatibility(
    metadata: dict[str, Any], path: Path, trt_version: str, gpu: dict[str, Any] | None
) -> None:
    """Refuse an engine built by another TensorRT version or for another GPU, from its sidecar.

    ``gpu``: ``{"name", "compute_capability": "8.9"}`` of the device it would run on. Engines are
    tied to the exact TensorRT version that built them unless built version-compatible (then to the
    major version), and to the GPU's compute capability.
    """
    info = metadata.get("tensorrt") or {}
    built = str(info.get("version") or "")
    rebuild = f"rebuild it here with `msad export tensorrt {metadata.get('source_onnx') or 'MODEL.onnx'}`"
    if built:
        same_major = built.split(".")[0] == str(trt_version).split(".")[0]
        if info.get("version_compatible") and not same_major:
            raise ValueError(
                f"{path} was built version-compatible by TensorRT {built}; this is TensorRT {trt_version}, of "
                f"another major version; {rebuild}"
            )
        if not info.get("version_compatible") and built != str(trt_version):
            raise ValueError(
                f"{path} was built by TensorRT {built} but this is TensorRT {trt_version}: engines load only "
                f"in the TensorRT version that built them; {rebuild} (or build with --version-compatible)"
            )
    built_gpu = info.get("gpu") or {}
    if (
        gpu
        and built_gpu.get("compute_capability")
        and built_gpu["compute_capability"] != gpu.get("compute_capability")
    ):
        raise ValueError(
            f"{path} was built for {built_gpu.get('name', 'a GPU')} (compute capability "
            f"{built_gpu['compute_capability']}); this is {gpu.get('name')} (compute capability "
            f"{gpu.get('compute_capability')}): engines run only on the GPU architecture they were built for; {rebuild}"
        )


def gpu_info(device: torch.device) -> dict[str, Any]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return {"name": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}"}


def _make_logger(trt):
    class CapturingLogger(trt.ILogger):
        """Keeps TensorRT's errors so that exceptions can quote them."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg) -> None:  # noqa: D401 (TensorRT's callback)
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(" ".join(str(msg).split()))
                del self.errors[:-5]

    return CapturingLogger()


class _Slot:
    """One execution context and the CUDA stream it runs on."""

    def __init__(self, context, device: torch.device) -> None:
        self.context = context
        self.stream = torch.cuda.Stream(device)


class TensorRTBackend(Backend):
    name = "tensorrt"
    thread_safety = (
        "a pool of execution contexts, one per concurrent caller (contexts=N), each on its own stream"
    )

    def __init__(self, path: str | Path, device: str | torch.device = "auto", contexts: int = 2) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(2, "no such TensorRT engine", str(path))
        metadata = load_metadata(path, None)
        spec = artifact_spec(metadata, path)
        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise ValueError(f"{path} is a TensorRT engine, which needs an NVIDIA GPU; torch sees none here")
        device = resolve_device(device, default="cuda")
        if device.type != "cuda":
            raise ValueError(f"TensorRT engines run on a CUDA device, not {device}")
        if int(contexts) < 1:
            raise ValueError(f"contexts must be >= 1, got {contexts}")
        check_engine_compatibility(metadata, path, trt.__version__, gpu_info(device))
        super().__init__(path, spec, metadata, device)
        self._layout_from_metadata(metadata)
        self.trt = trt
        self.logger = _make_logger(trt)
        info = metadata.get("tensorrt") or {}
        if info.get("plugins") and hasattr(trt, "init_libnvinfer_plugins"):
            trt.init_libnvinfer_plugins(self.logger, "")
        with torch.cuda.device(device):
            self.runtime = trt.Runtime(self.logger)
            if info.get("version_compatible") and hasattr(self.runtime, "engine_host_code_allowed"):
                self.runtime.engine_host_code_allowed = True
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise ValueError(
                    f"TensorRT {trt.__version__} could not deserialize {path} "
                    f"({'; '.join(self.logger.errors) or 'no error logged'}): a corrupt file, or an engine built "
                    "by another TensorRT version or for another GPU; rebuild it with `msad export tensorrt`"
                )
            self.engine = engine
            self._read_io(path, metadata)
            self._pool: queue.Queue[_Slot] = queue.Queue()
            for _ in range(int(contexts)):
                context = engine.create_execution_context()
                if context is None:
                    raise ValueError(
                        f"TensorRT could not create an execution context for {path} "
                        f"({'; '.join(self.logger.errors) or 'out of GPU memory?'})"
                    )
                self._pool.put(_Slot(context, device))

    def _read_io(self, path: Path, metadata: dict[str, Any]) -> None:
        trt, engine = self.trt, self.engine
        self.inputs: dict[str, torch.dtype] = {}
        self.outputs: dict[str, torch.dtype] = {}
        io: dict[str, tuple[str, list[Any]]] = {}
        profiles: dict[str, tuple[list[int], list[int]]] = {}
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            dtype_name = str(engine.get_tensor_dtype(name)).split(".")[-1]
            if dtype_name not in TRT_DTYPES:
                raise ValueError(
                    f"{path}: tensor {name!r} has TensorRT type {dtype_name}, which the runtime does not map"
                )
            listed, torch_dtype = TRT_DTYPES[dtype_name]
            shape = [int(d) for d in engine.get_tensor_shape(name)]
            io[name] = (listed, [d if d >= 0 else None for d in shape])
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.inputs[name] = torch_dtype
                if any(d < 0 for d in shape):
                    low, _, high = engine.get_tensor_profile_shape(name, 0)
                    profiles[name] = ([int(d) for d in low], [int(d) for d in high])
            else:
                self.outputs[name] = torch_dtype
        check_output_names(list(self.outputs), metadata, path)
        check_io_against_spec(io, metadata, self.spec, path)
        main = "frames" if self.takes_frames else "images"
        if main in profiles:
            low, high = profiles[main]
            if io[main][1][0] is None:
                self.max_batch = high[0]
            spatial = (1, 2) if self.takes_frames else (2, 3)
            scale = 1 if self.takes_frames else self.spec.input_divisor
            if io[main][1][spatial[0]] is None:
                self.max_input_size = (high[spatial[0]] * scale, high[spatial[1]] * scale)
                self.min_input_size = (low[spatial[0]] * scale, low[spatial[1]] * scale)

    def _execute(self, feeds: dict[str, Tensor]) -> dict[str, Tensor]:
        missing = set(self.inputs) - set(feeds)
        if missing:
            raise ValueError(f"{self.path} needs inputs {sorted(missing)}")
        slot = self._pool.get()
        try:
            with torch.cuda.device(self.device):
                context, stream = slot.context, slot.stream
                tensors = {}
                for name, dtype in self.inputs.items():
                    tensor = feeds[name].to(self.device, dtype).contiguous()
                    tensors[name] = tensor
                    if not context.set_input_shape(name, tuple(tensor.shape)):
                        raise ValueError(
                            f"{self.path} does not take {name} of shape {tuple(tensor.shape)} (outside its "
                            f"optimisation profile; {'; '.join(self.logger.errors)})"
                        )
                    context.set_tensor_address(name, tensor.data_ptr())
                outputs = {}
                for name, dtype in self.outputs.items():
                    shape = tuple(int(d) for d in context.get_tensor_shape(name))
                    if any(d < 0 for d in shape):
                        raise ValueError(
                            f"{self.path}: output {name!r} has a data-dependent shape {shape}; the runtime expects "
                            "the padded output contract (re-export with msad export onnx)"
                        )
                    outputs[name] = torch.empty(shape, dtype=dtype, device=self.device)
                    context.set_tensor_address(name, outputs[name].data_ptr())
                stream.wait_stream(torch.cuda.current_stream(self.device))
                if not context.execute_async_v3(stream.cuda_stream):
                    raise RuntimeError(
                        f"TensorRT failed to run {self.path}: {'; '.join(self.logger.errors) or 'no error logged'}"
                    )
                stream.synchronize()
                return outputs
        finally:
            self._pool.put(slot)

    def infer(self, batch: PreparedBatch) -> Detections:
        feeds = {"images": batch.inputs, "image_sizes": batch.image_sizes.float()}
        outputs = self._execute({k: v for k, v in feeds.items() if k in self.inputs})
        if self.nms == "none":
            padded_hw = tuple(int(v) * self.spec.input_divisor for v in batch.inputs.shape[-2:])
            return raw_detections(
                outputs["boxes"],
                outputs["scores"],
                padded_hw,
                batch.image_sizes.to(self.device).float(),
                self.spec,
            )
        return contract_detections({k: v.cpu() for k, v in outputs.items()})

    def infer_frames(self, frames: Tensor) -> Detections:
        if self.nms == "none":
            raise ValueError(
                f"{self.path}: raw outputs with in-graph preprocessing are not supported by the runtime"
            )
        outputs = self._execute({"frames": frames})
        return contract_detections({k: v.cpu() for k, v in outputs.items()})

    def close(self) -> None:
        while not self._pool.empty():
            self._pool.get_nowait()
        self.engine = None
        self.runtime = None

    def describe(self) -> dict[str, Any]:
        info = (self.metadata or {}).get("tensorrt") or {}
        return {**super().describe(), "tensorrt": self.trt.__version__, "built_by": info.get("version")}
