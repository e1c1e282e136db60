"""What a store really holds, counted from its tables rather than taken from the manifest (which
an interrupted run or a failed import can leave behind): for `clipdex info`."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Mapping

import pyarrow.compute as pc

from store.store import Store
from store.tables import IMAGES


@dataclass(frozen=True)
class StoreReport:
    rows: int  # rows in the images table now
    distinct_paths: int
    captioned: int
    failures: int
    table_version: int
    index_rows: int  # rows the current index was built over (0: no index)
    index_version: int  # table version the index was built from
    disk_bytes: int
    roots: dict[str, int] = field(default_factory=dict)  # indexed root -> rows under it

    @property
    def duplicate_rows(self) -> int:
        """Rows beyond the first for a path: never made by clipdex, a sign of damage (or of old runs)."""
        return self.rows - self.distinct_paths

    @property
    def has_index(self) -> bool:
        return self.index_rows > 0 or self.index_version > 0

    @property
    def index_is_current(self) -> bool:
        return self.has_index and self.index_version == self.table_version

    def to_dict(self) -> dict:
        return {**asdict(self), "duplicate_rows": self.duplicate_rows, "has_index": self.has_index,
                "index_is_current": self.index_is_current}


def inspect(store: Store) -> StoreReport:
    """Count what the store holds; reads the path and caption columns, not the vectors."""
    tables, manifest = store.tables, store.manifest
    has_rows = tables.exists(IMAGES)
    paths = tables.file_rows().column("path") if has_rows else None
    rows = len(paths) if paths is not None else 0
    roots = {root: int(pc.sum(pc.starts_with(paths, root.rstrip(os.sep) + os.sep)).as_py() or 0) if rows else 0
             for root in manifest.roots}
    return StoreReport(
        rows=rows, distinct_paths=int(pc.count_distinct(paths).as_py()) if rows else 0,
        captioned=tables.images.count_rows("caption IS NOT NULL") if rows else 0,
        failures=tables.failure_count(), table_version=tables.version() if has_rows else 0,
        index_rows=manifest.index.count if manifest.index.file else 0,
        index_version=manifest.index.table_version if manifest.index.file else 0,
        disk_bytes=_disk_use(store.directory), roots=roots)


def _disk_use(directory: os.PathLike) -> int:
    total = 0
    for folder, _, names in os.walk(directory):
        for name in names:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass  # removed while we walked (a compaction): not ours to count
    return total


def recall_text(recall_at_10: float | None, recall: Mapping[str, float], target_met: bool | None = None) -> str:
    """How well the index answers, for one line of output: the worst query set's recall@10 and
    each set's, or that only stored vectors were measured (an imported store without a text
    encoder or --tune-queries)."""
    if recall_at_10 is None:
        return "recall@10 not measured"
    if set(recall) <= {"image"}:
        text = f"recall@10 {recall_at_10:.3f} (measured on stored vectors only)"
    else:
        text = f"recall@10 {recall_at_10:.3f} (" + " · ".join(f"{name} {value:.3f}" for name, value in recall.items()) + ")"
    return text + ("; below the target recall: the query time limit (--max-query-ms) came first"
                   if target_met is False else "")
