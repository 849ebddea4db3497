"""Synthetic COCO generator: determinism, object statistics, tight boxes, valid COCO output.

Both profiles: ``objects`` (the default) and ``shapes`` (the earlier benchmark, kept reproducible)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from msad_deploy.data import SYNTH_CLASSES, generate_synthetic_coco
from msad_deploy.data.synth import (
    _image_rng,
    _image_shape,
    _render_scene,
    small_area_threshold,
)
from msad_deploy.data.synth_objects import OBJECT_CLASSES, render_objects_scene

IMAGE_SIZE = 256  # the shapes profile's tests
OBJECTS_SIZE = 128  # the objects profile's tests: the demo's size
SEED = 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out_dir = tmp_path_factory.mktemp("synth")
    summary = generate_synthetic_coco(
        out_dir, num_train=40, num_val=6, image_size=IMAGE_SIZE, seed=SEED, progress=False, profile="shapes"
    )
    return out_dir, summary


@pytest.fixture(scope="module")
def objects_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out_dir = tmp_path_factory.mktemp("synth_objects")
    summary = generate_synthetic_coco(
        out_dir, num_train=60, num_val=6, image_size=OBJECTS_SIZE, seed=SEED, progress=False
    )
    return out_dir, summary


def _load(out_dir: Path, split: str) -> dict:
    return json.loads((out_dir / "annotations" / f"instances_{split}.json").read_text())


def _written_files(out_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out_dir)): p.read_bytes() for p in sorted(out_dir.rglob("*")) if p.is_file()}


def _drawn_mask_in_tight_box(obj, box: list[float], width: int, height: int) -> np.ndarray:
    """The object's drawn mask [H, W] in image pixels, after checking ``box`` (COCO xywh) is inside the
    image and tight around it."""
    x, y, w, h = box
    assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= width and y + h <= height
    mask = np.zeros((height, width), dtype=bool)
    obj_h, obj_w = obj.alpha.shape
    mask[obj.top : obj.top + obj_h, obj.left : obj.left + obj_w] = obj.drawn_mask()
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    assert [x, y, x + w, y + h] == [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]
    return mask


@pytest.mark.parametrize("profile", ["objects", "shapes"])
def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path, profile: str) -> None:
    kwargs = {"num_train": 3, "num_val": 2, "image_size": 128, "progress": False, "profile": profile}
    generate_synthetic_coco(tmp_path / "a", seed=11, **kwargs)
    generate_synthetic_coco(tmp_path / "b", seed=11, **kwargs)
    generate_synthetic_coco(tmp_path / "c", seed=12, **kwargs)
    first, again, other = (_written_files(tmp_path / name) for name in "abc")
    assert len(first) == 3 + 2 + 2
    assert first == again
    assert first.keys() == other.keys()
    assert all(first[name] != other[name] for name in first)


@pytest.mark.parametrize("profile", ["objects", "shapes"])
def test_image_depends_only_on_seed_split_and_index(tmp_path: Path, profile: str) -> None:
    generate_synthetic_coco(tmp_path / "few", 2, 1, image_size=128, seed=5, progress=False, profile=profile)
    generate_synthetic_coco(tmp_path / "more", 4, 3, image_size=128, seed=5, progress=False, profile=profile)
    for name in ("train/000000.png", "train/000001.png", "val/000000.png"):
        assert (tmp_path / "few" / name).read_bytes() == (tmp_path / "more" / name).read_bytes()
    assert (tmp_path / "few/train/000000.png").read_bytes() != (tmp_path / "few/val/000000.png").read_bytes()


@pytest.mark.parametrize(
    ("fixture", "classes", "num_train"),
    [("dataset", SYNTH_CLASSES, 40), ("objects_dataset", OBJECT_CLASSES, 60)],
)
def test_valid_coco_with_non_contiguous_category_ids(
    request: pytest.FixtureRequest, fixture: str, classes: tuple[str, ...], num_train: int
) -> None:
    out_dir, summary = request.getfixturevalue(fixture)
    for split, num_images in (("train", num_train), ("val", 6)):
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(out_dir / "annotations" / f"instances_{split}.json"))
        assert len(coco.getImgIds()) == num_images == summary[split]["images"]
        assert len(coco.getAnnIds()) == summary[split]["instances"] > 0
        cat_ids = sorted(coco.getCatIds())
        assert [coco.cats[c]["name"] for c in cat_ids] == list(classes)
        assert cat_ids != list(range(1, len(cat_ids) + 1)) and cat_ids != list(range(len(cat_ids)))
        for image in coco.dataset["images"]:
            with Image.open(out_dir / split / image["file_name"]) as png:
                assert png.size == (image["width"], image["height"]) and png.mode == "RGB"
        for ann in coco.dataset["annotations"]:
            assert ann["iscrowd"] == 0 and ann["category_id"] in coco.cats and ann["image_id"] in coco.imgs


def test_sizes_classes_and_small_object_share(dataset: tuple[Path, dict]) -> None:
    out_dir, summary = dataset
    data = _load(out_dir, "train")
    areas = np.array([ann["area"] for ann in data["annotations"]])
    small_share = float((areas < small_area_threshold(IMAGE_SIZE)).mean())
    assert small_share >= 0.4
    assert summary["train"]["small_share"] == pytest.approx(small_share)
    assert len({ann["category_id"] for ann in data["annotations"]}) >= 6
    sides = np.array([ann["bbox"][2:] for ann in data["annotations"]]).max(axis=1)
    assert sides.min() <= 6 and sides.max() >= IMAGE_SIZE / 4  # a few px up to a large share of the image
    short_sides = {min(image["width"], image["height"]) for image in data["images"]}
    assert all(max(image["width"], image["height"]) == IMAGE_SIZE for image in data["images"])
    assert len(short_sides) > 3 and min(short_sides) >= 0.75 * IMAGE_SIZE - 1


def test_boxes_inside_image_and_match_rendered_objects(dataset: tuple[Path, dict]) -> None:
    """Re-render train images from their RNG: PNG pixels equal, JSON boxes tight around the drawn masks."""
    out_dir, _ = dataset
    data = _load(out_dir, "train")
    occluded_objects = 0
    for image in data["images"][:12]:
        rng = _image_rng(SEED, "train", image["id"] - 1)
        width, height = _image_shape(rng, IMAGE_SIZE)
        pixels, objects = _render_scene(rng, width, height, IMAGE_SIZE)
        png = np.asarray(Image.open(out_dir / "train" / image["file_name"]))
        assert np.array_equal(png, pixels)
        boxes = [ann["bbox"] for ann in data["annotations"] if ann["image_id"] == image["id"]]
        assert len(boxes) == len(objects)
        for (x, y, w, h), obj in zip(boxes, objects):
            mask = _drawn_mask_in_tight_box(obj, (x, y, w, h), width, height)
            obj_h, obj_w = obj.alpha.shape
            # occlusion happens but is limited: every object keeps >= 70 % of its pixels
            assert mask.sum() >= 0.7 * obj.full_pixels
            occluded_objects += int(mask.sum() < obj.full_pixels)
            # the mask is really drawn: fully covered, unoccluded pixels show the object's colour (+ noise)
            solid = mask.copy()
            solid[obj.top : obj.top + obj_h, obj.left : obj.left + obj_w] &= obj.visible > 0.99
            if solid.sum() >= 4:
                error = np.abs(pixels[solid].astype(np.float32) - obj.colour).max(axis=1)
                assert np.median(error) < 15.0
    assert occluded_objects >= 3


@pytest.mark.parametrize("fixture", ["dataset", "objects_dataset"])
def test_background_is_cluttered_not_flat(request: pytest.FixtureRequest, fixture: str) -> None:
    out_dir, _ = request.getfixturevalue(fixture)
    data = _load(out_dir, "val")
    for image in data["images"]:
        pixels = np.asarray(Image.open(out_dir / "val" / image["file_name"])).astype(np.float32)
        background = np.ones(pixels.shape[:2], dtype=bool)
        for ann in data["annotations"]:
            if ann["image_id"] == image["id"]:
                x, y, w, h = (int(v) for v in ann["bbox"])
                background[y : y + h, x : x + w] = False
        fine_detail = np.abs(np.diff(pixels, axis=1)).mean()  # per-pixel noise and texture
        assert pixels[background].std(axis=0).mean() > 10.0 and fine_detail > 2.0


def test_objects_scale_mix_is_coco_like(objects_dataset: tuple[Path, dict]) -> None:
    """COCO's bounds scaled to 128 px: roughly 30-45 % small, 30-40 % medium, 20-30 % large (room left
    for 60 images), few objects under 5 px, every class present, several objects per image."""
    out_dir, summary = objects_dataset
    data = _load(out_dir, "train")
    areas = np.array([ann["area"] for ann in data["annotations"]])
    small, medium = small_area_threshold(OBJECTS_SIZE), 9.0 * small_area_threshold(OBJECTS_SIZE)
    shares = [(areas < small).mean(), ((areas >= small) & (areas < medium)).mean(), (areas >= medium).mean()]
    assert 0.27 <= shares[0] <= 0.48 and 0.27 <= shares[1] <= 0.45 and 0.16 <= shares[2] <= 0.34
    assert summary["train"]["small_share"] == pytest.approx(shares[0])
    assert summary["train"]["medium_share"] == pytest.approx(shares[1])
    assert summary["train"]["large_share"] == pytest.approx(shares[2])
    sides = np.array([ann["bbox"][2:] for ann in data["annotations"]]).max(axis=1)
    assert (sides < 5).mean() < 0.05 and sides.max() >= OBJECTS_SIZE / 4
    assert set(summary["train"]["instances_per_class"]) == set(OBJECT_CLASSES)
    assert min(summary["train"]["instances_per_class"].values()) > 0
    assert len(areas) / len(data["images"]) >= 4


def test_objects_boxes_are_tight_and_objects_textured(objects_dataset: tuple[Path, dict]) -> None:
    """Re-render images from their RNG: PNG pixels equal, boxes tight around the drawn masks, occlusion
    limited to 40 %, and the textured classes really carry a pattern (pixel spread inside the object)."""
    out_dir, _ = objects_dataset
    data = _load(out_dir, "train")
    occluded, spreads = 0, {name: [] for name in ("tile", "flag", "nut")}
    for image in data["images"][:20]:
        rng = _image_rng(SEED, "train", image["id"] - 1)
        width, height = _image_shape(rng, OBJECTS_SIZE)
        pixels, objects = render_objects_scene(rng, width, height, OBJECTS_SIZE)
        assert np.array_equal(np.asarray(Image.open(out_dir / "train" / image["file_name"])), pixels)
        anns = [ann for ann in data["annotations"] if ann["image_id"] == image["id"]]
        assert len(anns) == len(objects)
        for ann, obj in zip(anns, objects):
            mask = _drawn_mask_in_tight_box(obj, ann["bbox"], width, height)
            assert ann["area"] == mask.sum() >= 0.6 * obj.full_pixels
            assert OBJECT_CLASSES[obj.class_index] == next(
                c["name"] for c in data["categories"] if c["id"] == ann["category_id"]
            )
            occluded += int(mask.sum() < obj.full_pixels)
            name = OBJECT_CLASSES[obj.class_index]
            if name in spreads and mask.sum() >= 150:
                spreads[name].append(pixels[mask].astype(np.float32).std(axis=0).max())
    assert occluded >= 3
    for name, values in spreads.items():
        assert values and np.median(values) > 20.0, name  # two tones, not a flat fill


def test_unknown_profile_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown synthetic profile 'photos'.*objects"):
        generate_synthetic_coco(tmp_path, 1, 1, image_size=128, progress=False, profile="photos")


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_size"):
        generate_synthetic_coco(tmp_path, 1, 1, image_size=32, progress=False)
    with pytest.raises(ValueError, match="num_train"):
        generate_synthetic_coco(tmp_path, -1, 1, progress=False)
