"""The one committer every writer goes through: the local engine, the Ray driver and the importer.

Rows reach the table in commits of at least ``every`` rows; each commit is atomic in Lance, so a
writer killed at any moment loses at most the rows it had not committed, and a rerun redoes just
those. Which rows are appended and which replace a stored row is decided here, by id: ids from
``first_new_id`` on were reserved by this run and are new (a plain append, no join); older ids
are rows already in the table, written again (an upsert: one atomic merge on ``id``).
"""

from __future__ import annotations

from typing import Any, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from store.delta import record_changed
from store.tables import Tables


class Committer:
    def __init__(self, tables: Tables, first_new_id: int, every: int = 1) -> None:
        self.tables, self.first_new_id, self.every = tables, first_new_id, max(1, every)
        self.written = 0  # rows committed so far
        self._rows: list[pa.Table] = []
        self._fragments: list[Any] = []
        self._pending = 0

    def add(self, rows: pa.Table) -> None:
        """Rows of the images table (from :func:`store.tables.image_rows`), new ids or old."""
        if rows.num_rows:
            self._rows.append(rows)
            self._pending += rows.num_rows
            self._maybe_commit()

    def add_fragments(self, fragments: Sequence[Any], rows: int) -> None:
        """Lance fragments a worker elsewhere wrote beside the table, holding *rows* rows of new ids
        only: committed by reference, so their vectors never pass through this process."""
        self._fragments.extend(fragments)
        self._pending += rows
        self._maybe_commit()

    def _maybe_commit(self) -> None:
        if self._pending >= self.every:
            self.commit()

    def commit(self) -> None:
        if not self._pending:
            return
        self.tables.append_fragments(self._fragments)
        if self._rows:
            rows = pa.concat_tables(self._rows) if len(self._rows) > 1 else self._rows[0]
            is_new = pc.greater_equal(rows.column("id"), self.first_new_id)
            self.tables.add(rows.filter(is_new))
            if not pc.all(is_new).as_py():
                old = rows.filter(pc.invert(is_new))
                if self.tables.directory is not None:  # the index's delta must know these vectors changed
                    record_changed(self.tables.directory, old.column("id").to_numpy())
                self.tables.upsert(old)
        self.written += self._pending
        self._rows, self._fragments, self._pending = [], [], 0

    def __enter__(self) -> "Committer":
        return self

    def __exit__(self, kind, error, trace) -> None:
        # Only a writer that finished commits its last rows; one that failed leaves them to the
        # rerun, as a killed one would.
        if kind is None:
            self.commit()
