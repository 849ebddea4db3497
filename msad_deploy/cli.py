"""The ``msad`` command: one entry point, subcommands for data, evaluation and inspection.

Subcommands import what they need when they run, so ``msad --help`` stays fast and a missing
optional dependency only affects the subcommand that needs it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXAMPLES = """examples:
  msad data synth --out data/synth --train 2000 --val 300 --size 128 --seed 0
  msad train teacher --config configs/synth_cpu.yaml --out runs/teacher
  msad train student --config configs/synth_cpu.yaml --teacher runs/teacher/best.pt --out runs/student
  torchrun --nproc-per-node 8 -m msad_deploy.training baseline --config configs/coco_r50_1x.yaml --out runs/hr
  msad eval --model runs/student/best.pt --data data/synth --out runs/student/val_metrics.json
  msad eval --model student.onnx --data data/synth            # any artifact: .pt, .onnx, .engine, .pt2, .xml
  msad predict student.onnx photos/ 'more/*.jpg' --out predictions --score-thresh 0.3
  msad serve student.onnx --port 8000 --max-batch 8 --max-wait-ms 5
  msad info --model configs/synth_cpu.yaml model.pyramid_shift=1 --input-size 64 64
"""


ENTRY_POINT_GROUP = "msad_deploy.commands"


def _add_data_parser(subparsers) -> None:
    from msad_deploy.data.synth import SYNTH_PROFILES

    data = subparsers.add_parser("data", help="dataset tools", description="Dataset tools.")
    data.set_defaults(handler=_run_data)
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    synth = data_sub.add_parser(
        "synth",
        help="generate the synthetic COCO-format benchmark",
        description=(
            "Write a deterministic COCO-format detection dataset: OUT/{train,val}/*.png and "
            "OUT/annotations/instances_{train,val}.json. Profile 'objects' (default): eight classes of "
            "textured solid objects (shape and surface differ per class) on photo-like clutter with "
            "decoys, a COCO-like mix of small, medium and large objects; small ones lose their texture "
            "at half resolution, so input resolution matters. Profile 'shapes': the earlier benchmark "
            "(outlines and solid shapes in pairs), kept so old runs stay reproducible. The same "
            "arguments always give the same bytes."
        ),
    )
    synth.add_argument("--out", required=True, type=Path, help="output directory (created)")
    synth.add_argument("--train", type=int, default=800, help="number of training images (default 800)")
    synth.add_argument("--val", type=int, default=200, help="number of validation images (default 200)")
    synth.add_argument(
        "--size", type=int, default=256, help="long side of every image in pixels (default 256)"
    )
    synth.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files (default 0)")
    synth.add_argument(
        "--profile",
        choices=SYNTH_PROFILES,
        default="objects",
        help="scene profile: objects (textured objects, the default) or shapes (the earlier benchmark)",
    )
    synth.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_eval_parser(subparsers) -> None:
    ev = subparsers.add_parser(
        "eval",
        help="COCO bbox metrics of a checkpoint, an exported artifact or a detections file",
        description=(
            "Score a model (or a detections JSON) with pycocotools: AP, AP50, AP75, APs, APm, APl, AR@100, "
            "in percent. --model takes a checkpoint or any exported artifact (.onnx, .engine/.plan, .pt2, OpenVINO .xml): it "
            "runs through the runtime's Detector, the path that is deployed. Boxes are evaluated in original "
            "image pixels with the dataset's category ids."
        ),
        epilog=(
            "Trailing key=value arguments override the checkpoint's config, e.g. input.test_min_size=512; for an "
            "exported artifact only data.* settings (e.g. data.eval_area_range_scale=0.04)."
        ),
    )
    ev.set_defaults(handler=_run_eval)
    source = ev.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model",
        type=Path,
        help="checkpoint written by msad train (best.pt / last.pt) or an exported artifact (.onnx, .engine, .pt2, .xml)",
    )
    source.add_argument(
        "--detections", type=Path, help="COCO results JSON to score instead of running a model"
    )
    ev.add_argument(
        "--data", type=Path, help="dataset root with annotations/instances_SPLIT.json and SPLIT/ images"
    )
    ev.add_argument("--split", default="val", help="split name under --data (default val)")
    ev.add_argument("--images", type=Path, help="image directory (overrides --data/--split)")
    ev.add_argument("--annotations", type=Path, help="COCO annotation file (overrides --data/--split)")
    ev.add_argument("--out", type=Path, help="write the metrics as JSON here")
    ev.add_argument(
        "--save-detections", type=Path, help="also write the model's detections as COCO results JSON"
    )
    ev.add_argument(
        "--save-per-image",
        type=Path,
        metavar="NPZ",
        help="also write pycocotools' per-image evaluation (.npz, tens of kB): later paired AP "
        "comparisons with other results on the same images resample it without re-running the model",
    )
    ev.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default 4)")
    ev.add_argument(
        "--workers", type=int, default=None, help="data loader workers (default: config data.num_workers)"
    )
    ev.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    ev.add_argument(
        "--branch",
        default=None,
        choices=["fused", "hr", "lr"],
        help="for a teacher checkpoint: which branch to decode (default fused, the teacher's inference path)",
    )
    _add_test_size(ev, "with --model: ")
    add_bootstrap_arguments(ev)
    ev.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    ev.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def add_bootstrap_arguments(parser, default: int | None = 1000) -> None:
    """--bootstrap N / --bootstrap-seed S: the 95 % interval of AP over the images (AP_ci95).

    ``default=None`` leaves both unset (a config file then decides; 1000 and 0 otherwise)."""
    parser.add_argument(
        "--bootstrap",
        type=_count,
        default=default,
        metavar="N",
        help="image resamples for the 95 %% interval of AP (AP_ci95: resample the evaluated images with "
        "replacement, percentile interval; paired between results on the same images); 0: off (default 1000)",
    )
    parser.add_argument(
        "--bootstrap-seed",
        type=_count,
        default=0 if default is not None else None,
        metavar="S",
        help="seed of the resamples; the same seed gives the same interval (default 0)",
    )


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"expected test sizes in pixels like 96,128,160, got {text!r}")
    return sizes


def _add_test_size(parser, prefix: str = "") -> None:
    parser.add_argument(
        "--test-size",
        type=int,
        default=None,
        help=f"{prefix}run at this test size (HR-frame short side; the max side scales with it); "
        "checkpoints and --dynamic artifacts take any",
    )


def _add_predict_parser(subparsers) -> None:
    predict = subparsers.add_parser(
        "predict",
        help="detect on images with any artifact; annotated images + detections JSON",
        description=(
            "Run ARTIFACT (a checkpoint, .onnx, .engine/.plan, .pt2 or OpenVINO .xml) on INPUTS (image files, folders, or glob "
            "patterns) and write OUT/<image>.png with boxes, class names and scores drawn, plus "
            "OUT/detections.json with every detection in original pixels. Unreadable images are reported and "
            "skipped (exit code 1)."
        ),
    )
    predict.set_defaults(handler=_run_predict)
    predict.add_argument("artifact", type=Path, help="checkpoint or exported artifact")
    predict.add_argument("inputs", nargs="+", help="image files, folders or glob patterns (quote them)")
    predict.add_argument("--out", type=Path, required=True, help="output folder (created)")
    predict.add_argument(
        "--score-thresh", type=float, default=None, help="drop detections scored below this (0..1)"
    )
    predict.add_argument(
        "--device",
        default="auto",
        help="auto (default), cpu, cuda or cuda:N; for an .xml also an OpenVINO device",
    )
    predict.add_argument("--batch", type=int, default=4, help="images per batch (default 4)")
    predict.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="largest image in pixels, checked before decoding; larger ones are skipped and reported "
        "(default 89478485; 0: no limit)",
    )
    _add_test_size(predict)
    predict.add_argument("--no-draw", action="store_true", help="write detections.json only")
    predict.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_serve_parser(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="HTTP detection service (REST + KServe v2 / Triton protocol, micro-batching, metrics)",
        description=(
            "Serve ARTIFACT (a checkpoint, .onnx, .engine/.plan, .pt2 or OpenVINO .xml) over HTTP with FastAPI + uvicorn "
            "(pip install 'msad-deploy[serve]'): POST /v1/detect (an image body or multipart upload -> JSON "
            "detections); the Open Inference Protocol (KServe v2, as Triton speaks it: /v2/health/live, "
            "/v2/health/ready, /v2/models/NAME, POST /v2/models/NAME/infer with a UINT8 IMAGE tensor [H,W,3] or "
            "[B,H,W,3], GET /v2/models/NAME/config); GET /metrics (Prometheus). Requests arriving within "
            "--max-wait-ms are run as one batch of at most --max-batch, a large request's images interleaved with "
            "others'. Each request's cost is bounded (--max-body-mb, --max-inflight-mb, --max-images, --max-pixels, --decode-workers; "
            "see docs/SERVING.md). SIGTERM drains in-flight requests, then exits with status 0."
        ),
    )
    serve.set_defaults(handler=_run_serve)
    serve.add_argument("artifact", type=Path, help="checkpoint or exported artifact")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--max-batch", type=int, default=8, help="images per model run at most (default 8)")
    serve.add_argument(
        "--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more images (default 5)"
    )
    serve.add_argument(
        "--device",
        default="auto",
        help="auto (default), cpu, cuda or cuda:N; for an .xml also an OpenVINO device",
    )
    serve.add_argument("--name", default=None, help="model name in /v2 URLs (default: the file's stem)")
    serve.add_argument(
        "--max-body-mb", type=float, default=20.0, help="largest request body in MiB (default 20)"
    )
    serve.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="largest image in decoded pixels, checked from the header before decoding; a larger one gets "
        "413 (default: follows the model, (32 x its long input side)^2, at most 89478485: 16777216 for a "
        "128-px model; a JPEG counts at the reduced scale it decodes at; 0: no limit)",
    )
    serve.add_argument(
        "--max-inflight-mb",
        type=float,
        default=None,
        help="request bodies held at once, in MiB, from reading to decoded; more wait before being read "
        "(default: 4 x --max-body-mb)",
    )
    serve.add_argument(
        "--max-images",
        type=int,
        default=None,
        help="images per request at most (the v2 batch dimension); more gets 413 (default: --max-batch)",
    )
    serve.add_argument(
        "--decode-workers",
        type=int,
        default=None,
        help="images decoded at once at most, bounding decode memory (default: the CPU cores, at most 4)",
    )
    serve.add_argument(
        "--min-side", type=int, default=None, help="smallest image side accepted, in pixels (default 8)"
    )
    serve.add_argument("--score-thresh", type=float, default=None, help="drop detections scored below this")
    _add_test_size(serve)
    serve.add_argument(
        "--size-divisibility",
        type=int,
        default=None,
        help="pad inputs to a multiple of this (default: the model's; msad bench's demo matrix uses 32, so "
        "sizes below the training padding cost less); checkpoints and --dynamic artifacts take any",
    )
    adaptive = serve.add_argument_group(
        "adaptive resolution",
        "Serve each micro-batch at the most accurate of several input sizes whose expected completion, given "
        "the queue, meets --slo-ms; the fastest under overload (see docs/SERVING.md). Responses name the size "
        "that served them (x-msad-operating-point header; operating_point in /v1/detect JSON).",
    )
    adaptive.add_argument(
        "--slo-ms",
        type=float,
        default=None,
        help="latency objective in ms, from request arrival to response, that adaptive serving holds",
    )
    adaptive.add_argument(
        "--sizes",
        type=_sizes,
        default=None,
        help="operating points: test sizes (HR-frame short side) to choose among, e.g. 96,128,160 (default: "
        "the sizes --operating-points has AP for); each is timed at start-up",
    )
    adaptive.add_argument(
        "--operating-points",
        type=Path,
        default=None,
        metavar="RESULTS_JSONL",
        help="msad bench results.jsonl: the AP of this model at each size ranks the points (without it, a "
        "larger size ranks as more accurate)",
    )
    adaptive.add_argument(
        "--hold-ms",
        type=float,
        default=1000.0,
        help="hysteresis: a more accurate point must qualify this long before serving (default 1000)",
    )
    serve.add_argument(
        "--drain-timeout",
        type=int,
        default=30,
        help="seconds SIGTERM waits for in-flight requests (default 30)",
    )
    serve.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )


def _add_info_parser(subparsers) -> None:
    info = subparsers.add_parser(
        "info",
        help="versions, devices, backends; with --model, FLOPs and parameters",
        description=(
            "Print library versions, visible devices and which inference backends import. With --model, "
            "also the FLOPs (1 multiply-add = 2 FLOPs) and parameters split into backbone / FPN / head."
        ),
        epilog="Trailing key=value arguments override the model config, e.g. model.backbone=resnet50.",
    )
    info.set_defaults(handler=_run_info)
    info.add_argument("--model", help="a checkpoint (.pt) or a config YAML; omit for environment info only")
    info.add_argument(
        "--input-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help="network input size (for a student: the LR size); default: the config's test_min_size x test_max_size, divided by 2**shift for a shifted detector",
    )
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msad",
        description="msad-deploy: train, evaluate, export and benchmark MSAD low-resolution detectors.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from msad_deploy import __version__

    parser.add_argument("--version", action="version", version=f"msad-deploy {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_data_parser(subparsers)
    _add_eval_parser(subparsers)
    _add_predict_parser(subparsers)
    _add_serve_parser(subparsers)
    _add_info_parser(subparsers)
    for register in _plugin_commands():
        register(subparsers)
    return parser


def _plugin_commands() -> list:
    """``register(subparsers)`` functions of the installed packages that add ``msad`` subcommands.

    training, export and benchmarks declare theirs as ``msad_deploy.commands`` entry points, so the
    core never imports them: a service installs and imports ``msad_deploy`` alone.
    """
    from importlib.metadata import entry_points

    return [entry.load() for entry in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)]


def _run_data(args: argparse.Namespace) -> int:
    from msad_deploy.data.synth import generate_synthetic_coco

    summary = generate_synthetic_coco(
        args.out,
        args.train,
        args.val,
        args.size,
        args.seed,
        progress=not args.no_progress,
        profile=args.profile,
    )
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


def _dataset_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    images = args.images or (args.data / args.split if args.data else None)
    annotations = args.annotations or (
        args.data / "annotations" / f"instances_{args.split}.json" if args.data else None
    )
    if images is None or annotations is None:
        raise SystemExit("msad eval: give --data DIR (or both --images and --annotations)")
    return images, annotations


def _run_eval(args: argparse.Namespace) -> int:
    from msad_deploy.config import Config, apply_overrides, config_to_dict, from_dict
    from msad_deploy.data.coco import CocoDetection
    from msad_deploy.evaluation.bootstrap import with_ap_interval
    from msad_deploy.evaluation.coco_eval import evaluate_detections, format_metrics_table, save_metrics

    images, annotations = _dataset_paths(args)
    if args.detections is not None and args.test_size is not None:
        raise ValueError(
            "--test-size applies to --model (it runs the model at that size), not to --detections"
        )
    if args.detections is not None:
        # Score against exactly the records training would use (data.on_bad=skip drops the same ones).
        config = from_dict(Config, apply_overrides(config_to_dict(Config()), args.overrides))
        dataset = CocoDetection(images, annotations, on_bad=config.data.on_bad)
        metrics, per_image = evaluate_detections(
            dataset.coco,
            args.detections,
            image_ids=dataset.image_ids,
            area_range_scale=config.data.eval_area_range_scale,
            per_image=True,
        )
        title = f"{args.detections} on {annotations}"
    else:
        from msad_deploy.evaluation.evaluator import artifact_eval_config, evaluate_detector
        from msad_deploy.runtime import Detector
        from msad_deploy.runtime.backends import backend_for

        checkpoint = backend_for(args.model) == "pytorch"
        options = {"overrides": args.overrides, "branch": args.branch or "fused"} if checkpoint else {}
        if args.branch and not checkpoint:
            raise ValueError(
                f"--branch applies to teacher checkpoints; {args.model} is exported, with its branch fixed"
            )
        device = args.device or "auto"
        with Detector.load(
            args.model, device, max_batch=args.batch_size, warmup=False, test_size=args.test_size, **options
        ) as detector:
            if checkpoint:
                config = detector.config
            else:
                config, note = artifact_eval_config(detector.spec, detector.metadata, args.overrides)
                print(f"{args.model}: {detector.backend_name} on {detector.device}; {note}")
            metrics, records, per_image = evaluate_detector(
                detector,
                config,
                images,
                annotations,
                batch_size=args.batch_size,
                num_workers=args.workers,
                progress=not args.no_progress,
                model_source=str(args.model),
                per_image=True,
            )
        if args.save_detections:
            args.save_detections.parent.mkdir(parents=True, exist_ok=True)
            args.save_detections.write_text(json.dumps(records))
        title = f"{args.model} on {annotations}"
    metrics = with_ap_interval(metrics, per_image, args.bootstrap, args.bootstrap_seed)
    if args.save_per_image:
        per_image.save(args.save_per_image)
    print(format_metrics_table(metrics, title=title))
    if args.bootstrap:
        print(
            f"AP_ci95: 95 % percentile interval of AP over {args.bootstrap} resamples of the "
            f"{per_image.num_images} images (seed {args.bootstrap_seed})"
        )
    if args.out:
        save_metrics(metrics, args.out)
        print(f"metrics written to {args.out}")
    return 0


def _run_predict(args: argparse.Namespace) -> int:
    from msad_deploy.runtime.predict import run_predict

    summary = run_predict(
        args.artifact,
        args.inputs,
        args.out,
        score_thresh=args.score_thresh,
        device=args.device,
        batch=args.batch,
        progress=not args.no_progress,
        draw=not args.no_draw,
        test_size=args.test_size,
        max_pixels=args.max_pixels,
    )
    found = sum(len(image["detections"]) for image in summary["images"])
    print(
        f"{len(summary['images'])} images, {found} detections ({summary['backend']} on {summary['device']}) -> "
        f"{args.out}/detections.json"
    )
    if summary["errors"]:
        print(f"{len(summary['errors'])} images could not be read (listed under 'errors')", file=sys.stderr)
        return 1
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    from msad_deploy.runtime.images import MIN_IMAGE_SIDE
    from msad_deploy.runtime.serving import ServeOptions, serve

    options = ServeOptions(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        max_pixels=args.max_pixels,
        min_side=MIN_IMAGE_SIDE if args.min_side is None else args.min_side,
        model_name=args.name,
        max_images=args.max_images,
        decode_workers=args.decode_workers,
        max_inflight_bytes=None if args.max_inflight_mb is None else int(args.max_inflight_mb * 1024 * 1024),
        slo_ms=args.slo_ms,
        sizes=args.sizes,
        operating_points=args.operating_points,
        hold_ms=args.hold_ms,
    )
    options.validate()
    if options.adaptive and args.test_size is not None:
        raise ValueError(
            "--test-size fixes one size; adaptive serving (--slo-ms) chooses among --sizes: give one or the other"
        )
    serve(
        str(args.artifact),
        args.host,
        args.port,
        args.device,
        options,
        score_thresh=args.score_thresh,
        log_level=args.log_level,
        drain_timeout=args.drain_timeout,
        test_size=args.test_size,
        size_divisibility=args.size_divisibility,
    )
    return 0


def _run_info(args: argparse.Namespace) -> int:
    from msad_deploy.info import environment_info, format_info, model_info

    report = {"environment": environment_info()}
    if args.model:
        report["model"] = model_info(args.model, args.overrides, args.input_size)
    print(json.dumps(report, indent=2) if args.json else format_info(report))
    return 0


def parse_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, letting key=value overrides sit anywhere (before or after options)."""
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if item.startswith("-") or "=" not in item]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


def main(argv: list[str] | None = None) -> int:
    from msad_deploy.errors import run_command

    args = parse_with_overrides(build_parser(), argv)
    return run_command(f"msad {args.command}", args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
