"""Deterministic generator of a synthetic COCO-format detection dataset, in two scene profiles.

Why: end-to-end tests, the demo and CPU trainings need a detection task on which input resolution
matters, with no download. ``objects`` (the default, synth_objects.py): textured solid objects on
photo-like clutter, learnable in minutes, a COCO-like size mix. ``shapes`` (this module; the
benchmark before it, kept so old runs stay reproducible): the classes come in pairs that differ only in shape detail (disc vs ring, square vs hollow
frame, plus vs X cross, triangle vs hollow triangle): at full resolution they are easy, after 2x
downsampling the small ones become ambiguous, which is exactly what MSAD distillation targets.

Each image is drawn from its own RNG seeded by (seed, split, index), so the same arguments always
give byte-identical PNG and JSON files, whatever the order or number of images generated.
Boxes are tight around the *visible* pixels of each object (coverage >= 0.5 after occlusion by the
objects drawn on top of it) and ``area`` is that visible pixel count, like COCO's mask area.
"""

from __future__ import annotations

import colorsys
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

SYNTH_CLASSES: tuple[str, ...] = (
    "disc",
    "ring",
    "square",
    "frame",
    "plus",
    "cross",
    "triangle",
    "triangle_outline",
)
SYNTH_PROFILES: tuple[str, ...] = ("objects", "shapes")
# Deliberately not contiguous (like COCO's 1..90 with gaps) so that id <-> label mapping is exercised.
SYNTH_CATEGORY_IDS: tuple[int, ...] = (1, 2, 3, 5, 7, 11, 13, 17)

_SPLIT_CODES = {"train": 0, "val": 1}
_SUPERSAMPLE = 4  # shapes are rasterised at 4x and box-filtered down: anti-aliased edges
_COVERAGE_THRESHOLD = 0.5  # a pixel belongs to an object when at least half of it is covered
_MIN_VISIBLE_FRACTION = 0.7  # occlusion limit: every object keeps >= 70 % of its pixels visible
_MIN_OBJECT_PIXELS = 6
_MIN_OBJECT_SIZE = 4.0  # px, nominal diameter of the smallest objects
_SMALL_OBJECT_PROBABILITY = 0.35  # extra draws below the "small" cut-off on top of the log-uniform sizes
_MIN_COLOUR_DISTANCE = 90.0  # RGB distance between an object and the canvas beneath it
_PLACEMENT_ATTEMPTS = 25


def small_area_threshold(image_size: int) -> float:
    """COCO's "small" cut-off (area < 32^2 at 640 px) scaled to ``image_size``."""
    return (32.0 * image_size / 640.0) ** 2


@dataclass
class SceneObject:
    """One object composited into a scene; arrays cover the object's window [top:top+h, left:left+w]."""

    class_index: int
    colour: np.ndarray  # [3] float32 RGB
    top: int
    left: int
    alpha: np.ndarray  # [h, w] float32 coverage of the whole shape
    visible: np.ndarray  # [h, w] float32 coverage left after the objects drawn on top of it
    full_pixels: int  # pixels of the unoccluded shape with coverage >= threshold

    def drawn_mask(self) -> np.ndarray:
        """[h, w] bool: pixels where this object is what is seen (coverage >= threshold)."""
        return self.visible >= _COVERAGE_THRESHOLD

    def box_xywh(self) -> list[float]:
        """Tight COCO box [x, y, w, h] in image pixels around the drawn mask."""
        mask = self.drawn_mask()
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        x0, y0 = self.left + int(cols[0]), self.top + int(rows[0])
        return [float(x0), float(y0), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]


def _ellipse(radius_x: float, radius_y: float, vertices: int = 48) -> np.ndarray:
    angles = np.linspace(0.0, 2.0 * math.pi, vertices, endpoint=False)
    return np.stack([radius_x * np.cos(angles), radius_y * np.sin(angles)], axis=1)


def _rectangle(half_width: float, half_height: float) -> np.ndarray:
    return np.array(
        [
            [-half_width, -half_height],
            [half_width, -half_height],
            [half_width, half_height],
            [-half_width, half_height],
        ]
    )


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    cos, sin = math.cos(angle), math.sin(angle)
    return points @ np.array([[cos, sin], [-sin, cos]])


