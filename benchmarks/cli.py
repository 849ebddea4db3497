"""``msad bench`` and ``msad bench serve``: registered as an ``msad_deploy.commands`` entry point."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
from pathlib import Path

from msad_deploy.cli import add_bootstrap_arguments

EXAMPLE = """examples:
  msad bench --model hr=runs/demo/hr/best.pt --model student=runs/demo/student/best.pt \\
      --sizes 64,96,128,160 --backends eager,onnxruntime --precisions fp32,int8 \\
      --data data/demo --out runs/bench --budget-ms 10
  msad bench --config configs/bench_demo.yaml --out runs/bench      # the matrix from a YAML file
  msad bench serve http://127.0.0.1:8000 --concurrency 1,8,32        # against a running msad serve
"""


DEFAULT_URL = "http://127.0.0.1:8000"


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, e.g. 64,96,128; got {text!r}"
        ) from None


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


SERVE_DESCRIPTION = "\n\n".join(
    textwrap.fill(paragraph, 100)
    for paragraph in (
        "Load msad serve on this machine (127.0.0.1, ::1 or localhost only) through POST /v1/detect.",
        "Closed loop (default): N clients per --concurrency level send back to back; throughput, p50/p99 "
        "and errors per level.",
        "Open loop (--profile): requests go out at scheduled arrival times whether or not earlier ones "
        "were answered, so queueing shows. Rates are in requests/s: constant R; step A:B (A until "
        "--step-at, default half the --duration, then B); bursty R (R for --on-s, idle for --off-s). "
        "Arrivals are Poisson (seeded by --seed) or evenly spaced (--arrivals even). At most "
        "--max-in-flight requests await answers; an arrival beyond that is dropped (a miss), and one sent "
        "over 10 ms behind its time is counted as late (latency runs from the scheduled time, so a client "
        "that falls behind does not hide queueing). Reported: latency p50/p90/p99/max of the answered "
        "requests, the share of all requests answered within --slo-ms (errors and drops are misses), the "
        "share per operating point (the x-msad-operating-point header), the request-weighted mean AP of "
        "the points served (from the adaptive server's /v1/model; '-' when unknown), the achieved rate, "
        "and a time series per --bin-s.",
        "--compare ARTIFACT runs the same schedule against `msad serve ARTIFACT --slo-ms MS --sizes ...` "
        "and then `msad serve ARTIFACT --test-size S` for each size, one server at a time on a free "
        "loopback port (SIGTERM after each), and writes OUT/serve_compare.json, .md and .png.",
    )
)


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
        help="load test msad serve on this machine: closed loop at concurrency levels, or open-loop "
        "profiles, adaptive against fixed resolution",
        description=SERVE_DESCRIPTION,
        epilog="""examples:
  msad bench serve http://127.0.0.1:8000 --concurrency 1,8,32                 # closed loop
  msad bench serve http://127.0.0.1:8000 --profile constant --rate 20 --duration 30 --slo-ms 50
  msad bench serve http://127.0.0.1:8000 --profile bursty --rate 60 --on-s 2 --off-s 2 --out run.json
  msad bench serve --compare student.onnx --sizes 64,96,128 --slo-ms 50 \\
      --operating-points runs/bench/results.jsonl --profile step --rate 10:60 --duration 20 \\
      --server-arg=--max-batch=8 --out runs/serve_compare
