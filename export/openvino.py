"""``msad export openvino``: a checkpoint (or an fp32 ONNX export) -> an OpenVINO IR (``.xml`` + ``.bin``).

The IR is converted from the ONNX graph this project already exports (export/onnx.py: network,
decode, per-level top-k, clip and NMS, or the decoded outputs with ``--nms none``), so there is one
tracing path and the IR has the ONNX artifact's inputs, outputs and output contract. Steps:

1. a checkpoint is exported to a temporary fp32 ONNX graph with the same shape options, at opset
   21 (``OPENVINO_OPSET``), where each GroupNorm is one ``GroupNormalization`` node that OpenVINO
   converts to its own GroupNormalization op; at the ONNX export's default opset 18 each is five
   nodes (Reshape, InstanceNormalization, Reshape, Mul, Add) that become MVN and seven IR ops. Both IRs
   run equally fast on the CPU (interleaved ratio 0.996-0.999, docs/bench/lean_graphs.md); the
   opset-21 IR is the smaller one (80 ops fewer on the demo student). An ONNX source is used as it
   is (any opset), its own metadata stripped;
2. ``openvino.convert_model`` turns it into an ``ov.Model``;
3. precision: ``fp32`` saves the weights as they are; ``fp16`` stores them as fp16
   (``save_model(compress_to_fp16=True)``, OpenVINO's "compressed FP16 IR"); ``int8`` is NNCF
   post-training quantisation, calibrated on ``--calib-data`` images prepared by the same function
   as the ONNX int8 calibration (:func:`~msad_deploy.export.precision.calibration_batches`), with
   FakeQuantize only on the convolutions (every other op type is in NNCF's ignored scope): as in the
   ONNX int8 graph, the GroupNorm, residual and FPN additions, decode, top-k and NMS stay float;
4. the sidecar's content goes into the IR's ``rt_info`` (key ``msad_deploy``), so the runtime can
   tell a sidecar that belongs to another export;
5. ``MODEL.xml``, ``MODEL.bin`` and ``MODEL.xml.json`` are written in a temporary folder beside
   ``--out``, opened once with the runtime backend (IO against the spec, precision, metadata), and
   moved into place only then: a failed export leaves nothing. The sidecar also records the size of
   the ``.bin`` (``weights_bytes``), so a truncated or swapped weights file is named at load.

In-graph preprocessing (``--preprocess``) is refused: OpenVINO's CPU plugin runs the graph's
antialiased resize without the antialiasing (see ``NO_PREPROCESS``); the Detector resizes on the host.

OpenVINO and NNCF send usage telemetry (on import, conversion and quantisation) unless told not to;
they are imported and called here with it off (``CI=true`` for the duration of the call, the switch
``openvino-telemetry`` honours for both), which also keeps its forked sender processes away.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from msad_deploy.runtime.artifacts import read_sidecar, sidecar_path, write_sidecar
from msad_deploy.runtime.backends import import_optional
from msad_deploy.runtime.backends.openvino import (
    OPENVINO_METADATA_KEY,
    import_openvino,
    openvino_telemetry_off,
    weights_path,
)

from .metadata import library_versions
from .onnx import PRECISIONS, OnnxExportOptions, export_onnx

log = logging.getLogger("msad.export")
# Opset of the ONNX graph a checkpoint is converted through: GroupNorm as one node (see step 1).
OPENVINO_OPSET = 21
NMS_MODES = ("ort", "none")
# NNCF quantises the inputs (activations and weights) of these op types only.
QUANTIZED_TYPES = frozenset({"Convolution", "GroupConvolution"})
# In-graph preprocessing resizes with an antialiased bilinear Resize. OpenVINO (2026.4) converts it to
# Interpolate(linear_onnx, antialias=true), whose CPU plugin leaves the antialiasing out: on a 333x517
# frame resized to 128x199 its output matches an aliased resize within 0.5 and differs from the
# antialiased one (torch, ONNX Runtime) by up to 132 of 255 levels, so the IR would not see frames as
# training and evaluation do.
NO_PREPROCESS = (
    "--preprocess: OpenVINO's CPU plugin runs the graph's antialiased resize without its antialiasing "
    "(frames would differ from evaluation's by up to half the uint8 range); export without --preprocess: "
    "the Detector resizes frames on the host, exactly as evaluation does"
)
# Options that shape the traced graph: given with an ONNX source, they could not be honoured.
SHAPE_OPTIONS = (
    "input_size",
    "batch",
    "dynamic",
    "nms",
    "preprocess",
    "branch",
    "test_size",
    "size_divisibility",
)


@dataclass
class OpenVinoExportOptions:
    """What ``msad export openvino`` was asked for (see its --help). Shape options left None take the
    ONNX export's defaults for a checkpoint; an ONNX source has them fixed already."""

    precision: str = "fp32"
    input_size: tuple[int, int] | None = None
    batch: int | None = None
    dynamic: bool | None = None
    nms: str | None = None
    preprocess: bool | None = None
    branch: str | None = None
    test_size: int | None = None
    size_divisibility: int | None = None
    calib_data: Path | None = None
    calib_images: int = 64

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.nms is not None and self.nms not in NMS_MODES:
            raise ValueError(
                f"--nms must be one of {NMS_MODES} for OpenVINO, got {self.nms!r} (EfficientNMS_TRT is a "
                "TensorRT plugin)"
            )
        if self.batch is not None and self.batch < 1:
            raise ValueError(f"--batch must be at least 1, got {self.batch}")
        if self.preprocess:
            raise ValueError(NO_PREPROCESS)
        if self.precision == "int8" and self.calib_data is None:
            raise ValueError(
                "--precision int8 needs calibration images: --calib-data DIR [--calib-images N] (a folder of "
                "images like the ones the model will see, e.g. data/synth/train)"
            )

    def onnx_options(self) -> OnnxExportOptions:
        """The fp32 ONNX export the IR is converted from (at ``OPENVINO_OPSET``: one node per GroupNorm)."""
        return OnnxExportOptions(
            input_size=self.input_size,
            batch=self.batch or 1,
            dynamic=bool(self.dynamic),
            opset=OPENVINO_OPSET,
            nms=self.nms or "ort",
            preprocess=bool(self.preprocess),
            precision="fp32",
            branch=self.branch,
            test_size=self.test_size,
            size_divisibility=self.size_divisibility,
        )