def _shape_layers(class_name: str, radius: float, rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    """Polygons [K, 2] (px, centred on 0) with fill 255 (paint) or 0 (cut a hole), drawn in order.

    Rotations are limited where they would change the class (a plus turned by 45 degrees is a cross).
    """
    stretch = math.sqrt(rng.uniform(0.8, 1.25))
    radius_x, radius_y = radius * stretch, radius / stretch
    hollow = class_name in ("ring", "frame", "triangle_outline")
    if class_name in ("disc", "ring"):
        outer = _ellipse(radius_x, radius_y)
        layers = [(outer, 255)]
        angle = rng.uniform(0.0, math.pi)
        hole_scale = rng.uniform(0.45, 0.65)
    elif class_name in ("square", "frame"):
        outer = _rectangle(0.85 * radius_x, 0.85 * radius_y)
        layers = [(outer, 255)]
        angle = math.radians(rng.uniform(-20.0, 20.0))
        hole_scale = rng.uniform(0.45, 0.65)
    elif class_name in ("plus", "cross"):
        half_thickness = radius * rng.uniform(0.2, 0.32)
        layers = [(_rectangle(radius_x, half_thickness), 255), (_rectangle(half_thickness, radius_y), 255)]
        angle = math.radians(rng.uniform(-10.0, 10.0) + (45.0 if class_name == "cross" else 0.0))
    elif class_name in ("triangle", "triangle_outline"):
        corner_angles = np.radians(np.array([-90.0, 30.0, 150.0]) + rng.uniform(-8.0, 8.0, 3))
        corner_radii = radius * rng.uniform(0.9, 1.1, 3)
        outer = np.stack([corner_radii * np.cos(corner_angles), corner_radii * np.sin(corner_angles)], axis=1)
        outer -= outer.mean(axis=0)
        layers = [(outer, 255)]
        angle = rng.uniform(0.0, 2.0 * math.pi)
        hole_scale = rng.uniform(0.4, 0.55)
    else:
        raise ValueError(f"unknown synthetic class {class_name!r}; expected one of {SYNTH_CLASSES}")
    if hollow:
        layers.append((outer * hole_scale, 0))
    return [(_rotate(points, angle), fill) for points, fill in layers]


def _rasterise(layers: list[tuple[np.ndarray, int]], subpixel_shift: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage [h, w] float32 in [0, 1], cropped to the pixels the shape touches."""
    extent = max(float(np.abs(points).max()) for points, _ in layers)
    half = math.ceil(extent) + 2
    side = 2 * half
    canvas = Image.new("L", (side * _SUPERSAMPLE, side * _SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(canvas)
    centre = (half + subpixel_shift) * _SUPERSAMPLE
    for points, fill in layers:
        draw.polygon([tuple(p) for p in (points * _SUPERSAMPLE + centre).tolist()], fill=fill)
    coverage = np.asarray(canvas, dtype=np.float32).reshape(side, _SUPERSAMPLE, side, _SUPERSAMPLE)
    coverage = coverage.mean(axis=(1, 3)) / 255.0
    rows = np.flatnonzero(coverage.any(axis=1))
    cols = np.flatnonzero(coverage.any(axis=0))
    return np.ascontiguousarray(coverage[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])


def _sample_object_size(rng: np.random.Generator, image_size: int) -> float:
    """Nominal diameter in px: log-uniform from a few px to half the image, plus extra small ones."""
    max_size = 0.5 * image_size
    if rng.random() < _SMALL_OBJECT_PROBABILITY:
        small_side = math.sqrt(small_area_threshold(image_size))
        return rng.uniform(_MIN_OBJECT_SIZE, max(_MIN_OBJECT_SIZE + 1.0, small_side))
    return math.exp(rng.uniform(math.log(_MIN_OBJECT_SIZE), math.log(max_size)))


def _render_object(
    rng: np.random.Generator, class_index: int, image_size: int, width: int, height: int
) -> np.ndarray:
    """Coverage [h, w] of one randomly sized and posed object that fits the image and is not too thin."""
    size = _sample_object_size(rng, image_size)
    while True:
        layers = _shape_layers(SYNTH_CLASSES[class_index], size / 2.0, rng)
        alpha = _rasterise(layers, rng.uniform(0.0, 1.0, 2))
        too_big = alpha.shape[0] > height or alpha.shape[1] > width
        if too_big:
            size *= 0.8
        elif int((alpha >= _COVERAGE_THRESHOLD).sum()) < _MIN_OBJECT_PIXELS:
            size *= 1.25  # hollow shapes a few px wide can vanish entirely under the threshold
        else:
            return alpha


def upsampled_noise(
    rng: np.random.Generator, width: int, height: int, cell: int, amplitude: float
) -> np.ndarray:
    """Smooth colour noise [H, W, 3]: Gaussian values on a coarse grid, bicubically upsampled."""
    grid_w, grid_h = width // cell + 2, height // cell + 2
    grid = rng.normal(0.0, amplitude, (3, grid_h, grid_w)).astype(np.float32)
    channels = [np.asarray(Image.fromarray(c, mode="F").resize((width, height), Image.BICUBIC)) for c in grid]
    return np.stack(channels, axis=-1)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    hue, saturation, value = rng.uniform(0.0, 1.0), rng.uniform(0.2, 1.0), rng.uniform(0.15, 1.0)
    return np.array(colorsys.hsv_to_rgb(hue, saturation, value), dtype=np.float32) * 255.0


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Cluttered background [H, W, 3] float32: gradient, cloudy texture, lines and soft blobs."""
    start, end = rng.uniform(0.0, 255.0, (2, 3)).astype(np.float32)
    direction = rng.uniform(0.0, 2.0 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = xs * math.cos(direction) + ys * math.sin(direction)
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1.0)
    pixels = start + (end - start) * ramp[..., None]
    pixels += upsampled_noise(rng, width, height, cell=max(width // 4, 8), amplitude=30.0)
    pixels += upsampled_noise(rng, width, height, cell=8, amplitude=14.0)

    image = Image.fromarray(np.clip(pixels, 0.0, 255.0).astype(np.uint8), mode="RGB")
    for _ in range(int(rng.integers(1, 6))):  # soft irregular blobs: stains, not shapes
        radius = rng.uniform(4.0, 0.2 * max(width, height))
        vertices = int(rng.integers(7, 13))
        angles = np.sort(rng.uniform(0.0, 2.0 * math.pi, vertices))
        radii = radius * rng.uniform(0.4, 1.0, vertices)
        centre = rng.uniform(0.0, 1.0, 2) * (width, height)
        outline = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1) + centre
        mask = Image.new("L", (width, height), 0)
        ImageDraw.Draw(mask).polygon([tuple(p) for p in outline.tolist()], fill=int(rng.integers(80, 180)))
        mask = mask.filter(ImageFilter.GaussianBlur(rng.uniform(1.0, 4.0)))
        colour = tuple(int(c) for c in _random_colour(rng))
        image = Image.composite(Image.new("RGB", (width, height), colour), image, mask)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 13))):  # thin straight or bent lines
        corners = int(rng.integers(2, 5))
        points = rng.uniform(0.0, 1.0, (corners, 2)) * (width, height)
        colour = tuple(int(c) for c in _random_colour(rng))
        draw.line([tuple(p) for p in points.tolist()], fill=colour, width=int(rng.integers(1, 4)))
    return np.asarray(image, dtype=np.float32)


