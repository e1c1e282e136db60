"""Webdataset shards as index inputs: each image inside a ``.tar`` is a row.

A shard is a tar of members ``KEY.EXT`` (img2dataset's layout: ``KEY.jpg`` beside ``KEY.txt``, its
caption, and ``KEY.json``, its metadata). An image member becomes a row whose path is
``SHARD.tar/NAME``, with the columns ``shard`` and ``key``; its id is kept across runs by that path,
so by (shard, key). The row records where the member's data lies in the shard and the shard's size,
mtime and identity (indexing, serving and thumbnails read the member by that offset).

A shard whose size, mtime and identity match every row recorded from it, and that left no failure,
is unchanged: its rows are taken as they are and the shard is not opened. Any other shard is
listed: its headers read (the tar reader seeks past member data), its captions and metadata read;
the planner then compares its members with their rows as it compares files, so a shard written
again with the same images moves their rows instead of embedding them again.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import re
import stat
import tarfile
from collections import Counter
from dataclasses import replace
from typing import Callable, Collection, Iterator

import numpy as np
import pyarrow as pa

from encoder.images import is_image_path
from indexer.scanner import Failure, FoundFile, Member, Scan
from indexer.stored import StoredRow, StoredRows
from store.errors import first_line
from store.remote import StorageOptions, filesystem, is_url
from store.sharded import Workers
from store.sources.metadata import column_name, extra_columns
from store.tables import IDENTITY_COLUMNS, file_identity, file_path, image_schema, split_path

LOG = logging.getLogger(__name__)
MAX_TEXT_MEMBER = 1 << 20  # a caption or a metadata member larger than this is not read
MAX_METADATA_FIELDS = 100  # JSON fields that become columns in one run, the most common first
REMOTE_BLOCK = 8 << 20  # a shard in object storage is read in ranges of this size while it is listed
# webdataset's own split of a member name into key and field: the key runs to the first dot of the file name.
_KEY_FIELD = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def list_shards(found: Scan, rows: StoredRows | pa.Table, failed: Collection[str],
                progress: Callable[[int], None] | None = None, workers: Workers | None = None) -> Scan:
    """*found* with the images of its shards among its files: an unchanged shard's from its
    stored *rows* (which have store.tables.FILE_COLUMNS), a changed or new one's from its tar.
    *failed*: the failure paths the store holds (a shard that left one is listed again, so
    its failed members are tried again like failed files). Members' metadata is typed here,
    across every shard listed, and the fields it needs are the scan's ``metadata_fields``.
    *workers* (a cluster's): the shards to list are listed there, each by the worker that reads
    it, so a driver never reads the shards of a dataset in object storage itself."""
    if not found.shards:
        return found
    rows = rows if isinstance(rows, StoredRows) else StoredRows(rows)
    by_shard = _rows_by_shard(rows)
    failures_sorted = sorted(failed)
    files, failures, listed, to_list = list(found.files), list(found.failures), [], []
    for shard in found.shards:
        text = split_path(shard.path)[0]
        rows_of_shard = [StoredRow(rows, int(position)) for position in by_shard.get(text, ())]
        if rows_of_shard and _unchanged(shard, rows_of_shard) and not _has_failure(failures_sorted, text):
            files += [_stored_member(shard, row) for row in rows_of_shard]
            if progress:
                progress(1)
        else:
            to_list.append(shard)
    for members, bad in _list_all(to_list, found.storage, workers, progress):
        listed += members
        failures += bad
    listed, fields = typed_metadata(listed)
    files += listed
    files.sort(key=lambda f: f.path)
    return replace(found, files=tuple(files), failures=tuple(failures), metadata_fields=fields)


def _list_all(shards: list[FoundFile], storage: StorageOptions, workers: Workers | None,
              progress: Callable[[int], None] | None) -> Iterator[tuple[list[FoundFile], list[Failure]]]:
    """list_members of each shard, here or on *workers* (a few rounds of the cluster's width at a
    time, so the members come back as they are listed)."""
    if workers is None:
        for shard in shards:
            yield list_members(shard, storage)
            if progress:
                progress(1)
        return
    step = max(1, workers.shards) * 4
    for start in range(0, len(shards), step):
        chunk = shards[start:start + step]
        yield from workers.map(_list_task, [(shard, storage) for shard in chunk])
        if progress:
            progress(len(chunk))


def _list_task(job: tuple[FoundFile, StorageOptions]) -> tuple[list[FoundFile], list[Failure]]:
    """A shard listed on a worker."""
    return list_members(*job)


def list_members(shard: FoundFile, storage: StorageOptions = ()) -> tuple[list[FoundFile], list[Failure]]:
    """The image members of *shard* with their captions and metadata, and what could not be
    read: a shard that is not a tar, a member cut off by the shard's end, an unsafe name. A shard
    in object storage is read through fsspec (*storage*), a block at a time."""
    if is_url(shard.path):
        try:
            fs, path = filesystem(shard.path, storage)
            handle = fs.open(path, "rb", block_size=REMOTE_BLOCK)
        except FileNotFoundError:
            return [], [Failure(shard.path, "missing", "vanished during the run")]
        except Exception as error:  # botocore's errors are not OSErrors
            return [], [Failure(shard.path, "unreadable", first_line(error))]
        with handle:
            return _members(handle, shard)
    try:
        fd = os.open(shard.path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return [], [Failure(shard.path, "missing", "vanished during the run")]
    except OSError as error:
        return [], [Failure(shard.path, "unreadable", error.strerror or str(error))]
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return [], [Failure(shard.path, "not a file")]
        # What was read is what the rows record: the open file's size, mtime and identity.
        return _members(handle, replace(shard, bytes=info.st_size, mtime=info.st_mtime, identity=file_identity(info)))


def _members(handle, shard: FoundFile) -> tuple[list[FoundFile], list[Failure]]:
    size = shard.bytes
    images, texts, metadata, failures = [], {}, {}, []
    try:
        tar = tarfile.open(fileobj=handle, mode="r:")
    except tarfile.TarError as error:
        return [], [Failure(shard.path, "corrupt", f"not a tar file ({error})")]
    count = 0
    while True:
        try:
            member = tar.next()
        except (tarfile.TarError, EOFError) as error:
            failures.append(Failure(shard.path, "corrupt", f"unreadable after {count} members: {error}"))
            break
        except Exception as error:  # a read that failed (a network error reaching object storage)
            failures.append(Failure(shard.path, "unreadable", f"after {count} members: {first_line(error)}"))
            break
        if member is None:
            break
        tar.members.clear()  # the reader keeps every header it read: a shard of 100,000 members need not
        count += 1
        if not member.isreg():
            continue
        name = member.name
        parts = name.split("/")
        if name.startswith("/") or any(part in ("", ".", "..") for part in parts):
            failures.append(Failure(shard.path, "unsafe name", f"member {name!r} skipped"))
            continue
        path = f"{shard.path}/{name}"
        if member.issparse():  # its data is not one run of bytes at offset_data
            failures.append(Failure(path, "unsupported format", "a sparse tar member"))
            continue
        if member.offset_data + member.size > size:
            failures.append(Failure(path, "truncated", f"the shard ends before the member's {member.size} bytes"))
            continue
        matched = _KEY_FIELD.match(name)
        if matched is None:
            continue
        key, field = matched.groups()
        if is_image_path("member." + field):
            images.append((path, key, member))
        elif field.lower() in ("txt", "json") and member.size <= MAX_TEXT_MEMBER:
            handle.seek(member.offset_data)
            (texts if field.lower() == "txt" else metadata)[key] = handle.read(member.size)
    count = len(images)
    files = [_listed(shard, count, (path, key, member), texts.get(key), metadata.get(key))
             for path, key, member in images]
    return files, failures


def _listed(shard: FoundFile, images: int, found: tuple[str, str, tarfile.TarInfo], text: bytes | None,
            meta: bytes | None) -> FoundFile:
    path, key, member = found
    caption = None
    if text is not None:
        caption = text.decode("utf-8", "replace").strip() or None
    where = Member(shard.path, key, member.offset_data, shard.bytes, shard.mtime, images, caption, _json_object(meta))
    return FoundFile(path, member.size, float(member.mtime), identity=shard.identity, member=where, etag=shard.etag)


def _json_object(data: bytes | None) -> str | None:
    """KEY.json's text when it holds a JSON object (anything else says nothing of the image)."""
    if data is None:
        return None
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return json.dumps(value) if isinstance(value, dict) and value else None


def typed_metadata(files: list[FoundFile]) -> tuple[list[FoundFile], tuple[pa.Field, ...]]:
    """The members' KEY.json fields as store columns, named as `clipdex import` names a
    clip-retrieval metadata column (store.sources.metadata: ``key`` is the key column, ``caption``
    becomes ``source_caption``, nested values JSON text), and each member's values under those names. A field
    whose values do not share one type (a number here, text there) is kept as text."""
    objects = [json.loads(f.member.metadata) if f.member and f.member.metadata else {} for f in files]
    names = _field_names(objects)
    if not names:
        return files, ()
    columns = {name: _column([value.get(name) for value in objects]) for name in names}
    # "key" is the member's own key, the key column (img2dataset writes the same value in the
    # JSON), as `clipdex import` takes clip-retrieval's key column.
    table = extra_columns(pa.table(columns), {"key"}, "webdataset metadata")
    if table is None:
        return files, ()
    values = table.to_pylist()
    typed = [replace(f, member=replace(f.member, metadata=json.dumps({k: v for k, v in row.items() if v is not None},
                                                                      default=str)))
             if f.member and f.member.metadata else f for f, row in zip(files, values)]
    return typed, tuple(table.schema)


def _field_names(objects: list[dict]) -> list[str]:
    """The JSON fields that become columns: the MAX_METADATA_FIELDS most common, one per store
    name (``a b`` and ``a_b`` are one column: the first seen wins). A dataset whose JSON has a key
    per image (an id as a key) would otherwise add a column per image."""
    counts = Counter(name for value in objects for name in value if name != "key")
    reserved, taken, names = set(image_schema(1).names), set(), []
    for name, _ in counts.most_common(MAX_METADATA_FIELDS):
        target = column_name(name, reserved)
        if target not in taken:
            taken.add(target)
            names.append(name)
    if len(counts) > len(names):
        LOG.warning("webdataset metadata: %d JSON fields kept as columns, %d others left out", len(names),
                    len(counts) - len(names))
    return names


def _column(values: list) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([v if v is None or isinstance(v, str) else json.dumps(v) for v in values], pa.string())


def _rows_by_shard(rows: StoredRows) -> dict[str, np.ndarray]:
    """The positions of the stored rows of each shard (by the shard's name as the rows show it)."""
    if "shard" not in rows.texts or not len(rows):
        return {}
    encoded = rows.texts["shard"].dictionary_encode()
    codes = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False)
    order = np.argsort(codes, kind="stable")
    ordered = codes[order]
    starts = np.flatnonzero(np.diff(ordered, prepend=-2))
    names = encoded.dictionary.to_pylist()
    return {names[ordered[start]]: order[start:end]
            for start, end in zip(starts, [*starts[1:], len(order)]) if ordered[start] >= 0}