""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.set_defaults(handler=_run_serve)
    serve.add_argument(
        "url", nargs="?", default=None, help=f"server URL (default {DEFAULT_URL}; not with --compare)"
    )
    serve.add_argument(
        "--image",
        type=Path,
        action="append",
        default=[],
        help="PNG/JPEG file or folder to send (repeat; default: a generated 128x128 PNG)",
    )
    closed = serve.add_argument_group("closed loop")
    closed.add_argument("--concurrency", type=_ints, help="levels, e.g. 1,8,32 (default 1,8,32)")
    closed.add_argument("--requests", type=int, help="requests per level at most (default 256)")
    serve.add_argument(
        "--duration",
        type=float,
        default=20.0,
        help="seconds per level at most; with --profile, the profile's length (default 20)",
    )
    serve.add_argument(
        "--timeout", type=float, default=60.0, help="per-request timeout in seconds (default 60)"
    )
    serve.add_argument(
        "--warmup",
        dest="serve_warmup",
        type=int,
        metavar="N",
        default=4,
        help="untimed requests before each run (default 4)",
    )
    serve.add_argument(
        "--out",
        dest="serve_out",
        type=Path,
        metavar="PATH",
        help="write the report as JSON to this file; with --compare, a folder for serve_compare.json/.md/.png",
    )
    opened = serve.add_argument_group("open loop")
    opened.add_argument(
        "--profile",
        metavar="{constant,step,bursty}",
        help="constant, step or bursty: send at scheduled times (default with --compare: constant)",
    )
    opened.add_argument(
        "--rate",
        metavar="R|A:B",
        help="requests per second: R for constant and bursty (e.g. 20), A:B for step (e.g. 10:60)",
    )
    opened.add_argument(
        "--step-at",
        type=float,
        metavar="S",
        help="step: seconds at which rate A becomes B (default half the --duration)",
    )
    opened.add_argument(
        "--on-s", type=float, metavar="S", help="bursty: seconds sending at the rate (default 1)"
    )
    opened.add_argument(
        "--off-s", type=float, metavar="S", help="bursty: idle seconds between bursts (default 1)"
    )
    opened.add_argument(
        "--arrivals",
        default="poisson",
        metavar="{poisson,even}",
        help="poisson (exponential gaps, seeded) or even (1/rate apart) (default %(default)s)",
    )
    opened.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the Poisson arrivals (default 0): the same schedule each run",
    )
    opened.add_argument(
        "--slo-ms",
        type=float,
        help="latency objective in ms for the within-objective share; with --compare, also the adaptive "
        "server's (default: the server's own --slo-ms, if adaptive)",
    )
    opened.add_argument("--bin-s", type=float, default=1.0, help="seconds per time-series bin (default 1)")
    opened.add_argument(
        "--max-in-flight",
        type=int,
        default=256,
        help="requests awaiting answers at most; later arrivals are dropped (default 256)",
    )
    compare = serve.add_argument_group("adaptive against fixed (--compare)")
    compare.add_argument(
        "--compare",
        dest="compare_artifact",
        type=Path,
        metavar="ARTIFACT",
        help="start msad serve ARTIFACT adaptive (--slo-ms, --sizes) and then fixed at each size, and load each "
        "with the same schedule; needs --sizes, --slo-ms, --rate and --out",
    )
    compare.add_argument(
        "--sizes", dest="serve_sizes", metavar="S,S,...", help="HR-frame test sizes, e.g. 64,96,128"
    )
    compare.add_argument(
        "--operating-points",
        type=Path,
        metavar="RESULTS_JSONL",
        help="msad bench results.jsonl passed to the adaptive server (its AP per size)",
    )
    compare.add_argument(
        "--server-arg",
        dest="server_args",
        action="append",
        default=[],
        metavar="OPTION",
        help="more msad serve options for every server, split like a shell would; repeat; write it with = "
        "(--server-arg=--max-batch=8, --server-arg='--device cpu')",
    )


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


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        sizes = []
    if not sizes:
        raise ValueError(f"--sizes {text!r}: expected comma-separated integers, e.g. 64,96,128")
    return sizes


def _run_serve(args: argparse.Namespace) -> int:
    from .serve_load import read_images

    images = read_images(args.image)
    if args.profile is None and args.compare_artifact is None:
        return _closed_loop(args, images)
    if args.concurrency is not None or args.requests is not None:
        raise ValueError(
            "--concurrency and --requests are for the closed loop (without --profile or --compare)"
        )
    return _open_loop(args, images)


