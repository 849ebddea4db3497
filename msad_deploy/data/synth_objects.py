"""The ``objects`` profile of the synthetic benchmark: solid, textured objects on photo-like clutter.

Why: the ``shapes`` profile (thin outlines, median object 7 px) keeps every model near 1 AP in the
demo's minutes, so accuracy differences are noise. Here each class has its own silhouette *and* its
own surface (shading, checks, stripes, speckle, grain, dots, a two-tone border, a gradient), like
real categories, so a detector learns them in minutes at full resolution. Textures have a period of
a few pixels and small objects are 4-7 px wide: at half resolution both fade, which is where a
low-resolution detector loses and MSAD distillation earns its keep.

Scale mix (area = visible pixels, COCO's bounds scaled to the image): about 38 % small, 36 % medium,
26 % large, drawn log-uniformly within each band. Appearance varies per instance: hue jitter around
a class hue (and some off-hue instances), brightness, rotation, aspect ratio, lighting gradient,
soft edges, occlusion up to 40 % of an object's pixels. Backgrounds are multi-octave noise over a
gradient with stains, lines and non-target shapes (irregular polygons, some textured) as hard
negatives. Everything is procedural and deterministic for a seed.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from msad_deploy.data.synth import (
    SceneObject,
    place_object,
    small_area_threshold,
    upsampled_noise,
)

OBJECT_CLASSES: tuple[str, ...] = ("ball", "tile", "flag", "star", "lens", "nut", "sign", "moon")

_SUPERSAMPLE = 4
_COVERAGE_THRESHOLD = 0.5
_MIN_VISIBLE_FRACTION = 0.6  # occlusion limit: every object keeps >= 60 % of its pixels visible
_MIN_OBJECT_PIXELS = 8
# Area bands as fractions of the small/medium cut-offs: (probability, low, high) with bounds in units of
# the "small" threshold (COCO: 32^2 and 96^2 = 9 x 32^2 at 640 px). The large band ends at 2.2x the
# medium bound (~42 px square on a 128-px image).
_AREA_BANDS = ((0.38, 0.5, 1.0), (0.36, 1.0, 9.0), (0.26, 9.0, 20.0))
_CLASS_HUES = np.arange(len(OBJECT_CLASSES)) / len(OBJECT_CLASSES)
_OFF_HUE_PROBABILITY = 0.2  # instances with any hue: colour alone never decides the class


def _polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _regular(vertices: int, radius: float, inner: float | None = None) -> np.ndarray:
    """Regular polygon (or star when ``inner`` is the inner radius) [K, 2] centred on 0."""
    if inner is None:
        angles = np.linspace(0.0, 2.0 * math.pi, vertices, endpoint=False)
        return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)
    angles = np.linspace(0.0, 2.0 * math.pi, 2 * vertices, endpoint=False) - math.pi / 2
    radii = np.where(np.arange(2 * vertices) % 2 == 0, radius, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _silhouette(class_name: str, rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    """Unit-scale polygons [K, 2] (paint 255 / cut 0), before rotation; the size is set later by area."""
    if class_name == "ball":
        return [(_regular(40, 1.0) * [rng.uniform(0.92, 1.08), 1.0], 255)]
    if class_name == "tile":
        aspect = rng.uniform(0.85, 1.15)
        return [(np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float) * [aspect, 1.0], 255)]
    if class_name == "flag":
        aspect = rng.uniform(1.5, 2.2)
        return [(np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float) * [aspect, 1.0], 255)]
    if class_name == "star":
        return [(_regular(5, 1.0, inner=rng.uniform(0.42, 0.52)), 255)]
    if class_name == "lens":  # pointed ellipse (a leaf / a lens), long axis along x
        t = np.linspace(0.0, math.pi, 20)
        aspect = rng.uniform(1.8, 2.5)
        upper = np.stack([-aspect * np.cos(t), np.sin(t)], axis=1)
        return [(np.concatenate([upper, upper[::-1] * [1, -1]]), 255)]
    if class_name == "nut":  # hexagon with a round hole
        return [(_regular(6, 1.0), 255), (_regular(24, rng.uniform(0.3, 0.42)), 0)]
    if class_name == "sign":  # triangle, point up
        return [(_regular(3, 1.0) @ np.array([[0.0, -1.0], [1.0, 0.0]]), 255)]
    if class_name == "moon":  # a disc with an offset disc cut away
        offset = rng.uniform(0.45, 0.65)
        return [(_regular(40, 1.0), 255), (_regular(40, 0.9) + [offset, -0.15], 0)]
    raise ValueError(f"unknown object class {class_name!r}; expected one of {OBJECT_CLASSES}")


def _silhouette_area(layers: list[tuple[np.ndarray, int]]) -> float:
    """Painted area of the unit silhouette; holes subtract (they lie inside the paint, except the moon's
    cut, whose overlap with the disc is estimated on a grid)."""
    points = [p for p, _ in layers]
    if len(layers) == 1:
        return _polygon_area(points[0])
    grid = np.stack(np.meshgrid(np.linspace(-2.5, 2.5, 101), np.linspace(-2.5, 2.5, 101)), axis=-1)
    inside = _inside(points[0], grid) & ~_inside(points[1], grid)
    return float(inside.mean()) * 25.0


def _inside(polygon: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test for points [..., 2]."""
    x, y = points[..., 0], points[..., 1]
    inside = np.zeros(x.shape, dtype=bool)
    x0, y0 = polygon[:, 0], polygon[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    for ax, ay, bx, by in zip(x0, y0, x1, y1):
        crosses = (ay > y) != (by > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_cross = ax + (y - ay) * (bx - ax) / (by - ay)
        inside ^= crosses & (x < x_cross)
    return inside


def _sample_area(rng: np.random.Generator, image_size: int) -> float:
    small = small_area_threshold(image_size)
    band = rng.choice(len(_AREA_BANDS), p=[b[0] for b in _AREA_BANDS])
    _, low, high = _AREA_BANDS[band]
    return small * math.exp(rng.uniform(math.log(low), math.log(high)))


def _rasterise(
    layers: list[tuple[np.ndarray, int]], rng: np.random.Generator, blur: float
) -> tuple[np.ndarray, np.ndarray]:
    """Anti-aliased coverage [h, w] in [0, 1] and the shape's centre (y, x) in that window."""
    extent = max(float(np.abs(points).max()) for points, _ in layers)
    half = math.ceil(extent) + 3
    side = 2 * half
    canvas = Image.new("L", (side * _SUPERSAMPLE, side * _SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(canvas)
    centre = half + rng.uniform(0.0, 1.0, 2)
    for points, fill in layers:
        draw.polygon([tuple(p) for p in ((points + centre) * _SUPERSAMPLE).tolist()], fill=fill)
    coverage = np.asarray(canvas, dtype=np.float32).reshape(side, _SUPERSAMPLE, side, _SUPERSAMPLE)
    coverage = coverage.mean(axis=(1, 3)) / 255.0
    if blur > 0.0:  # soft edges (defocus, motion): the box follows what is drawn, see SceneObject
        coverage = _gaussian_blur(coverage, blur)
    rows = np.flatnonzero((coverage > 0.02).any(axis=1))
    cols = np.flatnonzero((coverage > 0.02).any(axis=0))
    window = np.ascontiguousarray(coverage[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
    window[window <= 0.02] = 0.0
    return window, np.array([centre[1] - rows[0], centre[0] - cols[0]]) - 0.5


def _gaussian_blur(values: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a small float array [h, w] (zero outside)."""
    radius = max(1, math.ceil(3.0 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    padded = np.pad(values, radius)
    rows = sum(tap * padded[:, i : i + values.shape[1]] for i, tap in enumerate(taps))
    return sum(tap * rows[i : i + values.shape[0], :] for i, tap in enumerate(taps)).astype(np.float32)


def _class_colour(rng: np.random.Generator, class_index: int) -> np.ndarray:
    """RGB [3] float in [0, 255]: the class's hue with jitter, sometimes any hue; any brightness."""
    hue = rng.uniform(0.0, 1.0) if rng.random() < _OFF_HUE_PROBABILITY else _CLASS_HUES[class_index]
    hue = (hue + rng.normal(0.0, 0.035)) % 1.0
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.45, 1.0), rng.uniform(0.35, 1.0))
    return np.array(rgb, dtype=np.float32) * 255.0


def _texture(
    class_name: str, u: np.ndarray, v: np.ndarray, radius: float, rng: np.random.Generator
) -> np.ndarray:
    """Surface pattern t [h, w] in [0, 1] in the object's own frame (u, v in px, rotated with it)."""
    period = max(2.5, radius * rng.uniform(0.45, 0.6))
    if class_name == "ball":  # spherical shading: highlight up-left, dark rim
        d = np.hypot(u + 0.35 * radius, v + 0.35 * radius) / (1.35 * radius)
        return np.clip(d, 0.0, 1.0) ** 1.2
    if class_name == "tile":  # checks
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    if class_name == "flag":  # stripes along the long side
        return (np.floor(v / (0.7 * period)) % 2).astype(np.float32)
    if class_name == "star":  # speckle
        return (rng.random(u.shape) < 0.45).astype(np.float32)
    if class_name == "lens":  # grain: rings around an off-centre knot
        d = np.hypot(u - 0.3 * radius, 1.8 * v)
        return 0.5 + 0.5 * np.sin(2.0 * math.pi * d / period)
    if class_name == "nut":  # dots on a grid
        cu, cv = u / period - np.round(u / period), v / period - np.round(v / period)
        return (np.hypot(cu, cv) < 0.3).astype(np.float32)
    if class_name == "sign":  # two-tone: a bright border band around a dark inner triangle
        inset = np.maximum(v, np.maximum(0.866 * u - 0.5 * v, -0.866 * u - 0.5 * v))  # 0.5 * r on the edge
        return (inset > 0.3 * radius).astype(np.float32)
    if class_name == "moon":  # smooth gradient across the crescent
        return np.clip(0.5 + u / (2.0 * radius), 0.0, 1.0)
    raise ValueError(f"unknown object class {class_name!r}")


def _paint(
    class_index: int,
    alpha: np.ndarray,
    centre: np.ndarray,
    angle: float,
    radius: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Object colours [h, w, 3] and its mean colour [3]: texture between two tones, lit from one side."""
    rows, cols = np.mgrid[0 : alpha.shape[0], 0 : alpha.shape[1]].astype(np.float32)
    dy, dx = rows - centre[0], cols - centre[1]
    cos, sin = math.cos(angle), math.sin(angle)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy  # the frame the silhouette was drawn in
    t = _texture(OBJECT_CLASSES[class_index], u, v, radius, rng)
    base = _class_colour(rng, class_index)
    # The second tone: darker or paler version of the base, strong enough to be seen.
    if rng.random() < 0.5:
        second = base * rng.uniform(0.2, 0.45)
    else:
        second = base + (255.0 - base) * rng.uniform(0.5, 0.8)
    colours = base + (second - base) * t[..., None]
    light_angle = rng.uniform(0.0, 2.0 * math.pi)
    light = 1.0 + rng.uniform(0.0, 0.25) * (math.cos(light_angle) * dx + math.sin(light_angle) * dy) / radius
    colours = colours * light[..., None] * rng.uniform(0.85, 1.15)
    return colours, base


def _texture_patch(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random stripe or check pattern [h, w] for hard negatives: familiar surface, wrong shape."""
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(2.5, 5.0)
    angle = rng.uniform(0.0, math.pi)
    u = math.cos(angle) * cols + math.sin(angle) * rows
    if rng.random() < 0.5:
        return (np.floor(u / period) % 2).astype(np.float32)
    v = -math.sin(angle) * cols + math.cos(angle) * rows
    return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Photo-like clutter [H, W, 3] float32: gradient, multi-octave noise, stains, lines, decoys."""
    start, end = _muted_colour(rng), _muted_colour(rng)
    direction = rng.uniform(0.0, 2.0 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = xs * math.cos(direction) + ys * math.sin(direction)
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1.0)
    pixels = start + (end - start) * ramp[..., None]
    amplitude = rng.uniform(18.0, 36.0)
    for cell in (32, 16, 8, 4):  # fractal (1/f-like) texture: large soft areas and fine grain
        noise = upsampled_noise(rng, width, height, cell=cell, amplitude=amplitude)
        pixels += 0.75 * noise.mean(axis=-1, keepdims=True) + 0.25 * noise  # mostly brightness, some colour
        amplitude *= 0.55

    image = Image.fromarray(np.clip(pixels, 0.0, 255.0).astype(np.uint8), mode="RGB")
    for _ in range(int(rng.integers(1, 5))):  # soft stains
        radius = rng.uniform(6.0, 0.25 * max(width, height))
        centre = rng.uniform(0.0, 1.0, 2) * (width, height)
        outline = _irregular(rng, radius) + centre
        mask = Image.new("L", (width, height), 0)
        ImageDraw.Draw(mask).polygon([tuple(p) for p in outline.tolist()], fill=int(rng.integers(60, 160)))
        mask = mask.filter(ImageFilter.GaussianBlur(rng.uniform(2.0, 5.0)))
        colour = tuple(int(c) for c in _muted_colour(rng))
        image = Image.composite(Image.new("RGB", (width, height), colour), image, mask)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 5))):  # lines: cables, edges
        points = rng.uniform(0.0, 1.0, (int(rng.integers(2, 4)), 2)) * (width, height)
        colour = tuple(int(c) for c in _any_colour(rng))
        draw.line([tuple(p) for p in points.tolist()], fill=colour, width=int(rng.integers(1, 3)))
    pixels = np.asarray(image, dtype=np.float32).copy()
    for _ in range(int(rng.integers(1, 5))):  # decoys: irregular solid or textured shapes, sharp edges
        _draw_decoy(rng, pixels)
    return pixels


def _irregular(rng: np.random.Generator, radius: float) -> np.ndarray:
    vertices = int(rng.integers(5, 11))
    angles = np.sort(rng.uniform(0.0, 2.0 * math.pi, vertices))
    radii = radius * rng.uniform(0.35, 1.0, vertices)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _any_colour(rng: np.random.Generator) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb(rng.uniform(0.0, 1.0), rng.uniform(0.1, 0.9), rng.uniform(0.15, 1.0))
    return np.array(rgb, dtype=np.float32) * 255.0


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    """Background colours: like photos, mostly low saturation, so saturated objects stand out less by
    colour alone than by shape, surface and edges."""
    rgb = colorsys.hsv_to_rgb(rng.uniform(0.0, 1.0), rng.uniform(0.0, 0.35), rng.uniform(0.15, 0.9))
    return np.array(rgb, dtype=np.float32) * 255.0


def _draw_decoy(rng: np.random.Generator, canvas: np.ndarray) -> None:
    height, width = canvas.shape[:2]
    area = _sample_area(rng, max(width, height))
    layers = [(_irregular(rng, 1.0), 255)]
    scale = math.sqrt(area / max(_polygon_area(layers[0][0]), 1e-3))
    alpha, _ = _rasterise([(layers[0][0] * scale, 255)], rng, blur=0.0)
    h, w = alpha.shape
    if h >= height or w >= width:
        return
    top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    colour = _any_colour(rng)
    fill = np.broadcast_to(colour, (h, w, 3))
    if rng.random() < 0.5:
        t = _texture_patch(rng, h, w)[..., None]
        fill = colour + (colour * 0.35 - colour) * t
    window = canvas[top : top + h, left : left + w]
    window += (fill - window) * alpha[..., None]


def render_objects_scene(
    rng: np.random.Generator, width: int, height: int, image_size: int
) -> tuple[np.ndarray, list[SceneObject]]:
    """One image [H, W, 3] uint8 and its objects, bottom to top (later ones may occlude earlier ones)."""
    canvas = _background(rng, width, height)
    objects: list[SceneObject] = []
    for _ in range(int(rng.integers(3, 11))):
        class_index = int(rng.integers(len(OBJECT_CLASSES)))
        unit = _silhouette(OBJECT_CLASSES[class_index], rng)
        area = _sample_area(rng, image_size)
        angle = rng.uniform(0.0, 2.0 * math.pi)
        cos, sin = math.cos(angle), math.sin(angle)
        rotation = np.array([[cos, sin], [-sin, cos]])
        blur = rng.uniform(0.3, 0.8) if rng.random() < 0.4 else 0.0
        scale = math.sqrt(area / _silhouette_area(unit))
        while True:
            alpha, centre = _rasterise([((p * scale) @ rotation, f) for p, f in unit], rng, blur)
            full_pixels = int((alpha >= _COVERAGE_THRESHOLD).sum())
            if alpha.shape[0] > height or alpha.shape[1] > width:
                scale *= 0.8
            elif full_pixels < _MIN_OBJECT_PIXELS:
                scale *= 1.2
            else:
                break
        obj_h, obj_w = alpha.shape
        placed = place_object(rng, objects, alpha, width, height, _MIN_VISIBLE_FRACTION, _MIN_OBJECT_PIXELS)
        if placed is None:
            continue  # no placement keeps the others recognisable: leave this object out
        top, left = placed
        colours, base = _paint(class_index, alpha, centre, angle, scale, rng)
        window = canvas[top : top + obj_h, left : left + obj_w]
        under = window[alpha >= _COVERAGE_THRESHOLD].reshape(-1, 3).mean(axis=0)
        if float(np.linalg.norm(base - under)) < 60.0:  # camouflaged by chance: same hue, other brightness
            gain = 0.45 if float(under.mean()) > 110.0 else 1.8
            colours = np.clip(colours * gain, 0.0, 255.0)
            base = np.clip(base * gain, 0.0, 255.0)
        window += (colours - window) * alpha[..., None]
        objects.append(SceneObject(class_index, base, top, left, alpha, alpha.copy(), full_pixels))
    if rng.random() < 0.3:  # slight defocus of the whole frame
        blurred = Image.fromarray(np.clip(canvas, 0.0, 255.0).astype(np.uint8), mode="RGB")
        canvas = np.asarray(blurred.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.6))), dtype=np.float32)
        canvas = canvas.copy()
    canvas += rng.normal(0.0, rng.uniform(2.0, 6.0), canvas.shape).astype(np.float32)  # sensor noise
    return np.clip(np.rint(canvas), 0.0, 255.0).astype(np.uint8), objects
