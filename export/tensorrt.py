"""Build a serialized TensorRT engine from an exported ONNX file and its JSON sidecar.

    msad export tensorrt model.onnx --out model.engine --max-batch 8 --max-size 704x704

Two halves. :func:`plan_build` is pure Python: from the sidecar (I/O names, dtypes, shapes with
symbolic "batch"/"height"/"width" dims, spec), what the ONNX graph contains (:class:`GraphFacts`:
Q/DQ nodes, fp16 tensors, the ``EfficientNMS_TRT`` plugin) and :class:`EngineOptions`, it decides
the optimization-profile shapes per input, the network and builder flags and the engine precision,
and refuses impossible combinations, for TensorRT 10 or 11 (``trt_major`` is a parameter, so the
rules are tested without TensorRT). :func:`build_engine` runs that plan with TensorRT's builder and
writes a plain serialized engine (``trtexec --loadEngine`` and Triton load it as is) plus the sidecar
``ENGINE.json``.

Precision, by TensorRT major version:

* 10: weakly typed by default: ``--fp16`` sets ``BuilderFlag.FP16`` (TensorRT may pick fp16 kernels);
  an fp16 ONNX graph is built STRONGLY_TYPED (its own types, no precision flags); a graph with
  QuantizeLinear/DequantizeLinear nodes sets ``BuilderFlag.INT8`` (explicit quantization);
  ``--int8`` without Q/DQ nodes needs entropy calibration from an existing cache (``--calib-cache``).
* 11: every network is strongly typed and the FP16/INT8 flags and calibrators are gone: precision
  comes only from the ONNX graph (export with ``--precision fp16`` / ``--precision int8``), and the
  ``EfficientNMS_TRT`` plugin is not supported (export with ``--nms ort``: ONNX NonMaxSuppression,
  which TensorRT maps to its NMS layer).

Only the full ``tensorrt`` package has the builder; ``tensorrt_lean`` only runs engines.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msad_deploy.runtime.artifacts import (
    atomic_path,
    check_metadata,
    metadata_spec,
    read_sidecar,
    sha256_file,
    write_sidecar,
)

SUPPORTED_MAJORS = (10, 11)
INSTALL_HINT = (
    "install the TensorRT builder on a machine with an NVIDIA GPU: `pip install msad-deploy[tensorrt]` "
    "or `pip install tensorrt --extra-index-url https://pypi.nvidia.com` (tensorrt-lean can only run engines)"
)
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
EFFICIENT_NMS_OP = "EfficientNMS_TRT"
DEFAULT_MAX_BATCH = 8
# Frames (uint8 input of a graph with in-graph preprocessing) take any size: these bound the profile.
DEFAULT_FRAME_MIN = (32, 32)
DEFAULT_FRAME_MAX = (4096, 4096)
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


class TensorRTUnavailableError(ImportError, ValueError):
    """``tensorrt`` (the builder) does not import. A ValueError too, so ``msad`` prints it as one line."""


# ---------------------------------------------------------------------------------------------------
# Version detection


def _parse_version(text: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", text)
    if not match:
        raise ValueError(f"cannot read the TensorRT version {text!r}")
    return int(match.group(1)), int(match.group(2))


def tensorrt_version() -> tuple[int, int] | None:
    """(major, minor) of the importable ``tensorrt`` package, or None when it does not import."""
    try:
        import tensorrt
    except (ImportError, OSError):  # OSError: the wheel is there but libnvinfer cannot load
        return None
    return _parse_version(tensorrt.__version__)


def require_tensorrt():
    """The ``tensorrt`` module (10.x or 11.x), or a one-line error saying how to install it."""
    try:
        import tensorrt
    except (ImportError, OSError) as err:
        lean = ""
        try:
            import tensorrt_lean  # noqa: F401

            lean = "only tensorrt_lean is installed, which runs engines but cannot build them; "
        except (ImportError, OSError):
            pass
        raise TensorRTUnavailableError(
            f"building a TensorRT engine needs the `tensorrt` package, which does not import here "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no message'}); {lean}{INSTALL_HINT}",
            name="tensorrt",
        ) from err
    major, minor = _parse_version(tensorrt.__version__)
    if major not in SUPPORTED_MAJORS:
        raise TensorRTUnavailableError(
            f"TensorRT {major}.{minor} is installed but msad export supports TensorRT 10 and 11; "
            "`pip install 'tensorrt>=10,<12'`",
            name="tensorrt",
        )
    return tensorrt


# ---------------------------------------------------------------------------------------------------
# What the ONNX graph contains


@dataclass(frozen=True)
class GraphFacts:
    """What in the ONNX graph changes how TensorRT must build it."""

    has_qdq: bool = False  # QuantizeLinear / DequantizeLinear nodes: explicit int8 quantization
    has_fp16: bool = False  # float16 initializers, I/O or casts: an fp16 graph (exported --precision fp16)
    has_efficient_nms: bool = False  # the EfficientNMS_TRT plugin node (exported --nms trt)

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> GraphFacts:
        """Best guess from the sidecar alone (precision and nms keys), when the graph cannot be read."""
        precision = metadata.get("precision", "fp32")
        # nms "trt" exported for TensorRT 11 is ONNX NonMaxSuppression (11 has no EfficientNMS_TRT).
        plugin = metadata.get("nms") == "trt" and metadata.get("trt_version") != 11
        return cls(has_qdq=precision == "int8", has_fp16=precision == "fp16", has_efficient_nms=plugin)


def inspect_onnx(path: str | Path) -> GraphFacts:
    """Scan the ONNX graph (subgraphs included, external weights not loaded) for :class:`GraphFacts`."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf DecodeError and friends: not an ONNX file
        raise ValueError(
            f"{path} is not a readable ONNX file ({type(err).__name__}: {err}); re-export it"
        ) from err
    fp16 = onnx.TensorProto.FLOAT16
    ops: set[str] = set()
    has_fp16 = False

    def visit(graph) -> None:
        nonlocal has_fp16
        for tensor in graph.initializer:
            has_fp16 |= tensor.data_type == fp16
        for value in list(graph.input) + list(graph.output):
            has_fp16 |= value.type.tensor_type.elem_type == fp16
        for node in graph.node:
            ops.add(node.op_type)
            for attr in node.attribute:
                if node.op_type == "Cast" and attr.name == "to":
                    has_fp16 |= attr.i == fp16
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        visit(sub)
                elif attr.type == onnx.AttributeProto.TENSOR:
                    has_fp16 |= attr.t.data_type == fp16

    visit(model.graph)
    return GraphFacts(
        has_qdq=bool(ops & QDQ_OPS), has_fp16=has_fp16, has_efficient_nms=EFFICIENT_NMS_OP in ops
    )


