"""CocoDetection: id mapping, targets, crowd/empty images, and every bad-input case in both modes."""

from __future__ import annotations

import io
import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from msad_deploy.config import Config, DataConfig, load_config
from msad_deploy.data import CocoDetection, DataError
from msad_deploy.data.coco import DEFAULT_MAX_IMAGE_PIXELS, decode_rgb, image_to_rgb

CATEGORIES = [{"id": 7, "name": "cross"}, {"id": 2, "name": "ring"}, {"id": 5, "name": "frame"}]
WIDTH, HEIGHT = 40, 30


def _noise(width: int = WIDTH, height: int = HEIGHT, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _save(path: Path, pixels: np.ndarray, mode: str = "RGB", fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels, mode="RGB").convert(mode)
    image.save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))


def _image(image_id: int, file_name: str, width: int = WIDTH, height: int = HEIGHT) -> dict[str, Any]:
    return {"id": image_id, "file_name": file_name, "width": width, "height": height}


def _ann(ann_id: int, image_id: int, category_id: int, bbox: list[float], iscrowd: int = 0) -> dict[str, Any]:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": iscrowd}


def _write_dataset(
    tmp_path: Path, annotations: list[dict], images: list[dict] | None = None, write_images: bool = True
) -> tuple[Path, Path]:
    """Two 40x30 noise PNGs (ids 1, 2) + a COCO file; returns (image_dir, ann_file)."""
    images = images if images is not None else [_image(1, "a.png"), _image(2, "b.png")]
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    if write_images:
        for seed, record in enumerate(images):
            _save(image_dir / record["file_name"], _noise(record["width"], record["height"], seed))
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return image_dir, ann_file


