"""``msad export onnx``: a checkpoint -> a verified ONNX graph with the pyramid shift fused in.

Steps: rebuild the model from its checkpoint and inference spec; wrap the deployable part (``ExportGraph``: a student has no P7 and no teacher, a
teacher exports one branch); export with torch's ONNX exporter (fixed or dynamic batch and size);
check and slim the graph (onnx.checker, onnxslim; eval-mode BatchNorm ends up folded into the
convolutions by the exporter's optimiser, which is checked); append NMS (export/nms.py); reduce precision (fp16 network in the wrapper;
int8 Q/DQ calibrated on images, export/precision.py); write atomically with the metadata in ``metadata_props`` and in
``FILE.json`` beside it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from msad_deploy.data.transforms import padded_size
from msad_deploy.models.build import LoadedModel, load_model
from msad_deploy.models.spec import InferenceSpec
from msad_deploy.models.teacher import TEACHER_BRANCHES
from msad_deploy.runtime.artifacts import (
    ONNX_METADATA_KEY,
    atomic_path,
    metadata_spec,
    read_sidecar,
    tensor_info,
    write_sidecar,
)
from msad_deploy.runtime.preprocess import inference_network

from .metadata import base_metadata
from .nms import NMS_MODES, append_onnx_nms, append_trt_efficient_nms
from .wrappers import ExportGraph

log = logging.getLogger("msad.export")
PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_OPSET = 18


@dataclass
class OnnxExportOptions:
    """What ``msad export onnx`` was asked for (see its --help)."""

    input_size: tuple[int, int] | None = None  # HR-frame padded size, or the raw frame size with preprocess
    batch: int = 1
    dynamic: bool = False
    opset: int = DEFAULT_OPSET
    nms: str = "ort"
    trt_version: int = 10
    preprocess: bool = False
    precision: str = "fp32"
    branch: str | None = None
    calib_data: Path | None = None
    calib_images: int = 64
    slim: bool = True
    test_size: int | None = None  # HR-frame test size written into the spec (default: the training one)
    size_divisibility: int | None = None  # padding multiple written into the spec (default: the training one)

    def validate(self) -> None:
        if self.nms not in NMS_MODES:
            raise ValueError(f"--nms must be one of {NMS_MODES}, got {self.nms!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.batch < 1:
            raise ValueError(f"--batch must be at least 1, got {self.batch}")
        if self.opset < 18:
            raise ValueError(f"--opset {self.opset} is too old: the exporter needs opset 18 or newer")
        if self.trt_version not in (10, 11):
            raise ValueError(f"--trt-version must be 10 or 11, got {self.trt_version}")
        if self.precision == "int8" and self.calib_data is None:
            raise ValueError("--precision int8 needs calibration images: --calib-data DIR [--calib-images N]")


def load_for_export(checkpoint: str | Path, branch: str | None) -> tuple[LoadedModel, InferenceSpec]:
    """The checkpoint's model and spec; a teacher must name the branch to export."""
    loaded = load_model(checkpoint)
    spec = loaded.spec
    if spec.arch == "msad_teacher":
        if branch is None:
            raise ValueError(
                f"{checkpoint} is an aligned multi-scale teacher; it deploys one branch: pass --branch fused "
                "(its inference path), or export the distilled student instead"
            )
        if branch not in TEACHER_BRANCHES:
            raise ValueError(f"--branch must be one of {TEACHER_BRANCHES}, got {branch!r}")
        spec = spec.replace(teacher_branch=branch)
    elif branch not in (None, "fused"):
        raise ValueError(
            f"--branch applies to teacher checkpoints only; {checkpoint} is a {spec.arch!r} model"
        )
    return loaded, spec


def resolve_input_size(spec: InferenceSpec, options: OnnxExportOptions) -> tuple[int, int]:
    """The export size: the padded HR-frame batch size (or, with --preprocess, the raw frame size)."""
    if options.input_size is None:
        if options.preprocess:
            return (spec.test_min_size, spec.test_max_size)
        return padded_size(spec.test_min_size, spec.test_max_size, spec.size_divisibility)
    height, width = options.input_size
    if height <= 0 or width <= 0:
        raise ValueError(f"--input-size must be positive, got {height}x{width}")
    if not options.preprocess and (height % spec.size_divisibility or width % spec.size_divisibility):
        raise ValueError(
            f"--input-size {height}x{width} is not a multiple of {spec.size_divisibility} (the padding every "
            f"input gets so the pyramid levels align); use e.g. "
            f"{'x'.join(str(v) for v in padded_size(height, width, spec.size_divisibility))}"
        )
    return height, width


