"""Duplicate photos: exact copies (the same content hash) and near-duplicates (re-encodes, resizes,
small crops, light edits, bursts: embeddings at cosine >= a threshold), in groups.

Exact groups come from the hash column. Near groups come from the store's own index: every row's
vector, a batch at a time, asks for its NEIGHBOURS nearest, and the pairs at or above the threshold
are kept. Groups then form around leaders (the row with the most such neighbours first), each
member that close to its leader: joining every pair transitively chained distinct look-alikes
into groups hundreds strong (bench/bench_dupes.py). A group's ``score`` is the lowest cosine
between any two of its members. Memory is one batch of vectors and the pairs found. Each group suggests a
photo to keep: the largest in pixels, then the oldest (taken_at, else mtime), then the lowest id.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from store.errors import InputError

if TYPE_CHECKING:
    from store.store import Store

# Cosine. Calibrated on the demo model (bench/bench_dupes.py, BENCHMARKS.md): the best recall at a
# pair precision of at least 0.9 among its look-alikes (same shape and colour, elsewhere).
DEFAULT_THRESHOLD = 0.995
NEIGHBOURS = 8  # asked of the index per row: a group larger than this is still found, through its members
BATCH = 4096
MEMBER_COLUMNS = ["id", "path", "hash", "bytes", "mtime", "width", "height", "taken_at"]


@dataclass(frozen=True)
class Group:
    kind: str  # "exact" (the same bytes) or "near"
    ids: list[int]
    paths: list[str]
    bytes: list[int | None]
    times: list[str | None]  # taken_at, else mtime, as ISO text
    score: float  # the lowest cosine between two members (1.0 for exact copies)
    keep: int  # the suggested keeper's id

    def to_dict(self) -> dict:
        return asdict(self)


def find_duplicates(store: "Store", threshold: float = DEFAULT_THRESHOLD, exact_only: bool = False,
                    where: str | None = None, progress: Callable[[int], None] | None = None) -> list[Group]:
    """The duplicate groups of *store* (a snapshot: rows and index of one version), exact ones
    first, each group's members ordered keeper first; *where*: only among the rows it admits."""
    if not -1.0 <= threshold <= 1.0:
        raise InputError(f"the threshold is a cosine similarity, between -1 and 1; got {threshold}")
    tables = store.tables
    admitted = np.sort(tables.ids_where(where)) if where else None
    rows = tables.file_rows(["id", "hash"])
    if admitted is not None:
        rows = rows.filter(pc.is_in(rows.column("id"), pa.array(admitted, pa.int64())))
    groups = [_group(store, "exact", ids, 1.0) for ids in _exact(rows)]
    if not exact_only:
        copies = {i for group in groups for i in group.ids if i != group.keep}  # its keeper stands for each set
        for ids in _near(store, threshold, admitted, copies, progress):
            groups.append(_group(store, "near", ids, None))
    return groups


def _exact(rows: pa.Table) -> list[list[int]]:
    if not rows.num_rows:
        return []
    counted = rows.group_by("hash").aggregate([("id", "list"), ("id", "count")])
    repeated = counted.filter(pc.greater(counted.column("id_count"), 1))
    return [sorted(ids) for ids in repeated.column("id_list").to_pylist()]


def _near(store: "Store", threshold: float, admitted: np.ndarray | None, copies: set[int],
          progress: Callable[[int], None] | None) -> list[list[int]]:
    """Groups around leaders: the row with the most neighbours at or above the threshold leads,
    and those of its neighbours not yet in a group join it; then the next. Every member is that
    close to its leader, so no chain of look-alikes (a~b~c~d...) becomes one group."""
    index = store.ann_index()
    source = store.tables.vector_source()
    close: dict[int, list[int]] = {}
    for batch_ids, vectors in source.batches():
        scores, found = index.search(vectors, NEIGHBOURS + 1)
        pairs = (found >= 0) & (scores >= threshold) & (found != batch_ids[:, None])
        for row, column in zip(*np.nonzero(pairs)):
            a, b = int(batch_ids[row]), int(found[row, column])
            if a in copies or b in copies or (admitted is not None and not (_has(admitted, a) and _has(admitted, b))):
                continue
            close.setdefault(a, []).append(b)
            close.setdefault(b, []).append(a)
        if progress:
            progress(len(batch_ids))
    grouped: set[int] = set()
    groups = []
    for leader in sorted(close, key=lambda i: (-len(set(close[i])), i)):
        if leader in grouped:
            continue
        members = [leader] + sorted({i for i in close[leader] if i not in grouped and i != leader})
        if len(members) > 1:
            grouped.update(members)
            groups.append(sorted(members))
    return groups


def _has(sorted_ids: np.ndarray, value: int) -> bool:
    at = np.searchsorted(sorted_ids, value)
    return bool(at < len(sorted_ids) and sorted_ids[at] == value)


def _group(store: "Store", kind: str, ids: list[int], score: float | None) -> Group:
    rows = store.tables.rows_by_id(ids, MEMBER_COLUMNS + ([] if score is not None else ["embedding"]))
    if score is None:
        vectors = np.asarray(rows.column("embedding").to_pylist(), np.float32)
        sims = vectors @ vectors.T
        score = float(sims[np.triu_indices(len(vectors), 1)].min()) if len(vectors) > 1 else 1.0
    listed = rows.to_pylist()
    listed.sort(key=_keeper_order)
    return Group(kind, [r["id"] for r in listed], [r["path"] for r in listed], [r["bytes"] for r in listed],
                 [_when(r) for r in listed], round(score, 6), listed[0]["id"])


def _keeper_order(row: dict) -> tuple:
    pixels = (row["width"] or 0) * (row["height"] or 0)
    when = row["taken_at"].timestamp() if row["taken_at"] is not None else (row["mtime"] or float("inf"))
    return (-pixels, when, row["id"])


def _when(row: dict) -> str | None:
    if row["taken_at"] is not None:
        return row["taken_at"].isoformat()
    if row["mtime"] is not None:
        return datetime.fromtimestamp(row["mtime"], timezone.utc).isoformat()
    return None
