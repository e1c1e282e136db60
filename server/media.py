"""Images that arrive over HTTP (uploads, base64), the indexed files a row may serve, and their
thumbnails."""

from __future__ import annotations

import base64
import binascii
import errno
import io
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Sequence

from encoder.images import decode_bytes, decode_file
from store.errors import GoneError, InputError, NotFoundError
from store.files import is_under, stream_hash, thumbnail_file, write_atomically
from store.tables import file_path

if TYPE_CHECKING:
    from PIL import Image


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


def open_indexed(row: dict, roots: Sequence[str], content_hash: str) -> BinaryIO:
    """The file a row was indexed from, opened, or NotFoundError (404) / GoneError (410).

    A row serves only its own file: one under a folder indexed into the store, whose path still
    leads to the real file it led to when indexed (a symlink re-pointed at /etc/passwd does not),
    a regular file of the recorded size and modification time, or else of the recorded content.
    Rows of imported features have no file and serve nothing. The checks run on the open file, so
    nothing can be swapped in between checking and sending.
    """
    image_id, shown = row["id"], row["path"]
    if row["bytes"] is None or row["mtime"] is None:
        raise NotFoundError(f"image {image_id} has no file here: its features were imported")
    path = file_path(row["path"], row["path_bytes"])
    if not any(is_under(path, root) for root in roots):
        raise NotFoundError(f"image {image_id} is not under a folder indexed into this store"
                            + ("" if roots else " (run `clipdex index` on the store to record its folders)"))
    expected = os.fsdecode(row["link_target"]) if row.get("link_target") is not None else path
    if os.path.realpath(path) != expected:
        raise GoneError(f"image {image_id} ({shown}) now leads to another file than the one indexed")
    try:
        fd = os.open(expected, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise NotFoundError(f"image {image_id} was indexed from {shown}, which is no longer there") from None
    except PermissionError:
        raise NotFoundError(f"image {image_id} is at {shown}, which the server is not allowed to read") from None
    except OSError as error:  # ELOOP: swapped for a symlink after the check above
        raise GoneError(f"image {image_id} ({shown}) changed since it was indexed ({errno.errorcode.get(error.errno, '')})") from None
    handle = os.fdopen(fd, "rb")
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise GoneError(f"image {image_id} ({shown}) is no longer a regular file")
        if (info.st_size, info.st_mtime) != (row["bytes"], row["mtime"]) and stream_hash(handle, content_hash) != row["hash"]:
            raise GoneError(f"image {image_id} ({shown}) changed since it was indexed: index the folder again")
        handle.seek(0)
        return handle
    except BaseException:
        handle.close()
        raise


def thumbnail(store_dir: Path, handle: BinaryIO, content_hash: str, size: int) -> Path | bytes:
    """A JPEG at most *size* px on its longer side of the opened file, made once per content and
    kept in the store (or returned as bytes when the store cannot be written). Nothing is created
    where the store folder itself has gone."""
    target = thumbnail_file(store_dir, content_hash, size)
    if target.is_file():
        return target
    image, _ = decode_file(handle, getattr(handle, "name", "image"), draft=(size, size))
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    try:
        target.parent.parent.mkdir(exist_ok=True)  # not parents=True: a vanished store stays vanished
        target.parent.mkdir(exist_ok=True)
        write_atomically(target, out.getvalue())  # concurrent requests: last rename wins, same bytes
    except OSError:
        return out.getvalue()
    return target
