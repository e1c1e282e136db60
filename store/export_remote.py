"""Exports to object storage (``clipdex export --out s3://bucket/prefix``), through fsspec.

A Parquet or CSV export is one object, uploaded as it is written (a multipart upload for a large
one) and completed only when the export finished: a failed export discards the upload, so no
partial object ever appears under the name. A clip-retrieval export is a prefix of objects; one
that fails removes the objects it wrote. An existing object, or a prefix holding anything, is
replaced only with ``--overwrite``, and a prefix only when it holds a previous clip-retrieval export.
"""

from __future__ import annotations

import contextlib
import re
from typing import BinaryIO, Callable

from store.errors import InputError, first_line
from store.remote import StorageOptions, filesystem

_EXPORT_PART = re.compile(r"(img_emb/img_emb_\d+\.npy|text_emb/text_emb_\d+\.npy|metadata/metadata_\d+\.parquet)")

Opener = Callable[[str], BinaryIO]  # a clip-retrieval part by its name within the export (img_emb/img_emb_0.npy)


def write_remote(url: str, storage: StorageOptions, kind: str, overwrite: bool, write: Callable) -> int:
    """``write(sink)`` to the object *url* (an open binary stream), or ``write(opener)`` to the
    prefix *url* for a clip-retrieval export; the bytes written."""
    fs, path = filesystem(url, storage)
    path = path.rstrip("/")
    try:
        existing = fs.find(path, detail=True) if kind == "clip-retrieval" else (
            {path: fs.info(path)} if fs.exists(path) else {})
    except Exception as error:  # botocore's errors are not OSErrors
        raise InputError(f"cannot reach {url}: {first_line(error)}") from error
    if existing and not overwrite:
        raise InputError(f"{url} already exists: pass --overwrite to replace it")
    if kind == "clip-retrieval":
        return _write_prefix(fs, path, url, existing, write)
    return _write_object(fs, path, write)


def _write_object(fs, path: str, write: Callable) -> int:
    handle = fs.open(path, "wb")
    try:
        write(handle)
        size = handle.tell()
    except BaseException:
        _discard(handle)
        raise
    handle.close()  # the object appears now, whole
    return size


def _discard(handle) -> None:
    """Abandon an upload: nothing appears under its name (s3fs aborts the multipart upload)."""
    discard = getattr(handle, "discard", None)
    if discard is not None:
        with contextlib.suppress(Exception):
            discard()
            handle.closed = True  # else closing it later (at garbage collection) would still try to upload
            return
    with contextlib.suppress(Exception):
        handle.close()


def _write_prefix(fs, path: str, url: str, existing: dict, write: Callable) -> int:
    relative = [name[len(path) + 1:] for name in existing]
    if existing and not all(_EXPORT_PART.fullmatch(name) for name in relative):
        raise InputError(f"{url} holds objects that are not a clip-retrieval export: left as it is, nothing exported")
    written: list[str] = []

    def opener(name: str) -> BinaryIO:
        written.append(f"{path}/{name}")
        return fs.open(written[-1], "wb")

    try:
        write(opener)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(written)
        raise
    stale = sorted(set(existing) - set(written))  # shards of a larger previous export
    if stale:
        fs.rm(stale)
    return sum(fs.size(name) for name in written)
