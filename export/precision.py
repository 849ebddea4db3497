"""Reduced-precision ONNX graphs: int8 Q/DQ calibrated on images (fp16 is done in the wrapper).

The calibration images are prepared here for every int8 export (:func:`calibration_batches`): the
ONNX Q/DQ graph below and the OpenVINO IR that NNCF quantises (export/openvino.py) see the same
inputs, made by the same resize, pad and normalisation as inference.

int8 uses ONNX Runtime's static quantisation in QDQ format: QuantizeLinear/DequantizeLinear
pairs around the network's convolutions (decode and NMS stay float32), symmetric int8 weights
per output channel. Activations take one of two forms (``ACTIVATIONS``):

- ``int8``: symmetric int8, the Q/DQ form TensorRT 10 and 11 build int8 engines from (TensorRT takes
  no uint8 or nonzero zero points); kept for ``--nms trt`` exports;
- ``uint8``: asymmetric uint8, for ONNX Runtime. Its CPU provider fuses DQ -> Conv -> Q into
  QLinearConv for all 64 of the student's convolutions with uint8 activations but for 24 of them
  with int8 ones (the other 40 run as DequantizeLinear -> float Conv): the int8 form ran at 1.1x
  fp32 and the uint8 form at about 0.3x, with the same AP (docs/bench/lean_graphs.md).

Calibration runs the fp32 graph on ``--calib-images`` images of a folder, preprocessed exactly as
at inference.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msad_deploy.data.coco import decode_rgb
from msad_deploy.data.transforms import pad_images, resize_image
from msad_deploy.models.spec import InferenceSpec
from msad_deploy.runtime.preprocess import prepare_batch

# Activation forms of the int8 Q/DQ graph (see the module docstring): the consumer each is for.
ACTIVATIONS = {"int8": "TensorRT", "uint8": "ONNX Runtime"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def calibration_images(folder: str | Path, count: int) -> list[Path]:
    """The first ``count`` images (sorted) under ``folder``; a clear error when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"calibration folder {folder} does not exist (--calib-data)")
    if count < 1:
        raise ValueError(f"--calib-images must be at least 1, got {count}")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(
            f"calibration folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); point --calib-data at "
            "a folder of images like the ones the model will see, e.g. data/synth/val"
        )
    return images[:count]


def calibration_feeds(
    paths: list[Path],
    spec: InferenceSpec,
    input_size: tuple[int, int],
    preprocess_in_graph: bool,
    has_sizes: bool,
) -> Iterator[dict[str, np.ndarray]]:
    """One feed dict per image, as the exported graph takes it (batch 1)."""
    for path in paths:
        image = torch.from_numpy(decode_rgb(path)).permute(2, 0, 1).contiguous()
        if preprocess_in_graph:  # raw frames of the exported frame size
            frame = torch.nn.functional.interpolate(image[None].float(), size=input_size, mode="bilinear")
            yield {"frames": frame.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()}
            continue
        resized = resize_image(image, spec.test_min_size, spec.test_max_size)
        padded, sizes = pad_images([resized], spec.size_divisibility)
        height, width = input_size
        padded = torch.nn.functional.pad(padded, (0, width - padded.shape[-1], 0, height - padded.shape[-2]))
        batch = prepare_batch(padded, sizes, sizes, spec)
        feeds = {"images": batch.inputs.numpy()}
        if has_sizes:
            feeds["image_sizes"] = batch.image_sizes.float().numpy()
        yield feeds


def calibration_batches(
    folder: str | Path,
    count: int,
    spec: InferenceSpec,
    input_size: tuple[int, int],
    preprocess_in_graph: bool,
    input_names: list[str],
    batch: int,
) -> tuple[list[dict[str, np.ndarray]], list[Path]]:
    """Calibration feeds of ``count`` images of ``folder`` for a graph with inputs ``input_names``:
    ``batch`` images per feed (a fixed-batch graph's batch; the last feed padded with copies), each
    image prepared as at inference (:func:`calibration_feeds`). Returns (feeds, image paths).

    The one calibration path of every int8 export (ONNX Runtime's Q/DQ and NNCF's OpenVINO IR)."""
    paths = calibration_images(folder, count)
    has_sizes = "image_sizes" in input_names
    single = list(calibration_feeds(paths, spec, input_size, preprocess_in_graph, has_sizes))
    feeds = []
    for start in range(0, len(single), batch):
        group = single[start : start + batch]
        group += [group[-1]] * (batch - len(group))
        feeds.append({name: np.concatenate([f[name] for f in group]) for name in group[0]})
    return feeds, paths


class _QuantizationAdvice(logging.Filter):
    """Drops onnxruntime.quantization's warnings and infos (advice such as "Please consider to run
    pre-processing before quantization", logged on the root logger); its errors pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        parts = Path(record.pathname).parts
        return record.levelno >= logging.ERROR or not ("onnxruntime" in parts and "quantization" in parts)


@contextlib.contextmanager
def quiet_quantization_advice() -> Iterator[None]:
    """Inside the block, onnxruntime.quantization's advice lines are not printed. The graphs this project
    quantises are already checked, slimmed and shape-inferred by the export, which is what the advice
    suggests; printed at every int8 export, it only read as a problem."""
    advice = _QuantizationAdvice()
    root = logging.getLogger()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


def quantize_int8(
    source: Path, target: Path, feeds: list[dict[str, Any]], activations: str = "uint8"
) -> None:
    """Static Q/DQ quantisation of the convolutions of ``source`` into ``target``, calibrated on ``feeds``:
    int8 weights per channel; ``activations`` "uint8" (asymmetric, ONNX Runtime) or "int8" (symmetric,
    TensorRT)."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {tuple(ACTIVATIONS)}, got {activations!r}")
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(feeds)

        def get_next(self) -> dict[str, Any] | None:
            return next(self.items, None)

    with quiet_quantization_advice():
        quantize_static(
            str(source),
            str(target),
            Reader(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["Conv"],
            per_channel=True,
            activation_type=QuantType.QInt8 if activations == "int8" else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            extra_options={"ActivationSymmetric": activations == "int8", "WeightSymmetric": True},
        )
