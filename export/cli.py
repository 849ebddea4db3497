"""``msad export ...``: registered as an ``msad_deploy.commands`` entry point (see pyproject.toml)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from msad_deploy.cli import add_bootstrap_arguments


def _size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 128x128, got {text!r}") from None
    return height, width


def add_input_arguments(parser) -> None:
    """--test-size / --size-divisibility: the resolution written into the artifact's inference spec."""
    parser.add_argument(
        "--test-size",
        type=int,
        help="HR-frame test size (short side) to deploy at, e.g. 96 (a student then sees 48); default: the "
        "checkpoint's own",
    )
    parser.add_argument(
        "--size-divisibility",
        type=int,
        help="pad inputs to a multiple of N instead of the training padding (e.g. 32: sizes between multiples of "
        "128 cost less)",
    )


def register(subparsers) -> None:
    export = subparsers.add_parser(
        "export",
        help="export a checkpoint to ONNX (and on to TensorRT, Triton), OpenVINO or AOTInductor; verify artifacts",
        description="Turn a checkpoint into a deployable, verified artifact with a JSON metadata sidecar.",
    )
    from msad_deploy.export.aoti import register_aoti
    from msad_deploy.export.openvino import register_openvino
    from msad_deploy.export.tensorrt import register_tensorrt
    from msad_deploy.export.triton import register_triton

    sub = export.add_subparsers(dest="export_command", required=True, metavar="FORMAT")
    _register_onnx(sub)
    _register_verify(sub)
    register_tensorrt(sub)
    register_triton(sub)
    register_aoti(sub)
    register_openvino(sub)


def _register_onnx(sub) -> None:
    onnx = sub.add_parser(
        "onnx",
        help="checkpoint -> ONNX with the pyramid shift, decode and NMS in the graph",
        description=(
            "Export the deployable model of CKPT (a student or baseline; a teacher with --branch fused) to ONNX: "
            "levels it does not use are not in the graph, boxes are decoded with the HR strides (HR-frame pixels, or "
            "original pixels with --preprocess), BatchNorm is folded, the graph is checked and slimmed. Outputs: "
            "boxes [B,K,4] xyxy, scores [B,K], labels [B,K] int64 (-1 padding), num_detections [B] int64; with "
            "--nms none the decoded pre-NMS boxes [B,L,4] and scores [B,L,C]. Writes FILE and FILE.json, then "
            "verifies against eager PyTorch (msad export verify)."
        ),
    )
    onnx.set_defaults(handler=_run_onnx)
    onnx.add_argument("checkpoint", type=Path, help="checkpoint written by msad train (best.pt / last.pt)")
    onnx.add_argument(
        "--out", type=Path, required=True, help="ONNX file to write (FILE.json is written beside it)"
    )
    onnx.add_argument(
        "--input-size",
        type=_size,
        help="HxW of the padded HR-frame input (a multiple of the model's padding, 128); with --preprocess the raw "
        "frame size. Default: the test size, padded",
    )
    onnx.add_argument("--batch", type=int, default=1, help="fixed batch size (default 1)")
    add_input_arguments(onnx)
    onnx.add_argument(
        "--dynamic", action="store_true", help="dynamic batch and spatial size instead of fixed ones"
    )
    onnx.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18, the minimum)")
    onnx.add_argument(
        "--nms",
        choices=["ort", "trt", "none"],
        default="ort",
        help="ort: ONNX NonMaxSuppression (ONNX Runtime; TensorRT 10/11 map it to their NMS layer); trt: TensorRT's "
        "NMS (the EfficientNMS_TRT plugin for --trt-version 10, ONNX NonMaxSuppression for 11); none: raw decoded "
        "outputs (default ort)",
    )
    onnx.add_argument(
        "--trt-version", type=int, default=10, choices=[10, 11], help="TensorRT major for --nms trt"
    )
    onnx.add_argument(
        "--preprocess",
        action="store_true",
        help="put input handling in the graph: uint8 frames [B,H,W,3] in (fixed size), resized, padded, normalised "
        "and downsampled exactly as in evaluation; boxes come out in frame pixels",
    )
    onnx.add_argument(
        "--precision",
        choices=["fp32", "fp16", "int8"],
        default="fp32",
        help="network precision (default fp32)",
    )
    onnx.add_argument(
        "--branch", choices=["fused", "hr", "lr"], help="teacher checkpoints: the branch to export"
    )
    onnx.add_argument("--calib-data", type=Path, help="int8: folder of calibration images")
    onnx.add_argument(
        "--calib-images", type=int, default=64, help="int8: calibration images to use (default 64)"
    )
    onnx.add_argument("--no-verify", action="store_true", help="skip the verification against eager PyTorch")
    onnx.add_argument(
        "--data", type=Path, help="dataset root for the AP check of the verification (optional)"
    )
    add_bootstrap_arguments(onnx)