# ---------------------------------------------------------------------------------------------------
# Options and the build plan


@dataclass
class EngineOptions:
    """What the user asks of the engine; None sizes mean "derive from the sidecar's spec".

    Sizes are (height, width) of the spatial input: the network input ``images`` (a multiple of
    spec.size_divisibility / 2**input_shift) or, for a graph with in-graph preprocessing, the uint8
    ``frames`` (any size).
    """

    workspace_gib: float = 4.0
    fp16: bool = False
    int8: bool = False
    int8_calibration: str = "qdq"  # "qdq": Q/DQ nodes in the graph; "entropy": TensorRT 10 calibration cache
    calibration_cache: Path | None = None
    min_batch: int | None = None
    opt_batch: int | None = None
    max_batch: int | None = None
    min_size: tuple[int, int] | None = None
    opt_size: tuple[int, int] | None = None
    max_size: tuple[int, int] | None = None
    timing_cache: Path | None = None
    version_compatible: bool = False
    builder_optimization_level: int | None = None  # 0..5; None keeps TensorRT's default (3)


@dataclass
class BuildPlan:
    """Everything :func:`build_engine` will set, decided without TensorRT (see :func:`plan_build`)."""

    trt_major: int
    # input name -> {"min": shape, "opt": shape, "max": shape}; fixed inputs have min == opt == max.
    profiles: dict[str, dict[str, list[int]]]
    needs_profile: bool  # some input has a dynamic dimension
    strongly_typed: bool  # create the network with NetworkDefinitionCreationFlag.STRONGLY_TYPED (10)
    builder_flags: list[str]  # names in trt.BuilderFlag to set
    precision: str  # "fp32" | "fp16" | "int8": what the engine computes in
    int8_calibration: str | None  # "qdq" | "entropy" | None
    calibration_cache: str | None
    plugins: bool  # call trt.init_libnvinfer_plugins (EfficientNMS_TRT)
    workspace_bytes: int
    timing_cache: str | None
    builder_optimization_level: int | None
    version_compatible: bool
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_positive(value: int | None, option: str) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{option} must be at least 1 (got {value})")


def _size_text(size: tuple[int, int] | list[int]) -> str:
    return f"{size[0]}x{size[1]}"


