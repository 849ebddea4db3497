"""Adaptive resolution on a real ``msad serve`` (127.0.0.1, httpx): operating points from bench rows,
the most accurate point at low load, a lower one during a burst, back after the hold, per-point and
objective metrics; and every new option's bad values as one line with exit status 2."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

from msad_deploy.cli import main
from msad_deploy.runtime.artifacts import sha256_file
from tests.test_serve import ServerProcess, _png

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

POINT_HEADER = "x-msad-operating-point"


def _bench_rows(path: Path, sha: str) -> Path:
    """An msad bench results.jsonl: this model at 64 and 128 (padding 32), a latency-only row at 320,
    a row padded otherwise and another model's row (neither may count)."""

    def row(size, ap, sha=sha, divisibility=32, model="student"):
        return {
            "model": model,
            "model_sha256": sha,
            "size": size,
            "backend": "eager",
            "precision": "fp32",
            "status": "ok",
            "size_divisibility": divisibility,
            "metrics": None if ap is None else {"AP": ap},
        }

    rows = [
        row(64, 2.0),
        row(128, 8.0),
        row(320, None),
        row(96, 6.0, divisibility=64),
        row(96, 9.9, sha="0" * 64, model="other"),
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_adaptive_server_moves_down_under_a_burst_and_back_after_the_hold(
    runtime_checkpoint, tmp_path
) -> None:
    rows = _bench_rows(tmp_path / "results.jsonl", sha256_file(runtime_checkpoint))
    server = ServerProcess(
        runtime_checkpoint,
        "--slo-ms", "300",
        "--operating-points", str(rows),
        "--size-divisibility", "32",
        "--hold-ms", "300",
        "--max-batch", "8",
        "--max-wait-ms", "2",
    )  # fmt: skip
    image = _png(np.random.default_rng(3).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    try:
        adaptive = httpx.get(f"{server.url}/v1/model").json()["serve"]["adaptive"]
        assert adaptive["slo_ms"] == 300.0
        assert [(p["size"], p["ap"]) for p in adaptive["points"]] == [(128, 8.0), (64, 2.0)]
        full_128 = adaptive["points"][0]["run_ms"]["8"]

        first = httpx.post(f"{server.url}/v1/detect", content=image)
        assert first.status_code == 200
        assert first.headers[POINT_HEADER] == "128" and first.json()["operating_point"] == 128

        # a burst whose queue cannot finish at 128 within 0.8 x 300 ms
        burst = 8 * (int(240 / full_128) + 2) + 64

        async def fire() -> list:
            limits = httpx.Limits(max_connections=burst, max_keepalive_connections=burst)
            async with httpx.AsyncClient(timeout=120, limits=limits) as client:
                return await asyncio.gather(
                    *(client.post(f"{server.url}/v1/detect", content=image) for _ in range(burst))
                )

        answers = asyncio.run(fire())
        assert all(a.status_code == 200 for a in answers)
        sizes = [a.headers[POINT_HEADER] for a in answers]
        assert [a.json()["operating_point"] for a in answers] == [int(s) for s in sizes]
        assert "64" in sizes, f"a burst of {burst} never moved off 128 (a full batch at 128: {full_128} ms)"

        time.sleep(1.2)  # the burst leaves the arrival-rate window
        served = []
        for _ in range(40):  # light load (under 5 req/s): back to 128 once it has qualified for the hold
            served.append(httpx.post(f"{server.url}/v1/detect", content=image).headers[POINT_HEADER])
            if served[-1] == "128":
                break
            time.sleep(0.2)
        assert served[-1] == "128", served  # (the hold itself: tests/test_serving_policy.py)

        metrics = httpx.get(f"{server.url}/metrics").text
        total = 1 + burst + len(served)
        assert _metric(metrics, "msad_objective_requests_total") == total
        per_point = [
            _metric(metrics, f'msad_operating_point_requests_total{{size="{size}"}}') for size in (64, 128)
        ]
        assert sum(per_point) == total and min(per_point) > 0
        assert _metric(metrics, "msad_operating_point_size") in (64.0, 128.0)
    finally:
        code, output = server.stop()
    assert code == 0 and "Traceback" not in output, output
    assert "adaptive resolution for a 300 ms objective" in output


def test_a_fixed_server_names_its_size_too(runtime_checkpoint) -> None:
    server = ServerProcess(runtime_checkpoint, "--test-size", "96")
    try:
        answer = httpx.post(f"{server.url}/v1/detect", content=_png(np.zeros((64, 64, 3), np.uint8)))
        assert answer.headers[POINT_HEADER] == "96" and answer.json()["operating_point"] == 96
        assert httpx.get(f"{server.url}/v1/model").json()["serve"]["adaptive"] is None
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--slo-ms", "50"], "--slo-ms needs operating points"),
        (["--sizes", "64,128"], "give --slo-ms too"),
        (["--slo-ms", "-5", "--sizes", "64,128"], "--slo-ms must be a positive"),
        (["--slo-ms", "50", "--sizes", "64,64"], "--sizes must be distinct"),
        (["--slo-ms", "50", "--sizes", "64"], "two or more sizes"),
        (["--slo-ms", "50", "--sizes", "64,128", "--test-size", "96"], "one or the other"),
        (["--slo-ms", "50", "--sizes", "64,128", "--hold-ms", "-1"], "--hold-ms must be >= 0"),
        (["--slo-ms", "50", "--operating-points", "missing.jsonl"], "no such file"),
    ],
)
def test_bad_adaptive_options_are_one_line(
    runtime_checkpoint, args, message, capsys, monkeypatch, tmp_path
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["serve", str(runtime_checkpoint), "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_bench_rows_that_do_not_fit_the_model_are_one_line(runtime_checkpoint, tmp_path, capsys) -> None:
    rows = _bench_rows(tmp_path / "results.jsonl", sha256_file(runtime_checkpoint))
    base = [
        "serve",
        str(runtime_checkpoint),
        "--device",
        "cpu",
        "--slo-ms",
        "50",
        "--operating-points",
        str(rows),
    ]
    cases = [
        # the rows were measured padded to 32; this server pads to the model's 128
        ([], "serve with --size-divisibility 32 or 64"),
        (["--size-divisibility", "32", "--sizes", "64,96"], "no AP for size(s) 96; it has 64,128"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    other = tmp_path / "other.jsonl"
    other.write_text(
        json.dumps({"model": "x", "model_sha256": "f" * 64, "precision": "fp32", "size": 64}) + "\n"
    )
    assert main([*base[:-1], str(other)]) == 2
    assert "has no AP for this model" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    assert main([*base[:-1], str(bad)]) == 2
    assert "line 1 is not JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["serve", str(runtime_checkpoint), "--slo-ms", "50", "--sizes", "64,x"])
    assert exit_.value.code == 2 and "expected test sizes" in capsys.readouterr().err
