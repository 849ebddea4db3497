"""``msad bench serve``, closed loop: ``--concurrency`` clients POST images to ``/v1/detect`` of an
``msad serve`` on this machine back to back, until a level has sent ``requests`` requests or run
``duration_s`` seconds; per level: throughput (answered requests per second), latency p50/p99/mean
of the answered requests and the error count (non-200 answers and transport errors). Also the
helpers every load shares (loopback check, images, readiness, warm-up); the open loop is
:mod:`.serve_profiles`, the adaptive-against-fixed comparison :mod:`.serve_compare`.

Loopback only: this is a benchmark of a local service, not a load generator for other people's servers.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from .stats import summarize

# Idle connections are closed by the client after this long: under uvicorn's own 5 s keep-alive, so a
# request never goes out on a connection the server is closing (an httpx ReadError, not the server's fault).
KEEPALIVE_S = 2.0


def check_loopback(url: str) -> str:
    """``url`` without a trailing slash, if its host resolves to loopback addresses only."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) URL like http://127.0.0.1:8000")
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(parts.hostname, parts.port or 80)}
    except socket.gaierror as err:
        raise ValueError(f"cannot resolve {parts.hostname!r} ({err})") from err
    if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise ValueError(
            f"{url}: msad bench serve loads servers on this machine only (127.0.0.1, ::1, localhost); "
            f"{parts.hostname} is not a loopback address"
        )
    return url.rstrip("/")


def default_image(size: int = 128) -> bytes:
    """A deterministic PNG (coloured shapes on grey) for when no image is given."""
    from PIL import Image

    image = np.full((size, size, 3), 110, dtype=np.uint8)
    image[size // 8 : size // 3, size // 8 : size // 3] = (220, 40, 40)
    image[size // 2 : size - size // 8, size // 2 : size - size // 6] = (40, 200, 60)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def content_type(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    return "application/octet-stream"


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    errors: int
    duration_s: float
    throughput_rps: float
    p50_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    first_error: str | None


async def _level(
    url: str, images: list[bytes], concurrency: int, requests: int, duration_s: float, timeout_s: float
):
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    sent = 0
    start = time.perf_counter()
    deadline = start + duration_s

    async def client_loop(client) -> None:
        nonlocal sent
        while sent < requests and time.perf_counter() < deadline:
            index = sent
            sent += 1
            body = images[index % len(images)]
            began = time.perf_counter()
            try:
                response = await client.post(
                    f"{url}/v1/detect", content=body, headers={"content-type": content_type(body)}
                )
            except httpx.HTTPError as err:
                errors.append(f"{type(err).__name__}: {err}")
                continue
            if response.status_code == 200:
                latencies.append(time.perf_counter() - began)
            else:
                errors.append(f"HTTP {response.status_code}: {response.text[:200]}")

    limits = httpx.Limits(
        max_connections=concurrency, max_keepalive_connections=concurrency, keepalive_expiry=KEEPALIVE_S
    )
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    stats = summarize(latencies) if latencies else None
    return LevelResult(
        concurrency=concurrency,
        requests=len(latencies) + len(errors),
        errors=len(errors),
        duration_s=round(elapsed, 3),
        throughput_rps=round(len(latencies) / elapsed, 2) if elapsed > 0 else 0.0,
        p50_ms=round(stats.p50_ms, 3) if stats else None,
        p99_ms=round(stats.p99_ms, 3) if stats else None,
        mean_ms=round(stats.mean_ms, 3) if stats else None,
        first_error=errors[0] if errors else None,
    )


def server_model(url: str) -> dict[str, Any]:
    """``GET url/v1/model`` once ``url/v2/health/ready`` answers 200; ``OSError`` when nothing answers."""
    import httpx

    try:
        ready = httpx.get(f"{url}/v2/health/ready", timeout=10)
        model = httpx.get(f"{url}/v1/model", timeout=10).json() if ready.status_code == 200 else None
    except httpx.HTTPError as err:
        raise OSError(
            f"no msad serve answers at {url} ({type(err).__name__}); start one with `msad serve MODEL`"
        ) from err
    if ready.status_code != 200:
        raise OSError(f"{url} is not ready (GET /v2/health/ready answered {ready.status_code})")
    return model


def warm_up(url: str, images: list[bytes], requests: int, timeout_s: float) -> None:
    """``requests`` sequential untimed requests (first runs, lazy allocations); ``OSError`` when one is
    not answered with 200 (every timed request would fail alike)."""
    import httpx

    for index in range(requests):
        body = images[index % len(images)]
        try:
            response = httpx.post(
                f"{url}/v1/detect",
                content=body,
                headers={"content-type": content_type(body)},
                timeout=timeout_s,
            )
        except httpx.HTTPError as err:
            raise OSError(f"warm-up request to {url}/v1/detect failed ({type(err).__name__}: {err})") from err
        if response.status_code != 200:
            raise OSError(
                f"{url}/v1/detect answered the warm-up request with HTTP {response.status_code}: "
                f"{response.text[:200]}"
            )


def load_test(
    url: str,
    images: list[bytes] | None = None,
    concurrency: tuple[int, ...] = (1, 8, 32),
    requests: int = 256,
    duration_s: float = 20.0,
    timeout_s: float = 60.0,
    warmup: int = 4,
) -> dict[str, Any]:
    """Run the levels in order against ``url`` (loopback only); returns {url, model, levels: [...]}."""
    url = check_loopback(url)
    if requests < 1 or duration_s <= 0 or any(c < 1 for c in concurrency):
        raise ValueError("requests, duration and every concurrency level must be positive")
    images = images or [default_image()]
    model = server_model(url)
    warm_up(url, images, warmup, timeout_s)
    levels = [
        asdict(asyncio.run(_level(url, images, c, requests, duration_s, timeout_s))) for c in concurrency
    ]
    return {
        "url": url,
        "model": model,
        "requests_per_level": requests,
        "duration_limit_s": duration_s,
        "levels": levels,
    }


def format_levels(report: dict[str, Any]) -> str:
    lines = [
        "| concurrency | requests | errors | throughput req/s | p50 ms | p99 ms | mean ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for level in report["levels"]:

        def f(v: Any) -> str:
            return "-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)

        lines.append(
            f"| {level['concurrency']} | {level['requests']} | {level['errors']} | {f(level['throughput_rps'])} | "
            f"{f(level['p50_ms'])} | {f(level['p99_ms'])} | {f(level['mean_ms'])} |"
        )
    return "\n".join(lines)


def read_images(paths: list[Path]) -> list[bytes]:
    found = []
    for path in paths:
        if path.is_dir():
            found += [
                p.read_bytes()
                for p in sorted(path.iterdir())
                if p.suffix.lower() in (".png", ".jpg", ".jpeg")
            ]
        else:
            found.append(path.read_bytes())
    if paths and not found:
        raise ValueError(f"no PNG or JPEG images in {', '.join(map(str, paths))}")
    return found
