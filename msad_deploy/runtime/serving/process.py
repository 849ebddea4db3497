"""The ``msad serve`` process: load the artifact, run uvicorn, drain on SIGTERM and exit 0."""

from __future__ import annotations

import contextlib
import signal
from typing import Any

from msad_deploy.runtime.serving.options import ServeOptions


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
    size_divisibility: int | None = None,
) -> None:
    """Load ``artifact`` and serve it with uvicorn until SIGTERM / SIGINT (in-flight requests drain first)."""
    import torch

    from msad_deploy.runtime.backends import backend_for, host_threads, import_optional
    from msad_deploy.runtime.detector import Detector
    from msad_deploy.runtime.serving.app import create_app

    uvicorn = import_optional("uvicorn", "serve", "msad serve")
    import_optional("fastapi", "serve", "msad serve")
    options = options or ServeOptions()
    options.validate()
    detector = Detector.load(
        artifact,
        device,
        max_batch=options.max_batch,
        score_thresh=score_thresh,
        max_pixels=options.detector_max_pixels(),
        min_side=options.min_side,
        test_size=test_size,
        size_divisibility=size_divisibility,
        # ONNX Runtime's idle threads would spin on the cores that decode the next requests
        # (measured: see the onnxruntime backend's docstring)
        **({"allow_spinning": False} if backend_for(artifact) == "onnxruntime" else {}),
    )
    threads = host_threads(detector.backend_name, detector.device)
    if threads is not None:  # what msad bench measured: see host_threads
        torch.set_num_threads(threads)
    try:
        app = create_app(detector, options)
        limits = app.state.limits
        name = options.model_name or detector.path.stem
        pixels = f"{limits.max_pixels:,}" if limits.max_pixels else "no limit"
        print(
            f"msad serve: {artifact} ({detector.backend_name} on {detector.device}"
            f"{f', torch on {threads} thread(s)' if threads else ''}) as model {name!r} at "
            f"http://{host}:{port} (max batch {options.max_batch}, max wait {options.max_wait_ms:g} ms, "
            f"{limits.max_images} images per request, {pixels} pixels per image, "
            f"{limits.decode_workers} decode worker(s))",
            flush=True,
        )
        policy = app.state.policy
        if policy is not None:
            points = "; ".join(
                f"{p.size} (AP {'?' if p.ap is None else f'{p.ap:.1f}'}, {p.one_ms:.1f} ms x1, "
                f"{p.full_ms:.1f} ms x{p.full_batch})"
                for p in policy.points
            )
            dropped = ", ".join(str(p.size) for p in policy.dropped)
            print(
                f"msad serve: adaptive resolution for a {options.slo_ms:g} ms objective, most accurate first: "
                f"{points}"
                + (f" (dropped, no faster than a more accurate point: {dropped})" if dropped else ""),
                flush=True,
            )
        config = uvicorn.Config(
            app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_timeout
        )
        graceful_server(uvicorn, config).run()
    finally:
        detector.close()