@contextlib.contextmanager
def quiet_openvino_tools() -> Iterator[None]:
    """Telemetry off (:func:`openvino_telemetry_off`), NNCF's info lines and progress bars hidden, for
    the block.

    NNCF reads the telemetry switch when it is first imported, so it is imported inside. NNCF logs
    through its ``nncf`` logger and draws rich progress bars on stdout; torch logs a CUDA warning
    when NNCF imports its extension loader. Errors still raise."""
    loggers = {name: logging.getLogger(name) for name in ("nncf", "torch.utils.cpp_extension")}
    levels = {name: logger.level for name, logger in loggers.items()}
    for logger in loggers.values():
        logger.setLevel(logging.ERROR)
    try:
        with openvino_telemetry_off(), contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for name, logger in loggers.items():
            logger.setLevel(levels[name])


def _onnx_source(source: Path, options: OpenVinoExportOptions) -> dict[str, Any]:
    """The sidecar of an ONNX source, checked: an fp32 ``msad export onnx`` graph OpenVINO can run."""
    given = [name for name in SHAPE_OPTIONS if getattr(options, name) not in (None, False)]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ValueError(
            f"{flags}: {source} was exported with its shapes and NMS fixed; export the checkpoint instead to "
            "choose them (msad export openvino CKPT ...)"
        )
    metadata = read_sidecar(source)
    if metadata.get("kind") != "onnx" or metadata.get("precision") != "fp32":
        raise ValueError(
            f"{source} is a {metadata.get('precision')} {metadata.get('kind')} artifact; the IR is converted from "
            "an fp32 ONNX export (`msad export onnx` without --precision), and --precision picks the IR's"
        )
    if metadata.get("preprocess"):
        raise ValueError(f"{source} has in-graph preprocessing; " + NO_PREPROCESS)
    if metadata.get("nms") == "trt":
        raise ValueError(
            f"{source} holds TensorRT's NMS (--nms trt), which runs only in TensorRT; export it with --nms ort "
            "or --nms none for OpenVINO"
        )
    return metadata


def _strip_onnx_metadata(source: Path, target: Path) -> None:
    """A copy of ``source`` without ``metadata_props`` (convert_model would carry them into the IR's
    rt_info, where the ONNX file's own metadata would describe the wrong artifact)."""
    import onnx

    model = onnx.load(str(source))
    del model.metadata_props[:]
    onnx.save(model, str(target))