def _build_quietly(image_dir: Path, ann_file: Path, **kwargs: Any) -> CocoDetection:
    """Construct, failing the test on any warning (nothing here should need a repair or a skip)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return CocoDetection(image_dir, ann_file, **kwargs)


GOOD_ANNOTATIONS = [_ann(1, 1, 7, [1.0, 2.0, 10.0, 5.0]), _ann(2, 1, 2, [20, 10, 4.5, 6])]


# ------------------------------------------------------------------------------------------ good data
def test_category_ids_map_to_contiguous_labels_and_back(tmp_path: Path) -> None:
    dataset = _build_quietly(*_write_dataset(tmp_path, GOOD_ANNOTATIONS))
    assert dataset.category_ids == [2, 5, 7]
    assert dataset.class_names == ["ring", "frame", "cross"]
    assert dataset.category_id_to_label == {2: 0, 5: 1, 7: 2}
    assert dataset.label_to_category_id == [2, 5, 7]
    assert dataset.num_classes == 3
    _, target = dataset[0]
    assert target["labels"].tolist() == [2, 0]
    assert [dataset.label_to_category_id[label] for label in target["labels"].tolist()] == [7, 2]


def test_item_is_uint8_rgb_with_xyxy_boxes_in_original_pixels(tmp_path: Path) -> None:
    dataset = _build_quietly(*_write_dataset(tmp_path, GOOD_ANNOTATIONS))
    assert len(dataset) == 2 and dataset.image_ids == [1, 2]
    image, target = dataset[0]
    assert image.dtype == torch.uint8 and image.shape == (3, HEIGHT, WIDTH)
    assert torch.equal(image, torch.from_numpy(_noise(seed=0)).permute(2, 0, 1))
    assert target["boxes"].dtype == torch.float32
    assert target["boxes"].tolist() == [[1.0, 2.0, 11.0, 7.0], [20.0, 10.0, 24.5, 16.0]]
    assert target["labels"].dtype == torch.int64
    assert target["image_id"] == 1 and target["orig_size"] == (HEIGHT, WIDTH)
    assert dataset[-1][1]["image_id"] == 2
    with pytest.raises(IndexError):
        dataset[2]


def test_targets_are_copies_not_views_of_the_dataset(tmp_path: Path) -> None:
    dataset = _build_quietly(*_write_dataset(tmp_path, GOOD_ANNOTATIONS))
    dataset[0][1]["boxes"].mul_(0.0)
    assert dataset[0][1]["boxes"][0].tolist() == [1.0, 2.0, 11.0, 7.0]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_grayscale_rgba_and_palette_images_become_three_channels(tmp_path: Path, mode: str) -> None:
    image_dir, ann_file = _write_dataset(tmp_path, GOOD_ANNOTATIONS)
    _save(image_dir / "a.png", _noise(), mode=mode)
    image, _ = _build_quietly(image_dir, ann_file)[0]
    assert image.shape == (3, HEIGHT, WIDTH) and image.dtype == torch.uint8
    if mode == "L":
        assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_crowd_annotations_are_excluded_and_counted(tmp_path: Path) -> None:
    annotations = [*GOOD_ANNOTATIONS, _ann(3, 1, 5, [0, 0, 30, 20], iscrowd=1)]
    dataset = _build_quietly(*_write_dataset(tmp_path, annotations))
    assert dataset.num_crowd == 1
    assert dataset[0][1]["labels"].tolist() == [2, 0]


def test_image_without_annotations_is_kept_with_empty_target(tmp_path: Path) -> None:
    dataset = _build_quietly(*_write_dataset(tmp_path, GOOD_ANNOTATIONS))
    image, target = dataset[1]
    assert image.shape == (3, HEIGHT, WIDTH)
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64


def test_file_without_annotations_gives_empty_targets(tmp_path: Path) -> None:
    dataset = _build_quietly(*_write_dataset(tmp_path, []))
    assert len(dataset) == 2 and dataset.num_crowd == 0
    assert all(dataset[i][1]["boxes"].shape == (0, 4) for i in range(2))


def test_transforms_hook_receives_image_and_target_and_its_output_is_returned(tmp_path: Path) -> None:
    calls = []

    def flip_and_tag(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        calls.append((image.shape, target["image_id"], target["boxes"].clone()))
        return image.flip(-1), {**target, "tag": "seen"}

    image_dir, ann_file = _write_dataset(tmp_path, GOOD_ANNOTATIONS)
    plain = _build_quietly(image_dir, ann_file)
    transformed = _build_quietly(image_dir, ann_file, transforms=flip_and_tag)
    image, target = transformed[0]
    assert len(calls) == 1 and calls[0][0] == (3, HEIGHT, WIDTH) and calls[0][1] == 1
    assert torch.equal(calls[0][2], plain[0][1]["boxes"])
    assert torch.equal(image, plain[0][0].flip(-1)) and target["tag"] == "seen"


def test_on_bad_must_be_a_known_mode(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="on_bad"):
        CocoDetection(*_write_dataset(tmp_path, GOOD_ANNOTATIONS), on_bad="ignore")


# ------------------------------------------------------------------------------- malformed files
def _write_raw(tmp_path: Path, text: str) -> tuple[Path, Path]:
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(text)
    return image_dir, ann_file


def _coco_text(**overrides: Any) -> str:
    data = {
        "images": [_image(1, "a.png")],
        "annotations": [_ann(1, 1, 7, [1, 1, 5, 5])],
        "categories": CATEGORIES,
    }
    data.update(overrides)
    return json.dumps({k: v for k, v in data.items() if v is not None})


MALFORMED = {
    "not_json": ("{'images': [", "not valid JSON"),
    "json_list": ("[1, 2]", "holds a JSON list"),
    "no_categories": (_coco_text(categories=None), "no 'categories' key"),
    "images_not_list": (_coco_text(images={"1": "a.png"}), "'images' is a dict, expected a list"),
    "bbox_string": (_coco_text(annotations=[_ann(9, 1, 7, "1,1,5,5")]), "annotation id=9 has bbox='1,1,5,5'"),
    "bbox_three_numbers": (_coco_text(annotations=[_ann(9, 1, 7, [1, 1, 5])]), "annotation id=9 has bbox="),
    "no_image_id": (
        _coco_text(annotations=[{"id": 4, "category_id": 7, "bbox": [1, 1, 5, 5]}]),
        "id=4 has no 'image_id'",
    ),
    "float_image_id": (_coco_text(images=[{**_image(1, "a.png"), "id": 1.5}]), "image id=1.5 has id=1.5"),
    "no_file_name": (
        _coco_text(images=[{"id": 3, "width": 4, "height": 4}]),
        "image id=3 has no 'file_name'",
    ),
    "zero_width": (_coco_text(images=[_image(3, "a.png", width=0)]), "image id=3 has width=0"),
    "file_name_number": (_coco_text(images=[_image(1, "a.png"), _image(3, 3)]), "image id=3 has file_name=3"),
    "duplicate_image_ids": (
        _coco_text(images=[_image(1, "a.png"), _image(1, "b.png")]),
        "ids [1] appear more",
    ),
    "category_without_name": (_coco_text(categories=[{"id": 7}]), "category id=7 has no 'name'"),
    "annotation_not_object": (_coco_text(annotations=[[1, 1, 7]]), "annotation #0"),
}


@pytest.mark.parametrize("on_bad", ["error", "skip"])
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_annotation_file_is_always_an_error_naming_it(
    tmp_path: Path, case: str, on_bad: str
) -> None:
    text, expected = MALFORMED[case]
    image_dir, ann_file = _write_raw(tmp_path, text)
    with pytest.raises(DataError) as error:
        CocoDetection(image_dir, ann_file, on_bad=on_bad)
    assert str(ann_file) in str(error.value)
    assert expected in str(error.value)


@pytest.mark.parametrize("on_bad", ["error", "skip"])
def test_missing_annotation_file_is_always_an_error(tmp_path: Path, on_bad: str) -> None:
    with pytest.raises(DataError, match="annotation file not found: .*nowhere.json"):
        CocoDetection(tmp_path, tmp_path / "nowhere.json", on_bad=on_bad)


def test_missing_image_folder_is_an_error(tmp_path: Path) -> None:
    _, ann_file = _write_dataset(tmp_path, GOOD_ANNOTATIONS)
    with pytest.raises(DataError, match="image folder not found: .*elsewhere"):
        CocoDetection(tmp_path / "elsewhere", ann_file, on_bad="skip")


# ------------------------------------------------------------------------------- missing images
def test_missing_image_file_error_names_file_and_image_id(tmp_path: Path) -> None:
    image_dir, ann_file = _write_dataset(tmp_path, GOOD_ANNOTATIONS)
    (image_dir / "a.png").unlink()
    with pytest.raises(DataError) as error:
        CocoDetection(image_dir, ann_file)
    message = str(error.value)
    assert str(image_dir / "a.png") in message and "image id=1" in message and str(ann_file) in message


def test_missing_image_file_skip_drops_image_and_counts_its_annotations(tmp_path: Path) -> None:
    image_dir, ann_file = _write_dataset(tmp_path, GOOD_ANNOTATIONS)
    (image_dir / "a.png").unlink()
    with pytest.warns(UserWarning, match="missing_image_file") as record:
        dataset = CocoDetection(image_dir, ann_file, on_bad="skip")
    assert "a.png" in str(record[0].message)
    assert dataset.image_ids == [2]
    assert dataset.skipped == {"missing_image_file": 1, "annotation_of_skipped_image": 2}
    assert dataset[0][1]["image_id"] == 2 and dataset[0][1]["boxes"].shape == (0, 4)


# ------------------------------------------------------------------------ unreadable images
def _corrupt(path: Path, kind: str) -> None:
    """Overwrite ``path`` with undecodable bytes: garbage, nothing, text, or a PNG/JPEG cut at 60 %."""
    if kind == "garbage":
        path.write_bytes(b"this is not an image" * 10)
        return
    if kind == "empty":
        path.write_bytes(b"")
        return
    if kind == "text":
        path.write_text("<html><body>404 Not Found</body></html>\n")
        return
    buffer = io.BytesIO()
    fmt = "PNG" if kind == "truncated_png" else "JPEG"
    Image.fromarray(_noise()).save(buffer, format=fmt)
    data = buffer.getvalue()
    path.write_bytes(data[: int(len(data) * 0.6)])


UNREADABLE = ["garbage", "empty", "text", "truncated_png", "truncated_jpeg"]


@pytest.mark.parametrize("kind", UNREADABLE)
@pytest.mark.parametrize("on_bad", ["error", "skip"])
def test_unreadable_image_raises_at_load_naming_the_file(tmp_path: Path, kind: str, on_bad: str) -> None:
    image_dir, ann_file = _write_dataset(tmp_path, GOOD_ANNOTATIONS)
    _corrupt(image_dir / "a.png", kind)
    dataset = _build_quietly(image_dir, ann_file, on_bad=on_bad)  # without verify_images: found at load
    with pytest.raises(DataError, match=r"cannot decode image .*a\.png"):
        dataset[0]
    assert dataset[1][0].shape == (3, HEIGHT, WIDTH)


@pytest.mark.parametrize("kind", UNREADABLE)
def test_verify_images_error_mode_raises_at_construction(tmp_path: Path, kind: str) -> None:
    image_dir, ann_file = _write_dataset(tmp_path, GOOD_ANNOTATIONS)
    _corrupt(image_dir / "a.png", kind)
    with pytest.raises(DataError) as error:
        CocoDetection(image_dir, ann_file, verify_images=True)
    assert str(image_dir / "a.png") in str(error.value) and "image id=1" in str(error.value)


@pytest.mark.parametrize("kind", UNREADABLE)
def test_verify_images_skip_mode_drops_and_counts(tmp_path: Path, kind: str) -> None:
    image_dir, ann_file = _write_dataset(tmp_path, GOOD_ANNOTATIONS)
    _corrupt(image_dir / "a.png", kind)
    with pytest.warns(UserWarning, match="unreadable_image"):
        dataset = CocoDetection(image_dir, ann_file, on_bad="skip", verify_images=True)
    assert dataset.image_ids == [2]
    assert dataset.skipped == {"unreadable_image": 1, "annotation_of_skipped_image": 2}


def test_image_size_differing_from_its_record(tmp_path: Path) -> None:
    images = [_image(1, "a.png"), _image(2, "b.png", width=50)]
    image_dir, ann_file = _write_dataset(tmp_path, GOOD_ANNOTATIONS, images=images)
    _save(image_dir / "b.png", _noise())  # 40 px wide, record says 50
    with pytest.raises(DataError, match=r"size mismatch: .*b\.png is 40x30 .*image id=2"):
        _build_quietly(image_dir, ann_file)[1]
    with pytest.raises(DataError, match=r"b\.png"):
        CocoDetection(image_dir, ann_file, verify_images=True)
    with pytest.warns(UserWarning, match="image_size_mismatch"):
        dataset = CocoDetection(image_dir, ann_file, on_bad="skip", verify_images=True)
    assert dataset.image_ids == [1] and dataset.skipped == {"image_size_mismatch": 1}


# ------------------------------------------------------------------------------- bad boxes / ids
@pytest.mark.parametrize("on_bad", ["error", "skip"])
def test_box_partly_outside_is_clipped_and_kept_with_a_warning(tmp_path: Path, on_bad: str) -> None:
    annotations = [*GOOD_ANNOTATIONS, _ann(3, 2, 5, [-4, 25, 10, 10]), _ann(4, 2, 5, [35, -1, 10, 4])]
    image_dir, ann_file = _write_dataset(tmp_path, annotations)
    with pytest.warns(UserWarning, match=r"clipped_box.*annotation id=3") as record:
        dataset = CocoDetection(image_dir, ann_file, on_bad=on_bad)
    assert str(ann_file) in str(record[0].message)
    assert dataset.repaired == {"clipped_box": 2} and not dataset.skipped
    assert dataset[1][1]["boxes"].tolist() == [[0.0, 25.0, 6.0, 30.0], [35.0, 0.0, 40.0, 3.0]]
    assert dataset[0][1]["boxes"].tolist() == [[1.0, 2.0, 11.0, 7.0], [20.0, 10.0, 24.5, 16.0]]


BAD_RECORDS = {
    "zero_width": (_ann(3, 2, 5, [5, 5, 0, 4]), "degenerate_box"),
    "negative_height": (_ann(3, 2, 5, [5, 5, 4, -2]), "degenerate_box"),
    "outside_after_clipping": (_ann(3, 2, 5, [41, 5, 4, 4]), "degenerate_box"),
    "not_finite": (_ann(3, 2, 5, [5, math.nan, 4, 4]), "degenerate_box"),
    "unknown_category": (_ann(3, 2, 4, [5, 5, 4, 4]), "unknown_category"),
    "unknown_image_id": (_ann(3, 99, 5, [5, 5, 4, 4]), "unknown_image_id"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_annotation_error_names_file_and_record(tmp_path: Path, case: str) -> None:
    bad, _ = BAD_RECORDS[case]
    image_dir, ann_file = _write_dataset(tmp_path, [*GOOD_ANNOTATIONS, bad])
    with pytest.raises(DataError) as error:
        CocoDetection(image_dir, ann_file)
    message = str(error.value)
    assert "annotation id=3" in message and str(ann_file) in message and "on_bad='skip'" in message


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_annotation_skip_drops_only_that_record_and_counts_it(tmp_path: Path, case: str) -> None:
    bad, reason = BAD_RECORDS[case]
    extra_good = _ann(4, 2, 2, [5, 5, 4, 4])
    image_dir, ann_file = _write_dataset(tmp_path, [*GOOD_ANNOTATIONS, bad, extra_good])
    with pytest.warns(UserWarning, match=rf"{reason}: annotation id=3"):
        dataset = CocoDetection(image_dir, ann_file, on_bad="skip")
    assert dataset.skipped == {reason: 1} and not dataset.repaired
    assert dataset[0][1]["boxes"].shape == (2, 4)
    assert dataset[1][1]["boxes"].tolist() == [[5.0, 5.0, 9.0, 9.0]]
    assert dataset[1][1]["labels"].tolist() == [0]


def test_crowd_annotation_with_unknown_category_is_not_a_bad_record(tmp_path: Path) -> None:
    annotations = [*GOOD_ANNOTATIONS, _ann(3, 2, 4, [5, 5, 4, 4], iscrowd=1)]
    dataset = _build_quietly(*_write_dataset(tmp_path, annotations))
    assert dataset.num_crowd == 1 and dataset[1][1]["boxes"].shape == (0, 4)


def test_skip_reports_the_count_of_every_bad_record(tmp_path: Path) -> None:
    annotations = [
        *GOOD_ANNOTATIONS,
        _ann(3, 2, 4, [5, 5, 4, 4]),
        _ann(4, 2, 4, [5, 5, 4, 4]),
        _ann(5, 2, 5, [1, 1, 0, 0]),
    ]
    image_dir, ann_file = _write_dataset(tmp_path, annotations)
    with pytest.raises(DataError, match=r"2 such record"):
        CocoDetection(image_dir, ann_file)
    with pytest.warns(UserWarning, match=r"skipped 3 bad record"):
        dataset = CocoDetection(image_dir, ann_file, on_bad="skip")
    assert dataset.skipped == {"unknown_category": 2, "degenerate_box": 1}


# --------------------------------------------------------------------- every PIL mode -> 8-bit RGB
def _mode_image(mode: str) -> tuple[Image.Image, str, tuple[int, int, int]]:
    """A 2x1 image of ``mode`` whose pixel (0, 0) should decode to the returned RGB; with its file format."""
    if mode == "1":
        image = Image.new("1", (2, 1), 0)
        image.putpixel((0, 0), 1)
        return image, "PNG", (255, 255, 255)
    if mode == "L":
        return Image.new("L", (2, 1), 77), "PNG", (77, 77, 77)
    if mode == "LA":
        return Image.new("LA", (2, 1), (77, 10)), "PNG", (77, 77, 77)
    if mode in ("P", "P_transparent"):
        image = Image.new("P", (2, 1), 1)
        image.putpalette([0, 0, 0, 100, 150, 200] + [0] * 762)
        if mode == "P_transparent":
            image.info["transparency"] = 1
        return image, "PNG", (100, 150, 200)
    if mode == "RGB":
        return Image.new("RGB", (2, 1), (100, 150, 200)), "PNG", (100, 150, 200)
    if mode == "RGBA":  # alpha is dropped, not composited: what convert("RGB") always did
        return Image.new("RGBA", (2, 1), (100, 150, 200, 0)), "PNG", (100, 150, 200)
    if mode in ("CMYK_tiff", "CMYK_jpeg"):
        image = Image.new("CMYK", (8, 8), (155, 105, 55, 0))
        return image, "TIFF" if mode == "CMYK_tiff" else "JPEG", (100, 150, 200)
    if mode in ("I;16", "I;16_tiff"):
        pixels = np.array([[25700, 65535, 128, 129]], dtype=np.uint16)
        return Image.fromarray(pixels), "PNG" if mode == "I;16" else "TIFF", (100, 100, 100)
    if mode == "I;16B":
        pixels = np.array([[25700, 65535]], dtype=">u2")
        return Image.frombytes("I;16B", (2, 1), pixels.tobytes()), "TIFF", (100, 100, 100)
    if mode == "I":  # 32-bit integers beyond 255: the 16-bit range
        return Image.fromarray(np.array([[25700, 65535]], dtype=np.int32)), "TIFF", (100, 100, 100)
    if mode == "I_8bit":  # 32-bit integers within 0..255: 8-bit values
        return Image.fromarray(np.array([[100, 255]], dtype=np.int32)), "TIFF", (100, 100, 100)
    if mode == "F":  # floats beyond 1: the 0..255 range, rounded
        return Image.fromarray(np.array([[100.4, 300.0]], dtype=np.float32)), "TIFF", (100, 100, 100)
    if mode == "F_unit":  # floats within 0..1: scaled by 255
        return Image.fromarray(np.array([[0.5, 1.0]], dtype=np.float32)), "TIFF", (128, 128, 128)
    raise AssertionError(mode)


FILE_MODES = [
    "1", "L", "LA", "P", "P_transparent", "RGB", "RGBA", "CMYK_tiff", "CMYK_jpeg",
    "I;16", "I;16_tiff", "I;16B", "I", "I_8bit", "F", "F_unit",
]  # fmt: skip


@pytest.mark.parametrize("mode", FILE_MODES)
def test_decode_rgb_gives_8bit_rgb_of_every_mode(tmp_path: Path, mode: str) -> None:
    image, fmt, expected = _mode_image(mode)
    path = tmp_path / f"image.{fmt.lower()}"
    image.save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    pixels = decode_rgb(path)
    assert pixels.dtype == np.uint8 and pixels.shape == (image.height, image.width, 3)
    tolerance = 2 if fmt == "JPEG" else 0
    assert np.abs(pixels[0, 0].astype(int) - expected).max() <= tolerance, pixels[0, 0]


def test_16bit_values_are_divided_by_257_and_rounded(tmp_path: Path) -> None:
    values = np.array([[0, 128, 129, 25700, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "gray16.png")
    pixels = decode_rgb(tmp_path / "gray16.png")
    assert pixels[0, :, 0].tolist() == [0, 0, 1, 100, 128, 255]
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


def test_float_images_clip_and_map_nan_to_zero(tmp_path: Path) -> None:
    values = np.array([[-5.0, np.nan, 254.6, 1e9]], dtype=np.float32)
    Image.fromarray(values).save(tmp_path / "float.tif")
    assert decode_rgb(tmp_path / "float.tif")[0, :, 0].tolist() == [0, 0, 255, 255]


@pytest.mark.parametrize(
    ("mode", "fill", "expected"),
    [
        ("PA", (1, 10), (100, 150, 200)),
        ("La", (77, 255), (77, 77, 77)),
        ("RGBa", (100, 150, 200, 255), (100, 150, 200)),
    ],
)
def test_modes_no_file_format_writes_convert_too(mode: str, fill: tuple, expected: tuple) -> None:
    image = Image.new(mode, (1, 1), fill)
    if mode == "PA":
        image.putpalette([0, 0, 0, 100, 150, 200] + [0] * 762)
    assert image_to_rgb(image)[0, 0].tolist() == list(expected)


def test_16bit_grayscale_dataset_image_is_not_white(tmp_path: Path) -> None:
    image_dir, ann_file = _write_dataset(tmp_path, GOOD_ANNOTATIONS)
    ramp = (np.arange(WIDTH * HEIGHT, dtype=np.uint32).reshape(HEIGHT, WIDTH) * 50).astype(np.uint16)
    Image.fromarray(ramp).save(image_dir / "a.png")
    image, _ = _build_quietly(image_dir, ann_file)[0]
    expected = torch.from_numpy(((ramp.astype(np.int64) + 128) // 257).astype(np.uint8))
    assert torch.equal(image[0], expected) and torch.equal(image[2], expected)


# --------------------------------------------------------------------------------- pixel limit
def _png(path: Path, width: int = 20, height: int = 20) -> Path:
    Image.fromarray(_noise(width, height)).save(path)
    return path


def test_pixel_limit_refuses_large_image_naming_size_limit_and_option(tmp_path: Path) -> None:
    path = _png(tmp_path / "big.png")
    with pytest.raises(DataError) as error:
        decode_rgb(path, max_pixels=100)
    message = str(error.value)
    assert str(path) in message and "20x20" in message and "400" in message and "100" in message
    assert "data.max_image_pixels" in message and "\n" not in message
    assert decode_rgb(path, max_pixels=400).shape == (20, 20, 3)


@pytest.mark.parametrize("disabled", [0, None])
def test_pixel_limit_zero_or_none_disables_it(tmp_path: Path, disabled: int | None) -> None:
    assert decode_rgb(_png(tmp_path / "a.png"), max_pixels=disabled).shape == (20, 20, 3)


def test_pixel_limit_is_checked_from_the_header_before_decoding(tmp_path: Path) -> None:
    path = _png(tmp_path / "cut.png")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # header intact, pixel data truncated
    with pytest.raises(DataError, match="data.max_image_pixels"):
        decode_rgb(path, max_pixels=100)
    with pytest.raises(DataError, match="cannot decode"):
        decode_rgb(path, max_pixels=400)


def test_pixel_limit_replaces_pils_global_guard_and_leaves_it_unchanged(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # PIL would warn at 51 and refuse at 101 pixels
    path = _png(tmp_path / "a.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode_rgb(path, max_pixels=None).shape == (20, 20, 3)
    assert Image.MAX_IMAGE_PIXELS == 50


def test_dataset_pixel_limit_in_both_modes(tmp_path: Path) -> None:
    image_dir, ann_file = _write_dataset(tmp_path, GOOD_ANNOTATIONS)  # 40x30 = 1200 pixels each
    dataset = _build_quietly(image_dir, ann_file, max_image_pixels=1000)
    with pytest.raises(DataError, match=r"a\.png .*is 40x30 .*data\.max_image_pixels"):
        dataset[0]
    with pytest.raises(DataError, match=r"a\.png .*is 40x30"):
        CocoDetection(image_dir, ann_file, max_image_pixels=1000, verify_images=True)
    with pytest.warns(UserWarning, match="image_too_large"):
        dataset = CocoDetection(image_dir, ann_file, on_bad="skip", verify_images=True, max_image_pixels=1000)
    assert dataset.image_ids == [] and dataset.skipped["image_too_large"] == 2
    assert len(_build_quietly(image_dir, ann_file, max_image_pixels=1200)) == 2


def test_max_image_pixels_default_is_pils_and_config_can_disable_it() -> None:
    assert DataConfig().max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS == 89_478_485
    assert load_config(None, ["data.max_image_pixels=null"]).data.max_image_pixels is None
    assert load_config(None, ["data.max_image_pixels=0"]).data.max_image_pixels == 0


# -------------------------------------------------------------------- verify_images and its cache
def test_decode_error_names_the_real_config_options(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    _corrupt(path, "empty")
    with pytest.raises(DataError) as error:
        decode_rgb(path)
    message = str(error.value)
    assert str(path) in message and "\n" not in message
    assert "data.verify_images=true" in message and "data.on_bad=skip" in message
    assert "verify_images=True" not in message


def test_verify_images_is_a_config_option_off_by_default() -> None:
    assert DataConfig().verify_images is False
    assert load_config(None, ["data.verify_images=true"]).data.verify_images is True


def _count_decodes(monkeypatch) -> list[Path]:
    from msad_deploy.data import coco

    calls: list[Path] = []
    original = coco.decode_rgb

    def counting(path: Path, *args: Any, **kwargs: Any) -> np.ndarray:
        calls.append(Path(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(coco, "decode_rgb", counting)
    return calls


def test_verify_cache_skips_unchanged_images_and_rechecks_changed_ones(tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("MSAD_CACHE_DIR", str(cache))
    image_dir, ann_file = _write_dataset(tmp_path, GOOD_ANNOTATIONS)
    calls = _count_decodes(monkeypatch)
    _build_quietly(image_dir, ann_file, verify_images=True)
    assert sorted(p.name for p in calls) == ["a.png", "b.png"]
    assert list((cache / "verify").glob("*.json"))
    calls.clear()
    _build_quietly(image_dir, ann_file, verify_images=True)
    assert calls == []  # second run: nothing decoded
    _corrupt(image_dir / "b.png", "truncated_png")  # new size and mtime: checked again
    with pytest.raises(DataError, match=r"b\.png"):
        CocoDetection(image_dir, ann_file, verify_images=True)
    assert [p.name for p in calls] == ["b.png"]


def test_verify_cache_applies_a_lower_pixel_limit_to_cached_images(tmp_path: Path) -> None:
    image_dir, ann_file = _write_dataset(tmp_path, GOOD_ANNOTATIONS)
    _build_quietly(image_dir, ann_file, verify_images=True)
    with pytest.raises(DataError, match="data.max_image_pixels"):
        CocoDetection(image_dir, ann_file, verify_images=True, max_image_pixels=1000)


def test_verify_cache_that_cannot_be_written_is_not_an_error(tmp_path: Path, monkeypatch) -> None:
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("MSAD_CACHE_DIR", str(blocker))
    image_dir, ann_file = _write_dataset(tmp_path, GOOD_ANNOTATIONS)
    assert len(_build_quietly(image_dir, ann_file, verify_images=True)) == 2


def test_verify_cache_that_is_corrupt_is_ignored(tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("MSAD_CACHE_DIR", str(cache))
    image_dir, ann_file = _write_dataset(tmp_path, GOOD_ANNOTATIONS)
    _build_quietly(image_dir, ann_file, verify_images=True)
    for path in (cache / "verify").glob("*.json"):
        path.write_text("{not json")
    calls = _count_decodes(monkeypatch)
    assert len(_build_quietly(image_dir, ann_file, verify_images=True)) == 2
    assert len(calls) == 2


# ------------------------------------------------------------- bad images met by the loaders
def _loader_config(num_workers: int, on_bad: str = "error") -> Config:
    config = Config()
    config.data.num_workers = num_workers
    config.data.on_bad = on_bad
    config.input.train_min_sizes = [30]
    config.input.train_max_size = 40
    config.input.test_min_size = 30
    config.input.test_max_size = 40
    config.input.size_divisibility = 32
    config.train.batch_size = 2
    return config


@pytest.mark.parametrize("num_workers", [0, 1])
@pytest.mark.parametrize("kind", ["empty", "text", "truncated_png"])
def test_train_loader_error_mode_raises_one_line_naming_the_file(
    tmp_path: Path, kind: str, num_workers: int
) -> None:
    from msad_deploy.training.data import build_train_loader

    image_dir, ann_file = _write_dataset(tmp_path, GOOD_ANNOTATIONS)
    _corrupt(image_dir / "a.png", kind)
    dataset = CocoDetection(image_dir, ann_file)
    loader = build_train_loader(_loader_config(num_workers), dataset)
    with pytest.raises(DataError) as error:
        next(iter(loader))
    message = str(error.value)
    assert "\n" not in message and "DataLoader worker" not in message
    assert f"cannot decode image {image_dir / 'a.png'}" in message and "image id=1" in message


@pytest.mark.parametrize("num_workers", [0, 1])
@pytest.mark.parametrize("kind", ["empty", "text", "truncated_png"])
def test_train_loader_skip_mode_replaces_bad_image_and_warns_once(
    tmp_path: Path, kind: str, num_workers: int
) -> None:
    from msad_deploy.training.data import build_train_loader

    image_dir, ann_file = _write_dataset(tmp_path, GOOD_ANNOTATIONS)
    _corrupt(image_dir / "a.png", kind)
    dataset = _build_quietly(image_dir, ann_file, on_bad="skip")
    config = _loader_config(num_workers, on_bad="skip")
    loader = build_train_loader(config, dataset)
    batches = iter(loader)
    with pytest.warns(UserWarning, match=r"skipped .*a\.png") as record:
        first = [next(batches) for _ in range(3)]
    assert len(record) == 1  # once per file, although every batch meets it
    assert loader.num_skipped == 3  # each batch holds image 1 once
    for batch in first:
        assert batch.images.shape[0] == 2  # batch size kept
        assert [t["image_id"] for t in batch.targets] == [2, 2]  # the next readable image
        assert all("skipped_images" not in t for t in batch.targets)
    again = iter(build_train_loader(config, dataset))  # deterministic: same replacement, same augmentation
    with pytest.warns(UserWarning):
        second = [next(again) for _ in range(3)]
    for a, b in zip(first, second):
        assert torch.equal(a.images, b.images)


def test_train_loader_skip_mode_skips_an_image_over_the_pixel_limit(tmp_path: Path) -> None:
    from msad_deploy.training.data import build_train_loader

    images = [_image(1, "a.png", width=50), _image(2, "b.png")]  # 1500 and 1200 pixels
    image_dir, ann_file = _write_dataset(tmp_path, GOOD_ANNOTATIONS, images=images)
    dataset = _build_quietly(image_dir, ann_file, on_bad="skip", max_image_pixels=1400)
    with pytest.warns(UserWarning, match=r"a\.png .*is 50x30 .*data\.max_image_pixels"):
        batch = next(iter(build_train_loader(_loader_config(0, on_bad="skip"), dataset)))
    assert [t["image_id"] for t in batch.targets] == [2, 2]


def test_train_loader_fails_clearly_when_no_image_loads(tmp_path: Path) -> None:
    from msad_deploy.training.data import build_train_loader

    image_dir, ann_file = _write_dataset(tmp_path, GOOD_ANNOTATIONS)
    _corrupt(image_dir / "a.png", "empty")
    _corrupt(image_dir / "b.png", "text")
    dataset = _build_quietly(image_dir, ann_file, on_bad="skip")
    with pytest.raises(DataError, match=r"no image of .*instances\.json could be loaded"):
        next(iter(build_train_loader(_loader_config(0, on_bad="skip"), dataset)))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_eval_loader_skip_mode_leaves_bad_image_out_and_error_mode_is_one_line(
    tmp_path: Path, num_workers: int
) -> None:
    from msad_deploy.evaluation.evaluator import build_eval_loader

    image_dir, ann_file = _write_dataset(tmp_path, GOOD_ANNOTATIONS)
    _corrupt(image_dir / "a.png", "truncated_png")
    config = _loader_config(num_workers, on_bad="skip")
    _, loader = build_eval_loader(config, image_dir, ann_file, batch_size=2, num_workers=num_workers)
    with pytest.warns(UserWarning, match=r"a\.png"):
        batches = list(loader)
    assert [[t["image_id"] for t in b.targets] for b in batches] == [[2]]
    assert batches[0].images.shape[0] == 1 and loader.failed_image_ids == [1]

    config.data.on_bad = "error"
    _, loader = build_eval_loader(config, image_dir, ann_file, batch_size=2, num_workers=num_workers)
    with pytest.raises(DataError) as error:
        list(loader)
    assert "\n" not in str(error.value) and str(image_dir / "a.png") in str(error.value)


@pytest.mark.parametrize("on_bad", ["error", "skip"])
def test_eval_loader_honours_verify_images_and_pixel_limit(tmp_path: Path, on_bad: str) -> None:
    from msad_deploy.evaluation.evaluator import build_eval_loader

    image_dir, ann_file = _write_dataset(tmp_path, GOOD_ANNOTATIONS)
    _corrupt(image_dir / "a.png", "text")
    config = _loader_config(0, on_bad=on_bad)
    config.data.verify_images = True
    if on_bad == "error":
        with pytest.raises(DataError, match=r"a\.png"):
            build_eval_loader(config, image_dir, ann_file)
    else:
        with pytest.warns(UserWarning, match="unreadable_image"):
            dataset, _ = build_eval_loader(config, image_dir, ann_file)
        assert dataset.image_ids == [2]
    config.data.verify_images = False
    config.data.max_image_pixels = 1000
    dataset, loader = build_eval_loader(config, image_dir, ann_file)
    assert dataset.max_image_pixels == 1000


# -------------------------------------------------------- evaluation sees what training uses
def test_skip_mode_ground_truth_is_what_training_uses(tmp_path: Path) -> None:
    from msad_deploy.evaluation.coco_eval import evaluate_detections

    def ann(ann_id: int, image_id: int, category_id: int, bbox: list[float], iscrowd: int = 0) -> dict:
        return {**_ann(ann_id, image_id, category_id, bbox, iscrowd), "area": float(bbox[2] * bbox[3])}

    annotations = [
        ann(1, 1, 7, [1.0, 2.0, 10.0, 5.0]),
        ann(2, 1, 2, [20, 10, 4.5, 6]),
        ann(3, 2, 5, [5, 5, 0, 4]),  # degenerate: dropped
        ann(4, 2, 4, [5, 5, 4, 4]),  # unknown category: dropped
        ann(5, 2, 5, [-4, 25, 10, 10]),  # clipped to [0, 25, 6, 5]
        ann(6, 2, 2, [1, 1, 8, 8], iscrowd=1),  # crowd: an ignore region, kept
        ann(7, 3, 2, [1, 1, 8, 8]),  # of a missing image: dropped with it
    ]
    images = [_image(1, "a.png"), _image(2, "b.png"), _image(3, "c.png")]
    image_dir, ann_file = _write_dataset(tmp_path, annotations, images=images)
    (image_dir / "c.png").unlink()
    with pytest.warns(UserWarning):
        dataset = CocoDetection(image_dir, ann_file, on_bad="skip")
    detections = []
    for index, image_id in enumerate(dataset.image_ids):
        _, target = dataset[index]
        for box, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            x0, y0, x1, y1 = box
            detections.append(
                {
                    "image_id": image_id,
                    "category_id": dataset.label_to_category_id[label],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "score": 1.0,
                }
            )
    assert len(detections) == 3
    metrics = evaluate_detections(dataset.coco, detections, image_ids=dataset.image_ids)
    # pycocotools divides by tp + fp + eps, so a perfect score is 100 - 3e-14, not exactly 100
    assert metrics["AP"] == pytest.approx(100.0, abs=1e-9)
    assert metrics["AR100"] == pytest.approx(100.0, abs=1e-9)
    assert sorted(dataset.coco.getImgIds()) == [1, 2]
    assert sorted(dataset.coco.getAnnIds()) == [1, 2, 5, 6]
    assert dataset.coco.anns[5]["bbox"] == [0.0, 25.0, 6.0, 5.0]
    assert sorted(c["id"] for c in dataset.coco.dataset["categories"]) == [2, 5, 7]
    assert len(dataset.raw_json["annotations"]) == 7  # the file as written stays available
    assert annotations[4]["bbox"] == [-4, 25, 10, 10]  # the parsed records were not modified
