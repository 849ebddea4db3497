"""NMS appended to an exported candidates graph, producing the output contract.

The candidates graph (``ExportGraph`` stage "candidates") ends in ``cand_boxes`` [B, N, 4],
``cand_scores`` [B, N] (0 = no candidate), ``cand_labels`` [B, N] int64 and optionally ``scale``
[B, 4]. Two NMS flavours are appended with plain ONNX nodes:

- "ort": ONNX NonMaxSuppression (ONNX Runtime; TensorRT 10 and 11 map it to their NMS layer).
  Class-aware through the coordinate offset torchvision's ``batched_nms`` uses (boxes of class c
  shifted by c * (max coordinate + 1), so boxes of different classes never overlap), one NMS
  "class" per image, at most K kept, then sorted by score and padded.
- "trt": the ``EfficientNMS_TRT`` plugin node of TensorRT 10 (scores one-hot per class).

Both end in ``boxes`` [B, K, 4], ``scores`` [B, K], ``labels`` [B, K] int64 (-1 padding) and
``num_detections`` [B] int64.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

NMS_MODES = ("ort", "trt", "none")
# EfficientNMS_TRT drops scores below this; candidates padded with score 0 must not survive.
TRT_SCORE_FLOOR = 1e-9
# TensorRT's ONNX parser imports unknown ops as plugins by op type; the custom domain keeps the
# node valid for onnx.checker (as other exporters of this plugin do).
TRT_PLUGIN_DOMAIN = "TRT"


class _Builder:
    """Collects nodes and constants with unique names under a prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{self.prefix}/{hint}_{self.count}"

    def const(self, value, dtype, hint: str = "const") -> str:
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(
        self, op_type: str, inputs: list[str], hint: str | None = None, outputs: int | list[str] = 1, **attrs
    ):
        names = outputs if isinstance(outputs, list) else [self.name(hint or op_type) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=self.name(op_type), **attrs))
        return names[0] if len(names) == 1 else names


def _finish(model: onnx.ModelProto, builder: _Builder, scale: bool, max_detections: int) -> onnx.ModelProto:
    graph = model.graph
    graph.node.extend(builder.nodes)
    graph.initializer.extend(builder.initializers)
    del graph.output[:]
    k = max_detections
    first = graph.input[0].type.tensor_type.shape.dim[0]  # the batch of the outputs is the inputs'
    batch = first.dim_value or first.dim_param or "batch"
    graph.output.extend(
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [batch, k, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, k]),
            helper.make_tensor_value_info("labels", TensorProto.INT64, [batch, k]),
            helper.make_tensor_value_info("num_detections", TensorProto.INT64, [batch]),
        ]
    )
    return model


def _scaled(b: _Builder, boxes: str, scale: bool, out: str) -> None:
    if scale:
        b.op("Mul", [boxes, b.op("Unsqueeze", ["scale", b.const([1], np.int64)])], outputs=[out])
    else:
        b.op("Identity", [boxes], outputs=[out])


