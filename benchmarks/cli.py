"""``msad bench`` and ``msad bench serve``: registered as an ``msad_deploy.commands`` entry point."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from msad_deploy.cli import add_bootstrap_arguments

EXAMPLE = """examples:
  msad bench --model hr=runs/demo/hr/best.pt --model student=runs/demo/student/best.pt \\
      --sizes 64,96,128,160 --backends eager,onnxruntime --precisions fp32,int8 \\
      --data data/demo --out runs/bench --budget-ms 10
  msad bench --config configs/bench_demo.yaml --out runs/bench      # the matrix from a YAML file
  msad bench serve http://127.0.0.1:8000 --concurrency 1,8,32        # against a running msad serve
"""


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, e.g. 64,96,128; got {text!r}"
        ) from None


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def register(subparsers) -> None:
    bench = subparsers.add_parser(
        "bench",
        help="latency against COCO AP across models, resolutions, backends, precisions and batch sizes",
        description=(
            "Measure every cell of a matrix (models x HR-frame sizes x backends x precisions x batch sizes x "
            "devices): end-to-end and model-only latency (p50/p90/p99/mean, images/s), COCO AP through the same "
            "Detector, FLOPs split backbone/FPN/head, parameters and artifact size. Checkpoints are exported on the "
            "fly (cached in OUT/artifacts). Writes OUT/results.jsonl, results.csv, results.md and pareto.png, and "
            "prints the table with the Pareto frontier. A re-run with the same OUT reuses finished cells."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.set_defaults(handler=_run_bench)
    bench.add_argument(
        "--config",
        type=Path,
        help="YAML file with the matrix (keys as the options below; "
        "models: a list of {name, path} or a {name: path} mapping); options given here override it",
    )
    bench.add_argument(
        "--model",
        action="append",
        default=None,
        metavar="NAME=PATH",
        help="a checkpoint (exported per backend on the fly) or an artifact (.onnx/.engine/.pt2/.xml); repeat",
    )
    bench.add_argument(
        "--sizes",
        type=_ints,
        help="HR-frame test sizes, e.g. 64,96,128,160 (a student at S sees S/2); default: each model's own",
    )
    bench.add_argument(
        "--latency-sizes",
        type=_ints,
        help="more HR-frame sizes timed without AP, e.g. 320,640 (deployment sizes beyond the dataset's "
        "images: frames are its images resized to SxS; the AP column says latency only)",
    )
    bench.add_argument(
        "--size-divisibility",
        type=int,
        help="pad inputs to a multiple of N instead of the model's own padding (e.g. 32, so sizes "
        "between multiples of 128 cost less)",
    )
    bench.add_argument(
        "--backends",
        type=_names,
        help="eager, compiled, cudagraphs, onnxruntime, tensorrt, aoti, openvino (default eager,onnxruntime)",
    )
    bench.add_argument(
        "--precisions",
        type=_names,
        help="fp32, fp16, bf16, int8 (default fp32); cells a backend or "
        "device cannot run are rows marked skipped",
    )
    bench.add_argument("--batches", type=_ints, help="batch sizes (default 1)")
    bench.add_argument("--devices", type=_names, help="cpu, cuda or auto (default auto: cuda when present)")
    bench.add_argument(
        "--data",
        type=Path,
        help="COCO-layout dataset root for AP and timing images "
        "(DATA/SPLIT/, DATA/annotations/instances_SPLIT.json); without it: latency only, on noise",
    )
    bench.add_argument("--split", help="dataset split (default val)")
    bench.add_argument(
        "--eval-images", type=int, help="evaluate on the first N images of the split (default: all)"
    )
    bench.add_argument(
        "--calib-images", type=int, help="int8 calibration images from DATA/train (default 64)"
    )
    bench.add_argument("--warmup", type=int, help="untimed calls before timing (default 5)")
    bench.add_argument("--min-runs", type=int, help="timed calls at least (default 20)")
    bench.add_argument(
        "--min-time", type=float, dest="min_time_s", help="seconds of timed calls at least (default 1)"
    )
    bench.add_argument(
        "--max-time",
        type=float,
        dest="max_time_s",
        help="stop timing one figure after this many seconds (default 30)",
    )
    bench.add_argument(
        "--threads", type=int, help="intra-op threads for torch, ONNX Runtime and OpenVINO (default: theirs)"
    )
    bench.add_argument(
        "--unstable-spread",
        type=float,
        help="re-measure a size once, then mark it unstable, when a cell's e2e p50 95%% interval is wider "
        "than this fraction of its p50 (default 0.15)",
    )
    bench.add_argument(
        "--twin-tolerance",
        type=float,
        help="... or when two architecturally identical networks on the same input (the HR and LR baselines "
        "at one size) differ by more than this fraction (default 0.2)",
    )
    bench.add_argument(
        "--busy-cores",
        type=float,
        help="... or when other processes used more than this many cores' worth of CPU while it was timed "
        "(from /proc/stat; default 0.25)",
    )
    bench.add_argument(
        "--no-verify", action="store_true", help="do not check on-the-fly exports against eager PyTorch"
    )
    bench.add_argument("--out", type=Path, required=False, help="output folder (required for a matrix run)")
    bench.add_argument(
        "--budget-ms",
        help="answer: the most accurate cell under this end-to-end p50 latency, and what the next best gives up; "
        "milliseconds (10) or a fraction of a cell's latency (0.5xhr@128: half the fastest hr cell at size 128)",
    )
    add_bootstrap_arguments(bench, default=None)
    bench.add_argument(
        "--compare",
        type=_names,
        metavar="A-B[@input],...",
        help="model pairs whose AP difference A - B is printed per size/backend/precision with its paired 95 %% "
        "interval; B at A's HR-frame size, or with @input where B's network input equals A's (default: each "
        "*student* model against lr@input and hr); int8/fp16/bf16 - fp32 of each model always",
    )
    bench.add_argument(
        "--fresh", action="store_true", help="ignore OUT/results.jsonl: measure every cell again"
    )
    bench.add_argument("--title", default="", help="title of the plot")
    bench.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    sub = bench.add_subparsers(dest="bench_command", metavar="serve", required=False)
    serve = sub.add_parser(
        "serve",
        help="load test a running msad serve (loopback only) at several concurrency levels",
        description="POST images to URL/v1/detect from N concurrent clients per level; report throughput, p50/p99 "
        "and errors per level. The server must be on this machine (127.0.0.1, ::1 or localhost).",
    )
    serve.set_defaults(handler=_run_serve)
    serve.add_argument(
        "url", nargs="?", default="http://127.0.0.1:8000", help="server URL (default %(default)s)"
    )
    serve.add_argument(
        "--image",
        type=Path,
        action="append",
        default=[],
        help="PNG/JPEG file or folder to send (repeat; default: a generated 128x128 PNG)",
    )
    serve.add_argument("--concurrency", type=_ints, default=[1, 8, 32], help="levels (default 1,8,32)")
    serve.add_argument("--requests", type=int, default=256, help="requests per level at most (default 256)")
    serve.add_argument("--duration", type=float, default=20.0, help="seconds per level at most (default 20)")
    serve.add_argument(
        "--timeout", type=float, default=60.0, help="per-request timeout in seconds (default 60)"
    )
    serve.add_argument("--out", dest="serve_out", type=Path, help="write the report as JSON here")


def build_config(args: argparse.Namespace):
    from msad_deploy.config import ConfigError, load_yaml_mapping

    from .matrix import BenchConfig, bench_config, parse_model

    config = BenchConfig()
    if args.config is not None:
        config = bench_config(load_yaml_mapping(args.config), str(args.config))
    if args.model:
        config.models = [parse_model(text) for text in args.model]
    for name in (
        "sizes",
        "latency_sizes",
        "size_divisibility",
        "backends",
        "precisions",
        "batches",
        "devices",
        "data",
        "split",
        "eval_images",
        "calib_images",
        "warmup",
        "min_runs",
        "min_time_s",
        "max_time_s",
        "threads",
        "bootstrap",
        "bootstrap_seed",
        "compare",
        "unstable_spread",
        "twin_tolerance",
        "busy_cores",
    ):
        value = getattr(args, name)
        if value is not None:
            setattr(config, name, value)
    if args.no_verify:
        config.verify_exports = False
    if args.out is None:
        raise ConfigError("msad bench: give --out DIR (results, artifacts and the plot go there)")
    return config


def _run_bench(args: argparse.Namespace) -> int:
    import torch

    from .report import append_jsonl, parse_budget, read_jsonl, write_outputs
    from .runner import BenchRunner

    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("msad").setLevel(logging.WARNING)  # failed cells; ONNX Runtime's tooling stays quiet
    config = build_config(args)
    config.validate()
    budget = parse_budget(args.budget_ms) if args.budget_ms is not None else None
    if config.threads:
        torch.set_num_threads(config.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    previous = {} if args.fresh else read_jsonl(results)
    (out / "bench_config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
    runner = BenchRunner(
        config, out, previous, progress=not args.no_progress, on_row=lambda r: append_jsonl(r, results)
    )
    rows = runner.run()
    summary = write_outputs(
        out, rows, budget, args.title, config.bootstrap, config.bootstrap_seed, config.model_pairs()
    )
    print(summary["table"])
    if summary["ratios"]:
        print(summary["ratios"])
    if summary["pairs"]:
        print(summary["pairs"])
    if summary["budget"]:
        print(summary["budget"])
    reused = sum(bool(r.get("reused")) for r in rows)
    counts = summary["counts"]
    print(
        f"\n{len(rows)} cells: {counts['ok']} measured ({reused} reused), {counts['skipped']} skipped, "
        f"{counts['failed']} failed -> {out}/results.jsonl, results.csv, results.md"
        + (", pareto.png" if summary["plot"] else "")
    )
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    from .serve_load import format_levels, load_test, read_images

    report = load_test(
        args.url,
        read_images(args.image),
        tuple(args.concurrency),
        args.requests,
        args.duration,
        args.timeout,
    )
    print(format_levels(report))
    if args.serve_out is not None:
        args.serve_out.parent.mkdir(parents=True, exist_ok=True)
        args.serve_out.write_text(json.dumps(report, indent=2))
        print(f"-> {args.serve_out}")
    return 0