def _quantize(model, onnx_metadata: dict[str, Any], options: OpenVinoExportOptions):
    """NNCF post-training int8 of the converted fp32 ``model``: (quantised model, calibration info)."""
    from msad_deploy.runtime.artifacts import metadata_spec

    from .precision import calibration_batches

    spec = metadata_spec(onnx_metadata)
    names = [port.get_any_name() for port in model.inputs]
    batch = 1 if onnx_metadata.get("dynamic") else int(onnx_metadata.get("batch") or 1)
    feeds, paths = calibration_batches(
        options.calib_data,
        options.calib_images,
        spec,
        tuple(onnx_metadata["input_size"]),
        bool(onnx_metadata.get("preprocess")),
        names,
        batch,
    )
    types = {op.get_type_name() for op in model.get_ordered_ops()}
    ignored = sorted(types - QUANTIZED_TYPES - {"Parameter", "Result", "Constant"})
    with quiet_openvino_tools():
        nncf = import_optional("nncf", "openvino", "int8 OpenVINO export (NNCF)")
        quantized = nncf.quantize(
            model,
            nncf.Dataset(feeds),
            subset_size=len(feeds),
            preset=nncf.QuantizationPreset.PERFORMANCE,  # symmetric weights and activations
            ignored_scope=nncf.IgnoredScope(types=ignored, validate=False),
        )
    info = {
        "folder": str(options.calib_data),
        "images": len(paths),
        "method": f"NNCF {getattr(nncf, '__version__', '')} post-training quantisation (OpenVINO), FakeQuantize on "
        "convolution inputs and weights only, preset performance (symmetric)",
    }
    return quantized, info


def export_openvino(source: str | Path, out: str | Path, options: OpenVinoExportOptions) -> dict[str, Any]:
    """Export ``source`` (a checkpoint, or an fp32 ONNX export with its sidecar) to the OpenVINO IR ``out``
    (``.xml``, with ``.bin`` and ``.xml.json`` beside it); returns the metadata written."""
    ov = import_openvino("msad export openvino")
    from .precision import calibration_images

    source, out = Path(source), Path(out)
    options.validate()
    if out.suffix.lower() != ".xml":
        raise ValueError(
            f"--out {out} must end in .xml (an OpenVINO IR is MODEL.xml with MODEL.bin beside it)"
        )
    from_onnx = source.suffix.lower() == ".onnx"
    onnx_metadata = _onnx_source(source, options) if from_onnx else None
    if options.precision == "int8":  # before the slow part: a folder without images is an error now
        calibration_images(options.calib_data, options.calib_images)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.stem}.tmp", dir=out.parent) as folder:
        work = Path(folder)
        onnx_path = work / "model.onnx"
        if from_onnx:
            _strip_onnx_metadata(source, onnx_path)
        else:
            level = log.level
            log.setLevel(logging.WARNING)  # the intermediate graph is not news (export_onnx logs here too)
            try:
                onnx_metadata = export_onnx(source, onnx_path, options.onnx_options())
            finally:
                log.setLevel(level)
            _strip_onnx_metadata(onnx_path, onnx_path)
        assert onnx_metadata is not None
        with quiet_openvino_tools():
            model = ov.convert_model(str(onnx_path))
        calibration = None
        if options.precision == "int8":
            model, calibration = _quantize(model, onnx_metadata, options)
        metadata = {
            **onnx_metadata,
            "kind": "openvino",
            "artifact": out.name,
            "precision": options.precision,
            "calibration": calibration,
            "versions": library_versions(),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "source_onnx": str(source) if from_onnx else None,
            "trt_version": None,
        }
        model.set_rt_info(json.dumps(metadata, sort_keys=True), [OPENVINO_METADATA_KEY])
        xml = work / out.name
        ov.save_model(model, str(xml), compress_to_fp16=options.precision == "fp16")
        metadata["weights_bytes"] = weights_path(xml).stat().st_size  # sidecar only: checked at load
        write_sidecar(xml, metadata)
        _check_written(xml)
        # weights first, then the graph that reads them, then the sidecar that describes both
        for name in (weights_path(out).name, out.name, sidecar_path(out).name):
            os.replace(work / name, out.parent / name)
    log.info(
        "exported %s (+ %s, %s, nms %s)", out, weights_path(out).name, options.precision, metadata["nms"]
    )
    return metadata


