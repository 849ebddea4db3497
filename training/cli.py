"""``msad train``: registered as an ``msad_deploy.commands`` entry point (see pyproject.toml)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    """``msad train`` (also ``python -m msad_deploy.training`` under torchrun, without the word train)."""
    train = subparsers.add_parser(
        "train",
        help="train a baseline, an aligned teacher or a distilled student",
        description=(
            "Train one model of the MSAD recipe. baseline: a single FCOS at one input scale "
            "(model.pyramid_shift=1 gives the shifted LR control); teacher: the aligned multi-scale "
            "teacher (HR + LR + fused losses); student: the low-resolution student distilled from --teacher. "
            "OUT receives config.yaml, metrics.jsonl, last.pt (resumable) and best.pt (best AP, inference only). "
            "Under torchrun (torchrun --nproc-per-node N -m msad_deploy.training RECIPE ...) every process "
            "trains a share of train.batch_size with DDP (NCCL on GPUs, gloo on CPUs)."
        ),
        epilog=(
            "Trailing key=value arguments override the config, e.g. train.max_iters=2000 model.backbone=resnet34 "
            "distill.aligned=false. Multi-node: run the same torchrun command on every node with --nnodes 2 "
            "--node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:PORT."
        ),
    )
    add_train_arguments(train)
    train.set_defaults(handler=run_train)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", choices=["baseline", "teacher", "student"], help="what to train")
    parser.add_argument(
        "--config", type=Path, help="YAML config (configs/ has presets); default: built-in defaults"
    )
    parser.add_argument("--out", type=Path, required=True, help="run directory (created)")
    parser.add_argument(
        "--teacher", type=Path, help="student only: teacher checkpoint (sets distill.teacher)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from OUT/last.pt (start fresh if it is missing)"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="hide the progress bar (logs still go to metrics.jsonl)"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def run_train(args: argparse.Namespace) -> int:
    import logging

    from msad_deploy.training.dist import shutdown
    from msad_deploy.training.launch import run_training

    from msad_deploy.config import load_config
    from msad_deploy.evaluation.coco_eval import format_metrics_table

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    overrides = list(args.overrides)
    if args.teacher is not None:
        overrides.append(f"distill.teacher={args.teacher}")
    config = load_config(args.config, overrides)
    try:
        metrics = run_training(
            args.recipe, config, args.out, resume=args.resume, progress=not args.no_progress
        )
    finally:
        shutdown()
    if metrics:
        print(format_metrics_table(metrics, title=f"{args.recipe} -> {args.out}"))
    return 0
