"""Every image a :class:`~msad_deploy.runtime.Detector` accepts -> uint8 RGB [3, H, W], or one clear error.

Accepted (see :func:`to_rgb_tensor`):

- a path (``str`` / ``os.PathLike``) or encoded bytes (``bytes``, ``bytearray``, ``memoryview``):
  decoded with PIL; every mode (gray, palette, RGBA, CMYK, 16-bit, ...) becomes 8-bit RGB
  (:func:`msad_deploy.data.coco.image_to_rgb`); the pixel count is checked from the header, before
  any pixel is decoded (decompression bombs), and truncated files are refused;
  :func:`decode_image_reduced` also decodes at a reduced size when the caller needs fewer pixels
  (JPEG: DCT scaling via ``draft``, checked against the limit at the size it will decode to; other
  formats: an integer box-filter ``reduce`` after decoding), so a service pays for what its model sees;
- a ``PIL.Image.Image`` (any mode, converted the same way);
- a ``numpy.ndarray`` uint8 ``[H, W, 3]`` RGB (``bgr=True`` for OpenCV frames), ``[H, W, 4]``
  RGBA/BGRA (alpha dropped), ``[H, W]`` or ``[H, W, 1]`` gray; any strides (views, slices, negative
  steps) are copied into a contiguous image;
- a ``torch.Tensor`` uint8, laid out like numpy: ``[H, W, C]`` with C in (1, 3, 4), or ``[H, W]``.
  A tensor whose last dimension is not 1, 3 or 4 but whose first is is taken as ``[C, H, W]``
  (torchvision's layout), so ``[3, H, W]`` works when W is not 1, 3 or 4.

Errors are :class:`InvalidImageError` (a ``ValueError``) naming the problem and the fix,
:class:`~msad_deploy.data.coco.ImageTooLargeError` for images over the pixel limit, and
``FileNotFoundError`` / ``IsADirectoryError`` for paths. Nothing here keeps state between calls.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from msad_deploy.data.coco import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DataError,
    ImageTooLargeError,
    image_to_rgb,
    one_line,
    without_pil_pixel_guard,
)

# Smaller images carry no detectable object and resize into degenerate network inputs.
MIN_IMAGE_SIDE = 8
ENCODED_TYPES = (bytes, bytearray, memoryview)


class InvalidImageError(DataError):
    """An input that is not a usable image (wrong type, dtype, rank, channels, size, or bytes that do
    not decode); the message names the problem. A ``ValueError``, so ``msad`` prints it as one line."""


def describe(image: Any) -> str:
    """A short name for an input in error messages: its path, or its type and shape."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    if isinstance(image, ENCODED_TYPES):
        return f"{len(image)} bytes"
    shape = getattr(image, "shape", None)
    if shape is not None:
        return f"{type(image).__name__} of shape {tuple(shape)} ({getattr(image, 'dtype', '?')})"
    if isinstance(image, Image.Image):
        return f"PIL image {image.width}x{image.height} ({image.mode})"
    return type(image).__name__


