"""A search restricted to the rows a `where` filter admits, by the cheapest plan for how many it
admits.

The filter's selectivity is measured first (Lance counts the rows it admits: 3-8 ms at 1M rows).
Then one of three plans runs:

- **post**: a broad filter (at least POST_FILTER_MIN of the rows) lets most neighbours through,
  so the unfiltered index is searched k / selectivity x 2 deep and its candidates are checked
  against the filter by id. The search widens 4x while too few pass, up to POST_DEPTH_LIMIT
  (or until the index has no more at its nprobe), then takes the pre plan.
- **exact**: a narrow filter admits few rows (at most EXACT_SUBSET_ROWS). Their ids are read, and
  their vectors are scored from the index's id-sorted values. This is exact, and an IVF index's
  lists may hold none of them.
- **pre**: anything else. The admitted ids restrict the index's own search (an `IDSelectorBatch`,
  an IVF probing as many more lists as the filter is narrow), which is what every filter did
  before.

Before this, a 54 % filter at 1M rows collected 540k ids for a selector: 431 ms p50 against 85 ms
unfiltered (BENCHMARKS.md, "Filters at scale").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

POST_FILTER_MIN = 0.05
POST_DEPTH_LIMIT = 4096
EXACT_SUBSET_ROWS = 50_000
PLANS = ("post", "exact", "pre")


@dataclass
class FilteredIndex:
    """What :class:`store.ann.AnnIndex` is to a search (``search(queries, k)`` -> scores, ids),
    restricted to the rows *sql* admits in *tables* (one version)."""

    index: object  # store.ann.AnnIndex
    tables: object  # store.tables.Tables
    sql: str
    values: object = None  # store.values.StoredValues: the index's id-sorted values, for the exact plan
    admitted_count: int = field(init=False)
    plan: str = field(init=False)

    def __post_init__(self) -> None:
        self.total = max(self.tables.count(), 1)
        self.admitted_count = self.tables.count_where(self.sql)
        selectivity = self.admitted_count / self.total
        if selectivity >= POST_FILTER_MIN:
            self.plan = "post"
        elif self.admitted_count <= EXACT_SUBSET_ROWS and self.values is not None:
            self.plan = "exact"
        else:
            self.plan = "pre"

    @property
    def selectivity(self) -> float:
        return self.admitted_count / self.total

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) ``[1, k]`` best first among the admitted rows; ids -1 where fewer exist."""
        if self.admitted_count == 0:
            return _padded(np.zeros(0, np.float32), np.zeros(0, np.int64), k)
        if self.plan == "post":
            found = self._post(queries, k)
            if found is not None:
                return found
        elif self.plan == "exact":
            return self._exact(queries, k)
        return self.index.search(queries, k, self.tables.ids_where(self.sql))

    def _post(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The unfiltered neighbours, deep enough for k of them to pass, filtered by id; None
        when the depth limit comes first (the filter admits far fewer near the query)."""
        depth = min(max(k, math.ceil(2 * k / self.selectivity)), POST_DEPTH_LIMIT)
        while True:
            scores, ids = self.index.search(queries, depth)
            found = ids[0] >= 0
            scores, ids = scores[0][found], ids[0][found]
            passing = np.isin(ids, self.tables.admitted(ids, self.sql))
            if passing.sum() >= k:
                return _padded(scores[passing][:k], ids[passing][:k], k)
            if len(ids) < depth or depth >= POST_DEPTH_LIMIT:
                return None  # the index gives no more at its nprobe (or the limit came): prefilter
            depth = min(depth * 4, POST_DEPTH_LIMIT)

    def _exact(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Every admitted row scored from the stored values (float16 by default), the best 2k
        scored again from their stored float32 vectors."""
        admitted = np.sort(self.tables.ids_where(self.sql))
        query = np.asarray(queries[0], np.float32)
        rough = np.asarray(self.values.values[self.values.positions(admitted)], np.float32) @ query
        best = admitted[np.argsort(-rough, kind="stable")[:2 * k]]
        rows = self.tables.rows_by_id(best.tolist(), ["id", "embedding"])
        ids = rows.column("id").to_numpy()
        vectors = np.asarray(rows.column("embedding").to_pylist(), np.float32).reshape(len(ids), -1)
        scores = vectors @ query
        order = np.argsort(-scores, kind="stable")[:k]
        return _padded(scores[order], ids[order], k)


def _padded(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    out_scores = np.full((1, k), -np.inf, np.float32)
    out_ids = np.full((1, k), -1, np.int64)
    out_scores[0, :len(ids)], out_ids[0, :len(ids)] = scores[:k], ids[:k]
    return out_scores, out_ids
