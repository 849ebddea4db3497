"""Peak memory of a real ``msad serve`` under 64 concurrent huge-image requests (docs/SERVING.md).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/serve_memory.py [--requests 64] [--side 9000]
        [--formats png,jpeg] [--bound-mb 1536] [--noise] ARTIFACT [-- extra msad serve options]

Starts ``python -m msad_deploy.cli serve ARTIFACT`` on 127.0.0.1 (CPU), and for each format sends
``--requests`` concurrent POST /v1/detect of one SIDE x SIDE image (a smooth picture: the PNG is
under 100 KB, as in the issue), sampling the server's resident memory (RSS, psutil) every 10 ms.
Prints idle, peak and after (1 s later) RSS, the status codes, whether every request got an HTTP
answer, and whether peak - idle stayed under --bound-mb. Exit status 1 when a bound or answer failed.
Run it with PYTHONPATH=/other/checkout to measure another version's server the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import psutil
from PIL import Image

MB = 1024 * 1024


def picture(side: int) -> np.ndarray:
    """A smooth uint8 RGB picture (gradients and a few flat blocks) that compresses well."""
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    image = np.empty((side, side, 3), np.uint8)
    image[..., 0] = ramp[None, :].astype(np.uint8)
    image[..., 1] = ramp[:, None].astype(np.uint8)
    image[..., 2] = 96
    for k in range(4):
        y, x = (k + 1) * side // 6, (3 - k + 1) * side // 6
        image[y : y + side // 8, x : x + side // 8] = (250, 40 * k, 30)
    return image


def encode(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt.upper(), **({"quality": 90} if fmt == "jpeg" else {}))
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(artifact: str, serve_args: list[str]) -> tuple[subprocess.Popen, str, list[str]]:
    """``msad serve ARTIFACT`` on a free 127.0.0.1 port (CPU, one OpenMP thread), once it is ready."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "msad_deploy.cli", "serve", artifact, "--port", str(port)]
    command += ["--device", "cpu", "--log-level", "warning", *serve_args]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 180
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"msad serve exited: {server.stdout.read()}")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return server, url, command
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.kill()
            raise RuntimeError("msad serve did not become ready in 180 s")
        time.sleep(0.2)


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


class Sampler(threading.Thread):
    """The largest RSS of ``pid`` seen since the last :meth:`reset`, sampled every 10 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.peak = 0
        self.stopped = threading.Event()

    def rss(self) -> int:
        return self.process.memory_info().rss

    def reset(self) -> None:
        self.peak = self.rss()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.peak = max(self.peak, self.rss())
            except psutil.Error:
                return
            time.sleep(0.01)


async def fire(url: str, body: bytes, count: int) -> list:
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:

        async def one():
            try:
                return await client.post("/v1/detect", content=body)
            except httpx.HTTPError as error:
                return error

        return await asyncio.gather(*(one() for _ in range(count)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact")
    parser.add_argument(
        "--requests", type=int, default=64, help="concurrent requests per format (default 64)"
    )
    parser.add_argument("--side", type=int, default=9000, help="image side in pixels (default 9000)")
    parser.add_argument("--formats", default="png,jpeg", help="comma-separated: png, jpeg (default both)")
    parser.add_argument("--bound-mb", type=float, default=1536, help="allowed peak - idle RSS (default 1536)")
    parser.add_argument(
        "--noise",
        action="store_true",
        help="random pixels instead of a smooth picture: bodies near their raw size (a 2600x2600 PNG is "
        "about 20 MB, the default body limit), to measure bodies held before decoding",
    )
    parser.add_argument("serve_args", nargs="*", help="extra msad serve options (after --)")
    args = parser.parse_args()

    if args.noise:
        image = np.random.default_rng(0).integers(0, 256, (args.side, args.side, 3), dtype=np.uint8)
    else:
        image = picture(args.side)
    bodies = {fmt: encode(image, fmt) for fmt in args.formats.split(",")}
    del image
    server, url, command = start_server(args.artifact, args.serve_args)
    ok = True
    try:
        sampler = Sampler(server.pid)
        sampler.start()
        time.sleep(1.0)
        print(f"server: {' '.join(command[1:])}")
        print(httpx.get(f"{url}/v1/model", timeout=10).json().get("serve"))
        for fmt, body in bodies.items():
            idle = sampler.rss()
            sampler.reset()
            started = time.perf_counter()
            responses = asyncio.run(fire(url, body, args.requests))
            wall = time.perf_counter() - started
            peak = sampler.peak
            time.sleep(1.0)
            after = sampler.rss()
            codes = collections.Counter(
                r.status_code if isinstance(r, httpx.Response) else type(r).__name__ for r in responses
            )
            answered = all(isinstance(r, httpx.Response) for r in responses)
            first_error = next(
                (
                    r.json().get("error")
                    for r in responses
                    if isinstance(r, httpx.Response) and r.status_code >= 400
                ),
                None,
            )
            within = (peak - idle) / MB <= args.bound_mb
            ok = ok and answered and within
            print(
                f"{fmt} {args.side}x{args.side} ({len(body) / 1024:.0f} KB) x {args.requests} concurrent: "
                f"idle {idle / MB:.0f} MB, peak {peak / MB:.0f} MB (+{(peak - idle) / MB:.0f} MB), "
                f"after {after / MB:.0f} MB; statuses {dict(codes)}; all answered: {answered}; "
                f"peak - idle <= {args.bound_mb:.0f} MB: {within}; {wall:.1f} s"
            )
            if first_error:
                print(f"  first error: {first_error}")
            if server.poll() is not None:
                print(f"  the server died (exit status {server.returncode}; -9: killed, e.g. out of memory)")
                ok = False
                break
        sampler.stopped.set()
    finally:
        stop_server(server)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
