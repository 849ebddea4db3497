"""What ``msad bench`` measures: models x resolutions x backends x precisions x batch sizes x devices.

The matrix comes from a YAML file (keys of :class:`BenchConfig`) and/or command-line options, which
override the file. Every combination is a :class:`Cell`; a cell a device or library cannot run is
not dropped but recorded as skipped, with the reason (:func:`skip_reason`).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from msad_deploy.config import ConfigError, from_dict
from msad_deploy.runtime.backends import SUFFIXES

# Backend names of the matrix -> (runtime backend, its options).
BACKENDS: dict[str, tuple[str, dict[str, Any]]] = {
    "eager": ("pytorch", {}),
    "compiled": ("pytorch", {"compile": True}),
    "cudagraphs": ("pytorch", {"cuda_graphs": True}),
    "onnxruntime": ("onnxruntime", {}),
    "tensorrt": ("tensorrt", {}),
    "aoti": ("aoti", {}),
    "openvino": ("openvino", {}),
}
BACKEND_ALIASES = {
    "torch": "eager",
    "pytorch": "eager",
    "compile": "compiled",
    "ort": "onnxruntime",
    "trt": "tensorrt",
    "ov": "openvino",
}
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
# Which precisions each backend runs (others are skipped with a reason).
BACKEND_PRECISIONS = {
    "eager": ("fp32", "fp16", "bf16"),
    "compiled": ("fp32", "fp16", "bf16"),
    "cudagraphs": ("fp32", "fp16", "bf16"),
    "onnxruntime": ("fp32", "fp16", "int8"),
    "tensorrt": ("fp32", "fp16", "int8"),
    "aoti": ("fp32",),
    "openvino": ("fp32", "fp16", "int8"),
}


@dataclass
class ModelEntry:
    """A model of the matrix: a display ``name`` and a checkpoint (exported on the fly per backend)
    or an artifact (``.onnx``, ``.engine``, ``.pt2``, ``.xml``: run as it is, on the backends that take it)."""

    name: str
    path: Path

    @property
    def is_checkpoint(self) -> bool:
        return SUFFIXES.get(self.path.suffix.lower()) == "pytorch"


@dataclass
class BenchConfig:
    """The matrix and how to measure it (``msad bench --help`` explains each)."""

    models: list[ModelEntry] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # HR-frame test sizes; empty: each model's own
    # HR-frame sizes timed without AP (deployment sizes beyond the dataset's images): frames are the
    # evaluation images resized to size x size, the AP column says "latency only"
    latency_sizes: list[int] = field(default_factory=list)
    size_divisibility: int | None = None  # pad inputs to this multiple instead of the model's own
    backends: list[str] = field(default_factory=lambda: ["eager", "onnxruntime"])
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    batches: list[int] = field(default_factory=lambda: [1])
    devices: list[str] = field(default_factory=lambda: ["auto"])
    data: Path | None = None  # dataset root: DATA/SPLIT/ images, DATA/annotations/instances_SPLIT.json
    split: str = "val"
    eval_images: int = 0  # evaluate on the first N images of the split (0: all)
    calib_images: int = 64  # int8 calibration images (from DATA/train when it exists, else the split)
    warmup: int = 5
    min_runs: int = 20
    min_time_s: float = 1.0
    max_time_s: float = 30.0
    threads: int | None = None  # intra-op threads of torch, ONNX Runtime, OpenVINO (None: their defaults)
    verify_exports: bool = True  # check each on-the-fly export against eager PyTorch
    bootstrap: int = 1000  # image resamples for AP_ci95 and the paired differences (0: off)
    # A size's timing is re-measured once, then published marked unstable, when a cell's e2e p50 95 %
    # interval is wider than unstable_spread of its p50, when two architecturally identical networks on
    # the same input (e.g. the HR and LR baselines) differ by more than twin_tolerance, or when other
    # processes used more than busy_cores cores' worth of CPU while it was timed.
    unstable_spread: float = 0.15
    twin_tolerance: float = 0.2
    busy_cores: float = 0.25
    bootstrap_seed: int = 0
    # model pairs "A-B" whose AP difference is reported per size/backend/precision (paired over the same
    # images); empty: every model named *student* against lr and hr, where those are in the matrix
    compare: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if not self.models:
            raise ConfigError("msad bench: no models; give --model NAME=PATH (or models: in the YAML file)")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ConfigError(f"msad bench: model names must be unique, got {names}")
        for model in self.models:
            if not model.path.exists():
                raise FileNotFoundError(2, f"model {model.name!r}: no such file", str(model.path))
            if model.path.suffix.lower() not in SUFFIXES:
                raise ConfigError(
                    f"model {model.name!r}: cannot tell the type of {model.path} (expected one of "
                    f"{', '.join(sorted(SUFFIXES))})"
                )
        self.backends = [BACKEND_ALIASES.get(b, b) for b in self.backends]
        for what, values, valid in (
            ("backend", self.backends, BACKENDS),
            ("precision", self.precisions, PRECISIONS),
        ):
            unknown = [v for v in values if v not in valid]
            if unknown:
                raise ConfigError(f"msad bench: unknown {what} {unknown}; choose from {', '.join(valid)}")
        if any(s < 16 for s in [*self.sizes, *self.latency_sizes]):
            raise ConfigError(
                f"msad bench: sizes must be at least 16 pixels, got {[*self.sizes, *self.latency_sizes]}"
            )
        for what, value in (
            ("unstable_spread", self.unstable_spread),
            ("twin_tolerance", self.twin_tolerance),
            ("busy_cores", self.busy_cores),
        ):
            if not value > 0:
                raise ConfigError(f"msad bench: {what} must be positive, got {value}")
        if any(b < 1 for b in self.batches):
            raise ConfigError(f"msad bench: batch sizes must be at least 1, got {self.batches}")
        if self.size_divisibility is not None and self.size_divisibility < 1:
            raise ConfigError(f"msad bench: size_divisibility must be positive, got {self.size_divisibility}")
        if self.bootstrap < 0 or self.bootstrap_seed < 0:
            raise ConfigError(
                f"msad bench: bootstrap (resamples, 0: off) and bootstrap_seed must be >= 0, got "
                f"{self.bootstrap} and {self.bootstrap_seed}"
            )
        self.model_pairs()  # names every pair it cannot resolve
        if self.data is not None:
            annotations = self.data / "annotations" / f"instances_{self.split}.json"
            if not annotations.is_file():
                raise FileNotFoundError(
                    2,
                    f"--data {self.data}: no annotations for split {self.split!r} (make one with "
                    "`msad data synth`, or point --data at a COCO-layout folder)",
                    str(annotations),
                )

    def model_pairs(self) -> list[tuple[str, str, str]]:
        """(A, B, match) model names whose AP difference A - B is reported, B at the same HR-frame size
        or (match ``input``) on the same network input: ``compare``, or by default every model named
        *student* against ``lr`` (same input) and ``hr`` (same size), those of them in the matrix."""
        from .report import default_model_pairs, parse_model_pairs

        names = [m.name for m in self.models]
        if not self.compare:
            return default_model_pairs(names)
        try:
            return parse_model_pairs(self.compare, names)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["models"] = [{"name": m.name, "path": str(m.path)} for m in self.models]
        data["data"] = str(self.data) if self.data else None
        return data

    def timing_settings(self) -> dict[str, Any]:
        """What a finished cell's numbers depend on besides the cell itself (resume reuses a cell only
        when these are unchanged)."""
        return {
            "warmup": self.warmup,
            "min_runs": self.min_runs,
            "min_time_s": self.min_time_s,
            "threads": self.threads,
            "unstable": [self.unstable_spread, self.twin_tolerance, self.busy_cores],
            "size_divisibility": self.size_divisibility,
            "data": str(self.data) if self.data else None,
            "split": self.split,
            "eval_images": self.eval_images,
        }


def bench_config(data: dict[str, Any], where: str) -> BenchConfig:
    """A :class:`BenchConfig` from a YAML mapping (``models`` as a list of {name, path} or a
    ``{name: path}`` mapping)."""
    data = dict(data)
    models = data.pop("models", [])
    if isinstance(models, dict):
        models = [{"name": k, "path": v} for k, v in models.items()]
    config = from_dict(BenchConfig, data, where)
    config.models = [from_dict(ModelEntry, dict(m), f"{where}.models") for m in models]
    return config


def parse_model(text: str) -> ModelEntry:
    """``NAME=PATH`` or ``PATH`` (named after its run folder, e.g. runs/demo/student/best.pt -> student)."""
    if "=" in text:
        name, path = text.split("=", 1)
    else:
        path = text
        p = Path(text)
        name = p.parent.name if p.stem in ("best", "last") and p.parent.name else p.stem
    if not name:
        raise ConfigError(f"--model {text!r}: expected NAME=PATH")
    return ModelEntry(name=name, path=Path(path))


@dataclass(frozen=True)
class Cell:
    model: str
    size: int | None  # None: the model's own test size
    backend: str
    precision: str
    batch: int
    device: str

    @property
    def cell_id(self) -> str:
        size = self.size if self.size is not None else "native"
        return f"{self.model}|{size}|{self.backend}|{self.precision}|b{self.batch}|{self.device}"

    @property
    def label(self) -> str:
        size = f"@{self.size}" if self.size is not None else ""
        batch = f" b{self.batch}" if self.batch != 1 else ""
        return f"{self.model}{size} {self.backend} {self.precision}{batch}"


def resolve_devices(devices: list[str]) -> list[str]:
    """ "auto" -> "cuda" when torch sees a GPU, else "cpu"; duplicates dropped, order kept."""
    resolved: list[str] = []
    for device in devices:
        name = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        if name not in resolved:
            resolved.append(name)
    return resolved


def expand(config: BenchConfig) -> list[Cell]:
    """Every cell of the matrix, models varying fastest, then batch sizes: the cells one engine,
    precision, size and batch size holds (:func:`size_groups`) are timed together, call by call, so
    the figures a comparison needs (HR model and student) see the same moments of the machine, whose
    speed drifts by tens of percent within minutes on a shared VM. Latency-only sizes come last."""
    sizes: list[int | None] = list(config.sizes) or [None]
    sizes += [s for s in config.latency_sizes if s not in sizes]
    return [
        Cell(model.name, size, backend, precision, batch, device)
        for device, backend, precision, size, batch, model in itertools.product(
            resolve_devices(config.devices),
            config.backends,
            config.precisions,
            sizes,
            config.batches,
            config.models,
        )
    ]


def size_groups(cells: list[Cell]) -> list[list[Cell]]:
    """Consecutive cells sharing device, backend, precision and size: one set of open runtimes."""
    return [
        list(group)
        for _, group in itertools.groupby(cells, key=lambda c: (c.device, c.backend, c.precision, c.size))
    ]


def skip_reason(model: ModelEntry, cell: Cell) -> str | None:
    """Why ``cell`` cannot run here (None: it can). Library availability is checked when it runs."""
    backend, precision, device = cell.backend, cell.precision, torch.device(cell.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    if precision not in BACKEND_PRECISIONS[backend]:
        runs = ", ".join(BACKEND_PRECISIONS[backend])
        return f"{backend} runs {runs}; {precision} is measured on other backends"
    if backend == "cudagraphs" and device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if backend == "tensorrt" and device.type != "cuda":
        return "TensorRT runs on NVIDIA GPUs only"
    if backend == "openvino" and device.type != "cpu":
        return "OpenVINO cells run on the CPU (CUDA is not an OpenVINO device)"
    if (
        backend in ("eager", "compiled", "cudagraphs")
        and precision in ("fp16", "bf16")
        and device.type == "cpu"
    ):
        return (
            f"{precision} autocast on the CPU is not a deployment path here; use fp32, or int8 on onnxruntime"
        )
    if not model.is_checkpoint:
        kind = SUFFIXES[model.path.suffix.lower()]
        runs_on = {
            "onnxruntime": ("onnxruntime", "tensorrt"),
            "tensorrt": ("tensorrt",),
            "aoti": ("aoti",),
            "openvino": ("openvino",),
        }[kind]
        if backend not in runs_on:
            return f"{model.path.name} is a {kind} artifact; it runs on {', '.join(runs_on)} (give the checkpoint to export it)"
    return None
