"""Which files are images, and how the formats Pillow does not open by itself are opened.

- Pillow's own: JPEG, PNG, WebP, BMP, GIF, TIFF, and AVIF (Pillow 11.3 and later, built with
  libavif); animated files by their first frame.
- HEIC/HEIF through pillow-heif's opener, registered the first time such a file is opened. libheif
  applies the file's rotation and mirroring itself, and says so by an EXIF orientation of 1.
- Camera RAW through libraw (rawpy): the embedded JPEG preview where there is one (a full-size one
  in current cameras' files), turned by the camera's orientation, which libraw reads from the RAW
  header because the preview usually carries none. Without a JPEG preview, libraw develops the raw
  data at half size.

A recognised extension whose library is missing in this installation is an ``ImageError`` with
reason ``unsupported format`` that names the package: a failure recorded, never a file skipped.
"""

from __future__ import annotations

import io
import os
from typing import BinaryIO

from PIL import Image, features

from store.errors import ImageError, first_line

PILLOW_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
AVIF_EXTENSIONS = frozenset({".avif"})
HEIF_EXTENSIONS = frozenset({".heic", ".heif", ".hif"})
RAW_EXTENSIONS = frozenset({".dng", ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".raf", ".orf",
                            ".rw2", ".pef", ".srw", ".x3f", ".3fr", ".iiq", ".erf", ".kdc", ".mrw"})
IMAGE_EXTENSIONS = PILLOW_EXTENSIONS | AVIF_EXTENSIONS | HEIF_EXTENSIONS | RAW_EXTENSIONS
# libraw's flip (0, 3, 5, 6) as the EXIF orientation that turns the picture upright
FLIP_ORIENTATION = {0: 1, 3: 3, 5: 8, 6: 6}

_heif_registered = False


def suffix(name: str | os.PathLike) -> str:
    return os.path.splitext(os.fspath(name))[1].lower()


def open_image(handle: BinaryIO, name: str, max_pixels: int) -> tuple[Image.Image, int | None]:
    """The file as a (lazily decoded) Pillow image, and the EXIF orientation to give it where its
    own metadata would not (a RAW file's preview), else None."""
    kind = suffix(name)
    if kind in HEIF_EXTENSIONS or (kind not in IMAGE_EXTENSIONS and _looks_heif(handle)):  # an upload has no name
        _register_heif(name)
    elif kind in AVIF_EXTENSIONS and not features.check("avif"):
        raise ImageError(name, "unsupported format", "this Pillow was built without AVIF (libavif): pip install "
                         "'pillow>=11.3'")
    elif kind in RAW_EXTENSIONS:
        return _raw(handle, name, max_pixels)
    return Image.open(handle), None


HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")


def _looks_heif(handle: BinaryIO) -> bool:
    """An ISO-BMFF file whose brand is HEIF's (bytes 4-12: ``ftyp`` and the brand)."""
    if not hasattr(handle, "read"):  # a path: Pillow opens it by its name
        return False
    try:
        start = handle.tell()
        head = handle.read(12)
        handle.seek(start)
    except (OSError, ValueError):
        return False
    return head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS


def _register_heif(name: str) -> None:
    global _heif_registered
    if _heif_registered:
        return
    try:
        import pillow_heif
    except ImportError as error:
        raise ImageError(name, "unsupported format", "HEIC/HEIF needs pillow-heif: pip install pillow-heif") from error
    pillow_heif.register_heif_opener()
    _heif_registered = True


def _raw(handle: BinaryIO, name: str, max_pixels: int) -> tuple[Image.Image, int | None]:
    try:
        import rawpy
    except ImportError as error:
        raise ImageError(name, "unsupported format", "camera RAW files need rawpy: pip install rawpy") from error
    try:
        with rawpy.imread(io.BytesIO(handle.read())) as raw:
            orientation = FLIP_ORIENTATION.get(raw.sizes.flip, 1)
            try:
                thumb = raw.extract_thumb()
            except (rawpy.LibRawNoThumbnailError, rawpy.LibRawUnsupportedThumbnailError):
                thumb = None
            if thumb is not None and thumb.format == rawpy.ThumbFormat.JPEG:
                return Image.open(io.BytesIO(thumb.data)), orientation
            width, height = raw.sizes.width, raw.sizes.height
            if width * height > max_pixels:
                raise ImageError(name, "too large", f"{width}x{height} pixels, limit {max_pixels:,}")
            # No JPEG preview: libraw develops the raw data (turned upright by it), at half size.
            developed = raw.postprocess(use_camera_wb=True, half_size=True, output_bps=8)
            return Image.fromarray(developed), None
    except ImageError:
        raise
    except rawpy.LibRawFileUnsupportedError as error:
        raise ImageError(name, "not an image", "libraw does not recognise it as a camera RAW file") from error
    except (rawpy.LibRawError, OSError, ValueError) as error:
        raise ImageError(name, "corrupt", first_line(error, 200)) from error
