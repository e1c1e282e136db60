"""Decode one image file into an upright RGB picture, or say precisely why it cannot be done."""

from __future__ import annotations

import io
import os
import stat
from contextlib import contextmanager
from typing import BinaryIO, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from encoder.formats import IMAGE_EXTENSIONS, open_image
from store.errors import ImageError, first_line

ORIENTATION_TAG = 0x0112
DEFAULT_MAX_PIXELS = 100_000_000  # ~10k x 10k; above this a file is treated as a decompression bomb

# clipdex enforces its own, configurable limit before decoding; PIL's would only warn or raise late.
Image.MAX_IMAGE_PIXELS = None


def is_image_path(path: str | os.PathLike) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


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
    bytearray, so that tensors can be made of it without a copy.

    The embedding stage reads every file on threads that give up the GIL at each system call and
    wait for it after: so three calls (open, fstat, read) and no file object, and the reasons are
    looked for only when the open fails. O_NONBLOCK: a FIFO put in a file's place cannot hang a reader.
    """
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        _checked(name)  # names the reason: missing, dangling symlink, not a file
        raise ImageError(name, "unreadable", error.strerror or first_line(error)) from error
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageError(name, "not a file")
        data = _read_open(fd, info.st_size)
    except OSError as error:
        raise ImageError(name, "unreadable", error.strerror or first_line(error)) from error
    finally:
        os.close(fd)
    if not data:
        raise ImageError(name, "empty file")
    return data


def read_member(shard: str | os.PathLike, offset: int, size: int, name: str) -> bytearray:
    """The *size* bytes at *offset* in *shard*: an image inside a webdataset tar, with the reasons
    of :func:`read_bytes` under the member's *name* (``truncated``: the shard now ends first)."""
    try:
        fd = os.open(shard, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError as error:
        raise ImageError(name, "missing", "its shard is gone") from error
    except OSError as error:
        raise ImageError(name, "unreadable", error.strerror or first_line(error)) from error
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ImageError(name, "not a file", "its shard is not a regular file")
        data = bytearray()
        while len(data) < size and (chunk := os.pread(fd, size - len(data), offset + len(data))):
            data += chunk
    except OSError as error:
        raise ImageError(name, "unreadable", error.strerror or first_line(error)) from error
    finally:
        os.close(fd)
    if len(data) < size:
        raise ImageError(name, "truncated", f"its shard ends {size - len(data)} bytes before the member does")
    if not data:
        raise ImageError(name, "empty file")
    return data


def _read_open(fd: int, size: int) -> bytearray:
    """Every byte of the open file *fd*, which fstat said holds *size*: one read for a local file."""
    data = bytearray(size + 1)  # one byte more tells a file that grew meanwhile
    got = 0
    with memoryview(data) as view:
        while count := os.readv(fd, [view[got:]]):
            got += count
            if got >= size:  # a short read (a network file system) goes on
                break
    if got > size:
        while chunk := os.read(fd, 1 << 20):
            data += chunk
    else:
        del data[got:]
    return data


def jpeg_orientation(data: bytes | bytearray) -> int | None:
    """The EXIF orientation of a JPEG's bytes (1 without one), as Pillow reads it, from the header
    segments alone; None where Pillow might read it differently (XMP, an Exif block split over
    segments, any header it would have to make sense of), so that the caller asks Pillow.

    Pillow's own header parse is Python and costs ~30 µs a file: when the device decodes, that was
    most of the host's work per image. Only the Exif block itself goes to Pillow here.
    """
    exif, at, end = None, 2, len(data)
    while True:
        if at + 4 > end or data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xDA:  # start of scan: every header segment has been seen
            break
        if marker in (0x00, 0x01, 0xD8, 0xD9, 0xFF) or 0xD0 <= marker <= 0xD7:  # fill bytes, no-length markers
            return None
        length = (data[at + 2] << 8) | data[at + 3]
        if length < 2 or at + 2 + length > end:
            return None
        if marker == 0xE1:  # Exif, XMP (Pillow also takes orientation from XMP) or an extension
            if exif is not None or not data.startswith(b"Exif\x00\x00", at + 4):
                return None
            exif = bytes(data[at + 4:at + 2 + length])
        at += 2 + length
    if exif is None:
        return 1
    try:
        parsed = Image.Exif()
        parsed.load(exif)
        return int(parsed.get(ORIENTATION_TAG, 1))
    except Exception:  # Pillow decides what a malformed block means
        return None


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
        image, orientation = open_image(handle, name, max_pixels)
        if orientation is not None:  # where the file says it elsewhere than in the picture's own EXIF
            image.getexif()[ORIENTATION_TAG] = orientation
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