def _dim_role(dim: int | str, input_name: str) -> str:
    """'fixed', 'batch', 'height' or 'width' for one sidecar dimension."""
    if isinstance(dim, int):
        if dim < 1:
            raise ValueError(
                f"input {input_name!r} has an unknown dimension ({dim}); re-export the ONNX model with "
                "msad export onnx (its sidecar names dynamic dims batch/height/width)"
            )
        return "fixed"
    text = str(dim).lower()
    if "batch" in text:
        return "batch"
    if "height" in text:
        return "height"
    if "width" in text:
        return "width"
    raise ValueError(
        f"input {input_name!r} has a symbolic dimension {dim!r} that is neither batch, height nor width; "
        "re-export the ONNX model with msad export (its sidecar names dynamic dims batch/height/width)"
    )


def _batch_profile(options: EngineOptions, fixed_batches: set[int], dynamic: bool) -> tuple[int, int, int]:
    for value, option in (
        (options.min_batch, "--min-batch"),
        (options.opt_batch, "--opt-batch"),
        (options.max_batch, "--max-batch"),
    ):
        _check_positive(value, option)
    given = [options.min_batch, options.opt_batch, options.max_batch]
    if not dynamic:
        batch = next(iter(fixed_batches)) if fixed_batches else 1
        for value, option in zip(given, ("--min-batch", "--opt-batch", "--max-batch")):
            if value is not None and value != batch:
                raise ValueError(
                    f"{option} {value}: the ONNX model has a fixed batch of {batch}; drop {option} or "
                    "re-export the ONNX model with a dynamic batch dimension"
                )
        return batch, batch, batch
    high = options.max_batch or max(DEFAULT_MAX_BATCH, options.opt_batch or 1, options.min_batch or 1)
    opt = options.opt_batch or high
    low = options.min_batch or min(1, opt)
    if not low <= opt <= high:
        raise ValueError(
            f"batch sizes must satisfy --min-batch <= --opt-batch <= --max-batch (got {low}, {opt}, {high})"
        )
    return low, opt, high