def append_onnx_nms(model: onnx.ModelProto, iou_threshold: float, max_detections: int) -> onnx.ModelProto:
    """Append ONNX NonMaxSuppression (class-aware via coordinate offsets) and the padded contract."""
    scale = any(o.name == "scale" for o in model.graph.output)
    b = _Builder("nms")
    k = max_detections
    axis1, axis2 = b.const([1], np.int64), b.const([2], np.int64)
    offset = b.op("Add", [b.op("ReduceMax", ["cand_boxes"], keepdims=0), b.const(1.0, np.float32)])
    class_offset = b.op("Mul", [b.op("Cast", ["cand_labels"], to=TensorProto.FLOAT), offset])
    nms_boxes = b.op("Add", ["cand_boxes", b.op("Unsqueeze", [class_offset, axis2])])
    selected = b.op(
        "NonMaxSuppression",
        [
            nms_boxes,
            b.op("Unsqueeze", ["cand_scores", axis1]),
            b.const([k], np.int64),
            b.const([iou_threshold], np.float32),
            b.const([0.0], np.float32),
        ],
    )  # [S, 3]: (batch, class 0, candidate), at most K per image
    pairs = b.op("Gather", [selected, b.const([0, 2], np.int64)], axis=1)  # [S, 2]
    dense = b.op(
        "ScatterND",
        [
            b.op(
                "ConstantOfShape",
                [b.op("Shape", ["cand_scores"])],
                value=helper.make_tensor("v", TensorProto.FLOAT, [1], [-1.0]),
            ),
            pairs,
            b.op("GatherND", ["cand_scores", pairs]),
        ],
    )  # [B, N]: kept scores, -1 elsewhere
    top_scores, top_index = b.op("TopK", [dense, b.const([k], np.int64)], axis=1, outputs=2)
    valid = b.op("Greater", [top_scores, b.const(0.0, np.float32)])  # [B, K]
    b.op(
        "Cast",
        [b.op("ReduceSum", [b.op("Cast", [valid], to=TensorProto.INT64), axis1], keepdims=0)],
        to=TensorProto.INT64,
        outputs=["num_detections"],
    )
    box_index = b.op(
        "Expand",
        [
            b.op("Unsqueeze", [top_index, axis2]),
            b.op("Concat", [b.op("Shape", [top_index]), b.const([4], np.int64)], axis=0),
        ],
    )
    boxes = b.op("GatherElements", ["cand_boxes", box_index], axis=1)
    boxes = b.op("Where", [b.op("Unsqueeze", [valid, axis2]), boxes, b.const(0.0, np.float32)])
    _scaled(b, boxes, scale, "boxes")
    b.op("Where", [valid, top_scores, b.const(0.0, np.float32)], outputs=["scores"])
    labels = b.op("GatherElements", ["cand_labels", top_index], axis=1)
    b.op("Where", [valid, labels, b.const(-1, np.int64)], outputs=["labels"])
    return _finish(model, b, scale, k)


def append_trt_efficient_nms(
    model: onnx.ModelProto, iou_threshold: float, max_detections: int, num_classes: int
) -> onnx.ModelProto:
    """Append TensorRT 10's ``EfficientNMS_TRT`` plugin node (runs only in TensorRT) and the contract."""
    scale = any(o.name == "scale" for o in model.graph.output)
    b = _Builder("trt_nms")
    k = max_detections
    one_hot = b.op(
        "OneHot",
        ["cand_labels", b.const(num_classes, np.int64), b.const([0.0, 1.0], np.float32)],
        axis=-1,
    )  # [B, N, C]
    class_scores = b.op("Mul", [one_hot, b.op("Unsqueeze", ["cand_scores", b.const([2], np.int64)])])
    num, boxes, scores, classes = b.op(
        "EfficientNMS_TRT",
        ["cand_boxes", class_scores],
        outputs=4,
        plugin_version="1",
        background_class=-1,
        max_output_boxes=k,
        score_threshold=TRT_SCORE_FLOOR,
        iou_threshold=float(iou_threshold),
        score_activation=0,
        class_agnostic=0,
        box_coding=0,
        domain=TRT_PLUGIN_DOMAIN,
    )
    if not any(entry.domain == TRT_PLUGIN_DOMAIN for entry in model.opset_import):
        model.opset_import.append(helper.make_opsetid(TRT_PLUGIN_DOMAIN, 1))
    count = b.op("Cast", [b.op("Squeeze", [num, b.const([1], np.int64)])], to=TensorProto.INT64)
    b.op("Identity", [count], outputs=["num_detections"])
    valid = b.op(
        "Less",
        [
            b.op("Range", [b.const(0, np.int64), b.const(k, np.int64), b.const(1, np.int64)]),
            b.op("Unsqueeze", [count, b.const([1], np.int64)]),
        ],
    )  # [B, K]
    _scaled(b, boxes, scale, "boxes")
    b.op("Identity", [scores], outputs=["scores"])
    b.op(
        "Where",
        [valid, b.op("Cast", [classes], to=TensorProto.INT64), b.const(-1, np.int64)],
        outputs=["labels"],
    )
    return _finish(model, b, scale, k)
