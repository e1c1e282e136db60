"""Decode one image file into an upright RGB picture, or say precisely why it cannot be done."""

from __future__ import annotations

import io
import os
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from store.errors import ImageError, first_line

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
ORIENTATION_TAG = 0x0112
DEFAULT_MAX_PIXELS = 100_000_000  # ~10k x 10k; above this a file is treated as a decompression bomb

# clipdex enforces its own, configurable limit before decoding; PIL's would only warn or raise late.
Image.MAX_IMAGE_PIXELS = None


def is_image_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open *path* as an RGB image with EXIF orientation applied.

    Raises :class:`ImageError` with ``reason`` one of ``missing``, ``not a file``, ``unreadable``,
    ``empty file``, ``not an image``, ``too large``, ``corrupt``.
    """
    return decode_image(path, max_pixels)[0]


def decode_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft: tuple[int, int] | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Like :func:`load_image`, also returning the upright (width, height) of the full image.

    With *draft*, JPEGs are decoded at the smallest power-of-two reduction that is still at least
    that size, several times faster when the model only needs a small input anyway.
    """
    name = _checked(path)
    with open_readable(name) as handle:
        return _decode(handle, name, max_pixels, draft)


def read_bytes(path: str | os.PathLike) -> bytearray:
    """The content of an image file, with the checks and reasons of :func:`decode_image`; a
    bytearray, so that tensors can be made of it without a copy. Opens first and asks why only when
    that fails: the embedding stage reads every file, and four stat calls per file add up."""
    name = str(path)
    try:
        handle = open(name, "rb", buffering=0)  # one read straight into the buffer below
    except OSError as error:
        _checked(name)  # names the reason: missing, dangling symlink, not a file
        raise ImageError(name, "unreadable", error.strerror or first_line(error)) from error
    with handle:
        try:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ImageError(name, "not a file")
            data = bytearray(info.st_size + 1)  # one byte more tells a file that grew meanwhile
            count = handle.readinto(data) or 0
            if count == len(data):
                data += handle.readall()
            else:
                del data[count:]
        except OSError as error:
            raise ImageError(name, "unreadable", error.strerror or first_line(error)) from error
    if not data:
        raise ImageError(name, "empty file")
    return data


def _checked(path: str | os.PathLike) -> str:
    name = str(path)
    if not os.path.lexists(name):
        raise ImageError(name, "missing", "no such file")
    if not os.path.exists(name):
        raise ImageError(name, "missing", "dangling symlink")
    if not os.path.isfile(name):
        raise ImageError(name, "not a file")
    if os.path.getsize(name) == 0:
        raise ImageError(name, "empty file")
    return name


def decode_file(handle: BinaryIO, name: str, max_pixels: int = DEFAULT_MAX_PIXELS,
                draft: tuple[int, int] | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """:func:`decode_image` of a file already opened (and checked) by the caller."""
    return _decode(handle, name, max_pixels, draft)


def decode_bytes(data: bytes, name: str = "upload", max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image file content held in memory (an HTTP upload) with the same checks as a file."""
    if not data:
        raise ImageError(name, "empty file")
    return _decode(io.BytesIO(data), name, max_pixels, None)[0]


@contextmanager
def open_readable(name: str) -> Iterator[BinaryIO]:
    try:
        handle = open(name, "rb")
    except PermissionError as error:
        raise ImageError(name, "unreadable", error.strerror or "permission denied") from error
    except OSError as error:
        raise ImageError(name, "unreadable", error.strerror or first_line(error)) from error
    with handle:
        yield handle


def _decode(handle: BinaryIO, name: str, max_pixels: int,
            draft: tuple[int, int] | None) -> tuple[Image.Image, tuple[int, int]]:
    try:
        image = Image.open(handle)
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(name, "too large", f"{width}x{height} pixels, limit {max_pixels:,}")
        if image.getexif().get(ORIENTATION_TAG, 1) in (5, 6, 7, 8):
            width, height = height, width
        if draft and image.format == "JPEG":
            image.draft("RGB", draft)
        image.load()  # truncated data raises OSError (ImageFile.LOAD_TRUNCATED_IMAGES stays False)
        return to_rgb(image), (width, height)
    except ImageError:
        raise
    except PermissionError as error:
        raise ImageError(name, "unreadable", error.strerror or "permission denied") from error
    except UnidentifiedImageError as error:
        raise ImageError(name, "not an image", "unrecognised content") from error
    except (OSError, SyntaxError, ValueError, Warning, Image.DecompressionBombError) as error:
        raise ImageError(name, "corrupt", first_line(error, 200)) from error


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright 8-bit RGB: transparency composited on white, 16-bit scaled rather than clipped."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 257.0
        image = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")