def _round_down(size: tuple[int, int], step: int) -> tuple[int, int]:
    return tuple(max(step, (v // step) * step) for v in size)  # type: ignore[return-value]


def _spatial_defaults(metadata: dict[str, Any], frames: bool) -> tuple[tuple[int, int], ...]:
    """Default (min, opt, max) (h, w): the spec's test sizes (landscape opt, square max)."""
    spec = metadata_spec(metadata)
    if frames:
        return DEFAULT_FRAME_MIN, (spec.test_min_size, spec.test_max_size), DEFAULT_FRAME_MAX
    divisor = spec.input_divisor
    step = _network_step(metadata)

    def padded(v: int) -> int:  # HR size padded to size_divisibility, then down to the network input
        return math.ceil(v / spec.size_divisibility) * spec.size_divisibility // divisor

    return (
        (step, step),
        (padded(spec.test_min_size), padded(spec.test_max_size)),
        (padded(spec.test_max_size), padded(spec.test_max_size)),
    )


def _network_step(metadata: dict[str, Any]) -> int:
    spec = metadata_spec(metadata)
    if spec.size_divisibility % spec.input_divisor:
        raise ValueError(
            f"spec size_divisibility {spec.size_divisibility} is not a multiple of 2**input_shift "
            f"({spec.input_divisor}); re-export the model"
        )
    return max(1, spec.size_divisibility // spec.input_divisor)


def _spatial_profile(
    metadata: dict[str, Any], options: EngineOptions, frames: bool
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(min, opt, max) (h, w) for the spatial input; given sizes are checked, defaults fitted around them."""
    names = ("--min-size", "--opt-size", "--max-size")
    given = [options.min_size, options.opt_size, options.max_size]
    step = 1 if frames else _network_step(metadata)
    for size, option in zip(given, names):
        if size is None:
            continue
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"{option} must be HxW with positive sizes (got {size})")
        if not frames and (size[0] % step or size[1] % step):
            spec = metadata_spec(metadata)
            fixed = _size_text([max(step, round(v / step) * step) for v in size])
            raise ValueError(
                f"{option} {_size_text(size)}: the network input must be a multiple of {step} "
                f"(spec size_divisibility {spec.size_divisibility} / 2**input_shift {spec.input_divisor}); "
                f"use e.g. {option} {fixed}"
            )
    d_min, d_opt, d_max = _spatial_defaults(metadata, frames)
    g_min, g_opt, g_max = given
    # Defaults are fitted around the sizes given: max covers them, opt lies within, min below opt.
    high = g_max or tuple(max([d_max[i]] + [g[i] for g in (g_min, g_opt) if g]) for i in range(2))
    opt = g_opt or _round_down(
        tuple(min(max(d_opt[i], g_min[i] if g_min else 0), high[i]) for i in range(2)), step
    )
    low = g_min or tuple(min(d_min[i], opt[i]) for i in range(2))
    for i, axis in enumerate(("height", "width")):
        if not low[i] <= opt[i] <= high[i]:
            raise ValueError(
                f"{axis}s must satisfy --min-size <= --opt-size <= --max-size "
                f"(got {_size_text(low)}, {_size_text(opt)}, {_size_text(high)})"
            )
    return tuple(low), tuple(opt), tuple(high)  # type: ignore[return-value]


def plan_profiles(
    metadata: dict[str, Any], options: EngineOptions
) -> tuple[dict[str, dict[str, list[int]]], bool]:
    """Optimization-profile shapes per input from the sidecar shapes; True when any dim is dynamic.

    Fixed dims stay; "batch" takes (min, opt, max) batch; "height"/"width" the (min, opt, max) size
    of that input (the network input ``images``: multiples of the spec's divisibility; uint8
    ``frames``: any size).
    """
    roles = {i["name"]: [_dim_role(d, i["name"]) for d in i["shape"]] for i in metadata["inputs"]}
    dynamic = any(r != "fixed" for rs in roles.values() for r in rs)
    batch_dynamic = any("batch" in rs for rs in roles.values())
    fixed_batches = {
        int(i["shape"][0]) for i in metadata["inputs"] if i["shape"] and roles[i["name"]][0] == "fixed"
    }
    batch = _batch_profile(options, fixed_batches if not batch_dynamic else set(), batch_dynamic)
    spatial_inputs = [i for i in metadata["inputs"] if {"height", "width"} & set(roles[i["name"]])]
    if not spatial_inputs:
        for value, option in (
            (options.min_size, "--min-size"),
            (options.opt_size, "--opt-size"),
            (options.max_size, "--max-size"),
        ):
            if value is not None:
                raise ValueError(f"{option}: the ONNX model has fixed spatial input sizes; drop {option}")
    profiles: dict[str, dict[str, list[int]]] = {}
    for info in metadata["inputs"]:
        name, shape = info["name"], info["shape"]
        role = roles[name]
        sizes = None
        if {"height", "width"} & set(role):
            sizes = _spatial_profile(metadata, options, frames=info.get("dtype") == "uint8")
        entry: dict[str, list[int]] = {}
        for k, key in enumerate(("min", "opt", "max")):
            dims = []
            for dim, r in zip(shape, role):
                if r == "fixed":
                    dims.append(int(dim))
                elif r == "batch":
                    dims.append(batch[k])
                else:
                    dims.append(sizes[k][0 if r == "height" else 1])  # type: ignore[index]
            entry[key] = dims
        profiles[name] = entry
    return profiles, dynamic


def plan_build(
    metadata: dict[str, Any],
    options: EngineOptions,
    trt_major: int,
    graph: GraphFacts | None = None,
) -> BuildPlan:
    """What a build with TensorRT ``trt_major`` will set, or a ValueError naming the option to change.

    ``graph`` describes the ONNX graph (:func:`inspect_onnx`); without it the sidecar's precision
    and nms keys stand in.
    """
    metadata = check_metadata(metadata, "ONNX sidecar")
    kind = metadata.get("kind", "onnx")
    if kind != "onnx":
        raise ValueError(
            f"msad export tensorrt builds from an ONNX artifact; this sidecar is a {kind!r} artifact"
        )
    if trt_major not in SUPPORTED_MAJORS:
        raise ValueError(f"TensorRT {trt_major} is not supported; msad export supports TensorRT 10 and 11")
    graph = graph or GraphFacts.from_metadata(metadata)
    if (metadata.get("calibration") or {}).get("activations") == "uint8":
        raise ValueError(
            "this int8 ONNX file was quantised for ONNX Runtime (asymmetric uint8 activations), which "
            "TensorRT does not build; export the engine's int8 ONNX with `msad export onnx --nms trt "
            "--precision int8` (symmetric int8), or build from the fp32 export"
        )
    if options.workspace_gib <= 0:
        raise ValueError(f"--workspace-gib must be positive (got {options.workspace_gib})")
    level = options.builder_optimization_level
    if level is not None and not 0 <= level <= 5:
        raise ValueError(f"--opt-level must be 0..5 (got {level})")
    if options.int8_calibration not in ("qdq", "entropy"):
        raise ValueError(f"int8 calibration must be 'qdq' or 'entropy' (got {options.int8_calibration!r})")
    entropy = options.int8_calibration == "entropy"

    notes: list[str] = []
    flags: list[str] = []
    strongly_typed = trt_major >= 11
    plugins = False
    calibration_cache = None
    int8_mode: str | None = None

    if graph.has_efficient_nms:
        if trt_major >= 11:
            raise ValueError(
                "the ONNX graph uses the EfficientNMS_TRT plugin, which TensorRT 11 does not support; "
                "export with --nms ort (ONNX NonMaxSuppression, built as TensorRT's NMS layer)"
            )
        if options.version_compatible:
            raise ValueError(
                "--version-compatible with the EfficientNMS_TRT plugin would need TensorRT's plugin library "
                "serialized into the engine; export with --nms ort or drop --version-compatible"
            )
        plugins = True

    if trt_major >= 11:
        if entropy or options.calibration_cache is not None:
            raise ValueError(
                "entropy calibration (--calib-cache) was removed in TensorRT 11; export with --precision int8 "
                "(Q/DQ nodes) instead"
            )
        if options.int8 and not graph.has_qdq:
            raise ValueError(
                "--int8 on TensorRT 11 needs Q/DQ nodes in the ONNX graph (11 has no INT8 flag or calibrators); "
                "export with --precision int8"
            )
        if options.fp16 and not graph.has_fp16:
            raise ValueError(
                "--fp16 on TensorRT 11 needs an fp16 ONNX graph (11 builds every network strongly typed, "
                "with no FP16 flag); export with --precision fp16"
            )
        if options.fp16 or options.int8:
            notes.append(
                "TensorRT 11: precision comes from the ONNX graph's types; --fp16/--int8 set no flag"
            )
        int8_mode = "qdq" if graph.has_qdq else None
    else:
        if entropy:
            if not options.int8:
                raise ValueError("--calib-cache (entropy calibration) needs --int8")
            if graph.has_qdq:
                raise ValueError(
                    "--calib-cache: the ONNX graph already has Q/DQ nodes (explicit quantization); drop --calib-cache"
                )
            if options.calibration_cache is None:
                raise ValueError(
                    "entropy calibration needs --calib-cache PATH (an existing calibration cache)"
                )
            if not Path(options.calibration_cache).is_file():
                raise FileNotFoundError(
                    f"--calib-cache {options.calibration_cache} does not exist; entropy calibration here replays "
                    "a cache written by an earlier calibration (trtexec --calib / polygraphy), or export with "
                    "--precision int8 (Q/DQ nodes) and drop --calib-cache"
                )
            calibration_cache = str(options.calibration_cache)
        elif options.calibration_cache is not None:
            raise ValueError("--calib-cache is only used with entropy calibration; drop it or pass --int8")
        elif options.int8 and not graph.has_qdq:
            raise ValueError(
                "--int8 needs Q/DQ nodes in the ONNX graph (export with --precision int8) or, on TensorRT 10, "
                "an entropy calibration cache (--calib-cache PATH)"
            )
        if graph.has_fp16 and not entropy:
            # The graph states its types (fp16, with or without Q/DQ): keep them exactly; no precision flags.
            strongly_typed = True
        else:
            if options.fp16:
                flags.append("FP16")
            if graph.has_qdq or entropy:
                flags.append("INT8")
            if graph.has_qdq and not options.int8:
                notes.append("the ONNX graph has Q/DQ nodes: building int8 (explicit quantization)")
        int8_mode = "qdq" if graph.has_qdq else ("entropy" if entropy else None)

    if graph.has_qdq or int8_mode == "entropy":
        precision = "int8"
    elif graph.has_fp16 or "FP16" in flags:
        precision = "fp16"
    else:
        precision = "fp32"
    if options.version_compatible:
        flags.append("VERSION_COMPATIBLE")
        notes.append("version-compatible engine: newer TensorRT runtimes can load it too (it may run slower)")
    if options.timing_cache is not None and Path(options.timing_cache).is_dir():
        raise ValueError(f"--timing-cache {options.timing_cache} is a directory; give a file path")

    profiles, dynamic = plan_profiles(metadata, options)
    return BuildPlan(
        trt_major=trt_major,
        profiles=profiles,
        needs_profile=dynamic,
        strongly_typed=strongly_typed,
        builder_flags=flags,
        precision=precision,
        int8_calibration=int8_mode,
        calibration_cache=calibration_cache,
        plugins=plugins,
        workspace_bytes=int(options.workspace_gib * (1 << 30)),
        timing_cache=str(options.timing_cache) if options.timing_cache is not None else None,
        builder_optimization_level=level,
        version_compatible=options.version_compatible,
        notes=notes,
    )


# ---------------------------------------------------------------------------------------------------
# Engine sidecar


def engine_metadata(
    onnx_metadata: dict[str, Any],
    plan: BuildPlan,
    *,
    tensorrt_version: str,
    gpu: dict[str, Any] | None,
    source_onnx: str,
    source_onnx_sha256: str,
    artifact: str | None = None,
) -> dict[str, Any]:
    """The engine's sidecar: the ONNX sidecar (same I/O and spec) plus how the engine was built.

    ``artifact`` is the engine's file name (the ONNX sidecar's ``artifact`` names the ONNX file).
    """
    metadata = json.loads(json.dumps(onnx_metadata))  # deep copy, JSON-safe
    versions = dict(metadata.get("versions") or {})
    versions["tensorrt"] = tensorrt_version
    metadata.update(
        kind="tensorrt",
        precision=plan.precision,
        versions=versions,
        tensorrt={
            "version": tensorrt_version,
            "major": plan.trt_major,
            "gpu": gpu,
            "strongly_typed": plan.strongly_typed,
            "builder_flags": list(plan.builder_flags),
            "int8_calibration": plan.int8_calibration,
            "version_compatible": plan.version_compatible,
            "workspace_bytes": plan.workspace_bytes,
            "builder_optimization_level": plan.builder_optimization_level,
            "plugins": plan.plugins,
            "notes": list(plan.notes),
        },
        profiles=plan.profiles,
        source_onnx=source_onnx,
        source_onnx_sha256=source_onnx_sha256,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    if artifact is not None or "artifact" in metadata:
        metadata["artifact"] = artifact
    return metadata


def _gpu_info() -> dict[str, Any] | None:
    """Name and compute capability of CUDA device 0 (via torch), or None."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return {"name": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}"}


# ---------------------------------------------------------------------------------------------------
# The real build


def _parser_errors(parser) -> str:
    """Every ONNX parser error on one line: 'node N (op 'name'): description'."""
    messages = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        desc = error.desc() if hasattr(error, "desc") else str(error)
        where = []
        node = error.node() if hasattr(error, "node") else -1
        if node is not None and node >= 0:
            where.append(f"node {node}")
        op = error.node_operator() if hasattr(error, "node_operator") else ""
        name = error.node_name() if hasattr(error, "node_name") else ""
        if op or name:
            where.append(f"{op} {name!r}".strip())
        messages.append((" ".join(where) + ": " if where else "") + " ".join(str(desc).split()))
    return "; ".join(messages) or "no parser error recorded"


def _cache_calibrator(trt, cache_path: Path):
    """An IInt8EntropyCalibrator2 (TensorRT 10) that replays an existing calibration cache, no data."""

    class CacheCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            super().__init__()
            self._cache = Path(cache_path).read_bytes()

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names):  # no data: TensorRT uses the cache
            return None

        def read_calibration_cache(self):
            return self._cache

        def write_calibration_cache(self, cache) -> None:
            return None

    return CacheCalibrator()


def _builder_flag(trt, name: str):
    flag = getattr(trt.BuilderFlag, name, None)
    if flag is None:
        raise ValueError(
            f"TensorRT {trt.__version__} has no BuilderFlag.{name}; see msad export tensorrt --help"
        )
    return flag


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    options: EngineOptions | None = None,
    *,
    verbose: bool = False,
) -> dict[str, Any]:
    """ONNX file (+ sidecar) -> serialized engine at ``engine_path`` (+ ``ENGINE.json``); returns the sidecar.

    The engine file is TensorRT's plain serialization (no header), written atomically. Its inputs
    and outputs keep the ONNX names, dtypes and (dynamic) shapes, within the planned profiles.
    """
    options = options or EngineOptions()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX file {onnx_path} does not exist; export one with `msad export onnx`")
    if engine_path.resolve() == onnx_path.resolve():
        raise ValueError(
            f"--out {engine_path} would overwrite the ONNX file; choose e.g. {onnx_path.with_suffix('.engine')}"
        )
    metadata = read_sidecar(onnx_path)
    try:
        graph = inspect_onnx(onnx_path)
    except ImportError:
        graph = GraphFacts.from_metadata(metadata)
    trt = require_tensorrt()
    major, _ = _parse_version(trt.__version__)
    plan = plan_build(metadata, options, major, graph)

    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    if plan.plugins:
        trt.init_libnvinfer_plugins(logger, "")
    try:
        builder = trt.Builder(logger)
    except (TypeError, RuntimeError) as err:  # pybind returns nullptr without a usable CUDA device
        raise ValueError(
            f"TensorRT could not create a builder ({err}); it needs an NVIDIA GPU with a working driver"
        ) from err
    flags = 0
    if plan.strongly_typed and major == 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    # TensorRT 10: explicit batch is the only mode (EXPLICIT_BATCH is deprecated and ignored);
    # TensorRT 11: every network is strongly typed (the STRONGLY_TYPED flag is deprecated and ignored).
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file: external weights resolve beside it
        raise ValueError(f"TensorRT {trt.__version__} could not parse {onnx_path}: {_parser_errors(parser)}")

    network_inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    if network_inputs != set(plan.profiles):
        raise ValueError(
            f"{onnx_path} has inputs {sorted(network_inputs)} but its sidecar lists {sorted(plan.profiles)}; "
            "re-export the model (the sidecar belongs to another graph)"
        )

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    for name in plan.builder_flags:
        config.set_flag(_builder_flag(trt, name))
    if plan.builder_optimization_level is not None:
        config.builder_optimization_level = plan.builder_optimization_level
    profile = None
    if plan.needs_profile:
        profile = builder.create_optimization_profile()
        for name, shapes in plan.profiles.items():
            profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
        config.add_optimization_profile(profile)
    if plan.int8_calibration == "entropy":  # TensorRT 10 only (plan_build refuses it on 11)
        config.int8_calibrator = _cache_calibrator(trt, Path(plan.calibration_cache))
        if profile is not None:
            config.set_calibration_profile(profile)
    timing_cache = None
    if plan.timing_cache is not None:
        cache_file = Path(plan.timing_cache)
        timing_cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
        if not config.set_timing_cache(timing_cache, ignore_mismatch=False):
            # Written on another GPU or TensorRT version: time every layer afresh and replace the file.
            print(f"note: timing cache {cache_file} does not match this GPU/TensorRT; starting a new one")
            timing_cache = config.create_timing_cache(b"")
            config.set_timing_cache(timing_cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ValueError(
            f"TensorRT {trt.__version__} failed to build an engine from {onnx_path} (see its messages above; "
            "rerun with --verbose for the full log)"
        )
    if timing_cache is not None:
        with atomic_path(plan.timing_cache) as tmp:
            tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(memoryview(serialized))
    result = engine_metadata(
        metadata,
        plan,
        tensorrt_version=trt.__version__,
        gpu=_gpu_info(),
        source_onnx=onnx_path.name,
        source_onnx_sha256=sha256_file(onnx_path),
        artifact=engine_path.name,
    )
    write_sidecar(engine_path, result)
    return result


# ---------------------------------------------------------------------------------------------------
# Command line


def parse_hw(text: str) -> tuple[int, int]:
    """'448x704' -> (448, 704) for argparse."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected HxW such as 448x704, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def register_tensorrt(subparsers) -> None:
    """``msad export tensorrt ONNX --out ENGINE [...]``."""
    cmd = subparsers.add_parser(
        "tensorrt",
        help="build a TensorRT engine from an exported ONNX file",
        description=(
            "Build a serialized TensorRT 10/11 engine from ONNX (+ its .json sidecar) and write ENGINE plus "
            "ENGINE.json. Dynamic inputs get one optimization profile: batch from --min/--opt/--max-batch, "
            "spatial size from --min/--opt/--max-size (network input: a multiple of the model's "
            "size_divisibility / 2**input_shift; uint8 frames: any size). TensorRT 11 takes precision from "
            "the ONNX graph only (export with --precision fp16/int8); TensorRT 10 also has --fp16 and "
            "--int8 (Q/DQ nodes, or --calib-cache)."
        ),
    )
    cmd.add_argument("onnx", type=Path, metavar="ONNX", help="ONNX file written by msad export onnx")
    cmd.add_argument(
        "--out", type=Path, required=True, metavar="ENGINE", help="engine file to write (.engine/.plan)"
    )
    cmd.add_argument(
        "--fp16",
        action="store_true",
        help="fp16 engine: TensorRT 10 sets BuilderFlag.FP16; TensorRT 11 needs an fp16 graph (--precision fp16)",
    )
    cmd.add_argument(
        "--int8",
        action="store_true",
        help="int8 engine from the graph's Q/DQ nodes (--precision int8), or on TensorRT 10 from --calib-cache",
    )
    cmd.add_argument(
        "--calib-cache",
        type=Path,
        metavar="PATH",
        help="TensorRT 10 only: existing int8 entropy calibration cache (with --int8, for a graph without Q/DQ)",
    )
    cmd.add_argument(
        "--workspace-gib", type=float, default=4.0, help="builder workspace limit in GiB (default 4)"
    )
    cmd.add_argument("--min-batch", type=int, help="smallest batch the engine accepts (default 1)")
    cmd.add_argument("--opt-batch", type=int, help="batch the kernels are tuned for (default: --max-batch)")
    cmd.add_argument(
        "--max-batch", type=int, help=f"largest batch the engine accepts (default {DEFAULT_MAX_BATCH})"
    )
    cmd.add_argument(
        "--min-size",
        type=parse_hw,
        metavar="HxW",
        help="smallest spatial input (default: one divisibility step)",
    )
    cmd.add_argument(
        "--opt-size",
        type=parse_hw,
        metavar="HxW",
        help="spatial size the kernels are tuned for (default: the spec's test size, landscape)",
    )
    cmd.add_argument(
        "--max-size",
        type=parse_hw,
        metavar="HxW",
        help="largest spatial input (default: the spec's max size, square)",
    )
    cmd.add_argument(
        "--timing-cache",
        type=Path,
        metavar="PATH",
        help="timing cache to load (if present) and save: faster rebuilds",
    )
    cmd.add_argument(
        "--version-compatible",
        action="store_true",
        help="engine that newer TensorRT runtimes can load too (BuilderFlag.VERSION_COMPATIBLE; may run slower)",
    )
    cmd.add_argument(
        "--opt-level", type=int, metavar="0-5", help="builder optimization level (default: TensorRT's, 3)"
    )
    cmd.add_argument("--verbose", action="store_true", help="print TensorRT's verbose build log")
    cmd.add_argument(
        "--dry-run",
        action="store_true",
        help="print the build plan (profiles, flags, precision) as JSON and build nothing",
    )
    cmd.add_argument(
        "--trt-major",
        type=int,
        choices=SUPPORTED_MAJORS,
        help="with --dry-run: plan for this TensorRT major instead of the installed one (no TensorRT needed)",
    )
    cmd.set_defaults(handler=run_tensorrt)


def options_from_args(args: argparse.Namespace) -> EngineOptions:
    return EngineOptions(
        workspace_gib=args.workspace_gib,
        fp16=args.fp16,
        int8=args.int8,
        int8_calibration="entropy" if args.calib_cache is not None else "qdq",
        calibration_cache=args.calib_cache,
        min_batch=args.min_batch,
        opt_batch=args.opt_batch,
        max_batch=args.max_batch,
        min_size=args.min_size,
        opt_size=args.opt_size,
        max_size=args.max_size,
        timing_cache=args.timing_cache,
        version_compatible=args.version_compatible,
        builder_optimization_level=args.opt_level,
    )


def run_tensorrt(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    if args.trt_major is not None and not args.dry_run:
        raise ValueError("--trt-major only applies to --dry-run; the build uses the installed TensorRT")
    if args.dry_run:
        if not args.onnx.is_file():
            raise FileNotFoundError(
                f"ONNX file {args.onnx} does not exist; export one with `msad export onnx`"
            )
        metadata = read_sidecar(args.onnx)
        try:
            graph = inspect_onnx(args.onnx)
        except ImportError:
            graph = GraphFacts.from_metadata(metadata)
        major = args.trt_major or _parse_version(require_tensorrt().__version__)[0]
        print(json.dumps(plan_build(metadata, options, major, graph).to_dict(), indent=2))
        return 0
    result = build_engine(args.onnx, args.out, options, verbose=args.verbose)
    size_mib = args.out.stat().st_size / (1 << 20)
    print(
        f"engine written to {args.out} ({size_mib:.1f} MiB, {result['precision']}, TensorRT {result['tensorrt']['version']})"
    )
    for name, shapes in result["profiles"].items():
        print(f"  {name}: min {shapes['min']}  opt {shapes['opt']}  max {shapes['max']}")
    for note in result["tensorrt"]["notes"]:
        print(f"note: {note}")
    return 0
