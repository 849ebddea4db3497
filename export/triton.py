"""Write a Triton Inference Server model repository for an exported ONNX file or TensorRT engine.

    msad export triton model.onnx --repo models --name msad_student --max-batch 8

writes ``models/msad_student/config.pbtxt``, ``models/msad_student/labels.txt`` and
``models/msad_student/1/model.onnx`` (platform ``onnxruntime_onnx``; an engine becomes ``model.plan``,
platform ``tensorrt_plan``) with the artifact's sidecar beside it (``model.onnx.json``), so
msad-deploy's own runtime can load the copy too. Serve the repository with:

    docker run --gpus all --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 -v $PWD/models:/models \\
        nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models

(ports: 8000 HTTP, 8001 gRPC, 8002 metrics; drop ``--gpus all`` for ``--kind cpu``). ``<yy.mm>`` is
a Triton release: for an engine, the one whose TensorRT version built it (see the engine's
``.json``), since a plan only loads in that TensorRT unless it was built ``--version-compatible``
(then add ``--backend-config=tensorrt,version-compatible=true``).

The config follows the artifact's sidecar: a symbolic leading "batch" dim gives
``max_batch_size`` > 0 (dims then exclude the batch dim; a [B] tensor becomes dims [1] with an empty
reshape) and dynamic batching; a fixed batch gives ``max_batch_size: 0`` and full dims. Other
symbolic dims are -1. Inputs/outputs: ``images`` float32 [B, 3, h, w] (+ ``image_sizes`` [B, 2]) or
``frames`` uint8 [B, H, W, 3]; ``boxes`` [B, K, 4], ``scores`` [B, K], ``labels`` int64 [B, K],
``num_detections`` int64 [B] (or raw ``boxes``/``scores`` with nms "none").
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msad_deploy.runtime.artifacts import (
    atomic_path,
    metadata_spec,
    read_sidecar,
    sidecar_path,
    write_sidecar,
)

PLATFORMS = {"onnx": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}
MODEL_FILES = {"onnx": "model.onnx", "tensorrt": "model.plan"}
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
TRITON_DTYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "bfloat16": "TYPE_BF16",
    "float64": "TYPE_FP64",
    "uint8": "TYPE_UINT8",
    "int8": "TYPE_INT8",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "bool": "TYPE_BOOL",
}
DTYPE_ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
}
DEFAULT_MAX_BATCH = 8
LABELS_FILE = "labels.txt"
IMAGE = "nvcr.io/nvidia/tritonserver:<yy.mm>-py3"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class TritonOptions:
    """How to serve the artifact: model name and version, batching, instances."""

    name: str | None = None  # default: the artifact's file stem
    version: int = 1
    max_batch: int | None = None  # None: DEFAULT_MAX_BATCH, capped at an engine's profile max
    instances: int = 1
    kind: str = "gpu"  # "gpu" | "cpu"
    preferred_batch: list[int] = field(default_factory=list)
    max_queue_delay_us: int = 100
    overwrite: bool = False


@dataclass
class RepositoryResult:
    model_dir: Path
    version_dir: Path
    model_file: Path
    config_path: Path
    config_text: str
    docker_command: str
    notes: list[str]


# ---------------------------------------------------------------------------------------------------
# The config schema


@functools.lru_cache(maxsize=1)
def model_config_schema():
    """tritonclient's ``model_config_pb2`` module (protobuf schema of config.pbtxt), or None.

    ``tritonclient[http]`` ships the generated module but its ``tritonclient.grpc`` package refuses
    to import without grpc, so the file is loaded directly when the normal import fails.
    """
    try:
        from tritonclient.grpc import model_config_pb2

        return model_config_pb2
    except (ImportError, RuntimeError):
        pass
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    if not path.is_file():
        return None
    module_spec = importlib.util.spec_from_file_location("_msad_triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except ImportError:  # protobuf missing or too old for the generated code
        return None
    return module


def _text_value(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if key in ("data_type", "kind"):  # enums are written bare
        return str(value)
    return json.dumps(str(value))


def _to_text(message: dict[str, Any], indent: int = 0) -> list[str]:
    """Protobuf text format of a config dict (the fallback when tritonclient is absent)."""
    pad = "  " * indent
    lines: list[str] = []
    for key, value in message.items():
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, dict):
                lines.append(f"{pad}{key} {{")
                lines.extend(_to_text(item, indent + 1))
                lines.append(f"{pad}}}")
            else:
                lines.append(f"{pad}{key}: {_text_value(key, item)}")
    return lines


def render_config(config: dict[str, Any]) -> str:
    """config.pbtxt text: through tritonclient's ModelConfig schema if importable, else written directly.

    Through the schema, a misspelt field or wrong type fails here rather than when Triton loads it.
    """
    schema = model_config_schema()
    if schema is None:
        return "\n".join(_to_text(config)) + "\n"
    from google.protobuf import json_format, text_format

    message = json_format.ParseDict(config, schema.ModelConfig())
    return text_format.MessageToString(message)


# ---------------------------------------------------------------------------------------------------
# From the sidecar to a config


def artifact_kind(path: Path, metadata: dict[str, Any]) -> str:
    """'onnx' or 'tensorrt' (from the sidecar's kind, else the file suffix); others are refused."""
    kind = metadata.get("kind")
    if kind is None:
        suffix = path.suffix.lower()
        kind = (
            "onnx" if suffix == ".onnx" else "tensorrt" if suffix in ENGINE_SUFFIXES else suffix.lstrip(".")
        )
    if kind not in PLATFORMS:
        raise ValueError(
            f"{path} is a {kind!r} artifact; msad export triton serves ONNX files (onnxruntime_onnx) and "
            "TensorRT engines (tensorrt_plan): export one with msad export onnx / msad export tensorrt"
        )
    if kind == "onnx" and _uses_efficient_nms(path, metadata):
        raise ValueError(
            f"{path} uses TensorRT's EfficientNMS_TRT plugin, which ONNX Runtime cannot run; build an engine "
            "from it with msad export tensorrt, or export the ONNX model with --nms ort"
        )
    return kind


def _uses_efficient_nms(path: Path, metadata: dict[str, Any]) -> bool:
    """Whether the ONNX graph holds the EfficientNMS_TRT plugin node (read from the graph if possible)."""
    from msad_deploy.export.tensorrt import GraphFacts, inspect_onnx

    try:
        return inspect_onnx(path).has_efficient_nms
    except ImportError:
        return GraphFacts.from_metadata(metadata).has_efficient_nms


def _triton_dtype(dtype: str, name: str) -> str:
    key = DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if key not in TRITON_DTYPES:
        raise ValueError(
            f"tensor {name!r} has dtype {dtype!r}, which has no Triton data type; re-export the model"
        )
    return TRITON_DTYPES[key]


def _is_batch(dim: Any) -> bool:
    return isinstance(dim, str) and "batch" in dim.lower()


def batch_limits(path: Path, metadata: dict[str, Any], kind: str) -> tuple[bool, int | None, int | None]:
    """(batched, fixed batch or None, largest batch the artifact takes or None for unbounded).

    Batched means every input and output leads with a symbolic "batch" dim; an engine's bounds come
    from its optimization profile (``profiles`` in its sidecar).
    """
    tensors = list(metadata["inputs"]) + list(metadata["outputs"])
    leading = [t["shape"][0] if t["shape"] else None for t in tensors]
    batched = [_is_batch(d) for d in leading]
    if any(batched) and not all(batched):
        odd = [t["name"] for t, b in zip(tensors, batched) if not b]
        raise ValueError(
            f"{path}: {', '.join(odd)} do not lead with the batch dimension the other tensors have; "
            "Triton batches all inputs and outputs together; re-export the model"
        )
    if not any(batched):
        fixed = next((int(d) for d in leading if isinstance(d, int)), 1)
        return False, fixed, fixed
    if kind != "tensorrt":
        return True, None, None
    profiles = metadata.get("profiles")
    if not isinstance(profiles, dict) or not profiles:
        raise ValueError(
            f"{sidecar_path(path)} lacks the engine's optimization profiles; rebuild it with msad export tensorrt"
        )
    lows, highs = [], []
    for info in metadata["inputs"]:
        shapes = profiles.get(info["name"])
        if not shapes:
            raise ValueError(
                f"{sidecar_path(path)} has no profile for input {info['name']!r}; rebuild the engine"
            )
        lows.append(int(shapes["min"][0]))
        highs.append(int(shapes["max"][0]))
    if max(lows) > 1:
        raise ValueError(
            f"{path} was built for batches of at least {max(lows)} but Triton sends any batch from 1 up; "
            "rebuild it with msad export tensorrt --min-batch 1"
        )
    return True, None, min(highs)


def _io_entry(info: dict[str, Any], batched: bool) -> dict[str, Any]:
    shape = list(info["shape"][1:] if batched else info["shape"])
    dims = [d if isinstance(d, int) and d > 0 else -1 for d in shape]  # 0: unknown in the ONNX graph
    entry: dict[str, Any] = {"name": info["name"], "data_type": _triton_dtype(info["dtype"], info["name"])}
    if batched and not dims:
        # A [B] tensor: Triton needs dims [1] and an empty reshape to drop the 1 at the model.
        entry.update(dims=[1], reshape={"shape": []})
    else:
        entry["dims"] = dims
    return entry


def model_config(
    path: Path, metadata: dict[str, Any], kind: str, options: TritonOptions, name: str
) -> tuple[dict[str, Any], list[str]]:
    """The ModelConfig (as a dict with the proto's field names) and notes for the user."""
    notes: list[str] = []
    if options.instances < 1:
        raise ValueError(f"--instances must be at least 1 (got {options.instances})")
    if options.kind not in ("cpu", "gpu"):
        raise ValueError(f"--kind must be cpu or gpu (got {options.kind!r})")
    if kind == "tensorrt" and options.kind == "cpu":
        raise ValueError(
            "--kind cpu: a TensorRT engine runs only on a GPU; use --kind gpu or serve the ONNX file"
        )
    if options.max_queue_delay_us < 0:
        raise ValueError(f"--max-queue-delay-us must be >= 0 (got {options.max_queue_delay_us})")
    if options.max_batch is not None and options.max_batch < 1:
        raise ValueError(f"--max-batch must be at least 1 (got {options.max_batch})")

    batched, fixed, limit = batch_limits(path, metadata, kind)
    if not batched:
        if options.max_batch is not None and options.max_batch > (fixed or 1):
            raise ValueError(
                f"--max-batch {options.max_batch}: {path} has a fixed batch of {fixed}; drop --max-batch or "
                "re-export it with a dynamic batch dimension"
            )
        if options.preferred_batch:
            raise ValueError(
                f"--preferred-batch: {path} has a fixed batch of {fixed}, so Triton cannot batch requests"
            )
        max_batch_size = 0
    else:
        if options.max_batch is not None and limit is not None and options.max_batch > limit:
            raise ValueError(
                f"--max-batch {options.max_batch} exceeds the engine's profile max batch {limit}; use --max-batch "
                f"{limit} or rebuild with msad export tensorrt --max-batch {options.max_batch}"
            )
        max_batch_size = options.max_batch or (min(DEFAULT_MAX_BATCH, limit) if limit else DEFAULT_MAX_BATCH)
        bad = [b for b in options.preferred_batch if not 1 <= b <= max_batch_size]
        if bad:
            raise ValueError(
                f"--preferred-batch {','.join(map(str, bad))}: preferred batch sizes must lie in 1..{max_batch_size} "
                "(the max batch)"
            )

    config: dict[str, Any] = {
        "name": name,
        "platform": PLATFORMS[kind],
        "max_batch_size": max_batch_size,
        "input": [_io_entry(info, batched) for info in metadata["inputs"]],
        "output": [_io_entry(info, batched) for info in metadata["outputs"]],
    }
    if metadata.get("nms", "none") != "none":
        for entry in config["output"]:
            if entry["name"] == "labels":
                entry["label_filename"] = LABELS_FILE
    if max_batch_size > 0:
        batching: dict[str, Any] = {"max_queue_delay_microseconds": options.max_queue_delay_us}
        if options.preferred_batch:
            batching["preferred_batch_size"] = sorted(set(options.preferred_batch))
        config["dynamic_batching"] = batching
    config["instance_group"] = [{"count": options.instances, "kind": f"KIND_{options.kind.upper()}"}]
    if kind == "tensorrt":
        trt = metadata.get("tensorrt") or {}
        if trt.get("version"):
            notes.append(
                f"the engine was built with TensorRT {trt['version']}"
                + (
                    f" on {trt['gpu']['name']}"
                    if isinstance(trt.get("gpu"), dict) and trt["gpu"].get("name")
                    else ""
                )
                + ": serve it with the Triton release that ships that TensorRT, on the same GPU model"
                + (
                    " (version-compatible: newer TensorRT releases load it too)"
                    if trt.get("version_compatible")
                    else ""
                )
            )
    return config, notes


def docker_command(repo: Path, kind: str, version_compatible: bool = False) -> str:
    """The ``docker run`` line that serves ``repo`` with Triton (HTTP 8000, gRPC 8001, metrics 8002)."""
    gpus = "--gpus all " if kind == "gpu" else ""
    backend = " --backend-config=tensorrt,version-compatible=true" if version_compatible else ""
    return (
        f"docker run {gpus}--rm -p 8000:8000 -p 8001:8001 -p 8002:8002 "
        f"-v {shlex.quote(str(Path(repo).resolve()))}:/models {IMAGE} "
        f"tritonserver --model-repository=/models{backend}"
    )


# ---------------------------------------------------------------------------------------------------
# Writing the repository


def _graph_tensors(graph):
    """Every TensorProto of a graph: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for sub in attr.graphs:
                yield from _graph_tensors(sub)


def _external_data_files(path: Path) -> list[str]:
    """Relative paths of the ONNX file's external weight files (empty without onnx or external data)."""
    try:
        import onnx
    except ImportError:
        return []
    model = onnx.load(str(path), load_external_data=False)
    files: list[str] = []
    for tensor in _graph_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if location and location not in files:
                files.append(location)
    return files


def default_name(path: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem) or "model"
    return name if _NAME.match(name) else f"m_{name}"


def write_repository(
    artifact: str | Path, repo: str | Path, options: TritonOptions | None = None
) -> RepositoryResult:
    """Copy ``artifact`` (+ sidecar, external weights) into ``repo/NAME/VERSION/`` and write the config.

    The version folder is assembled beside its final place and renamed in, so a failure leaves no
    half-written version; an existing version is replaced only with ``overwrite``.
    """
    options = options or TritonOptions()
    artifact, repo = Path(artifact), Path(repo)
    if not artifact.is_file():
        raise FileNotFoundError(
            f"artifact {artifact} does not exist; export one with msad export onnx / tensorrt"
        )
    metadata = read_sidecar(artifact)
    kind = artifact_kind(artifact, metadata)
    name = options.name or default_name(artifact)
    if not _NAME.match(name):
        raise ValueError(
            f"--name {name!r}: use letters, digits, '_', '.' and '-' (starting with a letter or digit)"
        )
    if options.version < 1:
        raise ValueError(f"--version must be a positive integer (got {options.version})")
    config, notes = model_config(artifact, metadata, kind, options, name)
    text = render_config(config)

    model_dir = repo / name
    version_dir = model_dir / str(options.version)
    if version_dir.exists() and not options.overwrite:
        raise FileExistsError(
            f"{version_dir} already exists; pass --overwrite to replace it or choose another --version"
        )
    model_file = version_dir / MODEL_FILES[kind]
    extra = _external_data_files(artifact) if kind == "onnx" else []
    for relative in extra:
        if not (artifact.parent / relative).is_file():
            raise FileNotFoundError(
                f"{artifact} keeps weights in {artifact.parent / relative}, which is missing"
            )

    model_dir.mkdir(parents=True, exist_ok=True)
    staging = model_dir / f".{options.version}.tmp{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        shutil.copy2(artifact, staging / model_file.name)
        copied = dict(metadata)
        if "artifact" in copied:  # the sidecar names its file: now model.onnx / model.plan
            copied["artifact"] = model_file.name
        write_sidecar(staging / model_file.name, copied)
        for relative in extra:
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(artifact.parent / relative, target)
        if version_dir.exists():
            shutil.rmtree(version_dir)
        os.replace(staging, version_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    with atomic_path(model_dir / LABELS_FILE) as tmp:
        tmp.write_text("\n".join(metadata_spec(metadata).label_names()) + "\n")
    config_path = model_dir / "config.pbtxt"
    with atomic_path(config_path) as tmp:
        tmp.write_text(text)
    others = sorted(
        p.name for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and p != version_dir
    )
    if others:
        notes.append(f"{model_dir} also holds versions {', '.join(others)}: they share this config.pbtxt")
    version_compatible = bool((metadata.get("tensorrt") or {}).get("version_compatible"))
    return RepositoryResult(
        model_dir=model_dir,
        version_dir=version_dir,
        model_file=model_file,
        config_path=config_path,
        config_text=text,
        docker_command=docker_command(repo, options.kind, version_compatible and kind == "tensorrt"),
        notes=notes,
    )


# ---------------------------------------------------------------------------------------------------
# Command line


def parse_batch_list(text: str) -> list[int]:
    """'4,8' -> [4, 8] for argparse."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated batch sizes such as 4,8, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one batch size, e.g. 4,8")
    return values


def register_triton(subparsers) -> None:
    """``msad export triton ARTIFACT --repo DIR [...]``."""
    cmd = subparsers.add_parser(
        "triton",
        help="write a Triton Inference Server model repository for an ONNX file or TensorRT engine",
        description=(
            "Write REPO/NAME/config.pbtxt, REPO/NAME/labels.txt and REPO/NAME/VERSION/model.onnx or model.plan "
            "(with its .json sidecar), then print the docker command that serves the repository. A dynamic batch "
            "dimension gives dynamic batching up to --max-batch; a fixed batch gives max_batch_size 0."
        ),
    )
    cmd.add_argument(
        "artifact",
        type=Path,
        metavar="ARTIFACT",
        help="model.onnx or a TensorRT engine, with its .json sidecar",
    )
    cmd.add_argument(
        "--repo", type=Path, required=True, metavar="DIR", help="model repository folder (created)"
    )
    cmd.add_argument("--name", help="model name in Triton (default: the artifact's file stem)")
    cmd.add_argument("--version", type=int, default=1, help="model version folder (default 1)")
    cmd.add_argument(
        "--max-batch",
        type=int,
        help=f"max_batch_size for a dynamic-batch artifact (default {DEFAULT_MAX_BATCH}, at most an engine's profile max)",
    )
    cmd.add_argument(
        "--instances", type=int, default=1, help="model instances (instance_group count, default 1)"
    )
    cmd.add_argument(
        "--kind", choices=["cpu", "gpu"], default="gpu", help="instance kind (default gpu; engines need gpu)"
    )
    cmd.add_argument(
        "--preferred-batch",
        type=parse_batch_list,
        default=[],
        metavar="N,N",
        help="dynamic batching preferred batch sizes, e.g. 4,8 (default: none, Triton batches as large as it can)",
    )
    cmd.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=100,
        help="how long dynamic batching may hold a request to fill a batch, in microseconds (default 100)",
    )
    cmd.add_argument("--overwrite", action="store_true", help="replace an existing version folder")
    cmd.set_defaults(handler=run_triton)


def run_triton(args: argparse.Namespace) -> int:
    options = TritonOptions(
        name=args.name,
        version=args.version,
        max_batch=args.max_batch,
        instances=args.instances,
        kind=args.kind,
        preferred_batch=list(args.preferred_batch),
        max_queue_delay_us=args.max_queue_delay_us,
        overwrite=args.overwrite,
    )
    result = write_repository(args.artifact, args.repo, options)
    print(f"Triton model written: {result.model_file} (config {result.config_path})")
    for note in result.notes:
        print(f"note: {note}")
    print("serve it with (pick a Triton release for <yy.mm>):")
    print(f"  {result.docker_command}")
    print(
        f"then check: curl -s localhost:8000/v2/models/{result.model_dir.name}/ready -o /dev/null -w '%{{http_code}}\\n'"
    )
    return 0