def _check_written(xml: Path) -> None:
    """Open the written IR with the runtime backend (IO against the spec, precision, metadata) before it
    is moved into place."""
    from msad_deploy.runtime.backends.openvino import OpenVinoBackend

    OpenVinoBackend(xml, device="cpu").close()


def register_openvino(sub) -> None:
    from .cli import _size, add_input_arguments

    parser = sub.add_parser(
        "openvino",
        help="checkpoint or fp32 ONNX -> OpenVINO IR (.xml + .bin), fp32/fp16/int8 (NNCF)",
        description=(
            "Convert the deployable model to an OpenVINO IR (FILE.xml + FILE.bin + FILE.xml.json) with "
            "openvino.convert_model, from the ONNX graph `msad export onnx` makes (a checkpoint is exported to it "
            "first; an fp32 ONNX export is converted as it is). The IR has the ONNX artifact's inputs and outputs "
            "(boxes [B,K,4], scores [B,K], labels [B,K], num_detections [B]; or the decoded outputs with --nms "
            "none). fp16 stores the weights as fp16; int8 is NNCF post-training quantisation of the convolutions, "
            "calibrated on --calib-data images (decode and NMS stay float). Then verified against eager PyTorch "
            "(msad export verify)."
        ),
    )
    parser.set_defaults(handler=_run_openvino)
    parser.add_argument(
        "source",
        type=Path,
        help="checkpoint written by msad train, or an fp32 .onnx written by msad export onnx (with its .json)",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="IR to write: FILE.xml (FILE.bin and FILE.xml.json beside it)"
    )
    parser.add_argument(
        "--precision", choices=list(PRECISIONS), default="fp32", help="IR precision (default fp32)"
    )
    parser.add_argument(
        "--input-size",
        type=_size,
        help="HxW of the padded HR-frame input (a multiple of the model's padding); default: the test size, padded",
    )
    parser.add_argument("--batch", type=int, help="fixed batch size (default 1)")
    add_input_arguments(parser)
    parser.add_argument(
        "--dynamic",
        action="store_true",
        default=None,
        help="dynamic batch and spatial size instead of fixed ones",
    )
    parser.add_argument(
        "--nms",
        choices=list(NMS_MODES),
        help="ort: NMS in the graph (ONNX NonMaxSuppression, converted to OpenVINO's); none: raw decoded outputs "
        "(default ort)",
    )
    parser.add_argument(
        "--preprocess",
        action="store_true",
        default=None,
        help="refused for OpenVINO, with the reason: its CPU plugin drops the antialiasing of the in-graph resize "
        "(the Detector resizes frames on the host instead)",
    )
    parser.add_argument("--branch", choices=["fused", "hr", "lr"], help="teacher checkpoints: the branch")
    parser.add_argument("--calib-data", type=Path, help="int8: folder of calibration images")
    parser.add_argument(
        "--calib-images", type=int, default=64, help="int8: calibration images to use (default 64)"
    )
    parser.add_argument(
        "--no-verify", action="store_true", help="skip the verification against eager PyTorch"
    )
    parser.add_argument(
        "--data", type=Path, help="dataset root for the AP check of the verification (optional)"
    )
    from msad_deploy.cli import add_bootstrap_arguments

    add_bootstrap_arguments(parser)


def _run_openvino(args) -> int:
    from .cli import _verify_and_report

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("msad").setLevel(logging.INFO)
    options = OpenVinoExportOptions(
        precision=args.precision,
        input_size=args.input_size,
        batch=args.batch,
        dynamic=args.dynamic,
        nms=args.nms,
        preprocess=args.preprocess,
        branch=args.branch,
        test_size=args.test_size,
        size_divisibility=args.size_divisibility,
        calib_data=args.calib_data,
        calib_images=args.calib_images,
    )
    metadata = export_openvino(args.source, args.out, options)
    print(
        f"wrote {args.out}, {weights_path(args.out).name} and {sidecar_path(args.out).name} "
        f"({metadata['precision']}, nms {metadata['nms']})"
    )
    if args.no_verify:
        return 0
    checkpoint = None if args.source.suffix.lower() == ".onnx" else args.source
    return _verify_and_report(
        args.out, checkpoint, args.data, None, bootstrap=args.bootstrap, bootstrap_seed=args.bootstrap_seed
    )


__all__ = ["OpenVinoExportOptions", "export_openvino", "quiet_openvino_tools", "register_openvino"]