def _example_inputs(
    graph: ExportGraph, spec: InferenceSpec, size: tuple[int, int], batch: int, dynamic: bool = False
) -> tuple:
    """Inputs ``graph`` is traced with. Dynamic exports trace at batch 2 and :func:`dynamic_example_size`."""
    if dynamic:
        size, batch = dynamic_example_size(spec), 2
    if graph.preprocess is not None:
        return (torch.randint(0, 256, (batch, *size, 3), dtype=torch.uint8),)
    divisor = spec.input_divisor
    images = torch.randn(batch, 3, size[0] // divisor, size[1] // divisor)
    if graph.stage == "raw":
        return (images,)
    frame = torch.tensor([size[0], size[1]], dtype=torch.float32) * spec.frame_scale
    return images, frame.expand(batch, 2).clone()


def dynamic_example_size(spec: InferenceSpec) -> tuple[int, int]:
    """The HR-frame size to trace a dynamic graph at (batch 2): torch.export pins any dimension whose
    example is 0 or 1, and the coarsest level of a small input is 1x1. So: the smallest multiple of the
    padding at least twice the coarsest stride (every level at least 2x2), and two steps at least."""
    step = spec.size_divisibility
    side = max(2 * step, -(-2 * max(spec.strides) // step) * step)
    return side, side


def _dynamic_shapes(graph: ExportGraph, spec: InferenceSpec, dynamic: bool) -> dict | None:
    if not dynamic:
        return None
    batch = torch.export.Dim("batch", min=1, max=256)
    if graph.preprocess is not None:  # raw frames of any size
        frame_h, frame_w = (
            torch.export.Dim("frame_h", min=16, max=8192),
            torch.export.Dim("frame_w", min=16, max=8192),
        )
        return {"inputs": {0: batch, 1: frame_h, 2: frame_w}}
    # Spatial sizes move in steps of the padding multiple (in network-input pixels).
    step = spec.size_divisibility // spec.input_divisor
    height, width = torch.export.Dim("h", min=1, max=64), torch.export.Dim("w", min=1, max=64)
    shapes: dict[str, Any] = {"inputs": {0: batch, 2: step * height, 3: step * width}}
    if graph.stage != "raw":
        shapes["image_sizes"] = {0: batch}
    return shapes


def export_graph(
    graph: ExportGraph, example: tuple, path: Path, opset: int, dynamic_shapes: dict | None
) -> None:
    """torch.export + ONNX translation of ``graph`` to ``path`` (no post-processing)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # torch.export first (non-strict), then the ONNX translation of that program: letting
        # torch.onnx.export drive torch.export itself specialised the dynamic spatial sizes.
        program = torch.export.export(graph, example, dynamic_shapes=dynamic_shapes, strict=False)
        torch.onnx.export(
            program,
            (),
            str(path),
            dynamo=True,
            opset_version=opset,
            input_names=graph.input_names(),
            output_names=graph.output_names(),
            external_data=False,  # one self-contained file (models here are far below ONNX's 2 GB limit)
            verbose=False,
        )


def io_metadata(model) -> tuple[list[dict], list[dict]]:
    """Inputs and outputs of an ONNX model as ``tensor_info`` entries."""
    import onnx

    def entries(values) -> list[dict]:
        result = []
        for value in values:
            tensor = value.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
            result.append(tensor_info(value.name, dtype, shape))
        return result

    return entries(model.graph.input), entries(model.graph.output)


def _rename_dynamic_dims(model, graph: ExportGraph, dynamic: bool) -> None:
    """Give symbolic dimensions readable names (batch, height, width) in inputs and outputs."""
    if not dynamic:
        return
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if len(dims) and not dims[0].dim_value:
            dims[0].dim_param = "batch"
        if value.name == "images" and len(dims) == 4:
            dims[2].dim_param, dims[3].dim_param = "height", "width"
        elif value.name == "frames" and len(dims) == 4:
            dims[1].dim_param, dims[2].dim_param = "height", "width"
        elif value.name in ("boxes", "scores") and graph.stage == "raw" and len(dims) == 3:
            dims[1].dim_param = "locations"


def _quantize(onnx_model, spec: InferenceSpec, size, options: OnnxExportOptions, tmp: Path):
    """int8 Q/DQ version of the fp32 graph, calibrated on ``options.calib_data``; (model, calibration info)."""
    import onnx

    from .precision import ACTIVATIONS, calibration_batches, quantize_int8

    names = [i.name for i in onnx_model.graph.input]
    batch = 1 if options.dynamic else options.batch  # fixed-batch graphs take batch-sized feeds
    feeds, paths = calibration_batches(
        options.calib_data, options.calib_images, spec, size, options.preprocess, names, batch
    )
    # TensorRT's NMS plugin means a TensorRT engine: symmetric int8 activations, the only Q/DQ form it
    # builds; otherwise ONNX Runtime's, uint8, which its CPU provider fuses into QLinearConv throughout.
    activations = "int8" if options.nms == "trt" else "uint8"
    fp32 = tmp.with_name(tmp.name + ".fp32.onnx")
    try:
        onnx.save(onnx_model, str(fp32))
        quantize_int8(fp32, tmp, feeds, activations)
    finally:
        fp32.unlink(missing_ok=True)
    symmetry = "symmetric" if activations == "int8" else "asymmetric"
    info = {
        "folder": str(options.calib_data),
        "images": len(paths),
        "method": f"onnxruntime static QDQ, int8 weights per channel, {symmetry} {activations} activations "
        f"(for {ACTIVATIONS[activations]})",
        "activations": activations,
    }
    return onnx.load(str(tmp)), info


def export_onnx(checkpoint: str | Path, out: str | Path, options: OnnxExportOptions) -> dict[str, Any]:
    """Export ``checkpoint`` to ``out`` (ONNX) + ``out.json``; returns the metadata written."""
    import onnx
    import onnxslim

    options.validate()
    checkpoint, out = Path(checkpoint), Path(out)
    loaded, spec = load_for_export(checkpoint, options.branch)
    spec = spec.at_input(options.test_size, options.size_divisibility)
    size = resolve_input_size(spec, options)
    network = inference_network(loaded.model.eval(), spec).eval()
    stage = "raw" if options.nms == "none" else "candidates"
    half = options.precision == "fp16"
    graph = ExportGraph(network, spec, stage, preprocess=options.preprocess, half=half).eval()
    example = _example_inputs(graph, spec, size, options.batch, options.dynamic)
    with atomic_path(out) as tmp:
        export_graph(graph, example, tmp, options.opset, _dynamic_shapes(graph, spec, options.dynamic))
        onnx_model = onnx.load(str(tmp))
        if options.slim:
            onnx_model = onnxslim.slim(onnx_model)
        calibration = None
        if options.nms == "ort" or (options.nms == "trt" and options.trt_version == 11):
            onnx_model = append_onnx_nms(onnx_model, spec.nms_thresh, spec.max_detections)
        elif options.nms == "trt":
            onnx_model = append_trt_efficient_nms(
                onnx_model, spec.nms_thresh, spec.max_detections, spec.num_classes
            )
        kept = [o for o in onnx_model.graph.output if o.name != "network_input"]  # intermediate only
        del onnx_model.graph.output[:]
        onnx_model.graph.output.extend(kept)
        _rename_dynamic_dims(onnx_model, graph, options.dynamic)
        onnx.checker.check_model(onnx_model)
        left = [n.name for n in onnx_model.graph.node if n.op_type == "BatchNormalization"]
        if left:  # the exporter's optimiser folds eval-mode BatchNorm into the convolutions
            raise RuntimeError(f"BatchNorm was not folded into convolutions: {left[:3]}")
        if options.precision == "int8":
            onnx_model, calibration = _quantize(onnx_model, spec, size, options, tmp)
        inputs, outputs = io_metadata(onnx_model)
        metadata = base_metadata("onnx", out, spec, checkpoint)
        metadata.update(
            inputs=inputs,
            outputs=outputs,
            nms=options.nms,
            trt_version=options.trt_version if options.nms == "trt" else None,
            preprocess=options.preprocess,
            precision=options.precision,
            calibration=calibration,
            opset=options.opset,
            input_size=list(size),
            batch=None if options.dynamic else options.batch,
            dynamic=options.dynamic,
        )
        del onnx_model.metadata_props[:]
        onnx.helper.set_model_props(onnx_model, {ONNX_METADATA_KEY: json.dumps(metadata, sort_keys=True)})
        onnx.save(onnx_model, str(tmp))
    write_sidecar(out, metadata)
    log.info("exported %s (%s, nms %s, %s)", out, "x".join(map(str, size)), options.nms, options.precision)
    return metadata


def quantize_onnx(
    source: str | Path, out: str | Path, calib_data: str | Path, calib_images: int = 64
) -> dict[str, Any]:
    """int8 Q/DQ copy of an fp32 export ``source`` (with its sidecar) at ``out``: the same graph and
    metadata, calibrated on ``calib_data``, without tracing the checkpoint again. Returns the metadata."""
    import onnx

    source, out = Path(source), Path(out)
    metadata = read_sidecar(source)
    if metadata.get("kind") != "onnx" or metadata.get("precision") != "fp32":
        raise ValueError(
            f"{source} is a {metadata.get('precision')} {metadata.get('kind')} artifact; int8 is made from an fp32 ONNX export"
        )
    spec = metadata_spec(metadata)
    options = OnnxExportOptions(
        batch=metadata.get("batch") or 1,
        nms=metadata.get("nms") or "ort",
        dynamic=bool(metadata.get("dynamic")),
        preprocess=bool(metadata.get("preprocess")),
        precision="int8",
        calib_data=Path(calib_data),
        calib_images=calib_images,
    )
    options.validate()
    with atomic_path(out) as tmp:
        model = onnx.load(str(source))
        del model.metadata_props[:]
        quantized, calibration = _quantize(model, spec, tuple(metadata["input_size"]), options, tmp)
        inputs, outputs = io_metadata(quantized)
        metadata = {
            **metadata,
            "artifact": out.name,
            "inputs": inputs,
            "outputs": outputs,
            "precision": "int8",
            "calibration": calibration,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        del quantized.metadata_props[:]
        onnx.helper.set_model_props(quantized, {ONNX_METADATA_KEY: json.dumps(metadata, sort_keys=True)})
        onnx.save(quantized, str(tmp))
    write_sidecar(out, metadata)
    log.info("quantized %s to %s (int8, %d calibration images)", source, out, calibration["images"])
    return metadata
