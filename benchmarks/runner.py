"""Run the matrix: export artifacts on the fly (cached), then per cell time and evaluate one Detector.

Each cell is measured through :class:`msad_deploy.runtime.Detector`, the object a service deploys:

* ``e2e``: decoded uint8 images [H, W, 3] (as a service holds them after reading a request) in,
  detections in original pixels out: input checks, resize, pad, normalise, input shift, host-device
  copies, the artifact, and mapping boxes back. Image decoding (JPEG/PNG) is not included.
* ``model``: the artifact alone on an already prepared input batch (``backend.infer``: the network,
  then decoding and NMS as the artifact holds them; eager PyTorch runs the same decode and NMS code).

Accuracy (COCO AP through pycocotools) is measured with the same Detector, hence through the same
backend, precision and resolution that were timed. A cell that raises becomes a row with its error.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msad_deploy.runtime.artifacts import read_sidecar, sha256_file

from .matrix import BACKENDS, BenchConfig, Cell, ModelEntry, expand, size_groups, skip_reason
from .stats import (
    TimingPolicy,
    cpu_seconds,
    measure_interleaved,
    other_load,
    summarize,
    timer_for,
    unstable_reasons,
)

log = logging.getLogger("msad.bench")
# 3: ONNX Runtime CPU cells run torch's pre/post-processing on one thread (torch_threads); e2e and
# model-only calls interleaved. 4: the models of one engine/precision/size/batch timed together, call
# by call; p50 intervals and the unstable check
ROW_VERSION = 4
LATENCY_RESAMPLES = 1000  # bootstrap resamples of the runs for each p50's interval


# -- environment ---------------------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _gpu() -> dict[str, Any] | None:
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    info: dict[str, Any] = {
        "name": props.name,
        "count": torch.cuda.device_count(),
        "memory_gib": round(props.total_memory / 2**30, 1),
        "capability": f"sm_{props.major}{props.minor}",
        "cuda": torch.version.cuda,
        "driver": None,
    }
    with contextlib.suppress(OSError):
        found = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        info["driver"] = (
            found.stdout.strip().splitlines()[0] if found.returncode == 0 and found.stdout else None
        )
    return info


def environment() -> dict[str, Any]:
    """The machine and software a row was measured with (stored in every row)."""
    from msad_deploy.info import environment_info

    software = environment_info()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": _gpu(),
        "platform": software["platform"],
        "python": software["python"],
        "versions": {k: v for k, v in software["versions"].items() if v},
    }


# -- artifacts -----------------------------------------------------------------------------------


def _key_hash(options: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:10]


class ArtifactCache:
    """Artifacts exported on the fly from checkpoints, under ``root/NAME-SHA12/``, reused while the
    checkpoint's SHA-256 and the export options are unchanged (the sidecar records both)."""

    def __init__(self, root: Path, config: BenchConfig, progress: bool = False) -> None:
        self.root = root
        self.config = config
        self.progress = progress
        self._errors: dict[tuple, BaseException] = {}
        self.verified: dict[Path, dict[str, Any]] = {}

    def _folder(self, model: ModelEntry, sha: str) -> Path:
        folder = self.root / f"{model.name}-{sha[:12]}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    @staticmethod
    def _fresh(path: Path, sha: str) -> bool:
        if not path.is_file():
            return False
        try:
            return read_sidecar(path).get("source_sha256") == sha
        except (OSError, ValueError):
            return False

    def _calibration_folder(self) -> Path | None:
        data = self.config.data
        if data is None:
            return None
        train = data / "train"
        return train if train.is_dir() else data / self.config.split

    def get(self, model: ModelEntry, sha: str, cell: Cell, sizes: list[int]) -> Path:
        """The artifact ``cell`` runs: the checkpoint itself for PyTorch backends, else an export."""
        runtime_backend = BACKENDS[cell.backend][0]
        if runtime_backend == "pytorch" or not model.is_checkpoint:
            return model.path
        key = (model.name, sha, cell.backend, cell.precision, cell.device)
        if key in self._errors:  # one failed export fails its cells without re-trying each time
            raise self._errors[key]
        try:
            if runtime_backend == "onnxruntime":
                return self._onnx(model, sha, cell.precision, "ort")
            if runtime_backend == "aoti":
                return self._aoti(model, sha, cell.device)
            if runtime_backend == "openvino":
                return self._openvino(model, sha, cell.precision)
            return self._engine(model, sha, cell, sizes)
        except Exception as err:
            self._errors[key] = err
            raise

    def _export_options(self) -> dict[str, Any]:
        return {"dynamic": True, "size_divisibility": self.config.size_divisibility}

    def _onnx(self, model: ModelEntry, sha: str, precision: str, nms: str, trt_version: int = 10) -> Path:
        from msad_deploy.export.onnx import OnnxExportOptions, export_onnx

        if precision == "int8":  # quantise the fp32 export (one trace per model, not two)
            return self._int8(model, sha, nms, trt_version)
        options = OnnxExportOptions(
            dynamic=True,
            nms=nms,
            trt_version=trt_version,
            precision=precision,
            size_divisibility=self.config.size_divisibility,
        )
        key = {**self._export_options(), "nms": nms, "trt": trt_version, "precision": precision}
        path = self._folder(model, sha) / f"onnx-{precision}-{nms}-{_key_hash(key)}.onnx"
        if not self._fresh(path, sha):
            log.info("exporting %s to %s", model.path, path)
            export_onnx(model.path, path, options)
        if self.config.verify_exports and nms != "trt":
            self._verify(path, model)
        return path

    def _int8(self, model: ModelEntry, sha: str, nms: str, trt_version: int) -> Path:
        from msad_deploy.export.onnx import quantize_onnx

        calib = self._calibration_folder()
        if calib is None:
            raise ValueError("int8 needs calibration images: give --data")
        fp32 = self._onnx(model, sha, "fp32", nms, trt_version)
        key = {"fp32": fp32.name, "calib": str(calib), "calib_images": self.config.calib_images}
        path = fp32.with_name(f"onnx-int8-{nms}-{_key_hash(key)}.onnx")
        if not self._fresh(path, sha):
            log.info("quantizing %s to %s", fp32, path)
            quantize_onnx(fp32, path, calib, self.config.calib_images)
        # int8 is judged by its AP in the table: the tensor checks against eager would only be reported
        return path

    def _openvino(self, model: ModelEntry, sha: str, precision: str) -> Path:
        """The OpenVINO IR of ``model``, converted from its cached fp32 ONNX export (one trace per model)."""
        from msad_deploy.export.openvino import OpenVinoExportOptions, export_openvino

        calib = self._calibration_folder() if precision == "int8" else None
        if precision == "int8" and calib is None:
            raise ValueError("int8 needs calibration images: give --data")
        onnx = self._onnx(model, sha, "fp32", "ort")
        key = {"onnx": onnx.name, "precision": precision, "calib": str(calib), "n": self.config.calib_images}
        path = onnx.with_name(f"openvino-{precision}-{_key_hash(key)}.xml")
        if not self._fresh(path, sha):
            log.info("converting %s to %s", onnx, path)
            options = OpenVinoExportOptions(
                precision=precision, calib_data=calib, calib_images=self.config.calib_images
            )
            export_openvino(onnx, path, options)
        # as with ONNX: int8 is judged by its AP in the table, the tensor checks would only be reported
        if self.config.verify_exports and precision != "int8":
            self._verify(path, model)
        return path

    def _verify(self, path: Path, model: ModelEntry) -> None:
        from msad_deploy.export.verify import verify_artifact

        report_path = path.with_name(path.name + ".verify.json")
        report = None
        if report_path.is_file() and report_path.stat().st_mtime >= path.stat().st_mtime:
            report = json.loads(report_path.read_text())
        if report is None:
            report = verify_artifact(path, model.path)
            report_path.write_text(json.dumps(report, indent=2, sort_keys=True))
        self.verified[path] = report

    def _aoti(self, model: ModelEntry, sha: str, device: str) -> Path:
        from msad_deploy.export.aoti import AotiExportOptions, export_aoti

        key = {**self._export_options(), "device": device}
        path = self._folder(model, sha) / f"aoti-{torch.device(device).type}-{_key_hash(key)}.pt2"
        if not self._fresh(path, sha):
            log.info("compiling %s to %s", model.path, path)
            export_aoti(
                model.path,
                path,
                AotiExportOptions(
                    dynamic=True, device=device, size_divisibility=self.config.size_divisibility
                ),
            )
        return path

    def _engine(self, model: ModelEntry, sha: str, cell: Cell, sizes: list[int]) -> Path:
        from msad_deploy.export.tensorrt import EngineOptions, build_engine, require_tensorrt

        require_tensorrt()  # a clear "not installed" before exporting anything
        onnx_path = self._onnx(model, sha, cell.precision, "trt")
        spec = read_sidecar(onnx_path)["spec"]
        divisor = 2 ** int(spec.get("input_shift", 0))
        step = int(self.config.size_divisibility or spec["size_divisibility"])
        padded = [(-(-s // step) * step) // divisor for s in (sizes or [int(spec["test_min_size"])])]
        batches = self.config.batches
        options = EngineOptions(
            fp16=cell.precision == "fp16",
            int8=cell.precision == "int8",
            min_batch=min(batches),
            opt_batch=min(batches),
            max_batch=max(batches),
            min_size=(min(padded), min(padded)),
            opt_size=(max(padded), max(padded)),
            max_size=(max(padded), max(padded)),
            timing_cache=self.root / "tensorrt.timing-cache",
        )
        key = {"onnx": onnx_path.name, "options": repr(options), "device": cell.device}
        path = onnx_path.with_name(f"trt-{cell.precision}-{_key_hash(key)}.engine")
        if not self._fresh(path, sha):
            build_engine(onnx_path, path, options)
        return path


# -- one cell ------------------------------------------------------------------------------------


def load_images(image_dir: Path, ann_file: Path, count: int) -> list[np.ndarray]:
    """The first ``count`` images of a COCO split, decoded to uint8 RGB arrays [H, W, 3]."""
    from msad_deploy.runtime.images import decode_image

    images = json.loads(ann_file.read_text())["images"]
    if not images:
        raise ValueError(f"{ann_file} lists no images")
    chosen = [images[i % len(images)] for i in range(count)]
    return [np.ascontiguousarray(decode_image(image_dir / image["file_name"])) for image in chosen]


def synthetic_images(size: int, count: int) -> list[np.ndarray]:
    """Deterministic noise images [size, size, 3] for timing without a dataset (no AP then)."""
    generator = np.random.default_rng(0)
    return [generator.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]


def subset_annotations(ann_file: Path, count: int, out_dir: Path) -> Path:
    """An annotation file holding the first ``count`` images of ``ann_file`` (and their objects)."""
    data = json.loads(ann_file.read_text())
    if count <= 0 or count >= len(data["images"]):
        return ann_file
    kept = data["images"][:count]
    ids = {image["id"] for image in kept}
    data["images"] = kept
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{ann_file.stem}_first{count}.json"
    target.write_text(json.dumps(data))
    return target


def check_backend(cell: Cell) -> None:
    """Raise :class:`BackendSkipped` when this machine lacks what ``cell``'s backend needs on its device."""
    runtime_backend = BACKENDS[cell.backend][0]
    if runtime_backend == "onnxruntime":
        from msad_deploy.runtime.backends import import_optional

        onnxruntime = import_optional("onnxruntime", "onnx", "the onnxruntime backend")
        if (
            torch.device(cell.device).type == "cuda"
            and "CUDAExecutionProvider" not in onnxruntime.get_available_providers()
        ):
            raise BackendSkipped(
                "this onnxruntime has no CUDA provider (pip install onnxruntime-gpu); its CPU rows are "
                "measured with --devices cpu"
            )
    elif runtime_backend == "tensorrt":
        from msad_deploy.export.tensorrt import require_tensorrt

        require_tensorrt()
    elif runtime_backend == "openvino":
        from msad_deploy.runtime.backends import import_optional

        import_optional("openvino", "openvino", "the openvino backend")


def open_detector(artifact: Path, cell: Cell, config: BenchConfig, max_batch: int, threads: int):
    """The runtime Detector of ``cell``; ``threads``: ONNX Runtime's intra-op threads, or OpenVINO's
    ``inference_num_threads`` (torch's own count is set by the caller, see :func:`torch_threads`)."""
    from msad_deploy.runtime import Detector

    runtime_backend, options = BACKENDS[cell.backend]
    options = dict(options)
    if runtime_backend == "pytorch":
        options["precision"] = cell.precision
    elif runtime_backend == "onnxruntime":
        if torch.device(cell.device).type == "cuda":
            options["providers"] = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            options["providers"] = ["CPUExecutionProvider"]
        # the same thread count as torch's network (or --threads), so backends compete on equal terms
        options["intra_op_threads"] = threads
        # explicit, not by ORT's default: the models of a size are timed call by call, and a session
        # whose pool spins after its call takes the cores from the next model's call (measured in the
        # demo matrix with spinning on: most ORT cells unstable, the HR and LR baselines 32 vs 24 ms);
        # msad serve turns it off too
        options["allow_spinning"] = False
    elif runtime_backend == "openvino":
        options["threads"] = threads  # likewise; the latency hint (one stream), as the Detector's default
    return Detector.load(
        artifact,
        device=cell.device,
        backend=runtime_backend,
        max_batch=max_batch,
        test_size=cell.size,
        size_divisibility=config.size_divisibility,
        **options,
    )


def torch_threads(cell: Cell, config: BenchConfig) -> int:
    """Torch intra-op threads for ``cell``: one around an ONNX Runtime or OpenVINO network on the CPU
    (the runtime's :func:`host_threads`, which ``msad serve`` applies too), else ``--threads`` or torch's."""
    from msad_deploy.runtime.backends import host_threads

    runtime_backend, _ = BACKENDS[cell.backend]
    return host_threads(runtime_backend, cell.device) or config.threads or torch.get_num_threads()


@contextlib.contextmanager
def num_threads(count: int):
    """``torch.set_num_threads(count)`` for the duration of the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class BackendSkipped(Exception):
    """A cell this machine cannot run (a missing library or provider): recorded as skipped."""


def prepared_call(detector, images: list[np.ndarray]) -> Callable[[], Any]:
    """``backend.infer`` on the prepared batch of ``images`` (what the Detector hands the artifact)."""
    from msad_deploy.runtime.preprocess import pad_to_size, prepare_batch, resize_and_pad

    tensors = [detector.to_tensor(image) for image in images]
    padded, sizes, original = resize_and_pad(tensors, detector.spec, detector.device)
    backend = detector.backend
    if backend.input_size is not None:
        padded = pad_to_size(padded, backend.input_size, detector.path.name)
    if backend.batch is not None and backend.batch != len(images):
        raise BackendSkipped(f"{detector.path.name} takes batches of exactly {backend.batch}")
    batch = prepare_batch(padded, sizes.to(detector.device), sizes, detector.spec)

    def run() -> Any:
        return backend.infer(batch)

    return run


def model_cost(model: ModelEntry, detector, image: np.ndarray, loaded: dict[Path, Any]) -> dict[str, Any]:
    """GFLOPs split backbone / FPN / head (/ fusion) and parameters at this cell's network input
    (``loaded``: checkpoints already read in this run, by path)."""
    from msad_deploy.models.build import load_model
    from msad_deploy.models.cost import model_cost as count
    from msad_deploy.models.teacher import AlignedMultiScaleTeacher
    from msad_deploy.runtime.preprocess import padded_input_size

    source = model.path
    if not model.is_checkpoint:
        source = Path(str((detector.metadata or {}).get("source_checkpoint") or ""))
        if not source.is_file():
            return {}
    if source not in loaded:
        loaded[source] = load_model(source).model
    network = loaded[source]
    spec = detector.spec
    height, width = padded_input_size(image.shape[0], image.shape[1], spec)
    if isinstance(network, AlignedMultiScaleTeacher):  # takes the HR size, halves it for its LR branch
        cost = count(network, (height, width))
    else:
        cost = count(network, (height // spec.input_divisor, width // spec.input_divisor))
    return {
        "gflops": {k: round(v, 4) for k, v in cost.gflops.items()},
        "gflops_total": round(cost.total_gflops, 4),
        "params_m": round(cost.total_params_m, 4),
        "network_input": [height // spec.input_divisor, width // spec.input_divisor],
    }


# -- the matrix ----------------------------------------------------------------------------------


class BenchRunner:
    """Runs :func:`expand` (config)'s cells in order, reusing finished rows from ``previous``."""

    def __init__(
        self,
        config: BenchConfig,
        out: Path,
        previous: dict[str, dict[str, Any]] | None = None,
        progress: bool = True,
        on_row: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self.out = out
        self.previous = previous or {}
        self.progress = progress
        self.on_row = on_row
        self.cache = ArtifactCache(out / "artifacts", config, progress)
        self.env = environment()
        self.settings = config.timing_settings()
        self.policy = TimingPolicy(
            warmup=config.warmup,
            min_runs=config.min_runs,
            min_time_s=config.min_time_s,
            max_time_s=config.max_time_s,
        )
        self.models = {m.name: m for m in config.models}
        self.sha = {m.name: sha256_file(m.path) for m in config.models}
        self._open: dict[str, Any] = {}  # model name -> Detector, for the size group being timed
        self._failed_to_open: dict[str, BaseException] = {}
        self._accuracy: dict[tuple, dict[str, Any]] = {}
        self._costs: dict[tuple, dict[str, Any]] = {}
        self._loaded: dict[Path, Any] = {}  # checkpoints read for their FLOPs, by path
        self.eval_ann: Path | None = None
        self.images: list[np.ndarray] = []
        if config.data is not None:
            ann = config.data / "annotations" / f"instances_{config.split}.json"
            self.eval_ann = subset_annotations(ann, config.eval_images, out / "eval")
            self.images = load_images(config.data / config.split, ann, max(config.batches))
        else:
            self.images = synthetic_images(128, max(config.batches))

    def cells(self) -> list[Cell]:
        return expand(self.config)

    def run(self) -> list[dict[str, Any]]:
        from tqdm.auto import tqdm

        cells = self.cells()
        rows: list[dict[str, Any]] = []
        bar = tqdm(total=len(cells), desc="bench", unit="cell", disable=not self.progress, dynamic_ncols=True)
        try:
            for group in size_groups(cells):
                bar.set_postfix_str(f"{group[0].backend} {group[0].precision} @{group[0].size or 'native'}")
                for row in self.run_group(group):
                    rows.append(row)
                    bar.update(1)
                    if self.on_row is not None:
                        self.on_row(row)
        finally:
            self._close()
            bar.close()
        order = {cell.cell_id: i for i, cell in enumerate(cells)}
        return sorted(rows, key=lambda r: order[r["cell_id"]])

    def _reuse(self, cell: Cell) -> dict[str, Any] | None:
        row = self.previous.get(cell.cell_id)
        if (
            row is not None
            and row.get("status") == "ok"
            and row.get("row_version") == ROW_VERSION
            and row.get("model_sha256") == self.sha[cell.model]
            and row.get("settings") == self.settings
            and (row.get("metrics") is not None) == self._scores(cell)
        ):
            return self._refresh_interval({**row, "reused": True})
        return None

    def _scores(self, cell: Cell) -> bool:
        """Whether ``cell`` gets an AP: with --data, at a size of --sizes (not a latency-only size)."""
        return self.eval_ann is not None and (
            cell.size in self.config.sizes or cell.size not in self.config.latency_sizes
        )

    def _refresh_interval(self, row: dict[str, Any]) -> dict[str, Any]:
        """A reused row's AP_ci95 for this run's --bootstrap / --bootstrap-seed, redrawn from its saved
        per-image matching when those changed (rows of runs before the intervals keep none)."""
        from msad_deploy.evaluation.bootstrap import PerImageEval, ap_interval

        wanted = {"resamples": self.config.bootstrap, "seed": self.config.bootstrap_seed}
        metrics = dict(row.get("metrics") or {})
        if not metrics or row.get("ap_bootstrap") == wanted:
            return row
        path = self.out / str(row.get("ap_per_image") or "")
        if not wanted["resamples"]:
            metrics.pop("AP_ci95", None)
        elif row.get("ap_per_image") and path.is_file():
            low, high = ap_interval(PerImageEval.load(path), wanted["resamples"], wanted["seed"])
            metrics["AP_ci95"] = [round(low, 4), round(high, 4)]
        else:
            return row
        return {**row, "metrics": metrics, "ap_bootstrap": wanted}

    def _base_row(self, cell: Cell) -> dict[str, Any]:
        model = self.models[cell.model]
        return {
            "row_version": ROW_VERSION,
            "cell_id": cell.cell_id,
            "label": cell.label,
            "model": cell.model,
            "model_path": str(model.path),
            "model_sha256": self.sha[cell.model],
            "size": cell.size,
            "backend": cell.backend,
            "precision": cell.precision,
            "batch": cell.batch,
            "device": cell.device,
            "status": None,
            "settings": self.settings,
            "env": self.env,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }

    def _not_ok(self, cell: Cell, err: BaseException) -> dict[str, Any]:
        """The row of a cell that raised ``err``: skipped (a missing library or provider) or failed."""
        row = self._base_row(cell)
        if isinstance(err, BackendSkipped):
            return {**row, "status": "skipped", "reason": str(err)}
        if isinstance(err, ImportError):  # a backend library that is not installed here
            return {**row, "status": "skipped", "reason": str(err).splitlines()[0]}
        first = str(err).splitlines()[0] if str(err) else ""
        log.warning("%s failed: %s", cell.label, first)
        return {**row, "status": "failed", "error": f"{type(err).__name__}: {first}"}

    def run_group(self, group: list[Cell]) -> Iterator[dict[str, Any]]:
        """Rows of one engine, precision and size (:func:`size_groups`): finished rows reused, cells
        this machine cannot run skipped, the rest timed together per batch size (:meth:`_measure_group`)."""
        pending = []
        for cell in group:
            reused = self._reuse(cell)
            reason = None if reused else skip_reason(self.models[cell.model], cell)
            if reused is not None:
                yield reused
            elif reason is not None:
                yield {**self._base_row(cell), "status": "skipped", "reason": reason}
            else:
                pending.append(cell)
        if not pending:
            return
        try:
            yield from self._measure_group(pending)
        finally:
            self._close()
            self._failed_to_open.clear()

    def _close(self) -> None:
        for detector in self._open.values():
            detector.close()
        self._open.clear()

    def _measure_group(self, cells: list[Cell]) -> Iterator[dict[str, Any]]:
        """Open every model's runtime of one engine/precision/size, then per batch size time all of
        them in turn, call by call (:meth:`_time_together`), and score each; a cell that raises is a
        row with its error while the others go on."""
        threads = self.config.threads or torch.get_num_threads()  # the network's, in any backend
        prepost = torch_threads(cells[0], self.config)
        with num_threads(prepost):
            for cell in cells:
                if cell.model in self._open:
                    continue
                try:
                    self._open[cell.model] = self._detector(cell, threads)
                except Exception as err:  # noqa: BLE001 - one model's failure must not stop the others
                    self._failed_to_open[cell.model] = err
            for batch in dict.fromkeys(cell.batch for cell in cells):
                ready, calls = [], []
                for cell in (c for c in cells if c.batch == batch):
                    try:
                        if cell.model in self._failed_to_open:
                            raise self._failed_to_open[cell.model]
                        detector = self._open[cell.model]
                        images = self._frames(cell)
                        run_model = prepared_call(detector, images)
                        # one call each before timing: a cell fails here, not in the middle of the others
                        detector(images)
                        run_model()
                        ready.append(cell)
                        calls.append((lambda d=detector, i=images: d(i), run_model))
                    except Exception as err:  # noqa: BLE001
                        yield self._not_ok(cell, err)
                if not ready:
                    continue
                timings = self._time_together(ready, calls)
                for cell, timing in zip(ready, timings, strict=True):
                    row = self._base_row(cell)
                    try:
                        row.update(self._result(cell, self._open[cell.model], timing))
                        row.update(status="ok", threads=threads, torch_threads=prepost)
                    except Exception as err:  # noqa: BLE001
                        row = self._not_ok(cell, err)
                    yield row

    def _frames(self, cell: Cell) -> list[np.ndarray]:
        """The decoded frames a cell is timed on: the evaluation images, or at a latency-only size those
        images resized to size x size (a deployment-sized frame, so the resize is not an upscale)."""
        images = self.images[: cell.batch]
        if self._scores(cell) or cell.size is None or self.eval_ann is None:
            return images
        from PIL import Image

        return [np.asarray(Image.fromarray(i).resize((cell.size, cell.size), Image.BILINEAR)) for i in images]

    def _time_together(
        self, cells: list[Cell], calls: list[tuple[Callable, Callable]]
    ) -> list[dict[str, Any]]:
        """Per cell: end-to-end and model-only :class:`LatencyStats` and a ``timing`` record, all cells
        timed in one :func:`measure_interleaved` (e2e and model-only of each model in turn, model by
        model), measured again once when :meth:`_unstable` finds a reason, and published with the
        reasons that remain."""
        timer = timer_for(self._open[cells[0].model].device)
        fns = [fn for pair in calls for fn in pair]
        first: list[dict[str, Any]] | None = None
        while True:
            before, started = cpu_seconds(), time.perf_counter()
            durations = measure_interleaved(fns, self.policy, timer)
            busy = other_load(before, cpu_seconds(), time.perf_counter() - started)
            seed = self.config.bootstrap_seed
            timings = [
                {
                    "e2e": summarize(durations[2 * i], cell.batch, LATENCY_RESAMPLES, seed),
                    "model": summarize(durations[2 * i + 1], cell.batch, LATENCY_RESAMPLES, seed),
                    "other_load_cores": None if busy is None else round(busy, 3),
                }
                for i, cell in enumerate(cells)
            ]
            reasons = self._unstable(cells, timings, busy)
            for timing, why in zip(timings, reasons, strict=True):
                timing["unstable"] = why
            if first is not None or not any(reasons):
                break
            first = timings
            flagged = [
                f"{cell.label} ({'; '.join(why)})" for cell, why in zip(cells, reasons, strict=True) if why
            ]
            log.warning("timing unstable, measuring these %d cells again: %s", len(cells), ", ".join(flagged))
        for i, timing in enumerate(timings):
            timing["remeasured"] = first is not None
            if first is not None:
                timing["first_pass"] = {
                    "e2e_p50_ms": round(first[i]["e2e"].p50_ms, 4),
                    "unstable": first[i]["unstable"],
                }
        if first is not None:
            still = [cell.label for cell, timing in zip(cells, timings, strict=True) if timing["unstable"]]
            log.warning(
                "measured again: %s",
                f"still unstable, published marked unstable: {', '.join(still)}" if still else "stable now",
            )
        return timings

    def _unstable(
        self, cells: list[Cell], timings: list[dict[str, Any]], busy: float | None
    ) -> list[list[str]]:
        """:func:`unstable_reasons` for cells timed together; twins share FLOPs, parameters and
        network input (e.g. the HR and LR baselines at one size)."""
        twin_keys = []
        for cell in cells:
            cost = self._cost(cell)
            twin_keys.append(
                (cost["gflops_total"], cost["params_m"], tuple(cost["network_input"])) if cost else None
            )
        return unstable_reasons(
            [cell.model for cell in cells],
            [timing["e2e"] for timing in timings],
            twin_keys,
            busy,
            self.config.unstable_spread,
            self.config.twin_tolerance,
            self.config.busy_cores,
        )

    def _detector(self, cell: Cell, threads: int):
        check_backend(cell)  # before exporting anything for it
        model = self.models[cell.model]
        artifact = self.cache.get(model, self.sha[cell.model], cell, self.config.sizes)
        detector = open_detector(artifact, cell, self.config, max(self.config.batches), threads)
        artifact_precision = (detector.metadata or {}).get("precision")
        if artifact_precision and artifact_precision != cell.precision:
            detector.close()
            raise BackendSkipped(f"{detector.path.name} is a {artifact_precision} artifact")
        return detector

    def _cost(self, cell: Cell) -> dict[str, Any]:
        key = (cell.model, cell.size)
        if key not in self._costs:
            detector = self._open[cell.model]
            self._costs[key] = model_cost(
                self.models[cell.model], detector, self._frames(cell)[0], self._loaded
            )
        return self._costs[key]

    def _result(self, cell: Cell, detector, timing: dict[str, Any]) -> dict[str, Any]:
        """A measured cell's row fields: artifact, latency (with the p50 intervals and the unstable
        check's verdict), runtime, cost and accuracy."""
        info = detector.info()
        result: dict[str, Any] = {
            "artifact": str(detector.path),
            # an OpenVINO IR's weights are in the .bin beside its .xml
            "artifact_mb": round(
                sum(
                    p.stat().st_size
                    for p in (detector.path, detector.path.with_suffix(".bin"))
                    if p == detector.path or detector.path.suffix == ".xml"
                )
                / 2**20,
                3,
            ),
            "verified": self._verified(detector.path),
            "test_size": [detector.spec.test_min_size, detector.spec.test_max_size],
            "size_divisibility": detector.spec.size_divisibility,
            "input_shift": detector.spec.input_shift,
            "runtime": {k: v for k, v in info.items() if k not in ("class_names",)},
            "e2e_ms": timing["e2e"].to_dict(),
            "model_ms": timing["model"].to_dict(),
            "timing": {k: v for k, v in timing.items() if k not in ("e2e", "model", "unstable")},
            "unstable": timing["unstable"] or None,
            "cost": self._cost(cell),
        }
        if self._scores(cell):
            result.update(self._metrics(detector, cell))
        else:
            result["metrics"] = None
            result["latency_only"] = self.eval_ann is not None
        return result

    def _verified(self, path: Path) -> bool | None:
        """True/False: the export's checks against eager passed/failed; None: not checked, or only reported
        (reduced precision is judged by its AP in the table, not by tensor tolerances)."""
        report = self.cache.verified.get(path)
        ran = [c for c in (report or {}).get("checks", []) if c.get("passed") is not None]
        return bool(report.get("passed")) if ran else None

    def _metrics(self, detector, cell: Cell) -> dict[str, Any]:
        """``metrics`` (COCO metrics with ``AP_ci95``; None without --data), ``ap_per_image`` (the saved
        per-image matching, relative to OUT: msad bench pairs rows with it) and ``ap_bootstrap`` (how
        AP_ci95 was drawn), shared by the cells that differ only in batch size."""
        if self.eval_ann is None:
            return {"metrics": None}
        key = (cell.model, cell.size, cell.backend, cell.precision, cell.device)
        if key not in self._accuracy:
            from msad_deploy.evaluation.bootstrap import with_ap_interval
            from msad_deploy.evaluation.evaluator import artifact_eval_config, evaluate_detector

            metadata = detector.metadata or {
                "source_checkpoint": str(detector.path),
                "source_sha256": self.sha[cell.model],
            }
            config, _ = artifact_eval_config(detector.spec, metadata, ["data.num_workers=0"])
            metrics, _, per_image = evaluate_detector(
                detector,
                config,
                self.config.data / self.config.split,
                self.eval_ann,
                batch_size=max(1, detector.max_batch),
                num_workers=0,
                progress=False,
                per_image=True,
            )
            bootstrap, seed = self.config.bootstrap, self.config.bootstrap_seed
            metrics = with_ap_interval(metrics, per_image, bootstrap, seed)
            name = re.sub(r"[^A-Za-z0-9_.-]", "_", "_".join(str(k) for k in key))
            saved = Path("eval") / "per_image" / f"{name}-{self.sha[cell.model][:12]}.npz"
            per_image.save(self.out / saved)
            self._accuracy[key] = {
                "metrics": {k: _rounded(v) for k, v in metrics.items()},
                "ap_per_image": str(saved),
                "ap_bootstrap": {"resamples": bootstrap, "seed": seed},
            }
        return self._accuracy[key]


def _rounded(value: Any) -> Any:
    """4 decimals, also inside an interval [low, high]."""
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return round(float(value), 4)