def _occlusion_updates(
    objects: list[SceneObject],
    alpha: np.ndarray,
    top: int,
    left: int,
    min_visible_fraction: float = _MIN_VISIBLE_FRACTION,
    min_pixels: int = _MIN_OBJECT_PIXELS,
) -> list[tuple[SceneObject, slice, slice, np.ndarray]] | None:
    """Visibility updates if a new object ``alpha`` goes on top at (top, left); None if over the limit
    (an object would keep under ``min_visible_fraction`` of its pixels, or under ``min_pixels``).

    Returns a list of (object, row slice, col slice, new visible coverage) for the overlapped objects.
    """
    updates = []
    height, width = alpha.shape
    for obj in objects:
        obj_h, obj_w = obj.alpha.shape
        y0, y1 = max(top, obj.top), min(top + height, obj.top + obj_h)
        x0, x1 = max(left, obj.left), min(left + width, obj.left + obj_w)
        if y0 >= y1 or x0 >= x1:
            continue
        rows, cols = slice(y0 - obj.top, y1 - obj.top), slice(x0 - obj.left, x1 - obj.left)
        before = obj.visible[rows, cols]
        after = before * (1.0 - alpha[y0 - top : y1 - top, x0 - left : x1 - left])
        lost = int((before >= _COVERAGE_THRESHOLD).sum()) - int((after >= _COVERAGE_THRESHOLD).sum())
        remaining = int(obj.drawn_mask().sum()) - lost
        if remaining < max(min_visible_fraction * obj.full_pixels, min_pixels):
            return None
        updates.append((obj, rows, cols, after))
    return updates


