"""Tiny ONNX graphs and sidecars named like real exports, for the TensorRT and Triton export tests.

The graphs are a 1x1 Conv (plus optional Q/DQ, fp16 casts, an EfficientNMS_TRT node or uint8
frame input) whose inputs carry the real names and symbolic dims; the sidecars follow
msad_deploy.runtime.artifacts. No exporter or trained model is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from msad_deploy.models.spec import InferenceSpec
from msad_deploy.runtime.artifacts import FORMAT, FORMAT_VERSION, tensor_info, write_sidecar

# Student-like spec: size_divisibility 128, input_shift 1 -> network input multiple of 64;
# test sizes 256 x 448 -> padded HR 256 x 512 -> network input 128 x 256.
SPEC = InferenceSpec(
    arch="fcos",
    num_classes=3,
    pyramid_shift=1,
    input_shift=1,
    size_divisibility=128,
    test_min_size=256,
    test_max_size=448,
    max_detections=100,
    class_names=["circle", "square", "triangle"],
)
K = SPEC.max_detections


def detection_outputs(batch: int | str = "batch") -> list[dict[str, Any]]:
    return [
        tensor_info("boxes", "float32", [batch, K, 4]),
        tensor_info("scores", "float32", [batch, K]),
        tensor_info("labels", "int64", [batch, K]),
        tensor_info("num_detections", "int64", [batch]),
    ]


def image_inputs(
    batch: int | str = "batch", size: tuple[Any, Any] = ("height", "width")
) -> list[dict[str, Any]]:
    return [
        tensor_info("images", "float32", [batch, 3, size[0], size[1]]),
        tensor_info("image_sizes", "float32", [batch, 2]),
    ]


def frame_inputs(batch: int | str = "batch") -> list[dict[str, Any]]:
    return [tensor_info("frames", "uint8", [batch, "height", "width", 3])]


def make_sidecar(
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]] | None = None,
    *,
    nms: str = "ort",
    precision: str = "fp32",
    preprocess: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    outputs = outputs if outputs is not None else detection_outputs(inputs[0]["shape"][0])
    dynamic = any(isinstance(d, str) for t in inputs + outputs for d in t["shape"])
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "spec": SPEC.to_dict(),
        "inputs": inputs,
        "outputs": outputs,
        "nms": nms,
        "preprocess": preprocess,
        "precision": precision,
        "opset": 17,
        "dynamic": dynamic,
        "versions": {"msad_deploy": "0.1.0"},
        "source_checkpoint": "runs/student/best.pt",
        "source_sha256": "0" * 64,
        "created": "2025-01-01T00:00:00",
    }
    metadata.update(extra)
    return metadata


def conv_onnx(
    path: Path,
    metadata: dict[str, Any],
    *,
    qdq: bool = False,
    fp16: bool = False,
    efficient_nms: bool = False,
    external_data: bool = False,
) -> Path:
    """A 1x1 Conv over the sidecar's first input (uint8 NHWC frames are cast and transposed first).

    Every sidecar input is a graph input; the Conv result is the graph output named like the
    sidecar's first output, further inputs are copied to the next outputs (a real build only needs
    the inputs to match the sidecar).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def value_info(info, elem=None):
        elem = (
            elem
            or {"float32": TensorProto.FLOAT, "uint8": TensorProto.UINT8, "int64": TensorProto.INT64}[
                info["dtype"]
            ]
        )
        return helper.make_tensor_value_info(info["name"], elem, info["shape"])

    first = metadata["inputs"][0]
    nodes, inits = [], []
    x = first["name"]
    if first["dtype"] == "uint8":
        nodes.append(helper.make_node("Cast", [x], ["frames_f"], to=TensorProto.FLOAT))
        nodes.append(helper.make_node("Transpose", ["frames_f"], ["nchw"], perm=[0, 3, 1, 2]))
        x = "nchw"
    if qdq:
        inits += [numpy_helper.from_array(np.array(0.02, np.float32), "x_scale")]
        inits += [numpy_helper.from_array(np.array(0, np.int8), "x_zero")]
        nodes.append(helper.make_node("QuantizeLinear", [x, "x_scale", "x_zero"], ["x_q"]))
        nodes.append(helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"]))
        x = "x_dq"
    weight = np.random.default_rng(0).standard_normal((4, 3, 1, 1)).astype(np.float16 if fp16 else np.float32)
    inits.append(numpy_helper.from_array(weight, "conv_w"))
    if fp16:
        nodes.append(helper.make_node("Cast", [x], ["x16"], to=TensorProto.FLOAT16))
        x = "x16"
    nodes.append(helper.make_node("Conv", [x, "conv_w"], ["conv"]))
    y = "conv"
    if fp16:
        nodes.append(helper.make_node("Cast", ["conv"], ["conv32"], to=TensorProto.FLOAT))
        y = "conv32"
    out_name = metadata["outputs"][0]["name"]
    if efficient_nms:
        nodes.append(helper.make_node("EfficientNMS_TRT", [y], [out_name], score_threshold=0.05))
    else:
        nodes.append(helper.make_node("Identity", [y], [out_name]))
    batch = first["shape"][0]
    outputs = [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [batch, 4, None, None])]
    # Further inputs (image_sizes) pass through to the next outputs, so every input is used.
    for info, out in zip(metadata["inputs"][1:], metadata["outputs"][1:]):
        nodes.append(helper.make_node("Identity", [info["name"]], [out["name"]]))
        outputs.append(value_info({**info, "name": out["name"]}))
    graph = helper.make_graph(nodes, "tiny", [value_info(i) for i in metadata["inputs"]], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data:
        onnx.save(
            model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0
        )
    else:
        onnx.save(model, str(path))
    write_sidecar(path, metadata)
    return path
