"""ONNX Runtime backend: ``.onnx`` artifacts written by ``msad export onnx``.

Providers: on a CUDA device, CUDA, TensorRT and CPU in that order (those this onnxruntime build
has); on the CPU, the CPU provider. ``providers=[...]`` overrides the list, ``intra_op_threads`` /
``inter_op_threads`` size ORT's thread pools, ``graph_optimization_level`` is one of "disable",
"basic", "extended", "all" (default). Inputs are fed as numpy arrays (ORT copies them to the device).

Spinning: ORT's thread pools busy-wait between calls by default (``allow_spinning=None`` keeps
that). Measured on 2 cores (scripts/ort_spinning.py: student at 128, fp32, 2 threads, interleaved): spinning off made
back-to-back calls 1.25-1.3x slower, but a numpy job in the same process ran 1.1-1.4x faster beside
an ORT that was called with 5 ms gaps, and with two sessions called in turn the one just called
kept its pool spinning through the other's call (the same network in two sessions measured 32 vs
24 ms; docs/BENCHMARKS.md). So ``msad bench``, which times
the models of a size call by call, and ``msad serve`` (decoding and other requests share the cores)
turn it off; a process that calls one session back to back may turn it on.

Thread safety: ``InferenceSession.run`` is thread-safe (ONNX Runtime documents concurrent ``run``
calls on one session), so callers run concurrently on one session without a lock.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from msad_deploy.runtime.artifacts import ONNX_METADATA_KEY
from msad_deploy.runtime.backends.base import (
    GraphBackend,
    artifact_spec,
    check_io_against_spec,
    check_output_names,
    import_optional,
    load_metadata,
    parse_embedded,
    resolve_device,
)

ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(uint8)": "uint8",
    "tensor(int8)": "int8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider")
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


def graph_precision(path: Path) -> str | None:
    """ "int8" (Q/DQ nodes), "fp16" (float16 initializers) or "fp32" from the ONNX graph; None when the
    ``onnx`` package is not installed (the sidecar is then trusted)."""
    try:
        import onnx
    except ImportError:
        return None
    model = onnx.load(str(path), load_external_data=False)
    ops = {node.op_type for node in model.graph.node}
    if ops & QDQ_OPS:
        return "int8"
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer):
        return "fp16"
    return "fp32"


class OnnxRuntimeBackend(GraphBackend):
    """An exported ONNX graph in an ``onnxruntime.InferenceSession``.

    ``extra_outputs`` adds intermediate tensors of the graph as outputs (export verification reads
    ``decoded_boxes`` / ``decoded_scores``); it needs the ``onnx`` package.
    """

    name = "onnxruntime"
    thread_safety = "InferenceSession.run is thread-safe: concurrent calls share one session, no lock"

    def __init__(
        self,
        path: str | Path,
        metadata: dict[str, Any] | None = None,
        device: str | torch.device = "cpu",
        providers: list[str] | None = None,
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        graph_optimization_level: str = "all",
        allow_spinning: bool | None = None,
        extra_outputs: tuple[str, ...] = (),
    ) -> None:
        ort = import_optional("onnxruntime", "onnx", "the ONNX Runtime backend (.onnx artifacts)")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(2, "no such ONNX file", str(path))
        available = ort.get_available_providers()
        cuda_ready = "CUDAExecutionProvider" in available and torch.cuda.is_available()
        device = resolve_device(device, default="cuda" if cuda_ready else "cpu")
        if providers is None:
            if device.type == "cuda":
                if "CUDAExecutionProvider" not in available:
                    raise ValueError(
                        f"device {device} was asked for, but this onnxruntime has only {available}; install "
                        "onnxruntime-gpu for the CUDA provider, or use device='cpu'"
                    )
                providers = [p for p in GPU_PROVIDERS if p in available]
            else:
                providers = ["CPUExecutionProvider"]
        unknown = [p for p in providers if p not in available]
        if unknown:
            raise ValueError(
                f"ONNX Runtime providers {unknown} are not available here (available: {available})"
            )
        if graph_optimization_level not in OPTIMIZATION_LEVELS:
            raise ValueError(
                f"graph_optimization_level must be one of {OPTIMIZATION_LEVELS}, got {graph_optimization_level!r}"
            )
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[graph_optimization_level]
        if intra_op_threads is not None:
            options.intra_op_num_threads = int(intra_op_threads)
        if inter_op_threads is not None:
            options.inter_op_num_threads = int(inter_op_threads)
        if allow_spinning is not None:
            if not isinstance(allow_spinning, bool):
                raise ValueError(f"allow_spinning must be true or false, got {allow_spinning!r}")
            for pool in ("intra_op", "inter_op"):
                options.add_session_config_entry(f"session.{pool}.allow_spinning", str(int(allow_spinning)))
        source: Any = str(path)
        if extra_outputs:
            onnx = import_optional("onnx", "onnx", "reading intermediate ONNX tensors")
            try:
                model = onnx.load(str(path))
            except Exception as err:  # protobuf's DecodeError and friends: truncated or foreign files
                raise ValueError(
                    f"{path} is not a readable ONNX model ({type(err).__name__}); re-export it"
                ) from err
            for name in extra_outputs:
                model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
            source = model.SerializeToString()
        try:
            session = ort.InferenceSession(source, options, providers=providers)
        except Exception as err:  # InvalidProtobuf, Fail, NoSuchFile...: not a loadable model
            first = " ".join(str(err).split())[:300]
            raise ValueError(
                f"{path} is not a readable ONNX model ({type(err).__name__}: {first}); re-export it with "
                "`msad export onnx`"
            ) from err
        embedded = parse_embedded(session.get_modelmeta().custom_metadata_map.get(ONNX_METADATA_KEY), path)
        metadata = metadata or load_metadata(path, embedded)
        spec = artifact_spec(metadata, path)
        super().__init__(path, spec, metadata, device)
        self.session = session
        self.providers = session.get_providers()
        self.intra_op_threads = options.intra_op_num_threads  # 0: ONNX Runtime's default (physical cores)
        # what the session was built with (no entry: ORT's default, spinning on)
        try:
            spinning = session.get_session_options().get_session_config_entry(
                "session.intra_op.allow_spinning"
            )
        except RuntimeError:
            spinning = "1"
        self.allow_spinning = spinning != "0"
        self._layout_from_metadata(metadata)
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        io = {
            t.name: (ORT_TYPES.get(t.type, t.type), [d if isinstance(d, int) else None for d in t.shape])
            for t in session.get_inputs() + session.get_outputs()
        }
        check_output_names(self.output_names, metadata, path)
        check_io_against_spec(io, metadata, spec, path)
        precision = graph_precision(path)
        if precision is not None and precision != metadata.get("precision", "fp32"):
            raise ValueError(
                f"{path} is an {precision} graph but its metadata says precision {metadata.get('precision')!r}; "
                "the sidecar belongs to another export"
            )

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Raw session run: output name -> array."""
        return dict(zip(self.output_names, self.session.run(None, feeds), strict=True))

    def close(self) -> None:
        self.session = None

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "providers": self.providers,
            "intra_op_threads": self.intra_op_threads,
            "allow_spinning": self.allow_spinning,
        }
