"""Images that arrive over HTTP (uploads, base64) and thumbnails of stored files."""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import TYPE_CHECKING

from encoder.images import decode_bytes, decode_image
from store.errors import InputError
from store.files import write_atomically

if TYPE_CHECKING:
    from PIL import Image

THUMBNAIL_DIR = "thumbnails"


def image_from_base64(text: str, max_pixels: int) -> "Image.Image":
    """Decode base64 file content (a bare string or a ``data:image/...;base64,`` URL) into RGB."""
    head, comma, tail = text.partition(",")
    payload = tail if comma and head.startswith("data:") else text
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as error:
        raise InputError("image is not valid base64: send the file's bytes base64-encoded") from error
    return decode_bytes(data, "the uploaded image", max_pixels)


def image_from_upload(data: bytes, max_pixels: int) -> "Image.Image":
    return decode_bytes(data, "the uploaded image", max_pixels)


def thumbnail(store_dir: Path, path: str, content_hash: str, size: int) -> Path | bytes:
    """A JPEG at most *size* px on its longer side, made once per file content and kept in the store
    (or returned as bytes when the store folder is read-only)."""
    target = store_dir / THUMBNAIL_DIR / content_hash[:2] / f"{content_hash}-{size}.jpg"
    if target.is_file():
        return target
    image, _ = decode_image(path, draft=(size, size))
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(target, out.getvalue())  # concurrent requests: last rename wins, same bytes
    except OSError:  # a read-only store still serves thumbnails, made each time
        return out.getvalue()
    return target