def _closed_loop(args: argparse.Namespace, images: list[bytes]) -> int:
    from .serve_load import format_levels, load_test

    open_only = {
        "--rate": args.rate,
        "--step-at": args.step_at,
        "--on-s": args.on_s,
        "--off-s": args.off_s,
        "--slo-ms": args.slo_ms,
        "--sizes": args.serve_sizes,
        "--operating-points": args.operating_points,
        "--server-arg": args.server_args or None,
    }
    given = [name for name, value in open_only.items() if value is not None]
    if given:
        raise ValueError(f"{' and '.join(given)}: for open-loop runs, give --profile (or --compare)")
    concurrency = args.concurrency or [1, 8, 32]
    report = load_test(
        args.url or DEFAULT_URL,
        images,
        tuple(concurrency),
        256 if args.requests is None else args.requests,
        args.duration,
        args.timeout,
        args.serve_warmup,
    )
    print(format_levels(report))
    _write_report(args.serve_out, report)
    return 0


def _write_report(path: Path | None, report: dict) -> None:
    """A load report as JSON at ``path`` (if given), and where it went."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
        print(f"-> {path}")


def _open_loop(args: argparse.Namespace, images: list[bytes]) -> int:
    from .serve_compare import compare_servers
    from .serve_profiles import format_runs, open_loop_test, parse_profile

    profile = parse_profile(
        args.profile or "constant",
        args.rate,
        args.duration,
        step_at_s=args.step_at,
        on_s=args.on_s,
        off_s=args.off_s,
        arrivals=args.arrivals,
        seed=args.seed,
    )

    def progress(line: str) -> None:
        print(f"msad bench serve: {line}", file=sys.stderr, flush=True)

    options = dict(
        images=images,
        timeout_s=args.timeout,
        warmup=args.serve_warmup,
        bin_s=args.bin_s,
        max_in_flight=args.max_in_flight,
    )
    if args.compare_artifact is None:
        if args.serve_sizes is not None or args.operating_points is not None or args.server_args:
            raise ValueError("--sizes, --operating-points and --server-arg apply to --compare only")
        report = open_loop_test(
            args.url or DEFAULT_URL, profile, slo_ms=args.slo_ms, progress=progress, **options
        )
        print(format_runs(report))
        _write_report(args.serve_out, report)
        return 0

    if args.url is not None:
        raise ValueError(f"give either a URL ({args.url}) or --compare ARTIFACT, not both")
    if args.serve_sizes is None:
        raise ValueError(
            "--compare needs --sizes, the fixed sizes and the adaptive server's, e.g. --sizes 64,96,128"
        )
    if args.slo_ms is None:
        raise ValueError("--compare needs --slo-ms, the adaptive server's latency objective in ms")
    if args.serve_out is None:
        raise ValueError("--compare needs --out DIR for serve_compare.json, .md and .png")
    if args.serve_out.exists() and not args.serve_out.is_dir():
        raise ValueError(f"--out {args.serve_out}: with --compare, a folder (it is a file)")
    report = compare_servers(
        args.compare_artifact,
        _sizes(args.serve_sizes),
        args.slo_ms,
        profile,
        operating_points=args.operating_points,
        server_args=args.server_args,
        progress=progress,
        **options,
    )
    table = format_runs(report)
    print(table)
    written = write_compare(report, table, args.serve_out)
    print(f"-> {', '.join(str(p) for p in written)}")
    return 0


def write_compare(report: dict, table: str, out: Path) -> list[Path]:
    """OUT/serve_compare.json, .md and (with matplotlib) .png; returns the paths written."""
    from msad_deploy.runtime.artifacts import atomic_path

    from .serve_profiles import Profile

    out.mkdir(parents=True, exist_ok=True)
    written = [out / "serve_compare.json", out / "serve_compare.md"]
    with atomic_path(written[0]) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    profile = Profile.from_dict(report["profile"])
    page = (
        f"# msad bench serve --compare {report['artifact']}\n\n{profile.describe()}; objective "
        f"{report['slo_ms']:g} ms; server options: {' '.join(report['server_args']) or 'none'}\n\n{table}\n"
    )
    with atomic_path(written[1]) as tmp:
        tmp.write_text(page)
    from .serve_plot import plot_runs

    try:
        plot_runs(report, out / "serve_compare.png")
    except ImportError as error:  # matplotlib is optional (msad-deploy[plot])
        print(f"msad bench serve: no plot ({error}; pip install 'msad-deploy[plot]')", file=sys.stderr)
        return written
    return [*written, out / "serve_compare.png"]
