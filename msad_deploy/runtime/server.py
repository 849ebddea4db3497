"""``msad serve ARTIFACT``: an HTTP detection service on FastAPI + uvicorn (``pip install 'msad-deploy[serve]'``).

Endpoints:

- ``POST /v1/detect``: an image as the request body (JPEG, PNG, ...) or as a multipart upload (the
  first file field) -> ``{"model", "image_size", "detections": [{"box", "score", "class_id",
  "class_name", "category_id"}]}`` (``?score_thresh=0.3`` raises the threshold). ``GET /v1/model``
  describes the model (classes, backend, batching).
- The Open Inference Protocol (KServe v2, what Triton speaks; ``tritonclient.http`` works against it):
  ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2``, ``GET /v2/models/NAME`` (metadata),
  ``GET /v2/models/NAME/ready``, ``POST /v2/models/NAME[/versions/1]/infer``. One input ``IMAGE``,
  ``UINT8``, shape ``[H, W, 3]`` or ``[B, H, W, 3]`` RGB (JSON ``data`` or the binary tensor extension);
  outputs ``boxes`` FP32 [B, K, 4] (xyxy, original pixels), ``scores`` FP32 [B, K], ``labels`` INT64
  [B, K] (-1 padding) and ``num_detections`` INT64 [B], K = the spec's max_detections, as JSON or binary.
- ``GET /metrics``: Prometheus text (requests, errors, latency, batch sizes, inference time).

Dynamic micro-batching: images arriving within ``max_wait_ms`` of the first are run as one batch
of at most ``max_batch`` on a worker thread, off the event loop; decoding runs in a thread pool.
Bad requests (empty or oversized body, not an image, truncated data, a decompression bomb, a tiny
image, a wrong tensor shape or dtype) get a 4xx with ``{"error": "..."}`` and the server goes on.
uvicorn stops on SIGTERM/SIGINT gracefully: no new connections, in-flight requests are answered
(the batcher runs until they are, at most ``--drain-timeout`` seconds), the batcher stops and the
model is released. A SIGTERM drain is how a container or service manager stops the server, so the
process then exits with status 0 (uvicorn itself would re-raise the signal after its shutdown and end
with 143); SIGINT (Ctrl+C) is still re-raised and ends the process as an interrupt.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations at definition time,
# and ``fastapi`` is imported inside create_app (an optional dependency), not at module level.

import asyncio
import contextlib
import importlib.util
import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from msad_deploy.data.coco import DEFAULT_MAX_IMAGE_PIXELS, ImageTooLargeError
from msad_deploy.runtime.images import MIN_IMAGE_SIDE
from msad_deploy.runtime.metrics import CONTENT_TYPE, ServerMetrics

INPUT_NAME = "IMAGE"
V2_TYPES = {"boxes": "FP32", "scores": "FP32", "labels": "INT64", "num_detections": "INT64"}
V2_DTYPES = {"FP32": np.float32, "INT64": np.int64, "UINT8": np.uint8}
HEADER_LENGTH = "inference-header-content-length"


@dataclass
class ServeOptions:
    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_body_bytes: int = 20 * 1024 * 1024
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    min_side: int = MIN_IMAGE_SIDE
    model_name: str | None = None

    def validate(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"--max-batch must be >= 1, got {self.max_batch}")
        if self.max_wait_ms < 0:
            raise ValueError(f"--max-wait-ms must be >= 0, got {self.max_wait_ms}")
        if self.max_body_bytes < 1:
            raise ValueError(f"--max-body-mb must be positive, got {self.max_body_bytes} bytes")


class RequestError(Exception):
    """A request the server refuses: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def image_error(error: Exception) -> RequestError:
    """A Detector input error -> the 4xx that names it (413 over the pixel limit, else 400/422)."""
    if isinstance(error, ImageTooLargeError):
        return RequestError(413, str(error))
    text = str(error)
    if "at least" in text and "pixels" in text:
        return RequestError(422, text)
    return RequestError(400, text)


