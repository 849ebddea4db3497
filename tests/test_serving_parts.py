"""The serving package's parts alone, without a server: the fair queue's batch order, v2 request
validation (shapes, limits, strict UINT8 data, parameters), the model config, reduced decoding (JPEG
draft, integer reduce) and mapping results back to original pixels, and the limits a model gets."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from msad_deploy.data.coco import ImageTooLargeError
from msad_deploy.runtime import Detector
from msad_deploy.runtime.images import decode_image_reduced
from msad_deploy.runtime.results import Result
from msad_deploy.runtime.serving import Limits, RequestError, ServeOptions
from msad_deploy.runtime.serving.batcher import FairQueue, Job
from msad_deploy.runtime.serving.decode import Decoded, needed_size, to_original
from msad_deploy.runtime.serving.protocol import model_config, parse_infer_request

LIMITS = Limits(
    max_body_bytes=1 << 20, max_images=4, max_pixels=10_000, decode_workers=1, max_inflight_bytes=4 << 20
)


class _Future:
    def __init__(self) -> None:
        self.finished = False

    def done(self) -> bool:
        return self.finished


def _job(name: str, count: int) -> Job:
    return Job([f"{name}{i}" for i in range(count)], _Future())


def test_fair_queue_interleaves_requests_round_robin() -> None:
    queue = FairQueue()
    big, single, pair = _job("a", 5), _job("b", 1), _job("c", 2)
    for job in (big, single, pair):
        queue.add(job)
    assert queue.pending == 8

    def names(batch):
        return [job.images[index] for job, index in batch]

    assert names(queue.take(4)) == ["a0", "b0", "c0", "a1"]
    late = _job("d", 1)  # arrives while the big job still has images: it is not served last
    queue.add(late)
    assert names(queue.take(3)) == ["c1", "a2", "d0"]
    assert queue.pending == 2
    big.future.finished = True  # abandoned (client gone): its remaining images are skipped
    assert queue.take(4) == [] and queue.pending == 0


def _request(**fields) -> dict:
    base = {"name": "IMAGE", "datatype": "UINT8", "shape": [2, 2, 3], "data": list(range(12))}
    return {"inputs": [{**base, **fields}]}


def _parse(request: dict, limits: Limits = LIMITS):
    import json

    return parse_infer_request(json.dumps(request).encode(), None, limits)


def test_v2_request_values_and_outputs() -> None:
    parsed = _parse(_request(data=[[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [9, 10, 255]]]))
    assert parsed.images.dtype == np.uint8 and parsed.images.shape == (1, 2, 2, 3)
    assert parsed.images.reshape(-1).tolist() == [*range(11), 255]
    assert [name for name, _ in parsed.outputs] == ["boxes", "scores", "labels", "num_detections"]
    request = {
        **_request(),
        "parameters": {"binary_data_output": True},
        "outputs": [{"name": "scores"}, {"name": "boxes", "parameters": {"binary_data": False}}],
    }
    assert _parse(request).outputs == [("scores", True), ("boxes", False)]


@pytest.mark.parametrize(
    ("request_", "status", "message"),
    [
        (_request(shape=[4611686018427387905, 4, 3]), 413, "over the limit of 10,000 pixels (--max-pixels)"),
        (
            _request(shape=[5, 2, 2, 3]),
            413,
            "holds 5 images, over the limit of 4 images per request (--max-images)",
        ),
        (_request(shape=[2**70, 2, 2, 3]), 413, "--max-images"),
        ({**_request(), "parameters": [1]}, 400, "the request's 'parameters' must be a JSON object"),
        ({**_request(), "parameters": {"binary_data_output": "yes"}}, 400, "must be true or false"),
        (_request(parameters=[1]), 400, "input IMAGE 'parameters' must be a JSON object"),
        (_request(data=[1.7] * 12), 400, "integers 0..255, got numbers with a fraction"),
        (_request(data=["12"] * 12), 400, "integers 0..255, got strings"),
        (_request(data=[True] * 12), 400, "integers 0..255, got booleans"),
        (_request(data=[1, [2]] + [0] * 10), 400, "'data' must be integers 0..255"),
        (_request(data=[2**70] * 12), 400, "integers 0..255"),
        (_request(data=[256] * 12), 400, "within 0..255"),
        ({**_request(), "outputs": [{"name": "boxes", "parameters": 3}]}, 400, "output boxes 'parameters'"),
    ],
)
def test_v2_request_errors(request_, status, message) -> None:
    with pytest.raises(RequestError) as caught:
        _parse(request_)
    assert caught.value.status == status and message in caught.value.message


def test_overflowing_shape_without_a_pixel_limit_is_a_size_mismatch() -> None:
    limits = Limits(
        max_body_bytes=1 << 20, max_images=4, max_pixels=None, decode_workers=1, max_inflight_bytes=4 << 20
    )
    with pytest.raises(RequestError, match="needs 55340232221128654860 values, got 12") as caught:
        _parse(_request(shape=[4611686018427387905, 4, 3]), limits)
    assert caught.value.status == 400


def test_model_config_is_tritons_form() -> None:
    config = model_config("student", "msad_deploy_pytorch", 100, max_images=16, max_batch=8, max_wait_ms=2.5)
    assert config["max_batch_size"] == 16
    assert config["input"] == [
        {"name": "IMAGE", "data_type": "TYPE_UINT8", "format": "FORMAT_NHWC", "dims": [-1, -1, 3]}
    ]
    assert [o["dims"] for o in config["output"]] == [[100, 4], [100], [100], [1]]
    assert config["dynamic_batching"] == {"preferred_batch_size": [8], "max_queue_delay_microseconds": 2500}


def _encoded(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def test_reduced_decoding_jpeg_draft_and_integer_reduce() -> None:
    big = np.full((4096, 4096, 3), 120, np.uint8)
    pixels, original = decode_image_reduced(_encoded(big, "JPEG"), 1_000_000, lambda h, w: (256, 256))
    assert original == (4096, 4096) and pixels.shape == (256, 256, 3)  # DCT 1/8 (512), then reduce 2
    assert np.abs(pixels.astype(int) - 120).max() <= 2
    pixels, _ = decode_image_reduced(_encoded(big, "JPEG"), 1_100_000, lambda h, w: (600, 600))
    assert pixels.shape == (1024, 1024, 3)  # DCT 1/4: 1/8 (512) would be under the need
    # the limit applies to what is decoded: 16.7 MP as a PNG is refused, as a JPEG it decodes 0.26 MP
    with pytest.raises(
        ImageTooLargeError, match="4096x4096 = 16,777,216 pixels, over the limit of 1,000,000"
    ):
        decode_image_reduced(_encoded(big, "PNG"), 1_000_000, lambda h, w: (256, 256))
    # PNG: decoded whole, then reduced by the largest integer factor keeping the need (1000 // 200 = 5)
    blocks = np.zeros((1000, 1000, 3), np.uint8)
    blocks[:500] = (10, 20, 30)
    blocks[500:] = (200, 100, 0)
    pixels, original = decode_image_reduced(_encoded(blocks, "PNG"), None, lambda h, w: (200, 200))
    assert original == (1000, 1000) and pixels.shape == (200, 200, 3)
    assert (pixels[:100] == (10, 20, 30)).all() and (pixels[100:] == (200, 100, 0)).all()
    palette = Image.fromarray(blocks).quantize(2)  # mode P, which reduce refuses: RGB first
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    pixels, _ = decode_image_reduced(buffer.getvalue(), None, lambda h, w: (300, 300))
    assert pixels.shape == (334, 334, 3)  # ceil(1000 / 3): Pillow keeps the partial last box
    assert (pixels[:166] == (10, 20, 30)).all() and (pixels[167:] == (200, 100, 0)).all()


def test_to_original_scales_boxes_back() -> None:
    import torch

    result = Result(
        np.array([[10, 20, 30, 40]], np.float32),
        np.array([0.9], np.float32),
        np.array([1], np.int64),
        ("c1",),
        np.array([2], np.int64),
        (100, 50),
    )
    decoded = Decoded(torch.zeros(3, 100, 50, dtype=torch.uint8), (400, 100))
    back = to_original(result, decoded)
    assert back.image_size == (400, 100) and back.boxes.tolist() == [[20, 80, 60, 160]]
    assert to_original(result, Decoded(decoded.tensor, (100, 50))) is result


def test_limits_follow_the_model(runtime_checkpoint) -> None:
    with Detector.load(runtime_checkpoint, device="cpu", warmup=False) as detector:
        limits = ServeOptions(max_batch=6).limits_for(detector)
        assert limits.max_pixels == (32 * 128) ** 2 and limits.max_images == 6
        assert ServeOptions(max_pixels=0, max_images=3).limits_for(detector).max_pixels is None
        needed = needed_size(detector)
        assert needed(1000, 2000) == (128, 256)  # 2x the 64x128 it resizes to
        assert needed(9000, 9000) == (256, 256)
    for field, value, message in [
        ("max_images", 0, "--max-images must be >= 1"),
        ("decode_workers", 0, "--decode-workers must be >= 1"),
        ("max_pixels", -1, "--max-pixels must be >= 0"),
        ("max_inflight_bytes", 0, "--max-inflight-mb must be positive"),
    ]:
        with pytest.raises(ValueError, match=message):
            ServeOptions(**{field: value}).validate()


def test_micro_batcher_serves_a_small_request_between_a_large_ones_batches() -> None:
    from msad_deploy.runtime.metrics import ServerMetrics
    from msad_deploy.runtime.serving.batcher import MicroBatcher

    runs: list[list[str]] = []

    def run(images, size):
        assert size is None  # no policy: the loaded size
        runs.append(list(images))
        return [f"r-{image}" for image in images]

    async def scenario():
        batcher = MicroBatcher(run, max_batch=4, max_wait_ms=0, metrics=ServerMetrics(), loaded_size=128)
        await batcher.start()
        large = asyncio.create_task(batcher.submit([f"a{i}" for i in range(12)]))
        small = asyncio.create_task(batcher.submit(["b0"]))
        results = await asyncio.gather(large, small)
        await batcher.stop()
        return results

    (large, large_sizes), (small, small_sizes) = asyncio.run(scenario())
    assert large == [f"r-a{i}" for i in range(12)] and small == ["r-b0"]
    assert large_sizes == [128] * 12 and small_sizes == [128]
    assert all(len(batch) <= 4 for batch in runs) and sum(len(b) for b in runs) == 13
    first_with_b = next(i for i, batch in enumerate(runs) if "b0" in batch)
    assert first_with_b <= 1, runs  # not after the large request's 3 batches


def test_body_budget_makes_bodies_wait_beyond_it() -> None:
    """100 bytes in flight: two 60-byte bodies run one after the other, a 500-byte one runs alone,
    small ones share the budget."""
    from msad_deploy.runtime.serving.decode import BodyBudget, declared_bytes

    events: list[str] = []

    async def scenario() -> None:
        budget = BodyBudget(100)

        async def request(name: str, size: int, pause: float) -> None:
            async with budget.hold(size):
                events.append(f"+{name}")
                assert budget.held <= budget.limit
                await asyncio.sleep(pause)
                events.append(f"-{name}")

        await asyncio.gather(request("a", 60, 0.05), request("b", 60, 0.01))
        await asyncio.gather(request("big", 500, 0.02), request("c", 30, 0.01))
        await asyncio.gather(request("d", 30, 0.03), request("e", 30, 0.03))
        assert budget.held == 0

    asyncio.run(scenario())
    assert events[:4] == ["+a", "-a", "+b", "-b"]
    assert events[4:8] == ["+big", "-big", "+c", "-c"]
    assert events[8:10] == ["+d", "+e"]  # 60 of 100 bytes: both at once
    assert declared_bytes({"content-length": "42"}, 1000) == 42
    assert declared_bytes({"content-length": "5000"}, 1000) == 1000
    assert declared_bytes({}, 1000) == declared_bytes({"content-length": "x"}, 1000) == 1000
