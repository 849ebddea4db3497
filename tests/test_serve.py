"""msad serve as a real uvicorn server in a subprocess on 127.0.0.1: /v1/detect (httpx), the KServe v2
protocol (the real tritonclient.http client, model config included), 64 concurrent requests micro-batched,
/metrics, every bad request (limits and malformed v2 requests included) answered with a 4xx while the server
keeps serving and logs no traceback, a large JPEG decoded reduced, a large request interleaved with a small
one, and SIGTERM draining in-flight requests."""

from __future__ import annotations

import asyncio
import io
import json
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from msad_deploy.benchmarks.serve_compare import LocalServer, free_port
from PIL import Image

from msad_deploy.runtime import Detector, Result
from tests.runtime_fixtures import assert_same_results, sample_images

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

MAX_BODY_MB = 0.25
MAX_PIXELS = 1_000_000


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


class ServerProcess(LocalServer):
    """``msad serve`` (CPU, one OpenMP thread) once it is ready; ``stop()`` sends SIGTERM and returns its
    exit code and output."""

    def __init__(self, checkpoint: Path, *args: str) -> None:
        super().__init__("test", checkpoint, ["--device", "cpu", *args], 120, {"OMP_NUM_THREADS": "1"})
        self.wait_ready()

    def stop(self) -> tuple[int, str]:  # type: ignore[override]
        code = super().stop()
        self.output.seek(0)
        return code, self.output.read()


@pytest.fixture(scope="module")
def server(runtime_checkpoint):
    process = ServerProcess(
        runtime_checkpoint,
        "--max-batch",
        "8",
        "--max-wait-ms",
        "30",
        "--max-body-mb",
        str(MAX_BODY_MB),
        "--max-pixels",
        str(MAX_PIXELS),
        "--max-inflight-mb",
        str(2 * MAX_BODY_MB),  # two max-size bodies at once: the concurrent tests wait on it too
        "--name",
        "student",
    )
    yield process
    code, output = process.stop()
    assert code == 0, f"a graceful SIGTERM drain should exit 0, got {code}:\n{output}"
    assert "Traceback" not in output, f"a request made the server log a traceback:\n{output}"


@pytest.fixture(scope="module")
def reference(runtime_checkpoint):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with Detector.load(runtime_checkpoint, device="cpu") as detector:
        yield detector
    torch.set_num_threads(threads)


def _result(boxes, scores, labels) -> Result:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    return Result(
        boxes, np.asarray(scores, np.float32), np.asarray(labels, np.int64), (), np.zeros(0), (0, 0)
    )


def _assert_matches(payload: dict, expected: Result) -> None:
    """A /v1/detect answer equals the in-process Detector's (batched runs: float tolerance)."""
    detections = payload["detections"]
    assert (payload["image_size"]["height"], payload["image_size"]["width"]) == expected.image_size
    assert sorted(d["class_name"] for d in detections) == sorted(expected.class_names)
    got = _result(
        [d["box"] for d in detections], [d["score"] for d in detections], [d["class_id"] for d in detections]
    )
    assert_same_results(got, expected, box_tol=1e-3, score_tol=1e-5)


def test_detect_body_and_multipart(server, reference) -> None:
    image = sample_images(1, seed=11)[0]
    expected = reference(image)
    for kwargs in (
        {"content": _png(image), "headers": {"content-type": "image/png"}},
        {"files": {"image": ("frame.png", _png(image), "image/png")}},
    ):
        response = httpx.post(f"{server.url}/v1/detect", timeout=60, **kwargs)
        assert response.status_code == 200, response.text
        payload = response.json()
        assert payload["model"] == "student"
        _assert_matches(payload, expected)
    strict = httpx.post(f"{server.url}/v1/detect?score_thresh=0.56", content=_png(image), timeout=60).json()
    assert all(d["score"] >= 0.56 for d in strict["detections"])
    assert len(strict["detections"]) == int((expected.scores >= 0.56).sum())
    info = httpx.get(f"{server.url}/v1/model", timeout=10).json()
    assert info["backend"] == "pytorch" and info["num_classes"] == 8 and info["serve"]["max_batch"] == 8
    assert info["serve"]["max_inflight_bytes"] == int(2 * MAX_BODY_MB * 1024 * 1024)


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