class MicroBatcher:
    """Collects images for up to ``max_wait_ms`` (or until ``max_batch``) and runs them as one batch.

    The model runs on one worker thread (``detect_tensors``), so the event loop never blocks on it;
    the Detector groups images by padded size, so batching does not change an image's detections.
    """

    def __init__(self, detector: Any, max_batch: int, max_wait_ms: float, metrics: ServerMetrics) -> None:
        self.detector = detector
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.metrics = metrics
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="msad-infer")
        self.running = False

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._loop())
        self.running = True

    async def stop(self) -> None:
        """Finish what is queued, then stop the worker."""
        self.running = False
        if self.queue is not None and self.task is not None:
            await self.queue.put(None)
            await self.task
        self.executor.shutdown(wait=True)

    async def submit(self, image: Any) -> Any:
        if not self.running or self.queue is None:
            raise RequestError(503, "the server is shutting down")
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((image, future))
        return await future

    async def _loop(self) -> None:
        assert self.queue is not None
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            item = await self.queue.get()
            if item is None:
                break
            batch = [item]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    if self.queue.empty():
                        remaining = deadline - loop.time()
                        if remaining <= 0:
                            break
                        item = await asyncio.wait_for(self.queue.get(), remaining)
                    else:
                        item = self.queue.get_nowait()
                except (asyncio.TimeoutError, TimeoutError):
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            batch = [(image, future) for image, future in batch if not future.cancelled()]
            if not batch:
                continue
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(
                    self.executor, self.detector.detect_tensors, [image for image, _ in batch]
                )
            except Exception as error:  # the whole batch failed: each request gets the error
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            self.metrics.inference.observe(time.perf_counter() - started)
            self.metrics.batch_size.observe(len(batch))
            self.metrics.images.inc(amount=len(batch))
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)


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


def route_label(path: str) -> str:
    """Metrics label of a path (model names folded into ``{name}``)."""
    if path.startswith("/v2/models/"):
        parts = path.split("/")
        tail = "/".join(parts[4:])
        if "/versions/" in path:
            tail = "/".join(["versions", "{version}", *parts[6:]])
        return "/v2/models/{name}" + (f"/{tail}" if tail else "")
    if path in ("/v1/detect", "/v1/model", "/v2", "/v2/health/live", "/v2/health/ready", "/metrics"):
        return path
    return "other"