def _check_pixels(label: str, width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels and width * height > max_pixels:
        raise ImageTooLargeError(
            f"{label} is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
            "pixels (max_pixels, --max-pixels on msad predict and msad serve; a decompression bomb "
            "guard): downscale the image or raise the limit"
        )


def decode_image(source: str | os.PathLike | bytes, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
    """Decode a file or encoded bytes to uint8 RGB ``[H, W, 3]``, the size checked before decoding."""
    return _decode(source, max_pixels, None)[0]


def decode_image_reduced(
    source: str | os.PathLike | bytes,
    max_pixels: int | None,
    needed: Callable[[int, int], tuple[int, int]],
) -> tuple[np.ndarray, tuple[int, int]]:
    """(uint8 RGB ``[h, w, 3]``, original (H, W)): decoded no smaller than ``needed(H, W)`` requires.

    ``needed`` maps the original (height, width) to the smallest (height, width) the caller can use. A
    JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps that size, and ``max_pixels``
    applies to the pixels it decodes (a 9000x9000 JPEG for a 128-px model decodes 1125x1125); other
    formats decode in full (the limit applies to their full size) and are then reduced by the largest
    integer factor (box filter) that keeps ``needed``. Errors as :func:`decode_image`.
    """
    return _decode(source, max_pixels, needed)


def _open_source(source: str | os.PathLike | bytes) -> tuple[Any, str]:
    """(what PIL opens, a label for messages); empty data, folders and missing files refused here."""
    if isinstance(source, ENCODED_TYPES):
        data = bytes(source)
        if not data:
            raise InvalidImageError("the image data is empty (0 bytes): send a JPEG, PNG or other image file")
        return io.BytesIO(data), f"the image data ({len(data)} bytes)"
    path = Path(source)
    if path.is_dir():
        raise IsADirectoryError(21, "is a directory, not an image file", str(path))
    if not path.is_file():
        raise FileNotFoundError(2, "no such image file", str(path))
    if path.stat().st_size == 0:
        raise InvalidImageError(f"image file {path} is empty (0 bytes)")
    return path, f"image {path}"


def _decode(
    source: str | os.PathLike | bytes,
    max_pixels: int | None,
    needed: Callable[[int, int], tuple[int, int]] | None,
) -> tuple[np.ndarray, tuple[int, int]]:
    stream, label = _open_source(source)
    try:
        # PIL's process-wide bomb guard is off only while the header is read (under its lock): our own
        # limit is checked from the header, then pixels are decoded without holding the lock.
        with without_pil_pixel_guard():
            image = Image.open(stream)
        with image:
            original = (image.height, image.width)
            target = needed(*original) if needed is not None else None
            if target is not None and image.format == "JPEG":
                image.draft(None, (max(1, target[1]), max(1, target[0])))  # sets the size it will decode
                if image.size != (original[1], original[0]):
                    label = f"{label} (a {original[1]}x{original[0]} JPEG decoded at a reduced scale)"
            _check_pixels(label, image.width, image.height, max_pixels)
            factor = 1
            if target is not None:
                factor = max(1, min(image.height // max(1, target[0]), image.width // max(1, target[1])))
            if factor > 1 and image.mode in ("RGB", "L"):  # reduce before the RGB copy
                return image_to_rgb(image.reduce(factor)), original
            rgb = image_to_rgb(image)
        if factor > 1:  # other modes: to RGB first (reduce does not take palettes, 1-bit, 16-bit)
            rgb = np.asarray(Image.fromarray(rgb).reduce(factor))
        return rgb, original
    except DataError:
        raise
    except UnidentifiedImageError as error:
        raise InvalidImageError(
            f"{label} is not an image format PIL can read (JPEG, PNG, BMP, TIFF, WebP, ...)"
        ) from error
    except Exception as error:  # truncated or corrupt data: OSError, SyntaxError, ValueError, EOFError...
        raise InvalidImageError(
            f"cannot decode {label}: {type(error).__name__}: {one_line(error)} (truncated or corrupt?)"
        ) from error


def _hwc_to_rgb(array: Any, bgr: bool, label: str) -> Any:
    """uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] (numpy or torch) -> [H, W, 3] RGB."""
    if array.ndim == 2:
        array = array[:, :, None]
    channels = array.shape[2]
    if channels not in (1, 3, 4):
        raise InvalidImageError(
            f"{label}: {channels} channels; expected an [H, W, 3] RGB image ([H, W] / [H, W, 1] gray and "
            "[H, W, 4] RGBA are converted)"
        )
    if channels == 1:
        return array.repeat(1, 1, 3) if isinstance(array, torch.Tensor) else np.repeat(array, 3, axis=2)
    array = array[:, :, :3]  # RGBA / BGRA: drop alpha
    if bgr:
        return array.flip(2) if isinstance(array, torch.Tensor) else array[:, :, ::-1]
    return array


def _check_dtype_and_rank(dtype: Any, ndim: int, shape: tuple, label: str) -> None:
    if str(dtype) not in ("uint8", "torch.uint8"):
        hint = (
            " (floats in 0..1: multiply by 255; then .round() and cast to uint8)"
            if "float" in str(dtype)
            else ""
        )
        raise InvalidImageError(f"{label}: dtype {dtype}; images must be uint8 (0..255){hint}")
    if ndim not in (2, 3):
        more = " (pass a list of images for a batch)" if ndim == 4 else ""
        raise InvalidImageError(
            f"{label}: {ndim} dimensions; expected an image [H, W, 3] (or [H, W] gray){more}"
        )
    if 0 in shape:
        raise InvalidImageError(f"{label}: empty image (shape {tuple(shape)})")


def to_rgb_tensor(
    image: Any,
    *,
    bgr: bool = False,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    min_side: int = MIN_IMAGE_SIDE,
) -> torch.Tensor:
    """One input (see the module docstring) -> contiguous uint8 RGB ``[3, H, W]`` tensor.

    ``bgr`` applies to arrays and tensors only (decoded files are RGB). ``max_pixels`` (None or 0: no
    limit) bounds every input's pixel count; ``min_side`` is the smallest height/width accepted.
    Tensors keep their device; everything else comes back on the CPU.
    """
    label = describe(image)
    if isinstance(image, (str, os.PathLike, *ENCODED_TYPES)):
        hwc: Any = decode_image(image, max_pixels)
    elif isinstance(image, Image.Image):
        _check_pixels(label, image.width, image.height, max_pixels)
        try:
            hwc = image_to_rgb(image)
        except Exception as error:  # a lazily opened image whose data is corrupt
            raise InvalidImageError(
                f"cannot decode {label}: {type(error).__name__}: {one_line(error)}"
            ) from error
    elif isinstance(image, np.ndarray):
        _check_dtype_and_rank(image.dtype, image.ndim, image.shape, label)
        hwc = _hwc_to_rgb(image, bgr, label)
    elif isinstance(image, torch.Tensor):
        _check_dtype_and_rank(image.dtype, image.ndim, tuple(image.shape), label)
        if image.ndim == 3 and image.shape[-1] not in (1, 3, 4) and image.shape[0] in (1, 3, 4):
            image = image.permute(1, 2, 0)  # [C, H, W] -> [H, W, C]
        hwc = _hwc_to_rgb(image.detach(), bgr, label)
    else:
        raise InvalidImageError(
            f"cannot read an image from a {label}; pass a path, bytes, a PIL image, a uint8 numpy array "
            "[H, W, 3] or a uint8 torch tensor [H, W, 3] / [3, H, W] (or a list of them)"
        )
    height, width = int(hwc.shape[0]), int(hwc.shape[1])
    if not isinstance(image, (str, os.PathLike, *ENCODED_TYPES, Image.Image)):
        _check_pixels(label, width, height, max_pixels)
    if min(height, width) < min_side:
        raise InvalidImageError(
            f"{label}: the image is {width}x{height} pixels; each side must be at least {min_side} pixels"
        )
    if isinstance(hwc, torch.Tensor):
        return hwc.permute(2, 0, 1).contiguous()
    # A copy: views with any strides work, and a caller reusing its buffer cannot change our input.
    return torch.from_numpy(np.array(hwc, dtype=np.uint8, order="C", copy=True)).permute(2, 0, 1).contiguous()
