"""OpenVINO backend: ``.xml`` IRs (with their ``.bin`` weights) written by ``msad export openvino``.

The IR is the same graph as the ONNX export (network, decode, top-k, clip, NMS; or the decoded
outputs with ``--nms none``), so it is fed and read like an ONNX artifact: ``images`` float32
[B, 3, h, w] and ``image_sizes`` float32 [B, 2] (or uint8 ``frames`` [B, H, W, 3]) in, the four
contract outputs out (see docs/EXPORT.md). Inputs are numpy arrays on the host; OpenVINO copies them
to its device.

Devices: ``device`` is "cpu" or "auto" (OpenVINO's ``CPU``) or an OpenVINO device name (``GPU``,
``GPU.1``, ``NPU``, ``AUTO``, ...); one this machine does not have is an error listing
``ov.Core().available_devices``. CUDA is not an OpenVINO device. Torch tensors stay on the CPU.

Options: ``performance_hint`` "latency" (default: one request at a time as fast as it goes; one
CPU stream over all cores) or "throughput" (several streams, each running one request: for many
concurrent callers, e.g. ``msad serve`` under load); ``threads``: OpenVINO's
``inference_num_threads`` (default: OpenVINO's own, the physical cores); ``streams``: OpenVINO's
``num_streams`` (overrides the hint's choice). CPU pinning stays at OpenVINO's default.

Precision: an fp32 or int8 IR runs with OpenVINO's ``inference_precision`` hint pinned to f32 (the
CPU plugin would otherwise run float layers in bf16 on CPUs with AMX or AVX512-BF16); so the
network's float layers, decode and NMS are float32 as in the ONNX artifacts, and int8 IRs run their
quantised convolutions in int8. An fp16 IR (weights stored as fp16) runs at the device's default
precision (CPU: f32, or bf16 where the CPU has it; Intel GPUs: f16).

Thread safety: an ``InferRequest`` must not be used by two threads at once, while
``CompiledModel.create_infer_request`` may be called from any thread. The backend keeps a pool of
requests (a ``queue.SimpleQueue``): each call takes a free one, or creates one when none is free,
and puts it back after. Concurrent calls so run at once without a lock, the pool grows only to the
largest number of calls in flight (not to the number of threads ever seen, as one request per
thread would with threads that come and go, e.g. a server's executor), and with
``performance_hint="throughput"`` OpenVINO runs those requests in parallel streams.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import queue
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from msad_deploy.runtime.artifacts import ONNX_METADATA_KEY, read_sidecar, sidecar_path
from msad_deploy.runtime.backends.base import (
    GraphBackend,
    artifact_spec,
    check_io_against_spec,
    check_output_names,
    import_optional,
    load_metadata,
    parse_embedded,
)

# The rt_info key of the IR that holds the sidecar's content (as ONNX ``metadata_props`` do).
OPENVINO_METADATA_KEY = ONNX_METADATA_KEY
PERFORMANCE_HINTS = ("latency", "throughput")
VIRTUAL_DEVICES = ("AUTO", "MULTI", "HETERO", "BATCH")


@contextlib.contextmanager
def openvino_telemetry_off() -> Iterator[None]:
    """``CI=true`` for the block: the switch ``openvino-telemetry`` reads to send nothing.

    OpenVINO sends a usage event when it is first imported (``openvino.tools.ovc``) and on every
    ``convert_model``, and NNCF when it is imported and used, each from a forked sender process,
    unless the user opted out or ``CI`` is true. This project imports and calls them inside this
    block, so loading or exporting a model sends nothing and forks nothing."""
    saved = os.environ.get("CI")
    os.environ["CI"] = "true"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("CI", None)
        else:
            os.environ["CI"] = saved


def import_openvino(what: str) -> ModuleType:
    """``import openvino`` (telemetry off, see :func:`openvino_telemetry_off`) or a
    :class:`BackendUnavailableError` naming ``pip install 'msad-deploy[openvino]'``."""
    with openvino_telemetry_off():
        return import_optional("openvino", "openvino", what)


def weights_path(path: str | Path) -> Path:
    """``model.xml`` -> ``model.bin`` (OpenVINO reads the weights from the file of the same stem)."""
    return Path(path).with_suffix(".bin")


def ir_precision(model: Any) -> str:
    """ "int8" (FakeQuantize nodes), "fp16" (f16 constants: weights compressed to fp16) or "fp32", read from
    an ``ov.Model``."""
    types = {op.get_type_name() for op in model.get_ordered_ops()}
    if "FakeQuantize" in types or "FakeConvert" in types:
        return "int8"
    for op in model.get_ordered_ops():
        if op.get_type_name() == "Constant" and op.get_output_element_type(0).get_type_name() == "f16":
            return "fp16"
    return "fp32"


def openvino_device(device: str | torch.device, available: list[str]) -> str:
    """The OpenVINO device for ``device``: "auto"/"cpu" -> "CPU", an OpenVINO name checked against
    ``available``; errors name the fix."""
    text = str(device)
    listed = ", ".join(available) or "none"
    if text in ("auto", "cpu"):
        return "CPU"
    if text.startswith("cuda"):
        raise ValueError(
            f"device {text!r}: OpenVINO does not run on CUDA devices; use device='cpu' or an OpenVINO device "
            f"(available here: {listed})"
        )
    name = text.upper()
    kind, _, targets = name.partition(":")
    wanted = [t for t in targets.split(",") if t] if kind in VIRTUAL_DEVICES else [name]
    families = {d.split(".")[0] for d in available}
    missing = [d for d in wanted if d not in available and d not in families]
    if missing:
        raise ValueError(
            f"OpenVINO device {missing[0]!r} does not exist on this machine; available OpenVINO devices: {listed} "
            "(device='cpu' runs on the CPU)"
        )
    return name


def _first_line(err: BaseException) -> str:
    """The message of an OpenVINO exception without its source locations (its last non-empty line)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(err).__name__


