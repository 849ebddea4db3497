"""``msad bench serve --compare``: the same open-loop schedule against the adaptive server
(``msad serve ARTIFACT --slo-ms MS --sizes ...``) and then one fixed server per size (``--test-size``),
one server at a time on a free loopback port, each stopped with SIGTERM after its run.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .serve_load import default_image, server_model, warm_up
from .serve_profiles import (
    MAX_IN_FLIGHT,
    Profile,
    ap_by_size,
    arrival_times,
    check_run_options,
    open_loop,
    run_report,
    summary_line,
)

# Options compare_servers sets itself on each server; --server-arg may not override them.
OWN_SERVER_OPTIONS = ("--host", "--port", "--test-size", "--slo-ms", "--sizes", "--operating-points")


class ServerStartError(OSError):
    """A server started by ``--compare`` exited or did not become ready (a user error: exit 2)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalServer:
    """``msad serve ARTIFACT ...`` (this interpreter's) on a free loopback port, its output in a
    temporary file (``env``: variables set on top of this process's); ``stop()`` sends SIGTERM and waits
    for the exit (the server drains first)."""

    def __init__(
        self,
        label: str,
        artifact: Path,
        args: list[str],
        ready_timeout_s: float = 300.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.label = label
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [
            sys.executable, "-m", "msad_deploy.cli", "serve", str(artifact),
            "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning", *args,
        ]  # fmt: skip
        self.output = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")  # noqa: SIM115
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process = subprocess.Popen(
            self.command, stdout=self.output, stderr=subprocess.STDOUT, env=environment
        )
        self.ready_timeout_s = ready_timeout_s

    def tail(self, lines: int = 3) -> str:
        """The server's last words: from its last line naming an error (argparse's, an exception's), else
        its last ``lines`` lines, joined by `` | ``."""
        self.output.flush()
        self.output.seek(0)
        text = [line.strip() for line in self.output.read().splitlines() if line.strip()]
        flagged = [i for i, line in enumerate(text) if re.search(r"error|exception", line, re.IGNORECASE)]
        start = flagged[-1] if flagged else len(text) - lines
        return " | ".join(text[max(start, 0) :][:lines]) or "(no output)"

    def wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise ServerStartError(
                    f"the {self.label} server exited with status {code} before it was ready: {self.tail()}"
                )
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise ServerStartError(
            f"the {self.label} server was not ready within {self.ready_timeout_s:g} s: {self.tail()}"
        )

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.output.close()


def split_server_args(values: list[str]) -> list[str]:
    """``--server-arg`` values as serve options: each split like a shell would (``"--max-batch 8"`` and
    ``--max-batch=8`` both work); options compare_servers sets itself are refused."""
    args = [token for value in values for token in shlex.split(value)]
    for token in args:
        name = token.split("=", 1)[0]
        if name in OWN_SERVER_OPTIONS:
            raise ValueError(
                f"--server-arg {token}: msad bench serve --compare sets {name} itself "
                f"({', '.join(OWN_SERVER_OPTIONS)} are its own)"
            )
    return args


def compare_configs(
    sizes: list[int], slo_ms: float, operating_points: Path | None = None
) -> list[tuple[str, list[str]]]:
    """(config name, serve options) per server: the adaptive one first, then one fixed per size."""
    adaptive = ["--slo-ms", f"{slo_ms:g}", "--sizes", ",".join(map(str, sizes))]
    if operating_points is not None:
        adaptive += ["--operating-points", str(operating_points)]
    return [("adaptive", adaptive)] + [(f"fixed {s}", ["--test-size", str(s)]) for s in sizes]


def compare_servers(
    artifact: Path,
    sizes: list[int],
    slo_ms: float,
    profile: Profile,
    operating_points: Path | None = None,
    server_args: list[str] | None = None,
    images: list[bytes] | None = None,
    timeout_s: float = 60.0,
    warmup: int = 4,
    bin_s: float = 1.0,
    max_in_flight: int = MAX_IN_FLIGHT,
    progress: Any = None,
    configs: list[tuple[str, list[str]]] | None = None,
) -> dict[str, Any]:
    """Serve ``artifact`` adaptively (``--slo-ms``, ``--sizes``) and then fixed at each size, one server
    at a time on a free loopback port, each loaded with the same arrival schedule after ``warmup``
    requests and stopped with SIGTERM. The AP per size is the adaptive server's ``/v1/model``
    (unknown when it lists none). ``progress``: called with one line per server.

    Returns {artifact, sizes, slo_ms, profile, server_args, ap_by_size, runs: [{config, command, url,
    model, exit_code, summary, series, requests}]}."""
    artifact = Path(artifact)
    if not artifact.exists():
        raise ValueError(f"--compare {artifact}: no such checkpoint or artifact")
    if not sizes or any(s < 1 for s in sizes) or len(set(sizes)) != len(sizes):
        raise ValueError(f"--compare needs --sizes with distinct positive sizes, e.g. 64,96,128; got {sizes}")
    if operating_points is not None and not Path(operating_points).is_file():
        raise ValueError(f"--operating-points {operating_points}: no such file (msad bench's results.jsonl)")
    check_run_options(timeout_s, warmup, bin_s, max_in_flight, slo_ms)
    extra = split_server_args(server_args or [])
    images = images or [default_image()]
    schedule = arrival_times(profile)
    say = progress or (lambda line: None)
    reports: list[dict[str, Any]] = []
    aps: dict[int, float | None] = {}
    for name, args in configs or compare_configs(sizes, slo_ms, operating_points):
        with LocalServer(name, artifact, [*args, *extra]) as server:
            started = time.perf_counter()
            server.wait_ready()
            say(f"{name}: msad {' '.join(server.command[3:])} ready in {time.perf_counter() - started:.1f} s")
            model = server_model(server.url)
            if not reports:  # the adaptive server's AP per size, for every run
                aps = ap_by_size(model)
            warm_up(server.url, images, warmup, timeout_s)
            say(f"{name}: {len(schedule)} requests, {profile.describe()}")
            records, elapsed = asyncio.run(open_loop(server.url, images, schedule, timeout_s, max_in_flight))
            code = server.stop()
        report = run_report(name, records, elapsed, profile, slo_ms, aps, bin_s)
        say(f"{name}: {summary_line(report['summary'])}" + (f"; server exit status {code}" if code else ""))
        extra_fields = {"command": server.command, "url": server.url, "model": model, "exit_code": code}
        reports.append({**report, **extra_fields})
    return {
        "artifact": str(artifact),
        "sizes": list(sizes),
        "slo_ms": slo_ms,
        "profile": profile.to_dict(),
        "bin_s": bin_s,
        "server_args": extra,
        "ap_by_size": {str(k): v for k, v in aps.items()},
        "runs": reports,
    }