def place_object(
    rng: np.random.Generator,
    objects: list[SceneObject],
    alpha: np.ndarray,
    width: int,
    height: int,
    min_visible_fraction: float = _MIN_VISIBLE_FRACTION,
    min_pixels: int = _MIN_OBJECT_PIXELS,
) -> tuple[int, int] | None:
    """(top, left) of a random position for ``alpha`` [h, w] that leaves every object in ``objects`` at
    least ``min_visible_fraction`` of its pixels (and ``min_pixels``), with their visibility updated;
    None when no try of _PLACEMENT_ATTEMPTS succeeds."""
    obj_h, obj_w = alpha.shape
    for _ in range(_PLACEMENT_ATTEMPTS):
        top = int(rng.integers(0, height - obj_h + 1))
        left = int(rng.integers(0, width - obj_w + 1))
        updates = _occlusion_updates(objects, alpha, top, left, min_visible_fraction, min_pixels)
        if updates is not None:
            for obj, rows, cols, visible in updates:
                obj.visible[rows, cols] = visible
            return top, left
    return None


def _pick_colour(rng: np.random.Generator, canvas_under: np.ndarray) -> np.ndarray:
    """A random colour far enough (RGB distance) from the mean canvas colour under the object."""
    reference = canvas_under.reshape(-1, 3).mean(axis=0)
    best, best_distance = None, -1.0
    for _ in range(12):
        colour = _random_colour(rng)
        distance = float(np.linalg.norm(colour - reference))
        if distance >= _MIN_COLOUR_DISTANCE:
            return colour
        if distance > best_distance:
            best, best_distance = colour, distance
    return best


def _render_scene(
    rng: np.random.Generator, width: int, height: int, image_size: int
) -> tuple[np.ndarray, list[SceneObject]]:
    """One image [H, W, 3] uint8 and its objects, bottom to top (later ones may occlude earlier ones)."""
    canvas = _background(rng, width, height)
    objects: list[SceneObject] = []
    for _ in range(int(rng.integers(3, 13))):
        class_index = int(rng.integers(len(SYNTH_CLASSES)))
        alpha = _render_object(rng, class_index, image_size, width, height)
        obj_h, obj_w = alpha.shape
        placed = place_object(rng, objects, alpha, width, height)
        if placed is None:
            continue  # no placement keeps the others recognisable: leave this object out
        top, left = placed
        window = canvas[top : top + obj_h, left : left + obj_w]
        colour = _pick_colour(rng, window[alpha >= _COVERAGE_THRESHOLD])
        window += (colour - window) * alpha[..., None]
        full_pixels = int((alpha >= _COVERAGE_THRESHOLD).sum())
        objects.append(SceneObject(class_index, colour, top, left, alpha, alpha.copy(), full_pixels))
    canvas += rng.normal(0.0, rng.uniform(2.0, 7.0), canvas.shape).astype(np.float32)  # sensor noise
    return np.clip(np.rint(canvas), 0.0, 255.0).astype(np.uint8), objects


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Independent stream per image, so any image can be regenerated alone."""
    return np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_CODES[split], index]))


def _image_shape(rng: np.random.Generator, image_size: int) -> tuple[int, int]:
    """(width, height): long side ``image_size``, short side 0.75..1.0 of it, either orientation."""
    short_side = int(round(image_size * rng.uniform(0.75, 1.0)))
    return (image_size, short_side) if rng.random() < 0.5 else (short_side, image_size)


def _profile(name: str) -> tuple[tuple[str, ...], Callable[..., tuple[np.ndarray, list[SceneObject]]]]:
    """(class names, scene renderer) of a scene profile."""
    if name == "shapes":
        return SYNTH_CLASSES, _render_scene
    if name == "objects":
        from msad_deploy.data.synth_objects import OBJECT_CLASSES, render_objects_scene

        return OBJECT_CLASSES, render_objects_scene
    raise ValueError(f"unknown synthetic profile {name!r}; expected one of {SYNTH_PROFILES}")


def _write_split(
    out_dir: Path, split: str, num_images: int, image_size: int, seed: int, profile: str, progress: bool
) -> dict[str, Any]:
    """Render one split's PNGs and COCO JSON; returns its counts."""
    classes, render_scene = _profile(profile)
    image_dir = out_dir / split
    image_dir.mkdir(parents=True, exist_ok=True)
    small_threshold = small_area_threshold(image_size)
    images, annotations = [], []
    per_class = [0] * len(classes)
    num_small = num_medium = 0
    medium_threshold = 9.0 * small_threshold
    for index in tqdm(range(num_images), desc=f"synth {split}", disable=not progress):
        rng = _image_rng(seed, split, index)
        width, height = _image_shape(rng, image_size)
        pixels, objects = render_scene(rng, width, height, image_size)
        image_id = index + 1
        file_name = f"{index:06d}.png"
        Image.fromarray(pixels, mode="RGB").save(image_dir / file_name, format="PNG")
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for obj in objects:
            area = float(obj.drawn_mask().sum())
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": SYNTH_CATEGORY_IDS[obj.class_index],
                    "bbox": obj.box_xywh(),
                    "area": area,
                    "iscrowd": 0,
                }
            )
            per_class[obj.class_index] += 1
            num_small += area < small_threshold
            num_medium += small_threshold <= area < medium_threshold
    info: dict[str, Any] = {
        "description": f"msad-deploy synthetic {profile}",
        "seed": seed,
        "image_size": image_size,
    }
    if profile != "shapes":  # the shapes profile's files stay byte-identical to those written before profiles
        info["profile"] = profile
    dataset = {
        "info": info,
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": cat_id, "name": name, "supercategory": "shape"}
            for cat_id, name in zip(SYNTH_CATEGORY_IDS, classes)
        ],
    }
    ann_path = out_dir / "annotations" / f"instances_{split}.json"
    ann_path.write_text(json.dumps(dataset, separators=(",", ":")) + "\n", encoding="utf-8")
    return {
        "images": len(images),
        "instances": len(annotations),
        "small_instances": num_small,
        "small_share": num_small / len(annotations) if annotations else 0.0,
        "medium_share": num_medium / len(annotations) if annotations else 0.0,
        "large_share": (len(annotations) - num_small - num_medium) / len(annotations) if annotations else 0.0,
        "instances_per_class": dict(zip(classes, per_class)),
    }