def _register_verify(sub) -> None:
    verify = sub.add_parser(
        "verify",
        help="compare an ONNX or OpenVINO artifact with eager PyTorch (tensors, detections, COCO AP)",
        description=(
            "Run ARTIFACT (ONNX Runtime for .onnx, OpenVINO for .xml) and its source checkpoint in eager PyTorch on "
            "random images (at a second size for dynamic artifacts) and, with --data, on a dataset: pre-NMS tensors "
            "within rtol 1e-3 / atol 1e-4, the same detections after NMS (boxes within 0.01 px), COCO AP within 0.1 "
            "(fp32; 0.5 fp16, 1.5 int8): the paired 95 % bootstrap interval of the AP difference (artifact and eager "
            "scored on the same image resamples) must lie inside the bound. fp16 and int8 report their tensor "
            "differences and must give well-formed outputs; their AP bound is checked with --data only. Prints a "
            "pass/fail table with each AP's AP_ci95, writes it as JSON with --out, exits 1 on failure."
        ),
    )
    verify.set_defaults(handler=_run_verify)
    verify.add_argument(
        "artifact", type=Path, help="an .onnx file or an OpenVINO .xml (with its .bin) and its .json sidecar"
    )
    verify.add_argument(
        "--checkpoint", type=Path, help="source checkpoint (default: the one the sidecar names)"
    )
    verify.add_argument(
        "--data", type=Path, help="dataset root (annotations/instances_SPLIT.json, SPLIT/) for the AP check"
    )
    verify.add_argument("--split", default="val", help="split under --data (default val)")
    verify.add_argument("--ap-limit", type=float, help="largest allowed AP difference (default by precision)")
    add_bootstrap_arguments(verify)
    verify.add_argument(
        "--out", type=Path, help="write the report as JSON here (default ARTIFACT.verify.json)"
    )
    verify.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _verify_and_report(
    artifact: Path,
    checkpoint,
    data,
    out,
    ap_limit=None,
    split="val",
    progress=True,
    bootstrap=1000,
    bootstrap_seed=0,
) -> int:
    from .verify import format_report, verify_artifact, write_report

    report = verify_artifact(
        artifact,
        checkpoint,
        data,
        split,
        ap_limit=ap_limit,
        progress=progress,
        bootstrap=bootstrap,
        bootstrap_seed=bootstrap_seed,
    )
    print(format_report(report))
    out = out or artifact.with_name(artifact.name + ".verify.json")
    write_report(report, out)
    print(f"report written to {out}")
    return 0 if report["passed"] else 1


def _run_onnx(args: argparse.Namespace) -> int:
    from .onnx import OnnxExportOptions, export_onnx

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("msad").setLevel(logging.INFO)  # ours; the ONNX tooling's INFO chatter stays off
    options = OnnxExportOptions(
        input_size=args.input_size,
        batch=args.batch,
        dynamic=args.dynamic,
        opset=args.opset,
        nms=args.nms,
        trt_version=args.trt_version,
        preprocess=args.preprocess,
        precision=args.precision,
        branch=args.branch,
        calib_data=args.calib_data,
        calib_images=args.calib_images,
        test_size=args.test_size,
        size_divisibility=args.size_divisibility,
    )
    metadata = export_onnx(args.checkpoint, args.out, options)
    print(f"wrote {args.out} and {args.out}.json ({metadata['precision']}, nms {metadata['nms']})")
    if args.no_verify:
        return 0
    return _verify_and_report(
        args.out,
        args.checkpoint,
        args.data,
        None,
        bootstrap=args.bootstrap,
        bootstrap_seed=args.bootstrap_seed,
    )


def _run_verify(args: argparse.Namespace) -> int:
    return _verify_and_report(
        args.artifact,
        args.checkpoint,
        args.data,
        args.out,
        args.ap_limit,
        args.split,
        not args.no_progress,
        args.bootstrap,
        args.bootstrap_seed,
    )
