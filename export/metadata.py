"""The sidecar fields every export writes the same way (``msad_deploy.runtime.artifacts`` reads them)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from msad_deploy.models.spec import InferenceSpec
from msad_deploy.runtime.artifacts import FORMAT, FORMAT_VERSION, sha256_file


def library_versions() -> dict[str, str | None]:
    """Installed versions of the packages an export depends on (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    names = (
        "msad-deploy",
        "torch",
        "torchvision",
        "onnx",
        "onnxscript",
        "onnxruntime",
        "onnxslim",
        "openvino",
        "nncf",
    )
    result: dict[str, str | None] = {}
    for name in names:
        try:
            result[name] = version(name)
        except PackageNotFoundError:
            result[name] = None
    return result


def base_metadata(
    kind: str, artifact: str | Path, spec: InferenceSpec, checkpoint: str | Path
) -> dict[str, Any]:
    """The common sidecar fields: format and its version, the artifact kind and file name, the inference
    spec, library versions, the source checkpoint and its SHA-256, and the creation time (UTC).

    Each exporter adds its own fields (inputs, outputs, NMS, precision, sizes, ...) after these."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "artifact": Path(artifact).name,
        "spec": spec.to_dict(),
        "versions": library_versions(),
        "source_checkpoint": str(checkpoint),
        "source_sha256": sha256_file(checkpoint),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
