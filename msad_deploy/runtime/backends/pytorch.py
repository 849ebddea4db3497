"""PyTorch eager backend: a training checkpoint (``.pt`` / ``.pth``) rebuilt with its config.

Options: ``compile=True`` (``torch.compile`` of the network; ``compile_options`` go to it, e.g.
``{"mode": "max-autotune"}``), ``cuda_graphs=True`` (CUDA only: one captured graph per input
shape, replayed; at most ``max_graphs`` shapes kept), ``channels_last=True``, ``precision`` "fp32"
(default), "bf16" or "fp16" (autocast of the network; decoding and NMS stay float32), ``branch``
(teacher checkpoints: "fused", "hr" or "lr") and ``overrides`` (``key=value`` config changes that
do not alter the architecture, e.g. ``postprocess.score_thresh=0.3``).

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

    def set_test_size(self, spec) -> None:
        """As for any backend; the checkpoint's config follows (``msad eval`` resizes by it), so this
        equals loading with ``overrides=["input.test_min_size=S", "input.test_max_size=M"]``."""
        super().set_test_size(spec)
        self.config.input.test_min_size = spec.test_min_size
        self.config.input.test_max_size = spec.test_max_size

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _forward(self, inputs: torch.Tensor) -> FCOSOutputs:
        with self._autocast():
            return self.network(inputs)

    def _graphed(self, inputs: torch.Tensor) -> FCOSOutputs:
        """Replay (capturing on first sight) the CUDA graph of this input shape; outputs are cloned."""
        key = tuple(inputs.shape)
        entry = self._graphs.get(key)
        if entry is None:
            static_in = inputs.clone()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # warm up kernels (cudnn autotuning, lazy init) outside the capture
                    self._forward(static_in)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self._forward(static_in)
            entry = (graph, static_in, static_out)
            self._graphs[key] = entry
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        graph, static_in, static_out = entry
        static_in.copy_(inputs)
        graph.replay()
        return _clone_outputs(static_out)

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