def parse_v2_request(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
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
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(400, f"the inference request is not valid JSON ({err})") from err
    if not isinstance(request, dict):
        raise RequestError(400, "the inference request must be a JSON object with 'inputs'")
    return request, binary


def v2_image_array(request: dict[str, Any], binary: bytes) -> np.ndarray:
    """The IMAGE input as uint8 [B, H, W, 3]; every shape, dtype and size problem is a 400."""
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
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise RequestError(400, f"input {INPUT_NAME}: 'shape' must be a list of integers, got {shape!r}")
    if len(shape) == 3:
        shape = [1, *shape]
    if len(shape) != 4 or shape[-1] != 3 or min(shape) < 1:
        raise RequestError(
            400,
            f"input {INPUT_NAME} has shape {tensor.get('shape')}; expected [H, W, 3] or [B, H, W, 3] (RGB, B >= 1)",
        )
    count = int(np.prod(shape))
    parameters = tensor.get("parameters") or {}
    if "binary_data_size" in parameters:
        size = parameters["binary_data_size"]
        if not isinstance(size, int) or size != len(binary):
            raise RequestError(
                400, f"input {INPUT_NAME}: binary_data_size {size} but {len(binary)} bytes follow the header"
            )
        if size != count:
            raise RequestError(
                400, f"input {INPUT_NAME}: shape {tensor.get('shape')} needs {count} bytes, got {size}"
            )
        return np.frombuffer(binary, dtype=np.uint8).reshape(shape)
    if "data" not in tensor:
        raise RequestError(400, f"input {INPUT_NAME} has neither 'data' nor binary data")
    try:
        values = np.asarray(tensor["data"], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise RequestError(400, f"input {INPUT_NAME}: 'data' must hold integers 0..255 ({err})") from err
    if values.size != count:
        raise RequestError(
            400, f"input {INPUT_NAME}: shape {tensor.get('shape')} needs {count} values, got {values.size}"
        )
    if values.size and (values.min() < 0 or values.max() > 255):
        raise RequestError(400, f"input {INPUT_NAME}: UINT8 values must be within 0..255")
    return values.astype(np.uint8).reshape(shape)


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


def create_app(detector: Any, options: ServeOptions | None = None):
    """The FastAPI application serving ``detector`` (see the module docstring)."""
    from msad_deploy.runtime.backends import import_optional

    fastapi = import_optional("fastapi", "serve", "msad serve")
    if importlib.util.find_spec("python_multipart") is None and importlib.util.find_spec("multipart") is None:
        import_optional("python_multipart", "serve", "msad serve (multipart uploads)")
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from msad_deploy import __version__

    options = options or ServeOptions()
    options.validate()
    name = options.model_name or detector.path.stem
    metrics = ServerMetrics()
    batcher = MicroBatcher(detector, options.max_batch, options.max_wait_ms, metrics)
    k = detector.spec.max_detections

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()  # after uvicorn has answered the in-flight requests

    app = fastapi.FastAPI(title="msad-deploy", version=__version__, lifespan=lifespan)
    app.state.batcher = batcher
    app.state.metrics = metrics
    app.state.detector = detector

    def error_response(status: int, message: str):
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(RequestError)
    async def _request_error(request, error: RequestError):
        return error_response(error.status, error.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, error):
        return error_response(error.status_code, str(error.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, error):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in error.errors()
        )
        return error_response(422, f"invalid request: {problems}")

    @app.exception_handler(Exception)
    async def _internal_error(request, error: Exception):
        return error_response(500, f"internal error: {type(error).__name__}: {error}")

    @app.middleware("http")
    async def _observe(request, call_next):
        started = time.perf_counter()
        metrics.in_flight.inc(amount=1)
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            metrics.in_flight.inc(amount=-1)
            metrics.observe_request(route_label(request.url.path), status, time.perf_counter() - started)

    def check_model(model: str) -> None:
        if model != name:
            raise RequestError(404, f"unknown model {model!r}; this server serves {name!r}")

    async def to_tensor(image: Any) -> Any:
        try:
            return await run_in_threadpool(detector.to_tensor, image)
        except (ValueError, OSError) as err:
            raise image_error(err) from err

    @app.post("/v1/detect")
    async def detect(request: fastapi.Request, score_thresh: float | None = None):
        if score_thresh is not None and not 0.0 <= score_thresh <= 1.0:
            raise RequestError(400, f"score_thresh must be within [0, 1], got {score_thresh}")
        body = await read_body(request, options.max_body_bytes)
        tensor = await to_tensor(await image_bytes(request, body))
        result = await batcher.submit(tensor)
        payload = result.to_dict()
        if score_thresh is not None:
            payload["detections"] = [d for d in payload["detections"] if d["score"] >= score_thresh]
        return {"model": name, **payload}

    @app.get("/v1/model")
    async def model_info():
        return {
            "name": name,
            **detector.info(),
            "serve": {"max_batch": options.max_batch, "max_wait_ms": options.max_wait_ms},
            "category_ids": detector.category_ids,
        }

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        if not batcher.running:
            raise RequestError(503, "not ready")
        return {"ready": True}

    @app.get("/v2")
    async def server_metadata():
        return {"name": "msad-deploy", "version": __version__, "extensions": ["binary_tensor_data"]}

    def metadata() -> dict[str, Any]:
        return {
            "name": name,
            "versions": ["1"],
            "platform": f"msad_deploy_{detector.backend_name}",
            "inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, -1, -1, 3]}],
            "outputs": [
                {"name": "boxes", "datatype": "FP32", "shape": [-1, k, 4]},
                {"name": "scores", "datatype": "FP32", "shape": [-1, k]},
                {"name": "labels", "datatype": "INT64", "shape": [-1, k]},
                {"name": "num_detections", "datatype": "INT64", "shape": [-1]},
            ],
        }

    @app.get("/v2/models/{model}")
    async def model_metadata(model: str):
        check_model(model)
        return metadata()

    @app.get("/v2/models/{model}/versions/{version}")
    async def model_version_metadata(model: str, version: str):
        check_model(model)
        return metadata()

    @app.get("/v2/models/{model}/ready")
    async def model_ready(model: str):
        check_model(model)
        if not batcher.running:
            raise RequestError(503, "not ready")
        return {"name": name, "ready": True}

    async def infer(request: fastapi.Request, model: str):
        check_model(model)
        body = await read_body(request, options.max_body_bytes)
        v2_request, binary = parse_v2_request(body, request.headers.get(HEADER_LENGTH))
        images = v2_image_array(v2_request, binary)
        tensors = [await to_tensor(image) for image in images]
        results = await asyncio.gather(*(batcher.submit(tensor) for tensor in tensors))
        outputs = v2_outputs(list(results), k)
        parameters = v2_request.get("parameters") or {}
        default_binary = bool(parameters.get("binary_data_output", False))
        requested = v2_request.get("outputs")
        if requested is None:
            wanted = [(n, default_binary) for n in outputs]
        else:
            if not isinstance(requested, list):
                raise RequestError(400, "'outputs' must be a list of {'name': ...}")
            wanted = []
            for entry in requested:
                output = entry.get("name") if isinstance(entry, dict) else None
                if output not in outputs:
                    raise RequestError(400, f"unknown output {output!r}; the outputs are {list(outputs)}")
                binary_flag = (entry.get("parameters") or {}).get("binary_data", default_binary)
                wanted.append((output, bool(binary_flag)))
        tensors_json, blobs = [], []
        for output, as_binary in wanted:
            array = outputs[output]
            entry: dict[str, Any] = {"name": output, "datatype": V2_TYPES[output], "shape": list(array.shape)}
            if as_binary:
                blob = np.ascontiguousarray(array).tobytes()
                entry["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                entry["data"] = array.reshape(-1).tolist()
            tensors_json.append(entry)
        response: dict[str, Any] = {"model_name": name, "model_version": "1", "outputs": tensors_json}
        if "id" in v2_request:
            response["id"] = v2_request["id"]
        if not blobs:
            return JSONResponse(response)
        header = json.dumps(response).encode()
        return Response(
            header + b"".join(blobs),
            media_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(len(header))},
        )

    @app.post("/v2/models/{model}/infer")
    async def v2_infer(request: fastapi.Request, model: str):
        return await infer(request, model)

    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def v2_infer_version(request: fastapi.Request, model: str, version: str):
        if version not in ("1", ""):
            raise RequestError(404, f"model {model!r} has version 1 only, not {version!r}")
        return await infer(request, model)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app


def graceful_server(uvicorn: Any, config: Any) -> Any:
    """A ``uvicorn.Server`` whose graceful SIGTERM shutdown returns normally (exit status 0).

    uvicorn (0.29+) records the signals it handled and re-raises them once its shutdown is complete,
    with the default handlers restored, so a drained SIGTERM still killed the process (status 143) and
    skipped the cleanup after ``run()``. The recorded SIGTERM is dropped here once the server has
    shut down; SIGINT is left to uvicorn (re-raised: KeyboardInterrupt).
    """

    class GracefulServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                try:
                    yield
                finally:  # runs before uvicorn's re-raise, after the graceful shutdown
                    captured = getattr(self, "_captured_signals", None)
                    if captured:
                        captured[:] = [s for s in captured if s != signal.SIGTERM]

    return GracefulServer(config)


def serve(
    artifact: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    options: ServeOptions | None = None,
    score_thresh: float | None = None,
    log_level: str = "info",
    drain_timeout: int | None = 30,
    test_size: int | None = None,
) -> None:
    """Load ``artifact`` and serve it with uvicorn until SIGTERM / SIGINT (in-flight requests drain first)."""
    import torch

    from msad_deploy.runtime.backends import backend_for, host_threads, import_optional
    from msad_deploy.runtime.detector import Detector

    uvicorn = import_optional("uvicorn", "serve", "msad serve")
    import_optional("fastapi", "serve", "msad serve")
    options = options or ServeOptions()
    options.validate()
    detector = Detector.load(
        artifact,
        device,
        max_batch=options.max_batch,
        score_thresh=score_thresh,
        max_pixels=options.max_pixels,
        min_side=options.min_side,
        test_size=test_size,
        # ONNX Runtime's idle threads would spin on the cores that decode the next requests
        # (measured: see the onnxruntime backend's docstring)
        **({"allow_spinning": False} if backend_for(artifact) == "onnxruntime" else {}),
    )
    threads = host_threads(detector.backend_name, detector.device)
    if threads is not None:  # what msad bench measured: see host_threads
        torch.set_num_threads(threads)
    try:
        app = create_app(detector, options)
        name = options.model_name or detector.path.stem
        print(
            f"msad serve: {artifact} ({detector.backend_name} on {detector.device}"
            f"{f', torch on {threads} thread(s)' if threads else ''}) as model {name!r} at "
            f"http://{host}:{port} (max batch {options.max_batch}, max wait {options.max_wait_ms:g} ms)",
            flush=True,
        )
        config = uvicorn.Config(
            app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_timeout
        )
        graceful_server(uvicorn, config).run()
    finally:
        detector.close()
