"""PyTorch eager backend: a training checkpoint (``.pt`` / ``.pth``) rebuilt with its config.

Options: ``compile=True`` (``torch.compile`` of the network; ``compile_options`` go to it, e.g.
``{"mode": "max-autotune-no-cudagraphs"}``), ``cuda_graphs=True`` (CUDA only: one captured graph per
input shape, replayed; at most ``max_graphs`` shapes kept; not with a compile mode that captures CUDA
graphs itself, "reduce-overhead" or "max-autotune"), ``channels_last=True``, ``precision`` "fp32"
(default), "bf16" or "fp16" (autocast of the network; decoding and NMS stay float32), ``branch``
(teacher checkpoints: "fused", "hr" or "lr") and ``overrides`` (``key=value`` config changes that
do not alter the architecture, e.g. ``postprocess.score_thresh=0.3``).

"fp32" on CUDA follows torch's TF32 switches, which this backend leaves alone (they are process-wide):
``torch.backends.cudnn.allow_tf32`` is on by default, so convolutions round their inputs to TF32 and
results differ from the CPU's by more than fp32 rounding; turn it off for CPU-close fp32.

CUDA graphs: each new shape is warmed up on a side stream (compilation, cuDNN algorithm choice) and
captured on the backend's device, with autocast's weight cache off (as torch requires under capture:
a cast cached during a capture is released when autocast exits, while every replay writes and reads
that memory again) and ``capture_error_mode="thread_local"``, so that other
threads using CUDA meanwhile (the Detector decodes outside the lock) neither fail nor break the
capture. Replays copy the input into the graph's static buffer and clone the outputs.

Thread safety: one network call at a time, under a lock (CUDA graphs replay static buffers and
compiled modules recompile on new shapes; torch's own kernels already use every core). Decoding and
NMS run after the lock is released, in the caller's thread.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from msad_deploy.models.build import load_model
from msad_deploy.models.head import FCOSOutputs
from msad_deploy.models.postprocess import Detections
from msad_deploy.runtime.backends.base import Backend, resolve_device
from msad_deploy.runtime.preprocess import PreparedBatch, frame_detections, inference_network

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# torch.compile modes that capture CUDA graphs themselves (cudagraph trees): not inside our own capture.
GRAPHING_COMPILE_MODES = ("reduce-overhead", "max-autotune")


def _clone_outputs(outputs: FCOSOutputs) -> FCOSOutputs:
    return type(outputs)(*([t.clone() for t in field] for field in outputs))


class TorchBackend(Backend):
    name = "pytorch"
    thread_safety = "one network call at a time under a lock; decoding and NMS run outside it"

    def __init__(
        self,
        path: str | Path,
        device: str | torch.device = "auto",
        compile: bool = False,
        compile_options: dict[str, Any] | None = None,
        cuda_graphs: bool = False,
        max_graphs: int = 8,
        channels_last: bool = False,
        precision: str = "fp32",
        branch: str = "fused",
        overrides: list[str] | None = None,
    ) -> None:
        path = Path(path)
        device = resolve_device(device)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        if cuda_graphs and device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a CUDA device; this Detector runs on {device}")
        mode = (compile_options or {}).get("mode")
        if cuda_graphs and compile and mode in GRAPHING_COMPILE_MODES:
            raise ValueError(
                f"compile mode {mode!r} captures CUDA graphs itself; use it without cuda_graphs=True, or "
                "cuda_graphs=True with the default mode (or 'max-autotune-no-cudagraphs')"
            )
        if precision == "bf16" and device.type == "cuda":
            with torch.cuda.device(device):
                if not torch.cuda.is_bf16_supported():
                    raise ValueError(
                        f"precision 'bf16': {torch.cuda.get_device_name(device)} has no bfloat16"
                    )
        loaded = load_model(path, "cpu", overrides, branch)
        super().__init__(path, loaded.spec, None, device)
        self.config = loaded.config
        self.checkpoint_version = loaded.checkpoint.get("version")
        network = inference_network(loaded.model, loaded.spec).eval().to(device)
        if channels_last:
            network = network.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        self.autocast_dtype = PRECISIONS[precision]
        self.precision = precision
        self.network = torch.compile(network, **(compile_options or {})) if compile else network
        self.compiled = compile
        self.cuda_graphs = cuda_graphs
        self.max_graphs = max(1, int(max_graphs))
        self._graphs: OrderedDict[tuple[int, ...], tuple[Any, torch.Tensor, FCOSOutputs]] = OrderedDict()
        self._lock = threading.Lock()

    def set_input_spec(self, spec) -> None:
        """As for any backend; the checkpoint's config follows (``msad eval`` resizes by it), so this
        equals loading with ``overrides=["input.test_min_size=S", "input.test_max_size=M",
        "input.size_divisibility=D"]``."""
        super().set_input_spec(spec)
        self.config.input.test_min_size = spec.test_min_size
        self.config.input.test_max_size = spec.test_max_size
        self.config.input.size_divisibility = spec.size_divisibility

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        # No weight-cast cache under CUDA graphs (torch.cuda.make_graphed_callables refuses it too): a cast
        # cached during a capture is released when autocast exits, while every replay reuses its memory.
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=not self.cuda_graphs)

    def _forward(self, inputs: torch.Tensor) -> FCOSOutputs:
        with self._autocast():
            return self.network(inputs)

    def _graphed(self, inputs: torch.Tensor) -> FCOSOutputs:
        """Replay (capturing on first sight) the CUDA graph of this input shape; outputs are cloned."""
        key = (*inputs.shape, inputs.is_contiguous(memory_format=torch.channels_last))
        with torch.cuda.device(self.device):  # capture and replay on the backend's device, not the current
            entry = self._graphs.get(key)
            if entry is None:
                entry = self._capture(inputs)
                self._graphs[key] = entry
                while len(self._graphs) > self.max_graphs:
                    self._graphs.popitem(last=False)
            self._graphs.move_to_end(key)
            graph, static_in, static_out = entry
            static_in.copy_(inputs)
            graph.replay()
            return _clone_outputs(static_out)

    def _capture(self, inputs: torch.Tensor) -> tuple[Any, torch.Tensor, FCOSOutputs]:
        static_in = inputs.clone()  # keeps the memory format
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(2):  # warm up outside the capture: compilation, cuDNN algorithms, lazy init
                self._forward(static_in)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_out = self._forward(static_in)
        return graph, static_in, static_out

    def infer(self, batch: PreparedBatch) -> Detections:
        inputs = batch.inputs.to(self.device)
        if self.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with self._lock, torch.inference_mode():
            outputs = self._graphed(inputs) if self.cuda_graphs else self._forward(inputs)
        with torch.inference_mode():
            return frame_detections(outputs, batch.image_sizes.to(self.device), self.spec)

    def close(self) -> None:
        with self._lock:
            self._graphs.clear()
            self.network = None

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "precision": self.precision,
            "compile": self.compiled,
            "cuda_graphs": self.cuda_graphs,
            "channels_last": self.channels_last,
        }
