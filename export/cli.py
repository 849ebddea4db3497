"""``msad export``: registered as an ``msad_deploy.commands`` entry point (see pyproject.toml).

Each target registers its own subcommand; their modules import heavy libraries only when they run.
"""

from __future__ import annotations


def register(subparsers) -> None:
    """``msad export {tensorrt,triton} ...``."""
    from msad_deploy.export.tensorrt import register_tensorrt
    from msad_deploy.export.triton import register_triton

    export = subparsers.add_parser(
        "export",
        help="export a model: TensorRT engines, Triton model repositories",
        description="Export trained detectors and exported artifacts for deployment.",
    )
    export_sub = export.add_subparsers(dest="export_command", required=True, metavar="TARGET")
    register_tensorrt(export_sub)
    register_triton(export_sub)
