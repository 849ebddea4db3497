"""Request parsing and validation, and response encoding: ``/v1/detect`` bodies and the KServe v2
(Open Inference Protocol) ``infer`` request, metadata and config, as Triton and ``tritonclient`` speak them.

Everything here is a pure function of the bytes and the limits, with no model and no event loop: a
malformed request becomes a :class:`RequestError` (4xx naming the problem and, for limits, the
option) before any image is decoded or any model time is spent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from msad_deploy.runtime.serving.errors import RequestError
from msad_deploy.runtime.serving.options import Limits

INPUT_NAME = "IMAGE"
OUTPUT_NAMES = ("boxes", "scores", "labels", "num_detections")
V2_TYPES = {"boxes": "FP32", "scores": "FP32", "labels": "INT64", "num_detections": "INT64"}
HEADER_LENGTH = "inference-header-content-length"


async def read_body(request: Any, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (from Content-Length, or while streaming)."""
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding not in ("identity", ""):
        raise RequestError(415, f"Content-Encoding {encoding!r} is not supported; send the body uncompressed")
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_bytes = int(declared)
        except ValueError as err:
            raise RequestError(400, f"invalid Content-Length {declared!r}") from err
        if declared_bytes > limit:
            raise RequestError(
                413,
                f"the request body is {declared_bytes:,} bytes, over the limit of {limit:,} bytes (--max-body-mb)",
            )
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise RequestError(413, f"the request body is over the limit of {limit:,} bytes (--max-body-mb)")
        chunks.append(chunk)
    return b"".join(chunks)