def test_64_concurrent_requests_are_answered_correctly_in_batches(server, reference) -> None:
    images = sample_images(64, seed=5)
    before = httpx.get(f"{server.url}/metrics", timeout=10).text

    async def fire() -> list:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(client.post("/v1/detect", content=_png(im)) for im in images))

    responses = asyncio.run(fire())
    for image, response in zip(images, responses):
        assert response.status_code == 200, response.text
        _assert_matches(response.json(), reference(image))
    after = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert after.startswith("# HELP")
    batches = _metric(after, "msad_batch_size_count") - _metric(before, "msad_batch_size_count")
    singles = _metric(after, 'msad_batch_size_bucket{le="1"}') - _metric(
        before, 'msad_batch_size_bucket{le="1"}'
    )
    images_run = _metric(after, "msad_batch_size_sum") - _metric(before, "msad_batch_size_sum")
    assert images_run == 64
    assert batches < 64 and singles < batches, "requests arriving together must share batches"
    assert _metric(after, 'msad_requests_total{route="/v1/detect",code="200"}') >= 64
    assert _metric(after, 'msad_request_duration_seconds_count{route="/v1/detect"}') >= 64
    assert "# TYPE msad_request_duration_seconds histogram" in after


def test_v2_protocol_with_tritonclient(server, reference) -> None:
    http = pytest.importorskip("tritonclient.http")
    image = sample_images(2, seed=21)
    client = http.InferenceServerClient(url=f"127.0.0.1:{server.port}", network_timeout=60)
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("student")
        metadata = client.get_model_metadata("student")
        config = client.get_model_config("student")
        assert config["name"] == "student" and config["max_batch_size"] == 8  # --max-images: --max-batch
        assert config["input"][0]["dims"] == [-1, -1, 3] and config["output"][0]["dims"] == [100, 4]
        assert client.get_model_config("student", model_version="1") == config
        assert metadata["inputs"] == [{"name": "IMAGE", "datatype": "UINT8", "shape": [-1, -1, -1, 3]}]
        assert [o["name"] for o in metadata["outputs"]] == ["boxes", "scores", "labels", "num_detections"]
        for binary in (True, False):
            batch = np.stack([image[0], image[0][::-1].copy()])  # [2, H, W, 3]
            request = http.InferInput("IMAGE", list(batch.shape), "UINT8")
            request.set_data_from_numpy(batch, binary_data=binary)
            outputs = [
                http.InferRequestedOutput(n, binary_data=binary)
                for n in ("boxes", "scores", "labels", "num_detections")
            ]
            result = client.infer("student", [request], outputs=outputs)
            boxes, scores = result.as_numpy("boxes"), result.as_numpy("scores")
            labels, num = result.as_numpy("labels"), result.as_numpy("num_detections")
            assert boxes.shape == (2, 100, 4) and boxes.dtype == np.float32 and labels.dtype == np.int64
            for index, frame in enumerate(batch):
                expected = reference(frame)
                n = int(num[index])
                assert n == len(expected) and (labels[index, n:] == -1).all()
                got = _result(boxes[index, :n], scores[index, :n], labels[index, :n])
                assert_same_results(got, expected, box_tol=1e-3, score_tol=1e-5)
        # [H, W, 3] without a batch dimension, the outputs left to their default (all, binary)
        single = http.InferInput("IMAGE", list(image[1].shape), "UINT8")
        single.set_data_from_numpy(image[1])
        result = client.infer("student", [single])
        assert int(result.as_numpy("num_detections")[0]) == len(reference(image[1]))
        with pytest.raises(Exception, match="unknown model 'nope'"):
            client.infer("nope", [single])
    finally:
        client.close()


