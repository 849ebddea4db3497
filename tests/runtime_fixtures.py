"""Artifacts of one tiny model family for the runtime tests, built once per session (see conftest.py).

``student.pt`` (MSAD student, input shift 1, test size 128), its ONNX (fp32, fixed batch 1,
128x128), its AOTInductor package (CPU, fixed batch 2), its ONNX with in-graph preprocessing
(``frames.onnx``: uint8 frames 200x256, resized to 100x128 in the graph; batch 2), and
``wide.onnx`` from a second checkpoint whose test size is 128/256 (fixed 128x256: a portrait image
does not fit it). Exports take most of the runtime tests' time, so each is made once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tests.test_export_onnx import CATEGORY_IDS, _checkpoint

__all__ = [
    "CATEGORY_IDS",
    "assert_same_results",
    "build_artifacts",
    "build_checkpoint",
    "frame_images",
    "sample_images",
]


def build_checkpoint(root: Path) -> Path:
    return _checkpoint(root / "student.pt", shift=1)


def build_artifacts(root: Path) -> dict[str, Path]:
    from msad_deploy.export.aoti import AotiExportOptions, export_aoti
    from msad_deploy.export.onnx import OnnxExportOptions, export_onnx

    checkpoint = build_checkpoint(root)
    wide = _checkpoint(root / "wide.pt", shift=1)
    # the same weights, a 128 x 256 test size: fixed exports are 128x256 (padded HR frame)
    from msad_deploy.models import load_model, save_model_checkpoint

    loaded = load_model(wide)
    loaded.config.input.test_max_size = 256
    save_model_checkpoint(
        wide, loaded.model, loaded.config, loaded.spec.class_names, loaded.spec.category_ids
    )
    export_onnx(checkpoint, root / "student.onnx", OnnxExportOptions())
    export_onnx(wide, root / "wide.onnx", OnnxExportOptions())
    export_aoti(checkpoint, root / "student.pt2", AotiExportOptions(batch=2))
    # in-graph preprocessing: uint8 frames of one size (200 x 256, resized in the graph), fixed batch 2
    export_onnx(
        checkpoint, root / "frames.onnx", OnnxExportOptions(preprocess=True, input_size=(200, 256), batch=2)
    )
    return {
        "checkpoint": checkpoint,
        "onnx": root / "student.onnx",
        "pt2": root / "student.pt2",
        "wide_checkpoint": wide,
        "wide_onnx": root / "wide.onnx",
        "frames_onnx": root / "frames.onnx",
    }


def sample_images(count: int, seed: int = 0) -> list[np.ndarray]:
    """uint8 RGB [H, W, 3] images, long side 128 (all pad to 128x128 at the test size): smooth blobs
    on noise, so that detections differ in score."""
    rng = np.random.default_rng(seed)
    shapes = [(128, 96), (96, 128), (128, 128), (100, 128), (128, 110), (120, 128), (128, 100), (90, 128)]
    images = []
    for index in range(count):
        height, width = shapes[index % len(shapes)]
        image = rng.integers(0, 64, (height, width, 3)).astype(np.float32)
        for _ in range(3):
            y, x = rng.integers(0, height), rng.integers(0, width)
            radius = rng.integers(8, 30)
            yy, xx = np.ogrid[:height, :width]
            mask = (yy - y) ** 2 + (xx - x) ** 2 < radius**2
            image[mask] = rng.integers(100, 256, 3)
        images.append(image.astype(np.uint8))
    return images


def frame_images() -> list[np.ndarray]:
    """Three different 200x256 frames: the size ``frames.onnx`` takes (the spec resizes them to 100x128)."""
    from PIL import Image

    small = [image for image in sample_images(20, seed=4) if image.shape[:2] == (100, 128)]
    return [np.array(Image.fromarray(image).resize((256, 200), Image.BILINEAR)) for image in small]


def assert_same_results(ours, reference, box_tol: float = 0.01, score_tol: float = 1e-4) -> None:
    """The same detections, as sets: equal counts; each detection matched one-to-one by class, score
    (within score_tol) and box (within box_tol px). Order may differ among near-equal scores."""
    assert len(ours) == len(reference), (len(ours), len(reference))
    used = np.zeros(len(reference), dtype=bool)
    for box, score, label in zip(ours.boxes, ours.scores, ours.class_ids):
        candidates = np.flatnonzero(
            ~used
            & (reference.class_ids == label)
            & (np.abs(reference.scores - score) <= score_tol)
            & (np.abs(reference.boxes - box).max(axis=1) <= box_tol)
        )
        assert len(candidates), f"no match for class {label} score {score:.6f} box {box.tolist()}"
        used[candidates[0]] = True


def run_in_threads(
    task: Callable[[int], None], count: int = 8, timeout: float = 120.0
) -> list[BaseException]:
    """``task(thread)`` on ``count`` threads released together by a barrier, so their calls overlap;
    returns what they raised (empty: all finished)."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(count)

    def run(thread: int) -> None:
        try:
            barrier.wait()
            task(thread)
        except BaseException as error:  # reported by the caller
            errors.append(error)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
    return errors
