"""COCO-format detection dataset on pycocotools, validated once at construction.

Why: training should fail early and precisely on broken data (naming the file, the record and a fix),
or, with ``on_bad="skip"``, drop bad records with a warning and a count, never silently. Validation is
a few vectorised passes over the annotation list, so COCO train (860k annotations) costs seconds.

Policies:
- crowd annotations (``iscrowd=1``) are excluded from the targets (FCOS trains without them) and
  counted in ``num_crowd``; they are otherwise not validated.
- boxes partly outside their image are clipped to it (a repair, counted in ``repaired["clipped_box"]``
  with a warning); boxes with zero or negative width/height after clipping are bad records.
- images without (usable) annotations are kept, with empty targets.
- ``coco`` (the evaluation ground truth) holds exactly what training uses: the kept images, their kept
  annotations with the clipped boxes, and their crowd annotations (ignore regions in COCO evaluation),
  so skipped records do not count as misses; ``raw_json`` holds the file as written.
- truncated images raise: PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left False on purpose.
- every PIL mode becomes 8-bit RGB (:func:`image_to_rgb`: 16-bit gray is scaled, not clipped to white);
  images over ``max_image_pixels`` are refused from their header, before decoding.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from msad_deploy.data.verify_cache import VerifyCache

if TYPE_CHECKING:
    from pycocotools.coco import COCO

Target = dict[str, Any]
Transforms = Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]]

ON_BAD_CHOICES = ("error", "skip")
_SKIP_HINT = "set data.on_bad=skip (CocoDetection(on_bad='skip')) to drop such records with a warning instead"


class DataError(ValueError):
    """A dataset file or record that cannot be used; the message names the file, the record and a fix."""


class ImageTooLargeError(DataError):
    """An image whose header states more pixels than the limit (``max_pixels`` / data.max_image_pixels)."""


# PIL's own default limit (1024**3 // 4 // 3: a 256 MiB RGB image); COCO's largest images are 640x640.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
_DECODE_HINT = (
    "re-encode or replace the file, or remove it from the annotation file (data.on_bad=skip skips it "
    "when met; with data.verify_images=true it is dropped before training starts)"
)
_PIL_GUARD_LOCK = threading.Lock()


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) made one space: an error in one line."""
    return " ".join(str(text).split())


@contextlib.contextmanager
def _without_pil_pixel_guard() -> Iterator[None]:
    """PIL's process-wide ``Image.MAX_IMAGE_PIXELS`` off, restored on exit (under a lock, so threads
    using this see a consistent value): our own header check is then the one limit that applies."""
    with _PIL_GUARD_LOCK:
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


# Public name for other readers of untrusted images (the runtime decodes bytes and files with it).
without_pil_pixel_guard = _without_pil_pixel_guard


def check_pixel_limit(path: Path, size: tuple[int, int], max_pixels: int | None) -> None:
    """Raise ImageTooLargeError when an image of ``size`` (W, H) has more than ``max_pixels`` pixels.

    ``max_pixels`` None or 0 disables the check.
    """
    width, height = size
    if max_pixels and width * height > max_pixels:
        raise ImageTooLargeError(
            f"image {path} is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{max_pixels:,} pixels (data.max_image_pixels); raise data.max_image_pixels (0 or null "
            "disables the check) if images this large are meant to be used, or downscale the image"
        )


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    """uint8 [H, W] -> uint8 [H, W, 3] (three equal channels)."""
    return np.repeat(gray[:, :, None], 3, axis=2)


