"""A part's metadata table as the images table takes it: each row's key, caption and size, and
every other column renamed and typed for the store."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa

from store.errors import InputError
from store.tables import image_schema

PATH_COLUMNS = ("path", "image_path", "url", "filepath")
CAPTION_COLUMNS = ("caption", "text")


class RowKeys(Sequence):
    """``<source>#<row>`` for every row of a features file without metadata, made on demand: unique
    by construction, so millions of rows need no list of keys and no table of duplicates."""

    def __init__(self, source: str, count: int) -> None:
        self.prefix, self.count = os.path.abspath(source), count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, row):
        if isinstance(row, slice):
            return [self[i] for i in range(*row.indices(self.count))]
        if not -self.count <= row < self.count:
            raise IndexError(row)
        return f"{self.prefix}#{row % self.count}"


@dataclass(frozen=True)
class SourceRows:
    """What a source says of its rows besides the features: key, caption, size, other metadata."""
    keys: Sequence[str]
    captions: Sequence[str | None]
    width: pa.Array | None = None
    height: pa.Array | None = None
    extra: pa.Table | None = None  # every other metadata column, named and typed for the store
    key: pa.Array | None = None  # webdataset's key (img2dataset's and clip-retrieval's `key`): the key column

    def take(self, positions: Sequence[int]) -> dict:
        """The image_rows columns of *positions* (extra metadata columns included)."""
        taken = pa.array(positions, pa.int64())
        columns = {"path": [self.keys[p] for p in positions], "caption": [self.captions[p] for p in positions]}
        for name, column in (("width", self.width), ("height", self.height), ("key", self.key)):
            if column is not None:
                columns[name] = column.take(taken)
        if self.extra is not None:
            columns["metadata"] = dict(zip(self.extra.column_names, self.extra.take(taken).columns))
        return columns


def source_rows(source: str, count: int, meta: pa.Table | None) -> SourceRows:
    """Each row's key (its path, url, ... column, else ``<source>#<row>``), caption, width and
    height, and every other metadata column (see :func:`extra_columns`)."""
    if meta is not None and meta.num_rows != count:
        raise InputError(f"{source}: {count} features but {meta.num_rows} metadata rows")
    if meta is None:
        return SourceRows(RowKeys(source, count), [None] * count)
    names = meta.column_names
    path_column = next((c for c in PATH_COLUMNS if c in names), None)
    caption_column = next((c for c in CAPTION_COLUMNS if c in names), None)
    keys = [str(p) for p in meta.column(path_column).to_pylist()] if path_column else RowKeys(source, count)
    captions = meta.column(caption_column).to_pylist() if caption_column else [None] * count
    sizes = {name: _integers(meta.column(name)) if name in names else None for name in ("width", "height")}
    used = {path_column, caption_column, *(name for name in sizes if sizes[name] is not None)}
    key = _texts(meta.column("key")) if "key" in names else None
    used |= {"key"} if key is not None else set()
    return SourceRows(keys, captions, sizes["width"], sizes["height"], extra_columns(meta, used, source), key)


def _texts(column: pa.ChunkedArray) -> pa.Array | None:
    try:
        return column.combine_chunks().cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None  # not keys after all (nested values): kept as a metadata column of its own


def _integers(column: pa.ChunkedArray) -> pa.Array | None:
    try:
        return column.combine_chunks().cast(pa.int32())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None  # not sizes after all: kept as a metadata column of its own


def extra_columns(meta: pa.Table, used: set, source: str) -> pa.Table | None:
    """The metadata columns clipdex has no column of its own for (clip-retrieval's url, key,
    status, exif, ...), kept so that `where` filters can use them. Names become identifiers
    (``original width`` -> ``original_width``) and one that is a clipdex column gets the prefix
    ``source_``; nested values become JSON text."""
    reserved = set(image_schema(1).names)
    columns: dict[str, pa.Array] = {}
    for name in meta.column_names:
        if name in used:
            continue
        target = column_name(name, reserved)
        if target in columns:
            raise InputError(f"{source}: metadata columns {name!r} and another both become {target!r}")
        columns[target] = _plain(meta.column(name).combine_chunks())
    return pa.table(columns) if columns else None


def column_name(name: str, reserved: set[str]) -> str:
    """The store's name for a metadata field: an identifier, prefixed ``source_`` where it is a
    clipdex column (*reserved*)."""
    target = re.sub(r"\W", "_", name, flags=re.ASCII) or "column"
    target = f"c_{target}" if target[0].isdigit() else target
    return f"source_{target}" if target in reserved else target


def _plain(column: pa.Array) -> pa.Array:
    """A column LanceDB can store and filter: nested values as JSON text, dictionaries decoded."""
    kind = column.type
    if pa.types.is_dictionary(kind):
        return _plain(column.dictionary_decode())
    if pa.types.is_null(kind):
        return column.cast(pa.string())
    if pa.types.is_large_string(kind):
        return column.cast(pa.string())
    if pa.types.is_nested(kind):
        return pa.array([None if v is None else json.dumps(v, default=str) for v in column.to_pylist()], pa.string())
    return column