def _binary_request(declared: int, data: bytes, shape: tuple[int, ...] = (8, 8, 3)) -> dict:
    """A v2 request with the binary tensor extension: JSON header, then ``data``."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "IMAGE",
                    "datatype": "UINT8",
                    "shape": list(shape),
                    "parameters": {"binary_data_size": declared},
                }
            ]
        }
    ).encode()
    return {"content": header + data, "headers": {"Inference-Header-Content-Length": str(len(header))}}


def _bad_requests() -> list[tuple[str, dict, int, str]]:
    rng = np.random.default_rng(0)
    good = sample_images(1)[0]
    jpeg = _jpeg(good)
    bomb = _png(np.zeros((1000, 1100), np.uint8))  # 1.1 MP (small as a file), over --max-pixels 1 MP
    v2 = "/v2/models/student/infer"

    def tensor(**fields) -> dict:
        base = {"name": "IMAGE", "datatype": "UINT8", "shape": [8, 8, 3], "data": [0] * 192}
        return {"json": {"inputs": [{**base, **fields}]}}

    return [
        ("/v1/detect", {"content": b""}, 400, "body is empty"),
        ("/v1/detect", {"content": b"this is not an image"}, 400, "not an image format"),
        ("/v1/detect", {"content": jpeg[: len(jpeg) // 2]}, 400, "truncated"),
        ("/v1/detect", {"content": bomb}, 413, "over the limit of 1,000,000 pixels"),
        ("/v1/detect", {"content": _png(np.zeros((1, 1, 3), np.uint8))}, 422, "at least 8 pixels"),
        ("/v1/detect", {"content": rng.bytes(int(MAX_BODY_MB * 1024 * 1024) + 10)}, 413, "over the limit of"),
        ("/v1/detect", {"files": {"note": (None, "text")}}, 400, "no file field"),
        ("/v1/detect", {"files": {"image": ("empty.png", b"", "image/png")}}, 400, "is empty"),
        ("/v1/detect?score_thresh=2", {"content": _png(good)}, 400, "score_thresh must be within"),
        (v2, tensor(shape=[8, 8, 4], data=[0] * 256), 400, "expected [H, W, 3] or [B, H, W, 3]"),
        (v2, tensor(shape=[8, 8], data=[0] * 64), 400, "expected [H, W, 3]"),
        (v2, tensor(datatype="FP32"), 400, "must be UINT8"),
        (v2, tensor(data=[0] * 10), 400, "needs 192 values, got 10"),
        (v2, tensor(data=[300] * 192), 400, "within 0..255"),
        (v2, tensor(shape=[1, 1, 3], data=[0] * 3), 422, "at least 8 pixels"),
        (v2, tensor(name="INPUT0"), 400, "unknown input 'INPUT0'"),
        (v2, {"content": b"{not json"}, 400, "not valid JSON"),
        (v2, {"content": b""}, 400, "body is empty"),
        (v2, {"json": {"inputs": []}}, 400, "exactly one tensor"),
        (v2, _binary_request(192, b"\x00" * 100), 400, "binary_data_size 192 but 100 bytes"),
        (v2, _binary_request(100, b"\x00" * 100), 400, "needs 192 bytes, got 100"),
        (v2, {"content": b"{}", "headers": {"Inference-Header-Content-Length": "5000"}}, 400, "does not fit"),
        ("/v2/models/other/infer", tensor(), 404, "unknown model 'other'"),
        (v2, {"json": {"inputs": [], "outputs": "boxes"}}, 400, "exactly one tensor"),
        (
            v2,
            tensor(shape=[4611686018427387905, 4, 3]),
            413,
            "over the limit of 1,000,000 pixels (--max-pixels)",
        ),
        (
            v2,
            tensor(shape=[9, 8, 8, 3], data=[0] * 1728),
            413,
            "limit of 8 images per request (--max-images)",
        ),
        (v2, {"json": {**tensor()["json"], "parameters": [1]}}, 400, "'parameters' must be a JSON object"),
        (v2, tensor(data=[1.7] * 192), 400, "must be integers 0..255, got numbers with a fraction"),
        (v2, tensor(data=["12"] * 192), 400, "must be integers 0..255, got strings"),
        (v2, tensor(parameters={"binary_data_size": True}), 400, "binary_data_size True"),
        ("/v1/nothing", {"content": b"x"}, 404, "Not Found"),
    ]


def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(server, reference) -> None:
    good = sample_images(1, seed=2)[0]
    expected = reference(good)
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for path, kwargs, status, message in _bad_requests():
            response = client.post(path, **kwargs)
            assert response.status_code == status, (path, message, response.status_code, response.text)
            assert message in response.json()["error"], (path, response.json())
            ok = client.post("/v1/detect", content=_png(good))
            assert ok.status_code == 200
            _assert_matches(ok.json(), expected)
        metrics = client.get("/metrics").text
    assert _metric(metrics, 'msad_request_errors_total{route="/v1/detect",code="413"}') >= 2
    assert _metric(metrics, 'msad_request_errors_total{route="/v2/models/{name}/infer",code="400"}') >= 10


def test_sigterm_drains_in_flight_requests(runtime_checkpoint) -> None:
    # A long batching window keeps the request in flight when SIGTERM arrives.
    process = ServerProcess(runtime_checkpoint, "--max-wait-ms", "1500", "--max-batch", "4")
    image = _png(sample_images(1, seed=9)[0])
    outcome: dict = {}

    def send() -> None:
        try:
            outcome["response"] = httpx.post(f"{process.url}/v1/detect", content=image, timeout=60)
        except httpx.HTTPError as error:
            outcome["error"] = error

    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(0.5)
    assert "response" not in outcome, "the request should still be waiting for its batch"
    code, output = process.stop()
    sender.join(timeout=60)
    assert "error" not in outcome, outcome
    assert outcome["response"].status_code == 200 and outcome["response"].json()["detections"]
    assert code == 0, f"a graceful SIGTERM drain should exit 0, got {code}:\n{output}"
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{process.url}/v2/health/live", timeout=2)


def test_bench_serve_load_levels(server, tmp_path, capsys) -> None:
    """msad bench serve against the real server: every request answered at each concurrency level."""
    from msad_deploy.cli import main

    out = tmp_path / "serve.json"
    args = ["bench", "serve", server.url, "--concurrency", "1,4", "--requests", "12", "--out", str(out)]
    assert main(args) == 0
    server_report = json.loads(out.read_text())
    levels = server_report["levels"]
    assert [level["concurrency"] for level in levels] == [1, 4]
    for level in levels:
        assert level["requests"] == 12 and level["errors"] == 0 and level["first_error"] is None
        assert level["throughput_rps"] > 0 and 0 < level["p50_ms"] <= level["p99_ms"]
    assert server_report["model"]["name"] == "student"
    assert "| 4 | 12 | 0 |" in capsys.readouterr().out


def test_bench_serve_refuses_other_hosts_and_missing_servers(capsys) -> None:
    from msad_deploy.benchmarks.serve_load import check_loopback

    from msad_deploy.cli import main

    with pytest.raises(ValueError, match="loopback"):
        check_loopback("http://192.0.2.1:8000")
    assert check_loopback("http://localhost:8000/") == "http://localhost:8000"
    assert main(["bench", "serve", f"http://127.0.0.1:{free_port()}", "--requests", "1"]) == 2
    assert "no msad serve answers" in capsys.readouterr().err


def test_large_jpeg_is_decoded_reduced_and_answered_in_original_pixels(server, reference) -> None:
    """A 4096x3072 JPEG (12.6 MP) passes --max-pixels 1 MP: it decodes at 1/8 scale (DCT), is reduced
    to 2x the model's input, and its boxes come back in the original pixels."""
    from msad_deploy.runtime.images import decode_image_reduced
    from msad_deploy.runtime.serving.decode import needed_size

    small = sample_images(1, seed=11)[0]  # 128 x 96
    big = small.repeat(32, axis=0).repeat(32, axis=1)
    jpeg = _jpeg(big)
    response = httpx.post(f"{server.url}/v1/detect", content=jpeg, timeout=60)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert payload["image_size"] == {"height": 4096, "width": 3072}
    pixels, original = decode_image_reduced(jpeg, None, needed_size(reference))
    assert original == (4096, 4096 * 3 // 4) and pixels.shape == (256, 192, 3)
    expected = reference(pixels)
    assert len(expected) > 0
    scaled = _result(expected.boxes * 16, expected.scores, expected.class_ids)
    got = payload["detections"]
    assert_same_results(
        _result([d["box"] for d in got], [d["score"] for d in got], [d["class_id"] for d in got]),
        scaled,
        box_tol=0.02,
        score_tol=1e-5,
    )
    png = _png(big)  # the same pixels as a PNG decode in full: over the limit
    refused = httpx.post(f"{server.url}/v1/detect", content=png, timeout=60)
    assert refused.status_code == 413 and "over the limit of 1,000,000 pixels" in refused.json()["error"]


def test_a_large_request_does_not_starve_a_small_one(runtime_checkpoint) -> None:
    """--max-images 64 with --max-batch 4: a 64-image v2 request runs as micro-batches, and a single
    image sent while it runs is answered before it (interleaved, not queued behind 16 batches)."""
    process = ServerProcess(
        runtime_checkpoint, "--max-batch", "4", "--max-images", "64", "--max-wait-ms", "0", "--name", "m"
    )
    try:
        images = np.stack([sample_images(1, seed=s)[0][:96, :96] for s in range(64)])
        finished: dict[str, float] = {}
        responses: dict[str, httpx.Response] = {}

        def send(key: str, path: str, **kwargs) -> None:
            responses[key] = httpx.post(f"{process.url}{path}", timeout=120, **kwargs)
            finished[key] = time.monotonic()

        large = threading.Thread(
            target=send,
            args=("large", "/v2/models/m/infer"),
            kwargs=_binary_request(images.nbytes, images.tobytes(), images.shape),
        )
        large.start()
        time.sleep(0.3)
        send("small", "/v1/detect", content=_png(sample_images(1, seed=3)[0]))
        large.join(timeout=120)
        assert responses["small"].status_code == 200 and responses["large"].status_code == 200
        assert finished["small"] < finished["large"], "the single image waited for the whole large request"
        assert responses["large"].json()["outputs"][3]["shape"] == [64]
        metrics = httpx.get(f"{process.url}/metrics", timeout=10).text
        assert _metric(metrics, "msad_batch_size_sum") == 65
        assert _metric(metrics, "msad_batch_size_count") >= 16
    finally:
        code, output = process.stop()
    assert code == 0 and "Traceback" not in output, output