def _unchanged(shard: FoundFile, rows: list[StoredRow]) -> bool:
    """Every image of the shard has a row, and each recorded the shard's present size, mtime and
    (device, inode, ctime)."""
    if any(row["shard_images"] != len(rows) for row in rows):
        return False
    for row in rows:
        recorded = tuple(row[c] for c in IDENTITY_COLUMNS)
        if (row["shard_bytes"], row["shard_mtime"], row["etag"]) != (shard.bytes, shard.mtime, shard.etag):
            return False
        if shard.identity is not None and None not in recorded and recorded != shard.identity:
            return False
    return True


def _has_failure(failed: list[str], shard: str) -> bool:
    """Whether a failure recorded lies at *shard* or inside it (*failed* sorted)."""
    at = bisect.bisect_left(failed, shard)
    inside = bisect.bisect_left(failed, shard + "/")  # "a.tar-b" sorts between "a.tar" and "a.tar/x"
    return ((at < len(failed) and failed[at] == shard)
            or (inside < len(failed) and failed[inside].startswith(shard + "/")))


def _stored_member(shard: FoundFile, row: StoredRow) -> FoundFile:
    """A member of an unchanged shard, as its row recorded it (the planner finds it unchanged)."""
    where = Member(shard.path, row["key"], row["shard_offset"], row["shard_bytes"], row["shard_mtime"],
                   row["shard_images"])
    identity = tuple(row[c] for c in IDENTITY_COLUMNS)
    return FoundFile(file_path(row["path"], row["path_bytes"]), row["bytes"], row["mtime"],
                     identity=None if None in identity else identity, member=where, etag=row["etag"])
