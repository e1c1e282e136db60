"""The store's file rows as the planner reads them: by path, held as columns.

A rerun of a large library compares every file it finds with its row. Held as one Python dict a
row, 50,000 rows took 1.4 KB each at the plan's peak (3M rows: 4 GB). Here the numbers are numpy
arrays (with a validity mask where a column may be null), the text stays in Arrow until a row's
caption, hash or link is asked for, and the only Python object a row keeps is its path in the
index by path. A row is a light view, made when it is looked up.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from store.tables import FILE_COLUMNS, file_path, image_schema

# Columns read into numpy: whole numbers, and mtime. The rest are read from Arrow when asked for.
_INTEGERS = ("id", "bytes", "file_dev", "file_ino", "file_ctime_ns", "shard_offset", "shard_bytes", "shard_images")
_FLOATS = ("mtime", "shard_mtime")


class StoredRows(Mapping):
    """path -> :class:`StoredRow` over *rows* (store.tables.FILE_COLUMNS, or any of them: a column
    the table lacks reads as null)."""

    def __init__(self, rows: pa.Table) -> None:
        self.table = rows
        self.numbers: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        for name in (*_INTEGERS, *_FLOATS):
            if name in rows.column_names:
                column = rows.column(name).combine_chunks().cast(pa.float64() if name in _FLOATS else pa.int64())
                valid = None if column.null_count == 0 else column.is_valid().to_numpy(zero_copy_only=False)
                self.numbers[name] = (column.fill_null(0).to_numpy(zero_copy_only=False), valid)
        self.texts = {name: rows.column(name).combine_chunks() for name in rows.column_names
                      if name not in self.numbers}
        paths = rows.column("path").to_pylist() if rows.num_rows else []
        raws = self.texts["path_bytes"].to_pylist() if "path_bytes" in self.texts else [None] * len(paths)
        self.positions = {file_path(path, raw): i for i, (path, raw) in enumerate(zip(paths, raws))}

    def __getitem__(self, path: str) -> "StoredRow":
        return StoredRow(self, self.positions[path])

    def get(self, path: str, default=None) -> "StoredRow | None":  # Mapping's would raise and catch KeyError
        position = self.positions.get(path)
        return default if position is None else StoredRow(self, position)

    def __contains__(self, path) -> bool:
        return path in self.positions

    def __iter__(self) -> Iterator[str]:
        return iter(self.positions)

    def __len__(self) -> int:
        return len(self.positions)

    def value(self, name: str, position: int):
        number = self.numbers.get(name)
        if number is not None:
            values, valid = number
            if valid is not None and not valid[position]:
                return None
            return float(values[position]) if name in _FLOATS else int(values[position])
        text = self.texts.get(name)
        return None if text is None else text[position].as_py()

    def column(self, name: str, positions: np.ndarray) -> list:
        """*name* of the rows at *positions*, as Python values (one numpy or Arrow take, not a
        lookup a row: a rerun asks this of every row whose file it found)."""
        number = self.numbers.get(name)
        if number is not None:
            values, valid = number
            taken = values[positions].tolist()
            return taken if valid is None else [v if ok else None for v, ok in zip(taken, valid[positions])]
        if name not in self.texts:
            return [None] * len(positions)
        return self.texts[name].take(pa.array(positions, pa.int64())).to_pylist()


class StoredRow(Mapping):
    """One row, read from its table's columns as it is asked for; every column name reads (null
    where the table lacks it), as ``dict.get`` did."""

    __slots__ = ("rows", "position")

    def __init__(self, rows: StoredRows, position: int) -> None:
        self.rows, self.position = rows, position

    def __getitem__(self, name: str):
        return self.rows.value(name, self.position)

    def get(self, name: str, default=None):
        value = self.rows.value(name, self.position)
        return default if value is None else value

    def __iter__(self) -> Iterator[str]:
        return iter(self.rows.table.column_names)

    def __len__(self) -> int:
        return self.rows.table.num_columns


# Columns of every stored row that a run holds while it walks (16 bytes a row as numpy: a path's
# fingerprint and its id; a shard member's shard, 16 more): which row a found path has.
_KEY_COLUMNS = ("id", "path", "path_bytes", "bytes", "shard")
_MATCH_COLUMNS = ("id", "hash", "path", "path_bytes", "caption", "shard")
_BATCH_ROWS = 65_536


class StoredIndex:
    """The store's rows for a run that never holds them whole: which row a found path has, by
    fingerprint, and the rows themselves fetched a chunk at a time.

    Held per row: the fingerprint of its path and its id (16 bytes; 16 more for a member of a
    shard), the distinct sizes of the stored files (the planner's test of whether a file can
    share a row's content), and whether the run found it (a byte per id). At 100M rows: 1.7 GB,
    where the rows as columns (StoredRows) took 27 GB. A fingerprint is Python's ``hash`` of the
    path, so two paths may share one: a lookup fetches every row of a fingerprint and keeps the one
    whose path is the one asked.

    *source* reads the rows (:class:`RowSource`: the store's ``Tables``, or :class:`TableSource`
    over a table in memory).
    """

    def __init__(self, source: "RowSource") -> None:
        self.source = source
        paths, path_ids, shards, shard_ids, sizes, top = [], [], [], [], [], 0
        for batch in source.file_batches(_KEY_COLUMNS):
            ids = batch.column("id").to_numpy(zero_copy_only=False).astype(np.int64)
            raws = batch.column("path_bytes")
            keys = batch.column("path").to_pylist()
            if raws.null_count < len(raws):  # a name that is not UTF-8: its exact bytes are its path
                keys = [file_path(key, raw) for key, raw in zip(keys, raws.to_pylist())]
            paths.append(np.fromiter(map(hash, keys), np.int64, len(keys)))
            path_ids.append(ids)
            shard = batch.column("shard")
            if shard.null_count < len(shard):
                members = np.flatnonzero(shard.is_valid().to_numpy(zero_copy_only=False))
                names = shard.take(pa.array(members)).to_pylist()
                shards.append(np.fromiter(map(hash, names), np.int64, len(names)))
                shard_ids.append(ids[members])
            sizes.append(np.unique(batch.column("bytes").cast(pa.int64()).fill_null(-1).to_numpy(zero_copy_only=False)))
            top = max(top, int(ids.max()) if len(ids) else 0)
        self.paths, self.path_ids = _sorted(paths, path_ids)
        self.shards, self.shard_ids = _sorted(shards, shard_ids)
        self.sizes = np.unique(np.concatenate(sizes)) if sizes else np.zeros(0, np.int64)
        self.seen = np.zeros(top + 1, bool)

    def __len__(self) -> int:
        return len(self.paths)

    def rows_at(self, paths: Iterable[str]) -> StoredRows:
        """The rows (store.tables.FILE_COLUMNS) of those of *paths* that have one."""
        return self._fetch(self.paths, self.path_ids, paths)

    def rows_in_shards(self, shards: Iterable[str]) -> StoredRows:
        """The rows of the members of *shards* (by their names as rows show them: store.tables.split_path)."""
        return self._fetch(self.shards, self.shard_ids, shards)

    def has_size(self, sizes: np.ndarray) -> np.ndarray:
        """Whether a stored row has each of *sizes*."""
        at = np.minimum(np.searchsorted(self.sizes, sizes), max(len(self.sizes) - 1, 0))
        return self.sizes[at] == sizes if len(self.sizes) else np.zeros(len(sizes), bool)

    def mark_seen(self, ids: Iterable[int]) -> None:
        """Rows whose file this run found (the rest are absent at its end)."""
        self.seen[np.fromiter(ids, np.int64)] = True

    def unseen(self) -> Iterator[pa.Table]:
        """id, path and path_bytes of the rows whose file the run did not find, a batch at a time."""
        ids = self.path_ids[~self.seen[self.path_ids]]
        for start in range(0, len(ids), _BATCH_ROWS):
            yield self.source.rows_by_id(np.sort(ids[start:start + _BATCH_ROWS]), ("id", "path", "path_bytes"))

    def rows_with_hashes(self, hashes: Collection[str]) -> pa.Table:
        """id, hash, path, path_bytes, caption and shard of every row whose content hash is one of
        *hashes*: one pass over the stored hashes, whatever their number."""
        wanted = pa.array(sorted(hashes), pa.string())
        ids = [batch.column("id").filter(pc.is_in(batch.column("hash"), value_set=wanted)).to_numpy(zero_copy_only=False)
               for batch in self.source.file_batches(("id", "hash"))]
        found = np.unique(np.concatenate(ids)) if ids else np.zeros(0, np.int64)
        parts = [self.source.rows_by_id(found[start:start + _BATCH_ROWS], _MATCH_COLUMNS)
                 for start in range(0, len(found), _BATCH_ROWS)]
        return pa.concat_tables(parts) if parts else TableSource(_empty()).rows_by_id(found, _MATCH_COLUMNS)

    def _fetch(self, keys: np.ndarray, ids: np.ndarray, names: Iterable[str]) -> StoredRows:
        asked = np.unique(np.fromiter(map(hash, names), np.int64))
        start, end = np.searchsorted(keys, asked, "left"), np.searchsorted(keys, asked, "right")
        wanted = np.concatenate([ids[s:e] for s, e in zip(start, end) if e > s] or [np.zeros(0, np.int64)])
        return StoredRows(self.source.rows_by_id(np.unique(wanted), FILE_COLUMNS) if len(wanted) else _empty())


def _sorted(keys: list[np.ndarray], ids: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The batches' keys sorted, with their ids; the batches let go of as soon as they are joined
    (at 100M rows each copy is 800 MB)."""
    if not keys:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    key, value = np.concatenate(keys), np.concatenate(ids)
    keys.clear()
    ids.clear()
    order = np.argsort(key, kind="stable")
    value = value[order]
    key = key[order]
    return key, value


def _empty() -> pa.Table:
    return pa.table({name: pa.array([], pa.int64() if name == "id" else pa.string()) for name in ("id", "path")})


class RowSource(Protocol):
    """Where a :class:`StoredIndex` reads the rows: every row a batch at a time, and rows by id
    (columns a table lacks read as null). store.tables.Tables is one."""

    def file_batches(self, columns: Sequence[str]) -> Iterable[pa.Table]: ...

    def rows_by_id(self, ids: np.ndarray, columns: Sequence[str]) -> pa.Table: ...


class TableSource:
    """Rows held in memory as one table (the planner's tests, a small store)."""

    def __init__(self, rows: pa.Table) -> None:
        self.rows = rows

    def _columns(self, rows: pa.Table, columns: Sequence[str]) -> pa.Table:
        schema = image_schema(1)
        return pa.table({name: rows.column(name) if name in rows.column_names
                         else pa.nulls(rows.num_rows, schema.field(name).type) for name in columns})

    def file_batches(self, columns: Sequence[str]) -> Iterable[pa.Table]:
        yield self._columns(self.rows, columns)

    def rows_by_id(self, ids: np.ndarray, columns: Sequence[str]) -> pa.Table:
        return self._columns(self.rows.filter(pc.is_in(self.rows.column("id"), pa.array(ids, pa.int64()))), columns)