class OpenVinoBackend(GraphBackend):
    """An OpenVINO IR compiled for one OpenVINO device, run through a pool of infer requests.

    ``extra_outputs`` adds intermediate tensors of the graph as outputs (export verification reads
    ``decoded_boxes`` / ``decoded_scores`` / ``network_input``).
    """

    name = "openvino"
    thread_safety = (
        "a pool of OpenVINO InferRequests: each call takes a free one (a new one when none is free), no lock"
    )

    def __init__(
        self,
        path: str | Path,
        metadata: dict[str, Any] | None = None,
        device: str | torch.device = "auto",
        threads: int | None = None,
        performance_hint: str = "latency",
        streams: int | None = None,
        extra_outputs: tuple[str, ...] = (),
    ) -> None:
        ov = import_openvino("the OpenVINO backend (.xml artifacts)")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(2, "no such OpenVINO IR", str(path))
        if performance_hint not in PERFORMANCE_HINTS:
            raise ValueError(
                f"performance_hint must be one of {', '.join(PERFORMANCE_HINTS)}, got {performance_hint!r}"
            )
        for option, value in (("threads", threads), ("streams", streams)):
            if value is not None and int(value) < 1:
                raise ValueError(f"{option} must be at least 1, got {value}")
        core = ov.Core()
        ov_device = openvino_device(device, list(core.available_devices))
        weights = weights_path(path)
        if not weights.is_file():
            raise ValueError(
                f"{path} has no weights file {weights.name} beside it: an OpenVINO IR is the .xml and its .bin; "
                "copy both, or re-export with `msad export openvino`"
            )
        try:
            model = core.read_model(str(path))
        except Exception as err:  # RuntimeError from the IR reader: bad XML, weights out of range, ...
            self._check_weights_size(path, weights)  # the likelier story, told more precisely
            raise ValueError(
                f"{path} is not a readable OpenVINO IR ({_first_line(err)}); re-export it with "
                "`msad export openvino` (its .xml and .bin belong together)"
            ) from err
        embedded = None
        if model.has_rt_info([OPENVINO_METADATA_KEY]):
            embedded = parse_embedded(model.get_rt_info([OPENVINO_METADATA_KEY]).astype(str), path)
        metadata = metadata or load_metadata(path, embedded)  # a sidecar of another export: an error here
        self._check_weights_size(path, weights)  # the .bin of another export of the same model
        if metadata.get("kind") not in (None, "openvino"):
            raise ValueError(
                f"{path}'s metadata describes a {metadata.get('kind')!r} artifact, not an OpenVINO IR; copy the "
                "sidecar written with this IR"
            )
        spec = artifact_spec(metadata, path)
        super().__init__(path, spec, metadata, torch.device("cpu"))
        self._layout_from_metadata(metadata)
        precision = ir_precision(model)
        if precision != metadata.get("precision", "fp32"):
            raise ValueError(
                f"{path} is an {precision} IR but its metadata says precision {metadata.get('precision')!r}; the "
                "sidecar belongs to another export"
            )
        if extra_outputs:
            try:
                model.add_outputs(list(extra_outputs))
            except Exception as err:
                raise ValueError(
                    f"{path} has no tensor among {list(extra_outputs)} ({_first_line(err)})"
                ) from err
        self.input_names = [port.get_any_name() for port in model.inputs]
        self.output_names = []
        for port in model.outputs:
            names = port.get_names()
            # the name the sidecar (or extra_outputs) uses, when the port carries several
            wanted = [n for n in (*(e["name"] for e in metadata["outputs"]), *extra_outputs) if n in names]
            name = wanted[0] if wanted else port.get_any_name()
            self.output_names.append(name)
        io = {}
        ports = [*model.inputs, *model.outputs]
        for name, port in zip(self.input_names + self.output_names, ports, strict=True):
            shape = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
            io[name] = (port.get_element_type().to_dtype().name, shape)
        check_output_names(self.output_names, metadata, path)
        check_io_against_spec(io, metadata, spec, path)

        properties = importlib.import_module("openvino.properties")
        hints = importlib.import_module("openvino.properties.hint")
        config: dict[Any, Any] = {
            hints.performance_mode: (
                hints.PerformanceMode.LATENCY
                if performance_hint == "latency"
                else hints.PerformanceMode.THROUGHPUT
            )
        }
        if threads is not None:
            config[properties.inference_num_threads] = int(threads)
        if streams is not None:
            config[properties.num_streams] = int(streams)
        supported = self._supported(core, ov_device)
        if precision in ("fp32", "int8") and "INFERENCE_PRECISION_HINT" in supported:
            config[hints.inference_precision] = ov.Type.f32
        try:
            self.compiled = core.compile_model(model, ov_device, config)
        except Exception as err:  # a device whose plugin does not load, a property it rejects
            raise ValueError(
                f"OpenVINO could not compile {path} for {ov_device} ({_first_line(err)}); available devices: "
                f"{', '.join(core.available_devices)}"
            ) from err
        self.ov_device = ov_device
        self.performance_hint = performance_hint
        self._requests: queue.SimpleQueue = queue.SimpleQueue()

    @staticmethod
    def _supported(core: Any, device: str) -> set[str]:
        try:
            return set(core.get_property(device, "SUPPORTED_PROPERTIES"))
        except Exception:  # virtual devices (AUTO, MULTI) may not list them
            return set()

    @staticmethod
    def _check_weights_size(path: Path, weights: Path) -> None:
        """A .bin whose size differs from the one the export wrote: truncated, or another IR's."""
        if not sidecar_path(path).is_file():
            return
        try:
            expected = read_sidecar(path).get("weights_bytes")
        except ValueError:
            return  # load_metadata reports what is wrong with the sidecar
        actual = weights.stat().st_size
        if expected is not None and actual != int(expected):
            raise ValueError(
                f"{weights} has {actual} bytes, but the export wrote {expected} (its sidecar's weights_bytes): the "
                "weights file is truncated or belongs to another IR; copy the .xml, .bin and .json of one export "
                "together, or re-export with `msad export openvino`"
            )

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One inference on a pooled request: output name -> array (copied out of the request)."""
        try:
            request = self._requests.get_nowait()
        except queue.Empty:
            request = self.compiled.create_infer_request()
        try:
            results = request.infer(feeds, share_inputs=True, share_outputs=False)
            outputs = {name: np.asarray(results[i]) for i, name in enumerate(self.output_names)}
        finally:
            self._requests.put(request)
        return outputs

    def close(self) -> None:
        self.compiled = None
        self._requests = queue.SimpleQueue()

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {**super().describe(), "ov_device": self.ov_device}
        info["performance_hint"] = self.performance_hint
        compiled = self.compiled
        if compiled is not None:
            for key, prop in (
                ("streams", "NUM_STREAMS"),
                ("threads", "INFERENCE_NUM_THREADS"),
                ("inference_precision", "INFERENCE_PRECISION_HINT"),
                ("optimal_requests", "OPTIMAL_NUMBER_OF_INFER_REQUESTS"),
            ):
                try:
                    value = compiled.get_property(prop)
                except Exception:  # not every device reports every property
                    continue
                if hasattr(value, "get_type_name"):  # an ov.Type
                    value = value.get_type_name()
                info[key] = value if isinstance(value, (int, str)) else str(value)
        return info
