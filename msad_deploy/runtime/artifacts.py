"""Artifact metadata: the JSON sidecar beside every exported file (and in ONNX ``metadata_props``).

``model.onnx`` has ``model.onnx.json`` beside it, ``model.engine`` has ``model.engine.json``, and so
on. The sidecar holds the inference spec (how to feed the artifact and read its outputs), the I/O
names, shapes and dtypes, precision, NMS mode, library versions and the source checkpoint's
SHA-256. The runtime reads it to load an artifact without the project's model code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from msad_deploy.models.spec import InferenceSpec

FORMAT = "msad-deploy-artifact"
FORMAT_VERSION = 1
ONNX_METADATA_KEY = "msad_deploy"
# The output contract (see msad_deploy.models.postprocess.Detections) and the pre-NMS outputs.
DETECTION_OUTPUTS = ("boxes", "scores", "labels", "num_detections")
RAW_OUTPUTS = ("boxes", "scores")


def sidecar_path(artifact: str | Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json``."""
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + ".json")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary name beside ``path``; rename it over ``path`` only if the block succeeds.

    A failed export never leaves a half-written artifact (nor a stale temporary file) behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")  # keeps the suffix tools check
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_sidecar(artifact: str | Path, metadata: dict[str, Any]) -> Path:
    """Write ``metadata`` as ``ARTIFACT.json`` (atomically); returns its path."""
    path = sidecar_path(artifact)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    return path


def read_sidecar(artifact: str | Path) -> dict[str, Any]:
    """The sidecar of ``artifact``, checked for format; errors name the file and the fix."""
    path = sidecar_path(artifact)
    if not path.is_file():
        raise FileNotFoundError(
            f"{artifact} has no metadata sidecar {path}; export it with `msad export` (which writes one) "
            "or copy the .json that was written beside it"
        )
    try:
        metadata = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"artifact metadata {path} is not valid JSON ({err}); re-export the artifact"
        ) from err
    return check_metadata(metadata, str(path))


def check_metadata(metadata: Any, source: str) -> dict[str, Any]:
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ValueError(f"{source} is not msad-deploy artifact metadata (no format={FORMAT!r})")
    if int(metadata.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{source} was written by a newer msad-deploy; upgrade to read it")
    for key in ("spec", "inputs", "outputs"):
        if key not in metadata:
            raise ValueError(f"{source} lacks {key!r}; re-export the artifact")
    return metadata


def metadata_spec(metadata: dict[str, Any]) -> InferenceSpec:
    return InferenceSpec.from_dict(metadata["spec"])


def tensor_info(name: str, dtype: str, shape: list[int | str]) -> dict[str, Any]:
    """One input/output entry: symbolic dimensions are strings ("batch", "height", ...)."""
    return {"name": name, "dtype": dtype, "shape": list(shape)}
