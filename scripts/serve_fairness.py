"""Does one large KServe v2 request starve a small one? (docs/SERVING.md)

    OMP_NUM_THREADS=1 .venv/bin/python scripts/serve_fairness.py ARTIFACT [--images 400] [--side 8]

Starts a real ``msad serve`` on 127.0.0.1 twice. First with the defaults: a v2 request of
``[IMAGES, SIDE, SIDE, 3]`` (binary tensor) is refused with 413 naming --max-images. Then with
``--max-images IMAGES``: the large request is sent, and 0.3 s later one 128x96 PNG to /v1/detect;
prints that image's latency alone and while the large request runs, and the large request's time.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import threading
import time

import httpx
import numpy as np
from PIL import Image
from serve_memory import start_server, stop_server


def v2_body(images: np.ndarray) -> tuple[bytes, dict]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "IMAGE",
                    "datatype": "UINT8",
                    "shape": list(images.shape),
                    "parameters": {"binary_data_size": images.nbytes},
                }
            ]
        }
    ).encode()
    return header + images.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def small_png() -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def timed_post(url: str, **kwargs) -> tuple[float, httpx.Response]:
    started = time.perf_counter()
    response = httpx.post(url, timeout=600, **kwargs)
    return time.perf_counter() - started, response


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact")
    parser.add_argument("--images", type=int, default=400, help="images in the large request (default 400)")
    parser.add_argument("--side", type=int, default=8, help="their side in pixels (default 8)")
    args = parser.parse_args()
    rng = np.random.default_rng(1)
    body, headers = v2_body(rng.integers(0, 255, (args.images, args.side, args.side, 3), dtype=np.uint8))
    png = small_png()

    server, url, _ = start_server(args.artifact, [])
    try:
        model = httpx.get(f"{url}/v1/model", timeout=10).json()["name"]
        response = httpx.post(f"{url}/v2/models/{model}/infer", content=body, headers=headers, timeout=60)
        print(
            f"defaults: [{args.images}, {args.side}, {args.side}, 3] ({len(body) / 1024:.0f} KB) -> "
            f"{response.status_code} {response.json().get('error')}"
        )
    finally:
        stop_server(server)

    server, url, _ = start_server(args.artifact, ["--max-images", str(args.images)])
    try:
        alone = min(timed_post(f"{url}/v1/detect", content=png)[0] for _ in range(5))
        outcome: dict = {}

        def large() -> None:
            outcome["large"] = timed_post(f"{url}/v2/models/{model}/infer", content=body, headers=headers)

        thread = threading.Thread(target=large)
        thread.start()
        time.sleep(0.3)
        small_seconds, small = timed_post(f"{url}/v1/detect", content=png)
        thread.join()
        large_seconds, large_response = outcome["large"]
        print(
            f"--max-images {args.images}: single image alone {alone * 1000:.0f} ms; during the large request "
            f"{small_seconds * 1000:.0f} ms (status {small.status_code}); the large request "
            f"{large_seconds:.1f} s (status {large_response.status_code})"
        )
    finally:
        stop_server(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
