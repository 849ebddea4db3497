"""The FastAPI application: routes wired to the protocol parsers, the bounded decoder and the batcher.

This module only connects the pieces (:mod:`.protocol` parses and validates, :mod:`.decode` decodes
within the limits, :mod:`.batcher` schedules model runs) and maps their errors to responses; it holds
no parsing or scheduling logic of its own.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations at definition time,
# and ``fastapi`` is imported inside create_app (an optional dependency), not at module level.

import contextlib
import importlib.util
import time
from typing import Any

from msad_deploy.runtime.metrics import CONTENT_TYPE, ServerMetrics
from msad_deploy.runtime.serving.batcher import MicroBatcher
from msad_deploy.runtime.serving.decode import BodyBudget, Decoder, declared_bytes, to_original
from msad_deploy.runtime.serving.errors import RequestError
from msad_deploy.runtime.serving.options import ServeOptions
from msad_deploy.runtime.serving.points import adaptive_policy
from msad_deploy.runtime.serving.protocol import (
    HEADER_LENGTH,
    encode_infer_response,
    image_bytes,
    model_config,
    model_metadata,
    parse_infer_request,
    read_body,
)

# Which operating point (HR-frame test size) served a response's images; comma-separated for several.
POINT_HEADER = "x-msad-operating-point"

ROUTES = ("/v1/detect", "/v1/model", "/v2", "/v2/health/live", "/v2/health/ready", "/metrics")


def route_label(path: str) -> str:
    """Metrics label of a path (model names folded into ``{name}``)."""
    if path.startswith("/v2/models/"):
        parts = path.split("/")
        tail = "/".join(parts[4:])
        if "/versions/" in path:
            tail = "/".join(["versions", "{version}", *parts[6:]])
        return "/v2/models/{name}" + (f"/{tail}" if tail else "")
    return path if path in ROUTES else "other"


def create_app(detector: Any, options: ServeOptions | None = None):
    """The FastAPI application serving ``detector`` (see :mod:`msad_deploy.runtime.serving`)."""
    from msad_deploy.runtime.backends import import_optional

    fastapi = import_optional("fastapi", "serve", "msad serve")
    if importlib.util.find_spec("python_multipart") is None and importlib.util.find_spec("multipart") is None:
        import_optional("python_multipart", "serve", "msad serve (multipart uploads)")
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from msad_deploy import __version__

    options = options or ServeOptions()
    options.validate()
    policy = adaptive_policy(detector, options)  # first: it sets the Detector to the largest size
    limits = options.limits_for(detector)
    name = options.model_name or detector.path.stem
    platform = f"msad_deploy_{detector.backend_name}"
    metrics = ServerMetrics()
    batcher = MicroBatcher(
        lambda images, size: detector.detect_tensors(images, test_size=size),
        options.max_batch,
        options.max_wait_ms,
        metrics,
        policy=policy,
        loaded_size=detector.spec.test_min_size,
    )
    decoder = Decoder(detector, limits.max_pixels, limits.decode_workers)
    bodies = BodyBudget(limits.max_inflight_bytes)
    k = detector.spec.max_detections

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()  # after uvicorn has answered the in-flight requests
            decoder.close()

    app = fastapi.FastAPI(title="msad-deploy", version=__version__, lifespan=lifespan)
    app.state.batcher = batcher
    app.state.decoder = decoder
    app.state.metrics = metrics
    app.state.detector = detector
    app.state.limits = limits
    app.state.policy = policy

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
        request.state.started = started  # the latency objective counts from here
        metrics.in_flight.inc(amount=1)
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            metrics.in_flight.inc(amount=-1)
            metrics.observe_request(route_label(request.url.path), status, time.perf_counter() - started)

    def served(request, sizes: list) -> dict[str, str]:
        """Count an answered inference request per point and against the objective; its header."""
        distinct = list(dict.fromkeys(sizes))
        for size in distinct:
            metrics.point_requests.inc(str(size))
        if options.slo_ms is not None:
            metrics.objective_requests.inc()
            if 1000.0 * (time.perf_counter() - request.state.started) > options.slo_ms:
                metrics.objective_misses.inc()
        return {POINT_HEADER: ",".join(map(str, distinct))}

    def check_model(model: str) -> None:
        if model != name:
            raise RequestError(404, f"unknown model {model!r}; this server serves {name!r}")

    @app.post("/v1/detect")
    async def detect(request: fastapi.Request, score_thresh: float | None = None):
        if score_thresh is not None and not 0.0 <= score_thresh <= 1.0:
            raise RequestError(400, f"score_thresh must be within [0, 1], got {score_thresh}")
        async with bodies.hold(declared_bytes(request.headers, limits.max_body_bytes)):
            body = await read_body(request, limits.max_body_bytes)
            decoded = await decoder.image(await image_bytes(request, body))
            del body
        [result], sizes = await batcher.submit([decoded.tensor], request.state.started)
        payload = to_original(result, decoded).to_dict()
        if score_thresh is not None:
            payload["detections"] = [d for d in payload["detections"] if d["score"] >= score_thresh]
        return JSONResponse(
            {"model": name, "operating_point": sizes[0], **payload}, headers=served(request, sizes)
        )

    @app.get("/v1/model")
    async def model_info():
        return {
            "name": name,
            **detector.info(),
            "serve": {
                "max_batch": options.max_batch,
                "max_wait_ms": options.max_wait_ms,
                "max_images": limits.max_images,
                "max_pixels": limits.max_pixels,
                "max_body_bytes": limits.max_body_bytes,
                "max_inflight_bytes": limits.max_inflight_bytes,
                "decode_workers": limits.decode_workers,
                "adaptive": None
                if policy is None
                else {
                    "slo_ms": options.slo_ms,
                    "hold_ms": options.hold_ms,
                    "operating_points": str(options.operating_points) if options.operating_points else None,
                    "points": [point.describe() for point in policy.points],
                    "dropped": [point.describe() for point in policy.dropped],
                },
            },
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

    def check_version(version: str) -> None:
        if version not in ("1", ""):
            raise RequestError(404, f"model {name!r} has version 1 only, not {version!r}")

    @app.get("/v2/models/{model}")
    async def model_metadata_route(model: str):
        check_model(model)
        return model_metadata(name, platform, k)

    @app.get("/v2/models/{model}/versions/{version}")
    async def model_version_metadata(model: str, version: str):
        check_model(model)
        check_version(version)
        return model_metadata(name, platform, k)

    def config() -> dict[str, Any]:
        return model_config(name, platform, k, limits.max_images, options.max_batch, options.max_wait_ms)

    @app.get("/v2/models/{model}/config")
    async def model_config_route(model: str):
        check_model(model)
        return config()

    @app.get("/v2/models/{model}/versions/{version}/config")
    async def model_version_config(model: str, version: str):
        check_model(model)
        check_version(version)
        return config()

    @app.get("/v2/models/{model}/ready")
    async def model_ready(model: str):
        check_model(model)
        if not batcher.running:
            raise RequestError(503, "not ready")
        return {"name": name, "ready": True}

    async def infer(request: fastapi.Request, model: str):
        check_model(model)
        async with bodies.hold(declared_bytes(request.headers, limits.max_body_bytes)):
            body = await read_body(request, limits.max_body_bytes)
            parsed = parse_infer_request(body, request.headers.get(HEADER_LENGTH), limits)
            decoded = await decoder.arrays(parsed.images)
            parsed.images = None  # a view into the body: let the body go with the budget
            del body
        results, sizes = await batcher.submit([d.tensor for d in decoded], request.state.started)
        payload, header_length = encode_infer_response(parsed, results, k, name)
        headers = served(request, sizes)
        if header_length is None:
            return JSONResponse(payload, headers=headers)
        return Response(
            payload,
            media_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(header_length), **headers},
        )

    @app.post("/v2/models/{model}/infer")
    async def v2_infer(request: fastapi.Request, model: str):
        return await infer(request, model)

    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def v2_infer_version(request: fastapi.Request, model: str, version: str):
        check_version(version)
        return await infer(request, model)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app