def _sixteen_bit_to_8bit(values: np.ndarray) -> np.ndarray:
    """Values 0..65535 (clipped there) -> uint8 value / 257, rounded (65535 -> 255, 25700 -> 100)."""
    clipped = np.clip(values, 0, 65535).astype(np.uint32)
    return ((clipped + 128) // 257).astype(np.uint8)


def image_to_rgb(image: Image.Image) -> np.ndarray:
    """A PIL image of any mode a dataset may hold -> uint8 [H, W, 3] RGB (decodes it if still lazy).

    - 1, L, P, RGB, CMYK, YCbCr, LAB, HSV, RGBX: PIL's ``convert("RGB")`` (palette looked up, gray copied).
    - LA, PA, RGBA (and premultiplied La, RGBa, first un-premultiplied): the alpha channel is dropped,
      not composited: colour values are kept as stored, as ``convert("RGB")`` does for RGBA.
    - I;16, I;16B, I;16L, I;16N (16-bit gray): value / 257, rounded, so 0..65535 spans 0..255
      (``convert`` would clip everything above 255 to white).
    - I (32-bit int): values within 0..255 are taken as 8-bit gray; otherwise they are clipped to
      0..65535 and scaled like I;16 (old Pillow opens 16-bit PNGs as I, so an I PNG is always scaled).
    - F (32-bit float): values within 0..1 are scaled by 255; otherwise clipped to 0..255. Both rounded;
      NaN becomes 0.
    """
    mode = image.mode
    if mode.startswith("I;16"):
        return _gray_to_rgb(_sixteen_bit_to_8bit(np.asarray(image)))
    if mode == "I":
        values = np.asarray(image)
        eight_bit = image.format != "PNG" and (
            values.size == 0 or (values.min() >= 0 and values.max() <= 255)
        )
        return _gray_to_rgb(values.astype(np.uint8) if eight_bit else _sixteen_bit_to_8bit(values))
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            values = values * 255.0
        return _gray_to_rgb(np.rint(np.clip(values, 0.0, 255.0)).astype(np.uint8))
    if mode in ("La", "RGBa"):  # premultiplied alpha: PIL converts these only to their straight form
        image = image.convert(mode.upper())
    return np.array(image.convert("RGB"))


def decode_rgb(path: Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode an image file to RGB uint8 [H, W, 3]; every mode is converted by :func:`image_to_rgb`.

    The size is checked against ``max_pixels`` (None or 0: no limit) from the header, before any pixel
    is decoded; ImageTooLargeError names the image, its size and the limit. PIL's own global
    ``MAX_IMAGE_PIXELS`` guard is off meanwhile (restored after), so ``max_pixels`` is the one limit.
    Raises DataError naming the file when PIL cannot decode it completely (corrupt or truncated).
    """
    try:
        with _without_pil_pixel_guard(), Image.open(path) as image:
            check_pixel_limit(path, image.size, max_pixels)
            return image_to_rgb(image)
    except DataError:
        raise
    except Exception as error:  # PIL signals corrupt data with OSError, SyntaxError, ValueError, EOFError...
        raise DataError(
            f"cannot decode image {path}: {type(error).__name__}: {one_line(error)}; {_DECODE_HINT}"
        ) from error


def _is_main_process() -> bool:
    """False on DDP ranks other than 0 (they verify too, but show no progress bar)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _load_json(ann_file: Path) -> dict[str, Any]:
    """The parsed annotation file with its three top-level lists checked; DataError otherwise."""
    if not ann_file.is_file():
        raise DataError(f"annotation file not found: {ann_file}. Check the path (is the dataset downloaded?)")
    try:
        with ann_file.open("rb") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(
            f"annotation file {ann_file} is not valid JSON ({error}); re-download or regenerate it"
        ) from error
    if not isinstance(data, dict):
        raise DataError(
            f"annotation file {ann_file} holds a JSON {type(data).__name__}, expected an object with "
            "'images', 'annotations' and 'categories' lists (COCO detection format)"
        )
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DataError(
                f"annotation file {ann_file} is not COCO detection format: no '{key}' key "
                f"(found keys {sorted(data)}); it needs 'images', 'annotations' and 'categories' lists"
            )
        if not isinstance(data[key], list):
            raise DataError(
                f"annotation file {ann_file}: '{key}' is a {type(data[key]).__name__}, expected a list "
                "(COCO detection format)"
            )
    return data


def _record_name(section: str, position: int, record: Any) -> str:
    """'annotation id=7' when the record has an id, else 'annotation #3 (0-based position)'."""
    if isinstance(record, dict) and "id" in record:
        return f"{section} id={record['id']!r}"
    return f"{section} #{position} (0-based position in '{section}s')"


def _value_ok(value: Any, kinds: str, is_box: bool) -> bool:
    """Whether one JSON value is a number of an allowed numpy kind ('b', 'i', 'f'), or 4 of them."""
    if is_box and not (isinstance(value, list) and len(value) == 4):
        return False
    for number in value if is_box else [value]:
        if isinstance(number, bool):
            kind = "b"
        elif isinstance(number, int):
            kind = "i"
        elif isinstance(number, float):
            kind = "f"
        else:
            return False
        if kind not in kinds:
            return False
    return True


_REQUIRED = object()


def _column(
    records: list[Any],
    key: str,
    section: str,
    ann_file: Path,
    kinds: str,
    expected: str,
    default: Any = _REQUIRED,
) -> np.ndarray:
    """Values of ``key`` over ``records``: [N] numbers, or [N, 4] for ``bbox``; numpy kind in ``kinds``.

    Fast path: one list comprehension + np.asarray. On failure a slow pass finds the first bad record
    and raises DataError naming it. ``default`` fills a missing optional key.
    """
    is_box = key == "bbox"
    if not records:
        return np.zeros((0, 4) if is_box else (0,), dtype=np.float64 if is_box else np.int64)
    try:
        if default is _REQUIRED:
            values = [record[key] for record in records]
        else:
            values = [record.get(key, default) for record in records]
        column = np.asarray(values)
        shape_ok = column.shape == ((len(records), 4) if is_box else (len(records),))
        # numpy turns ["a", 3] into strings: text columns must hold only str
        text_ok = column.dtype.kind != "U" or all(isinstance(value, str) for value in values)
        if column.dtype.kind in kinds and shape_ok and text_ok:
            return column
    except (KeyError, TypeError, ValueError, AttributeError):
        pass
    for position, record in enumerate(records):
        if not isinstance(record, dict):
            problem = f"is a {type(record).__name__}, expected an object"
        elif key not in record:
            if default is not _REQUIRED:
                continue
            problem = f"has no '{key}'"
        elif not (isinstance(record[key], str) if kinds == "U" else _value_ok(record[key], kinds, is_box)):
            problem = f"has {key}={record[key]!r}"
        else:
            continue
        raise DataError(
            f"annotation file {ann_file}: {_record_name(section, position, record)} {problem}; every "
            f"{section} needs '{key}' as {expected}. Fix or remove that record"
        )
    raise AssertionError(f"'{key}' values failed the vectorised check but every record passed")


def _check_unique(ids: np.ndarray, section: str, ann_file: Path) -> None:
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise DataError(
            f"annotation file {ann_file}: {section} ids must be unique, but ids "
            f"{unique[counts > 1][:5].tolist()} appear more than once; renumber them"
        )


@dataclass
class _AnnotationColumns:
    """The annotation list as arrays: [N] ids, image ids, category ids, crowd flags; [N, 4] xywh boxes."""

    ann_ids: np.ndarray
    image_ids: np.ndarray
    category_ids: np.ndarray
    boxes: np.ndarray
    is_crowd: np.ndarray


class CocoDetection(Dataset):
    """COCO-format detections: ``dataset[i] -> (image uint8 [3, H, W] RGB, target)``.

    target: ``boxes`` float32 [N, 4] xyxy in original pixels, ``labels`` int64 [N] in 0..C-1
    (``label_to_category_id[label]`` gives the file's category id), ``image_id`` int, ``orig_size``
    (H, W). Then ``image, target = transforms(image, target)`` when ``transforms`` is given.
    ``image_ids`` are sorted; images without usable annotations are kept with N = 0.

    ``on_bad``: "error" raises DataError on the first bad record; "skip" drops bad records, counts
    them in ``skipped`` (reason -> count) and warns once. A malformed annotation file is always an
    error. ``verify_images`` decodes every image at construction (a tqdm bar when ``progress``) so that
    unreadable ones are found (and, with "skip", dropped) before training; images that decoded in an
    earlier run and did not change since are not decoded again (:mod:`msad_deploy.data.verify_cache`).
    Otherwise they raise DataError in ``__getitem__``; the training and evaluation loaders turn that
    into a one-line error or a skip (:mod:`msad_deploy.data.guard`).
    ``max_image_pixels`` (None or 0: no limit) refuses larger images from their header, before decoding
    (DataError in ``__getitem__``, or a bad record "image_too_large" under ``verify_images``).

    Attributes: ``coco`` (pycocotools COCO of the kept images and annotations, for evaluation),
    ``raw_json`` (the annotation file as written), ``image_ids``, ``category_ids``
    (sorted), ``class_names``, ``category_id_to_label``, ``label_to_category_id``, ``num_classes``,
    ``num_crowd`` (crowd annotations left out of the targets), ``skipped`` and ``repaired`` (Counters).
    """

    def __init__(
        self,
        image_dir: str | Path,
        ann_file: str | Path,
        transforms: Transforms | None = None,
        on_bad: str = "error",
        verify_images: bool = False,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        progress: bool = True,
    ) -> None:
        if on_bad not in ON_BAD_CHOICES:
            raise ValueError(f"on_bad must be one of {ON_BAD_CHOICES}, got {on_bad!r}")
        if max_image_pixels is not None and max_image_pixels < 0:
            raise ValueError(f"max_image_pixels must be >= 0 (0 or None: no limit), got {max_image_pixels}")
        self.max_image_pixels = max_image_pixels
        self.progress = progress
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        self.on_bad = on_bad
        self.skipped: Counter[str] = Counter()
        self.repaired: Counter[str] = Counter()
        self._notes: list[str] = []  # first example of each skip / repair, for the warnings

        data = _load_json(self.ann_file)
        # The whole file's structure first (always an error), then files and records (on_bad applies).
        self._read_categories(data["categories"])
        self._read_image_records(data["images"])
        annotations = self._read_annotation_records(data["annotations"])
        record_to_index = self._select_images(verify_images)
        self._select_annotations(annotations, record_to_index)
        self.raw_json = data
        self.coco = self._evaluation_coco(data)

        if self.skipped or self.repaired:
            counts = ", ".join(
                f"{n} {reason}" for reason, n in sorted((self.skipped + self.repaired).items())
            )
            notes = "\n  ".join(self._notes)
            warnings.warn(
                f"{self.ann_file}: skipped {sum(self.skipped.values())} bad record(s) (on_bad={on_bad!r}) and "
                f"repaired {sum(self.repaired.values())}: {counts}. First of each:\n  {notes}",
                stacklevel=2,
            )

    # ---------------------------------------------------------------- construction
    def _bad(self, reason: str, count: int, first_message: str) -> None:
        """Raise (on_bad='error') or count ``count`` dropped records of kind ``reason``."""
        if self.on_bad == "error":
            raise DataError(f"{first_message} [{count} such record(s) in {self.ann_file}; {_SKIP_HINT}]")
        self.skipped[reason] += count
        self._notes.append(f"{reason}: {first_message}")

    def _read_categories(self, categories: list[Any]) -> None:
        ids = _column(categories, "id", "category", self.ann_file, "iu", "an integer")
        _check_unique(ids, "category", self.ann_file)
        names = _column(categories, "name", "category", self.ann_file, "U", "a string")
        name_of_id = dict(zip(ids.tolist(), names.tolist()))
        self.category_ids: list[int] = sorted(name_of_id)
        self.class_names: list[str] = [name_of_id[cat_id] for cat_id in self.category_ids]
        self.category_id_to_label: dict[int, int] = {cat_id: i for i, cat_id in enumerate(self.category_ids)}
        self.label_to_category_id: list[int] = list(self.category_ids)
        self.num_classes: int = len(self.category_ids)

    def _read_image_records(self, images: list[Any]) -> None:
        """Per image record: id, width, height, file_name (structure checks only)."""
        self._record_image_ids = _column(images, "id", "image", self.ann_file, "iu", "an integer")
        _check_unique(self._record_image_ids, "image", self.ann_file)
        sizes = {}
        for key in ("width", "height"):
            sizes[key] = _column(images, key, "image", self.ann_file, "iu", "a positive integer (pixels)")
            if len(sizes[key]) and sizes[key].min() <= 0:
                position = int(np.argmin(sizes[key]))
                raise DataError(
                    f"annotation file {self.ann_file}: {_record_name('image', position, images[position])} "
                    f"has {key}={int(sizes[key][position])}; it must be the image's size in pixels"
                )
        self._record_widths, self._record_heights = sizes["width"], sizes["height"]
        self._record_file_names: list[str] = _column(
            images, "file_name", "image", self.ann_file, "U", "a path relative to the image folder"
        ).tolist()

    def _select_images(self, verify_images: bool) -> np.ndarray:
        """Check the image files. Returns [num_records] int64: dataset index of each record, -1 if dropped."""
        if not self.image_dir.is_dir():
            raise DataError(
                f"image folder not found: {self.image_dir} (images of {self.ann_file}); check the path"
            )

        usable = self._check_files_exist()
        if verify_images:
            usable &= self._check_images_decode(usable)
        records = np.flatnonzero(usable)
        self._index_to_record = records[np.argsort(self._record_image_ids[records], kind="stable")]
        self.image_ids: list[int] = self._record_image_ids[self._index_to_record].tolist()
        record_to_index = np.full(len(self._record_image_ids), -1, dtype=np.int64)
        record_to_index[self._index_to_record] = np.arange(len(self._index_to_record))
        return record_to_index

    def _check_files_exist(self) -> np.ndarray:
        """[num_records] bool: the image file exists (one directory listing, a stat for the others)."""
        listing = set(os.listdir(self.image_dir))
        exists = np.array(
            [name in listing or (self.image_dir / name).is_file() for name in self._record_file_names],
            dtype=bool,
        )
        if not exists.all():
            first = int(np.flatnonzero(~exists)[0])
            self._bad(
                "missing_image_file",
                int((~exists).sum()),
                f"image file not found: {self.image_dir / self._record_file_names[first]} (image "
                f"id={int(self._record_image_ids[first])} in {self.ann_file}); put the file there, fix its "
                "'file_name', or point image_dir at the right folder",
            )
        return exists

    def _check_images_decode(self, candidates: np.ndarray) -> np.ndarray:
        """[num_records] bool: False where a ``candidates`` image fails to decode, is over the pixel
        limit or has the wrong size. Images that decoded before (same size and mtime) are looked up in
        the :class:`~msad_deploy.data.verify_cache.VerifyCache` instead of decoded again."""
        ok = np.ones(len(candidates), dtype=bool)
        failures: dict[str, list[str]] = {
            "unreadable_image": [],
            "image_too_large": [],
            "image_size_mismatch": [],
        }
        cache = VerifyCache(self.ann_file, self.image_dir)
        records = np.flatnonzero(candidates).tolist()
        show = self.progress and _is_main_process()
        bar = tqdm(records, desc=f"verify {self.ann_file.name}", unit="img", disable=not show, leave=False)
        try:
            for record in bar:
                name = self._record_file_names[record]
                path = self.image_dir / name
                try:
                    stat = path.stat()
                    size = cache.lookup(name, stat)
                    if size is None:
                        pixels = decode_rgb(path, self.max_image_pixels)
                        size = (pixels.shape[1], pixels.shape[0])
                        del pixels
                        cache.store(name, stat, size)
                    else:  # decoded before, maybe under another limit
                        check_pixel_limit(path, size, self.max_image_pixels)
                except (DataError, OSError) as error:
                    if not isinstance(error, DataError):
                        error = DataError(f"cannot read image {path}: {one_line(error)}; {_DECODE_HINT}")
                    reason = (
                        "image_too_large" if isinstance(error, ImageTooLargeError) else "unreadable_image"
                    )
                    failures[reason].append(str(self._with_context(error, record)))
                    ok[record] = False
                    continue
                mismatch = self._size_mismatch(record, *size)
                if mismatch:
                    failures["image_size_mismatch"].append(mismatch)
                    ok[record] = False
        finally:  # keep what was verified, even when interrupted
            bar.close()
            cache.save()
        for reason, messages in failures.items():
            if messages:
                self._bad(reason, len(messages), messages[0])
        return ok

    def _with_context(self, error: DataError, record: int) -> DataError:
        """``error`` (naming the image file first) with its record's image id and annotation file added."""
        path = str(self.image_dir / self._record_file_names[record])
        context = f"{path} (image id={int(self._record_image_ids[record])} in {self.ann_file})"
        message = str(error)
        message = message.replace(path, context, 1) if path in message else f"{message} ({context})"
        return type(error)(message)

    def _size_mismatch(self, record: int, width: int, height: int) -> str | None:
        """Why a decoded ``width`` x ``height`` image does not match image record ``record``; None if it does."""
        stated_w, stated_h = int(self._record_widths[record]), int(self._record_heights[record])
        if (width, height) == (stated_w, stated_h):
            return None
        return (
            f"image size mismatch: {self.image_dir / self._record_file_names[record]} is {width}x{height} "
            f"(WxH) but its record (image id={int(self._record_image_ids[record])} in {self.ann_file}) says "
            f"{stated_w}x{stated_h}; boxes would be misplaced. Fix the record's width/height"
        )

    def _read_annotation_records(self, annotations: list[Any]) -> _AnnotationColumns:
        """Per annotation record: id, image_id, category_id, bbox, iscrowd (structure checks only)."""

        def column(key: str, kinds: str, expected: str, default: Any = _REQUIRED) -> np.ndarray:
            return _column(annotations, key, "annotation", self.ann_file, kinds, expected, default)

        ann_ids = column("id", "iu", "an integer")
        _check_unique(ann_ids, "annotation", self.ann_file)
        return _AnnotationColumns(
            ann_ids=ann_ids,
            image_ids=column("image_id", "iu", "an integer image id"),
            category_ids=column("category_id", "iu", "an integer category id"),
            boxes=column("bbox", "iuf", "[x, y, width, height] numbers").astype(np.float64),
            is_crowd=column("iscrowd", "iub", "0 or 1", default=0).astype(bool),
        )

    def _select_annotations(self, columns: _AnnotationColumns, record_to_index: np.ndarray) -> None:
        """Validate, clip and store the boxes/labels of the dataset's images, grouped per image.

        Each step narrows ``kept`` (annotation positions) and names the first annotation it drops.
        """
        ann_ids, image_ids, category_ids = columns.ann_ids, columns.image_ids, columns.category_ids
        boxes, is_crowd = columns.boxes, columns.is_crowd

        def drop(kept: np.ndarray, bad: np.ndarray, reason: str, problem: str) -> np.ndarray:
            """``kept`` without the entries marked in ``bad`` (aligned with ``kept``), reported."""
            if bad.any():
                first = int(kept[np.argmax(bad)])
                self._bad(
                    reason,
                    int(bad.sum()),
                    f"annotation id={int(ann_ids[first])} (image id={int(image_ids[first])}, "
                    f"category_id={int(category_ids[first])}, bbox={boxes[first].tolist()}) in "
                    f"{self.ann_file} {problem}",
                )
            return kept[~bad]

        # Image record of every annotation, -1 for an image id missing from 'images'.
        record_order = np.argsort(self._record_image_ids, kind="stable")
        sorted_ids = self._record_image_ids[record_order]
        slot = np.minimum(np.searchsorted(sorted_ids, image_ids), max(len(sorted_ids) - 1, 0))
        image_record = np.full(len(ann_ids), -1, dtype=np.int64)
        if len(sorted_ids):
            found = sorted_ids[slot] == image_ids
            image_record[found] = record_order[slot[found]]

        kept = np.arange(len(ann_ids))
        kept = drop(
            kept,
            image_record[kept] < 0,
            "unknown_image_id",
            "refers to an image id that is not in 'images'; add the image record or remove the annotation",
        )
        of_dropped_image = record_to_index[image_record[kept]] < 0  # their image was skipped above
        if of_dropped_image.any():
            self.skipped["annotation_of_skipped_image"] += int(of_dropped_image.sum())
            kept = kept[~of_dropped_image]
        self.num_crowd = int(is_crowd[kept].sum())
        kept = kept[~is_crowd[kept]]
        kept = drop(
            kept,
            ~np.isin(category_ids[kept], self.category_ids),
            "unknown_category",
            f"has a category_id that is not in 'categories' (known ids {self.category_ids}); fix the id or "
            "add the category",
        )

        x0, y0, width, height = boxes[kept].T
        xyxy = np.stack([x0, y0, x0 + width, y0 + height], axis=1)
        limits = np.stack([self._record_widths, self._record_heights], axis=1)[image_record[kept]]
        limits = np.tile(limits, 2).astype(np.float64)  # [K, 4]: W, H, W, H
        clipped = np.clip(xyxy, 0.0, limits)
        valid = (
            np.isfinite(xyxy).all(axis=1) & (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
        )
        kept = drop(
            kept,
            ~valid,
            "degenerate_box",
            "has zero or negative width/height inside its image (after clipping to the image) or non-finite "
            "values; fix the box or remove the annotation",
        )
        xyxy, clipped = xyxy[valid], clipped[valid]

        was_clipped = (clipped != xyxy).any(axis=1)
        if was_clipped.any():
            first = int(kept[np.argmax(was_clipped)])
            record = int(image_record[first])
            self.repaired["clipped_box"] = int(was_clipped.sum())
            self._notes.append(
                f"clipped_box: annotation id={int(ann_ids[first])} (image id={int(image_ids[first])}) in "
                f"{self.ann_file} has bbox={boxes[first].tolist()} reaching outside its "
                f"{int(self._record_widths[record])}x{int(self._record_heights[record])} image; clipped to "
                "the image and kept. Fix the box to silence this warning"
            )

        # For evaluation: the kept annotations with the boxes trained on, and the crowd annotations
        # (ignore regions) of kept images, in file order.
        of_kept_image = np.zeros(len(ann_ids), dtype=bool)
        known = image_record >= 0
        of_kept_image[known] = record_to_index[image_record[known]] >= 0
        self._gt_positions = np.union1d(kept, np.flatnonzero(is_crowd & of_kept_image))
        clipped_xywh = np.concatenate([clipped[:, :2], clipped[:, 2:] - clipped[:, :2]], axis=1)
        self._gt_repaired_boxes = dict(zip(kept[was_clipped].tolist(), clipped_xywh[was_clipped].tolist()))

        index = record_to_index[image_record[kept]]
        order = np.argsort(index, kind="stable")  # grouped per image, file order within an image
        self._boxes = clipped[order].astype(np.float32)
        self._labels = np.searchsorted(self.category_ids, category_ids[kept[order]]).astype(np.int64)
        self._offsets = np.searchsorted(index[order], np.arange(len(self.image_ids) + 1))

    def _evaluation_coco(self, data: dict[str, Any]) -> COCO:
        """COCO ground truth of exactly what training uses: kept images, their kept annotations (with
        clipped boxes; the file's ``area``, or the box area where it has none) and crowd annotations,
        every category. Records are the file's dicts, copied only where changed."""
        annotations = data["annotations"]
        kept = []
        for position in self._gt_positions.tolist():
            record = annotations[position]
            box = self._gt_repaired_boxes.get(position)
            if box is not None or "area" not in record:
                record = dict(record)
                if box is not None:
                    record["bbox"] = box
                if "area" not in record:
                    record["area"] = float(record["bbox"][2]) * float(record["bbox"][3])
            kept.append(record)
        images = [data["images"][record] for record in np.sort(self._index_to_record).tolist()]
        from pycocotools.coco import COCO  # here: the runtime imports this module, and needs no pycocotools

        coco = COCO()
        coco.dataset = {**data, "images": images, "annotations": kept}
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            coco.createIndex()
        return coco

    # ---------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        record = int(self._index_to_record[index])
        try:
            pixels = decode_rgb(self.image_dir / self._record_file_names[record], self.max_image_pixels)
        except DataError as error:
            raise self._with_context(error, record) from error
        mismatch = self._size_mismatch(record, pixels.shape[1], pixels.shape[0])
        if mismatch:
            raise DataError(mismatch)
        image = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
        start, end = int(self._offsets[index]), int(self._offsets[index + 1])
        target: Target = {
            "boxes": torch.from_numpy(self._boxes[start:end].copy()),
            "labels": torch.from_numpy(self._labels[start:end].copy()),
            "image_id": self.image_ids[index],
            "orig_size": (int(pixels.shape[0]), int(pixels.shape[1])),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target
