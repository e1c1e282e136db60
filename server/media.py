"""Images that arrive over HTTP (uploads, base64), the indexed files a row may serve, and their
thumbnails."""

from __future__ import annotations

import base64
import binascii
import errno
import io
import os
import stat
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Sequence

from encoder.images import decode_bytes, decode_file
from store.errors import GoneError, InputError, NotFoundError
from store.files import FILE_MODE, bytes_hash, is_under, stream_hash, thumbnail_file
from store.nofollow import folder_beneath, open_no_symlinks, replace_beneath
from store.remote import is_url
from store.tables import IDENTITY_COLUMNS, file_identity, file_path, shard_path

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

    A row serves only its own file: one under a folder indexed into the store, reached from the
    root down without following any symbolic link but the one the index recorded for the row, and
    that is the very file indexed: the same (device, inode, ctime) as recorded (ctime changes on
    every write, rename or chmod and cannot be set back), or else of the recorded content. Rows of
    imported features have no file and serve nothing. The checks run on the open descriptor, so
    nothing can be swapped in between checking and sending; every failure closes it.
    """
    image_id, shown = row["id"], row["path"]
    if row["bytes"] is None or row["mtime"] is None:
        raise NotFoundError(f"image {image_id} has no file here: its features were imported")
    path = file_path(row["path"], row["path_bytes"])
    if is_url(path):
        raise NotFoundError(f"image {image_id} is in object storage ({shown}): the server serves local files only")
    if not any(is_under(path, root) for root in roots):
        raise NotFoundError(f"image {image_id} is not under a folder indexed into this store"
                            + ("" if roots else " (run `clipdex index` on the store to record its folders)"))
    if row.get("shard") is not None:
        return _open_member(row, content_hash)
    linked = row.get("link_target") is not None
    target = os.fsdecode(row["link_target"]) if linked else path
    if linked and os.path.realpath(path) != target:
        raise GoneError(f"image {image_id} ({shown}) now leads to another file than the one indexed")
    try:
        if linked:  # the link itself must still lie in its indexed folder, reached without links
            os.close(open_no_symlinks(os.path.dirname(path), _SEARCH_FLAGS))
        fd = open_no_symlinks(target, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise NotFoundError(f"image {image_id} was indexed from {shown}, which is no longer there") from None
    except PermissionError:
        raise NotFoundError(f"image {image_id} is at {shown}, which the server is not allowed to read") from None
    except OSError as error:  # ELOOP, ENOTDIR: a folder or the file swapped for a link since indexing
        raise GoneError(f"image {image_id} ({shown}) changed since it was indexed "
                        f"({errno.errorcode.get(error.errno, 'error')})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # before fdopen, which refuses a folder with an error of its own
            raise GoneError(f"image {image_id} ({shown}) is no longer a regular file")
        handle = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    try:
        _check_same_file(handle, row, content_hash)
        return handle
    except BaseException:
        handle.close()
        raise


def _open_member(row: dict, content_hash: str) -> BinaryIO:
    """An image inside a webdataset shard: its bytes at the recorded offset of the shard reached
    without links, served while the shard is the one indexed (the same device, inode, ctime and
    size) or, in a shard written again, while the bytes there are still the indexed content."""
    image_id, shown = row["id"], row["path"]
    try:
        fd = open_no_symlinks(shard_path(row), os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise NotFoundError(f"image {image_id} was indexed from the shard {row['shard']}, which is no longer there") from None
    except PermissionError:
        raise NotFoundError(f"image {image_id} is in {row['shard']}, which the server is not allowed to read") from None
    except OSError as error:
        raise GoneError(f"image {image_id} ({shown}) changed since it was indexed "
                        f"({errno.errorcode.get(error.errno, 'error')})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise GoneError(f"image {image_id} ({shown}): its shard is no longer a regular file")
        same = (tuple(row.get(name) for name in IDENTITY_COLUMNS) == file_identity(info)
                and info.st_size == row["shard_bytes"])
        size, offset = row["bytes"], row["shard_offset"]
        data = os.pread(fd, size, offset) if offset + size <= info.st_size else b""
        while 0 < len(data) < size and (more := os.pread(fd, size - len(data), offset + len(data))):
            data += more
    finally:
        os.close(fd)
    if len(data) != size or (not same and bytes_hash(data, content_hash) != row["hash"]):
        raise GoneError(f"image {image_id} ({shown}) changed since it was indexed: index the shard again")
    handle = io.BytesIO(data)
    handle.name = shown
    return handle


def served_size(handle: BinaryIO) -> int:
    """The length of what an opened row serves (a file, or a member's bytes)."""
    if isinstance(handle, io.BytesIO):
        return handle.getbuffer().nbytes
    return os.fstat(handle.fileno()).st_size


_SEARCH_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY
# Files whose content was checked against their row's hash, by what the kernel says of them: a
# descriptor with the same (device, inode, ctime, size) holds the same bytes (any write moves ctime).
_VERIFIED: OrderedDict[tuple, None] = OrderedDict()
_VERIFIED_MAX = 4096
_VERIFIED_LOCK = threading.Lock()


def _check_same_file(handle: BinaryIO, row: dict, content_hash: str) -> None:
    image_id, shown = row["id"], row["path"]
    info = os.fstat(handle.fileno())
    identity = file_identity(info)
    recorded = tuple(row.get(name) for name in IDENTITY_COLUMNS)
    if recorded == identity and info.st_size == row["bytes"]:
        return
    # Another inode, or an older store that recorded none: only the indexed content will do.
    key = (image_id, row["hash"], *identity, info.st_size)
    with _VERIFIED_LOCK:
        if key in _VERIFIED:
            _VERIFIED.move_to_end(key)
            return
    if stream_hash(handle, content_hash) != row["hash"]:
        raise GoneError(f"image {image_id} ({shown}) changed since it was indexed: index the folder again")
    handle.seek(0)
    with _VERIFIED_LOCK:
        _VERIFIED[key] = None
        while len(_VERIFIED) > _VERIFIED_MAX:
            _VERIFIED.popitem(last=False)


MAX_THUMBNAIL_BYTES = 4 << 20  # a 1024 px JPEG at quality 85 is a few hundred KB


def thumbnail(store_dir: Path, handle: BinaryIO, content_hash: str, size: int, name: str | None = None) -> bytes:
    """A JPEG at most *size* px on its longer side of the opened file, made once per content and
    kept in the store's thumbnails/ (when the store can be written). The cache is read and written
    without following any link: a link, folder or device planted in it is removed and the
    thumbnail made again, so a writer of thumbnails/ cannot make the server send another file.
    Nothing is created where the store folder itself has gone. *name*: the row's path, whose
    extension says how a file Pillow does not open itself is opened (HEIC, camera RAW)."""
    target = thumbnail_file(store_dir, content_hash, size)
    parts = target.relative_to(store_dir).parts
    try:
        store_fd = os.open(store_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        store_fd = None
    try:
        cached = _cached(store_fd, parts) if store_fd is not None else None
        if cached is not None:
            return cached
        image, _ = decode_file(handle, name or str(getattr(handle, "name", handle)), draft=(size, size))
        image.thumbnail((size, size))
        out = io.BytesIO()
        image.save(out, "JPEG", quality=85)
        if store_fd is not None:
            _keep(store_fd, parts, out.getvalue())
        return out.getvalue()
    finally:
        if store_fd is not None:
            os.close(store_fd)


def _cached(store_fd: int, parts: Sequence[str]) -> bytes | None:
    """The kept thumbnail if it is a regular file reached without links; anything else in its
    place is removed (and None returned, so it is made again)."""
    relative = os.path.join(*parts)
    try:
        fd = open_no_symlinks(relative, os.O_RDONLY | os.O_NONBLOCK, dir_fd=store_fd)
    except FileNotFoundError:
        return None
    except OSError:  # a link on the way or in its place; _keep replaces whatever is in the way
        return None
    try:
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode) and 0 < info.st_size <= MAX_THUMBNAIL_BYTES:
            return os.read(fd, MAX_THUMBNAIL_BYTES)
        return None
    finally:
        os.close(fd)


def _keep(store_fd: int, parts: Sequence[str], data: bytes) -> None:
    try:
        folder = folder_beneath(store_fd, parts[:-1])
    except OSError:  # a read-only store serves thumbnails made on each request
        return
    try:
        replace_beneath(folder, parts[-1], data, FILE_MODE)  # concurrent requests: last rename wins, same bytes
    except OSError:
        pass
    finally:
        os.close(folder)
