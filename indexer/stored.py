"""The store's file rows as the planner reads them: by path, held as columns.

A rerun of a large library compares every file it finds with its row. Held as one Python dict a
row, 50,000 rows took 1.4 KB each at the plan's peak (3M rows: 4 GB). Here the numbers are numpy
arrays (with a validity mask where a column may be null), the text stays in Arrow until a row's
caption, hash or link is asked for, and the only Python object a row keeps is its path in the
index by path. A row is a light view, made when it is looked up.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import pyarrow as pa

from store.tables import file_path

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