def generate_synthetic_coco(
    out_dir: str | Path,
    num_train: int,
    num_val: int,
    image_size: int = 256,
    seed: int = 0,
    progress: bool = True,
    profile: str = "objects",
) -> dict[str, Any]:
    """Write a synthetic COCO detection dataset and return a summary of what was written.

    Layout: ``out_dir/{train,val}/NNNNNN.png`` and ``out_dir/annotations/instances_{train,val}.json``
    (``file_name`` relative to the split folder). Images have long side ``image_size``.
    ``profile``: ``objects`` (default; textured solid objects on photo-like clutter, a COCO-like mix of
    small / medium / large, see synth_objects.py) or ``shapes`` (the earlier benchmark: outlines and
    solid shapes from ~4 px to half the image, >= 40 % small; kept so old runs stay reproducible).
    "Small" and "medium" use COCO's bounds scaled to the image: area < (32 * image_size / 640)^2, < (96 ...)^2.
    Same arguments -> byte-identical files. Summary: per split ``images``, ``instances``,
    ``small_instances``, ``small_share``, ``medium_share``, ``large_share``, ``instances_per_class``;
    plus ``small_area_threshold`` and ``profile``.
    """
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train and num_val must be >= 0, got {num_train} and {num_val}")
    if profile not in SYNTH_PROFILES:
        raise ValueError(f"unknown synthetic profile {profile!r}; expected one of {SYNTH_PROFILES}")
    if image_size < 64:
        raise ValueError(
            f"image_size must be >= 64 px so that objects fit with room to spare, got {image_size}"
        )
    out_path = Path(out_dir)
    (out_path / "annotations").mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "out_dir": str(out_path),
        "image_size": image_size,
        "seed": seed,
        "profile": profile,
        "small_area_threshold": small_area_threshold(image_size),
    }
    for split, num_images in (("train", num_train), ("val", num_val)):
        summary[split] = _write_split(out_path, split, num_images, image_size, seed, profile, progress)
    return summary