async def image_bytes(request: Any, body: bytes) -> bytes:
    """The image of a /v1/detect request: the first file of a multipart form, or the raw body."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        from starlette.datastructures import UploadFile
        from starlette.formparsers import MultiPartException, MultiPartParser

        async def stream():
            yield body
            yield b""

        try:
            form = await MultiPartParser(request.headers, stream(), max_files=4, max_fields=16).parse()
        except MultiPartException as err:
            raise RequestError(400, f"malformed multipart body: {err.message}") from err
        files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        if not files:
            raise RequestError(400, "the multipart form has no file field; upload the image as a file")
        data = await files[0].read()
        await form.close()
        if not data:
            raise RequestError(400, f"the uploaded file {files[0].filename!r} is empty")
        return data
    if not body:
        raise RequestError(
            400, "the request body is empty; POST an image (JPEG, PNG, ...) or a multipart upload"
        )
    return body


@dataclass
class InferRequest:
    """A checked v2 infer request: ``images`` uint8 [B, H, W, 3]; ``outputs`` (name, as binary) in order."""

    images: np.ndarray | None  # None once decoded (it views the request body)
    outputs: list[tuple[str, bool]]
    id: Any = None


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError(400, f"{where} 'parameters' must be a JSON object, got {json.dumps(value)[:80]}")
    return value


def _flag(parameters: dict[str, Any], key: str, default: bool, where: str) -> bool:
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise RequestError(
            400, f"{where} parameter {key!r} must be true or false, got {json.dumps(value)[:80]}"
        )
    return value


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """(JSON header, trailing binary data) of a v2 infer request."""
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError as err:
            raise RequestError(400, f"invalid Inference-Header-Content-Length {header_length!r}") from err
        if not 0 < size <= len(body):
            raise RequestError(
                400, f"Inference-Header-Content-Length {size} does not fit a {len(body)}-byte body"
            )
        header, binary = body[:size], body[size:]
    else:
        header, binary = body, b""
    if not header:
        raise RequestError(400, "the request body is empty; send a v2 inference request (JSON)")
    try:
        request = json.loads(header)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise RequestError(400, f"the inference request is not valid JSON ({err})") from err
    if not isinstance(request, dict):
        raise RequestError(400, "the inference request must be a JSON object with 'inputs'")
    return request, binary


def check_shape(shape: Any, limits: Limits) -> tuple[int, int, int]:
    """(B, H, W) of an IMAGE shape [H, W, 3] or [B, H, W, 3], checked against the limits with Python
    integers (a shape whose element count overflows int64 is just too large, never an overflow)."""
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise RequestError(400, f"input {INPUT_NAME}: 'shape' must be a list of integers, got {shape!r}")
    dims = [1, *shape] if len(shape) == 3 else list(shape)
    if len(dims) != 4 or dims[-1] != 3 or min(dims) < 1:
        raise RequestError(
            400, f"input {INPUT_NAME} has shape {shape}; expected [H, W, 3] or [B, H, W, 3] (RGB, B >= 1)"
        )
    batch, height, width, _ = dims
    if batch > limits.max_images:
        raise RequestError(
            413,
            f"input {INPUT_NAME} holds {batch:,} images, over the limit of {limits.max_images} images per "
            "request (--max-images); send them in several requests",
        )
    if limits.max_pixels and height * width > limits.max_pixels:
        raise RequestError(
            413,
            f"input {INPUT_NAME}: images of {width}x{height} = {height * width:,} pixels, over the limit of "
            f"{limits.max_pixels:,} pixels (--max-pixels)",
        )
    return batch, height, width


def _uint8_values(data: Any, count: int, shape: list[int]) -> np.ndarray:
    """JSON ``data`` (flat or nested, row-major) -> uint8 [count]; only integers 0..255 are accepted."""
    try:
        values = np.asarray(data)
    except (ValueError, OverflowError) as err:  # ragged nesting, integers past int64
        raise RequestError(400, f"input {INPUT_NAME}: 'data' must be integers 0..255 ({err})") from err
    if values.dtype.kind not in "iu":  # floats, strings, booleans, objects: no silent conversion
        kind = {"f": "numbers with a fraction", "b": "booleans", "U": "strings"}.get(
            values.dtype.kind, "values"
        )
        raise RequestError(400, f"input {INPUT_NAME}: UINT8 'data' must be integers 0..255, got {kind}")
    values = values.reshape(-1)
    if values.size != count:
        raise RequestError(400, f"input {INPUT_NAME}: shape {shape} needs {count} values, got {values.size}")
    if values.size and (values.min() < 0 or values.max() > 255):
        raise RequestError(400, f"input {INPUT_NAME}: UINT8 values must be within 0..255")
    return values.astype(np.uint8)


def parse_infer_request(body: bytes, header_length: str | None, limits: Limits) -> InferRequest:
    """A v2 infer request body -> :class:`InferRequest`; every problem is a 4xx naming it (413 for limits)."""
    request, binary = split_body(body, header_length)
    parameters = _parameters(request.get("parameters"), "the request's")
    default_binary = _flag(parameters, "binary_data_output", False, "the request's")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise RequestError(400, f"'inputs' must list exactly one tensor, {INPUT_NAME!r}")
    tensor = inputs[0]
    if tensor.get("name") != INPUT_NAME:
        raise RequestError(400, f"unknown input {tensor.get('name')!r}; the model's input is {INPUT_NAME!r}")
    if tensor.get("datatype") != "UINT8":
        raise RequestError(
            400, f"input {INPUT_NAME} must be UINT8 RGB pixels, got datatype {tensor.get('datatype')!r}"
        )
    shape = tensor.get("shape")
    batch, height, width = check_shape(shape, limits)
    count = batch * height * width * 3
    outputs = requested_outputs(request.get("outputs"), default_binary)
    tensor_parameters = _parameters(tensor.get("parameters"), f"input {INPUT_NAME}")
    if "binary_data_size" in tensor_parameters:
        size = tensor_parameters["binary_data_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size != len(binary):
            raise RequestError(
                400, f"input {INPUT_NAME}: binary_data_size {size} but {len(binary)} bytes follow the header"
            )
        if size != count:
            raise RequestError(400, f"input {INPUT_NAME}: shape {shape} needs {count} bytes, got {size}")
        values = np.frombuffer(binary, dtype=np.uint8)
    elif "data" in tensor:
        values = _uint8_values(tensor["data"], count, shape)
    else:
        raise RequestError(400, f"input {INPUT_NAME} has neither 'data' nor binary data")
    return InferRequest(values.reshape(batch, height, width, 3), outputs, request.get("id"))


def requested_outputs(requested: Any, default_binary: bool) -> list[tuple[str, bool]]:
    """(name, as binary) per requested output; all of them when ``outputs`` is absent."""
    if requested is None:
        return [(name, default_binary) for name in OUTPUT_NAMES]
    if not isinstance(requested, list):
        raise RequestError(400, "'outputs' must be a list of {'name': ...}")
    wanted = []
    for entry in requested:
        name = entry.get("name") if isinstance(entry, dict) else None
        if name not in OUTPUT_NAMES:
            raise RequestError(400, f"unknown output {name!r}; the outputs are {list(OUTPUT_NAMES)}")
        where = f"output {name}"
        wanted.append(
            (name, _flag(_parameters(entry.get("parameters"), where), "binary_data", default_binary, where))
        )
    return wanted


def v2_outputs(results: list[Any], k: int) -> dict[str, np.ndarray]:
    """Results -> the padded output contract (boxes, scores, labels, num_detections)."""
    batch = len(results)
    boxes = np.zeros((batch, k, 4), np.float32)
    scores = np.zeros((batch, k), np.float32)
    labels = np.full((batch, k), -1, np.int64)
    num = np.zeros(batch, np.int64)
    for index, result in enumerate(results):
        n = min(len(result), k)
        boxes[index, :n] = result.boxes[:n]
        scores[index, :n] = result.scores[:n]
        labels[index, :n] = result.class_ids[:n]
        num[index] = n
    return {"boxes": boxes, "scores": scores, "labels": labels, "num_detections": num}


def encode_infer_response(
    request: InferRequest, results: list[Any], k: int, model: str
) -> tuple[dict[str, Any] | bytes, int | None]:
    """(JSON response, None), or (JSON header + binary tensors, the header's length) when any output is
    binary (the length goes in Inference-Header-Content-Length)."""
    outputs = v2_outputs(results, k)
    tensors, blobs = [], []
    for name, as_binary in request.outputs:
        array = outputs[name]
        entry: dict[str, Any] = {"name": name, "datatype": V2_TYPES[name], "shape": list(array.shape)}
        if as_binary:
            blob = np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.reshape(-1).tolist()
        tensors.append(entry)
    response: dict[str, Any] = {"model_name": model, "model_version": "1", "outputs": tensors}
    if request.id is not None:
        response["id"] = request.id
    if not blobs:
        return response, None
    header = json.dumps(response).encode()
    return header + b"".join(blobs), len(header)


def model_metadata(name: str, platform: str, k: int) -> dict[str, Any]:
    """``GET /v2/models/NAME``: the tensors (batch dimension -1)."""
    return {
        "name": name,
        "versions": ["1"],
        "platform": platform,
        "inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, -1, -1, 3]}],
        "outputs": [
            {"name": "boxes", "datatype": "FP32", "shape": [-1, k, 4]},
            {"name": "scores", "datatype": "FP32", "shape": [-1, k]},
            {"name": "labels", "datatype": "INT64", "shape": [-1, k]},
            {"name": "num_detections", "datatype": "INT64", "shape": [-1]},
        ],
    }


def model_config(
    name: str, platform: str, k: int, max_images: int, max_batch: int, max_wait_ms: float
) -> dict[str, Any]:
    """``GET /v2/models/NAME/config`` in Triton's model configuration form (what ``get_model_config``
    returns): ``max_batch_size`` is the per-request image limit; dims leave the batch dimension out."""
    return {
        "name": name,
        "platform": platform,
        "max_batch_size": max_images,
        "input": [
            {"name": INPUT_NAME, "data_type": "TYPE_UINT8", "format": "FORMAT_NHWC", "dims": [-1, -1, 3]}
        ],
        "output": [
            {"name": "boxes", "data_type": "TYPE_FP32", "dims": [k, 4]},
            {"name": "scores", "data_type": "TYPE_FP32", "dims": [k]},
            {"name": "labels", "data_type": "TYPE_INT64", "dims": [k]},
            {"name": "num_detections", "data_type": "TYPE_INT64", "dims": [1], "reshape": {"shape": []}},
        ],
        "dynamic_batching": {
            "preferred_batch_size": [max_batch],
            "max_queue_delay_microseconds": int(round(max_wait_ms * 1000)),
        },
        "version_policy": {"latest": {"num_versions": 1}},
    }
