"""A store's tables read through Lance alone, for the readers: LanceDB costs a second of imports
(0.9-1.2 s measured, most of a one-shot `clipdex search`), and what a reader asks of a table
(count, scan, filter, take, a version) Lance answers itself.

:class:`ReadDB` and :class:`ReadTable` answer the part of LanceDB's connection and table that
clipdex's read paths use; anything else (a full-text search, the index list) is handed to a
LanceDB table opened on first need at the same version, so no reader loses a feature.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa

LANCE_SUFFIX = ".lance"


@dataclass(frozen=True)
class Listing:
    tables: list[str]


class ReadDB:
    """LanceDB's ``connect`` for readers: ``list_tables().tables`` and ``open_table``."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def list_tables(self) -> Listing:
        folder = Path(self.uri)
        names = sorted(p.name[:-len(LANCE_SUFFIX)] for p in folder.glob(f"*{LANCE_SUFFIX}")) if folder.is_dir() else []
        return Listing(names)

    def open_table(self, name: str) -> "ReadTable":
        return ReadTable(self.uri, name)

    def create_table(self, *args: Any, **kwargs: Any) -> Any:
        raise PermissionError("a reader's view of the store cannot create tables")


class ReadTable:
    """One table at one version, through ``lance.dataset``; LanceDB's Table for everything else."""

    def __init__(self, folder: str, name: str) -> None:
        import lance

        self.folder, self.name = folder, name
        self.uri = str(Path(folder) / f"{name}{LANCE_SUFFIX}")
        self._dataset = lance.dataset(self.uri)
        self._pinned = False
        self._lancedb: Any = None

    def to_lance(self):
        return self._dataset

    @property
    def version(self) -> int:
        return self._dataset.version

    @property
    def schema(self) -> pa.Schema:
        return self._dataset.schema

    def count_rows(self, filter: str | None = None) -> int:  # noqa: A002 - LanceDB's name
        return self._dataset.count_rows(filter=filter)

    def checkout(self, version: int) -> None:
        self._dataset = self._dataset.checkout_version(version)
        self._pinned = True

    def checkout_latest(self) -> None:
        import lance

        self._dataset = lance.dataset(self.uri)
        self._pinned = False

    def take_offsets(self, offsets: Sequence[int]) -> "_Rows":
        return _Rows(self._dataset.take(list(offsets)))

    def search(self, query: Any = None, *args: Any, **kwargs: Any) -> Any:
        if query is None and not args and not kwargs:
            return _Scan(self._dataset)
        return self._full_table().search(query, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._full_table(), name)

    def _full_table(self):
        """LanceDB's own table at this version (imported only by the readers that need it)."""
        if self._lancedb is None:
            import lancedb

            self._lancedb = lancedb.connect(self.folder).open_table(self.name)
        if self._lancedb.version != self._dataset.version:
            if self._pinned:
                self._lancedb.checkout(self._dataset.version)
            else:
                self._lancedb.checkout_latest()
        return self._lancedb


class _Rows:
    def __init__(self, table: pa.Table) -> None:
        self.table = table

    def select(self, columns: Sequence[str]) -> "_Rows":
        return _Rows(self.table.select(list(columns)))

    def to_arrow(self) -> pa.Table:
        return self.table


class _Scan:
    """LanceDB's query builder without a query: ``where``, ``select``, ``offset``, ``limit``, then
    ``to_arrow`` or ``to_batches``."""

    def __init__(self, dataset, **options: Any) -> None:
        self.dataset, self.options = dataset, options

    def _with(self, **changes: Any) -> "_Scan":
        return _Scan(self.dataset, **{**self.options, **changes})

    def where(self, sql: str, prefilter: bool = True) -> "_Scan":
        return self._with(filter=sql)

    def select(self, columns: Sequence[str]) -> "_Scan":
        return self._with(columns=list(columns))

    def offset(self, count: int) -> "_Scan":
        return self._with(offset=count)

    def limit(self, count: int) -> "_Scan":
        return self._with(limit=count)

    def to_arrow(self) -> pa.Table:
        return self.dataset.to_table(**self.options)

    def to_batches(self, batch_size: int):
        return self.dataset.to_batches(batch_size=batch_size, **self.options)
