"""``msad predict ARTIFACT INPUTS... --out DIR``: images in, annotated images and one detections JSON out.

INPUTS are image files, folders (their images, recursively, sorted) or glob patterns. For each
image, ``DIR/<name>.png`` shows its boxes with class names and scores (torchvision's
``draw_bounding_boxes``); ``DIR/detections.json`` lists every image's detections (``Result.to_dict``
plus the file and the annotated image's name) and the images that could not be read, each with the
reason. An unreadable image is reported and skipped; the exit code is 1 when any was.
"""

from __future__ import annotations

import glob
import json
import sys
from pathlib import Path
from typing import Any

import torch

from msad_deploy.data.coco import DEFAULT_MAX_IMAGE_PIXELS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# A fixed palette, one colour per class (cycled), readable on photos.
PALETTE = [
    "#e6194b",
    "#3cb44b",
    "#ffe119",
    "#4363d8",
    "#f58231",
    "#911eb4",
    "#46f0f0",
    "#f032e6",
    "#bcf60c",
    "#fabebe",
    "#008080",
    "#e6beff",
]


def collect_inputs(inputs: list[str]) -> list[Path]:
    """Files, folders (images inside, recursively) and globs -> image paths, in order, without repeats."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not matches:
                raise ValueError(f"folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        elif path.exists():
            matches = [path]
        elif glob.has_magic(item):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not matches:
                raise ValueError(f"no file matches {item!r}")
        else:
            raise FileNotFoundError(2, "no such file or folder", item)
        found.extend(matches)
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise ValueError("no input images")
    return unique


def draw_result(image: torch.Tensor, result: Any) -> torch.Tensor:
    """uint8 [3, H, W] with the result's boxes, class names and scores drawn on it."""
    from torchvision.utils import draw_bounding_boxes

    if len(result) == 0:
        return image
    boxes = torch.from_numpy(result.boxes).clone()
    labels = [f"{name} {score:.2f}" for name, score in zip(result.class_names, result.scores.tolist())]
    colors = [PALETTE[int(c) % len(PALETTE)] for c in result.class_ids.tolist()]
    width = max(1, round(max(image.shape[1:]) / 320))
    return draw_bounding_boxes(image, boxes, labels=labels, colors=colors, width=width)


def _output_names(paths: list[Path]) -> list[str]:
    """``stem.png`` per input, made unique with the parent folder's name and then a counter."""
    names: list[str] = []
    used: set[str] = set()
    for path in paths:
        name = f"{path.stem}.png"
        if name in used:
            name = f"{path.parent.name}_{path.stem}.png"
        counter = 1
        base = name[:-4]
        while name in used or name == "detections.png":
            name = f"{base}_{counter}.png"
            counter += 1
        used.add(name)
        names.append(name)
    return names


def run_predict(
    artifact: str | Path,
    inputs: list[str],
    out: str | Path,
    score_thresh: float | None = None,
    device: str = "auto",
    batch: int = 4,
    progress: bool = True,
    draw: bool = True,
    test_size: int | None = None,
    max_pixels: int | None = None,
) -> dict[str, Any]:
    """Detect on every input image; write annotated images and ``detections.json`` under ``out``.

    ``test_size``: run at another test size (see :meth:`Detector.load`). ``max_pixels``: the largest
    image in pixels (None: PIL's default, 89478485; 0: no limit); larger ones are skipped and reported.
    ``out`` is created once the artifact has loaded, so a failed load leaves no empty folder behind."""
    from PIL import Image
    from tqdm import tqdm

    from msad_deploy.runtime.detector import Detector

    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    if max_pixels is not None and max_pixels < 0:
        raise ValueError(f"--max-pixels must be >= 0 (0: no limit), got {max_pixels}")
    paths = collect_inputs(inputs)
    out = Path(out)
    names = _output_names(paths)
    records: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    with Detector.load(
        artifact,
        device=device,
        score_thresh=score_thresh,
        max_batch=batch,
        test_size=test_size,
        max_pixels=DEFAULT_MAX_IMAGE_PIXELS if max_pixels is None else (max_pixels or None),
    ) as detector:
        out.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress)
        for start in range(0, len(paths), batch):
            chunk = list(zip(paths[start : start + batch], names[start : start + batch]))
            tensors = []
            for path, name in chunk:
                try:
                    tensors.append((path, name, detector.to_tensor(path)))
                except (ValueError, OSError) as error:
                    errors.append({"file": str(path), "error": str(error)})
                    print(f"msad predict: skipping {path}: {error}", file=sys.stderr)
            results = detector.detect_tensors([t for _, _, t in tensors]) if tensors else []
            for (path, name, tensor), result in zip(tensors, results):
                if draw:
                    annotated = draw_result(tensor, result)
                    Image.fromarray(annotated.permute(1, 2, 0).cpu().numpy()).save(out / name)
                records.append({"file": str(path), "annotated": name if draw else None, **result.to_dict()})
            bar.update(len(chunk))
        bar.close()
        summary = {
            "artifact": str(artifact),
            "backend": detector.backend_name,
            "device": str(detector.device),
            "score_thresh": detector.score_thresh,
            "test_size": [detector.spec.test_min_size, detector.spec.test_max_size],
            "class_names": detector.class_names,
            "images": records,
            "errors": errors,
        }
    (out / "detections.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
