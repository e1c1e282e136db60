"""Filters that stay fast on large stores (issue 27, item 4): each plan (post-filtering, an exact
search over a narrow filter's rows, the prefiltered index) finds what an exact search over the
admitted rows finds, on an IVF index whose lists a narrow filter barely touches."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import search.filtered
from search.query import Query
from store.store import Store
from tests.helpers import run

ROWS, DIM = 6000, 32


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An imported store of clustered vectors with a `shot` column 0..ROWS-1, a forced IVF index."""
    from tests.helpers import run_quietly

    root = tmp_path_factory.mktemp("filtered")
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((40, DIM))
    vectors = centres[rng.integers(0, 40, ROWS)] + 0.4 * rng.standard_normal((ROWS, DIM))
    np.save(root / "features.npy", vectors.astype(np.float32))
    pq.write_table(pa.table({"shot": pa.array(rng.permutation(ROWS), pa.int64())}), root / "meta.parquet")
    code, _, err = run_quietly("import", root / "features.npy", "--metadata", root / "meta.parquet",
                               "--store", root / "store", "--index-type", "ivf")
    assert code == 0, err
    return Store.snapshot(root / "store")


def exact_filtered(store, vector, sql, k):
    ids, vectors = store.tables.vectors()
    admitted = set(store.tables.ids_where(sql).tolist())
    keep = np.array([i in admitted for i in ids.tolist()])
    scores = vectors[keep] @ vector
    return ids[keep][np.argsort(-scores, kind="stable")[:k]].tolist()


@pytest.mark.parametrize("sql, plan", [("shot < 3300", "post"), ("shot < 600", "post"), ("shot < 60", "exact"),
                                       ("shot < 200", "pre")])
def test_each_plan_finds_the_exact_filtered_neighbours(store, monkeypatch, sql, plan):
    if plan == "pre":  # a narrow filter on a store without values, or more rows than an exact search takes
        monkeypatch.setattr(search.filtered, "EXACT_SUBSET_ROWS", 100)
    ids, vectors = store.tables.vectors()
    recalls = []
    for row in range(0, 60, 6):
        query = Query.create(store, vector=vectors[row]).limit(10).where(sql)
        searcher = query._searcher()
        assert searcher.plan == plan
        found = [r["id"] for r in query.to_list()]
        truth = exact_filtered(store, vectors[row] / np.linalg.norm(vectors[row]), sql, 10)
        admitted = set(store.tables.ids_where(sql).tolist())
        assert set(found) <= admitted and len(found) == min(10, len(admitted))
        recalls.append(len(set(found) & set(truth)) / len(truth))
    # The exact plan is exact; the others are as good as the index's own tuned recall.
    assert np.mean(recalls) >= (1.0 if plan == "exact" else 0.9), recalls


def test_post_filtering_widens_until_enough_pass(store, monkeypatch):
    """A broad filter that leaves out exactly the query's nearest rows: the first depth lets none
    through, the next one enough."""
    ids, vectors = store.tables.vectors()
    nearest = [r["id"] for r in Query.create(store, vector=vectors[3]).limit(60).to_list()]
    sql = f"id NOT IN ({','.join(map(str, nearest))})"
    calls = []
    admitted = store.tables.admitted
    monkeypatch.setattr(store.tables, "admitted", lambda *args: calls.append(len(args[0])) or admitted(*args))
    query = Query.create(store, vector=vectors[3]).limit(10).where(sql)
    assert query._searcher().plan == "post"
    found = [r["id"] for r in query.to_list()]
    assert len(calls) >= 2 and calls[1] == 4 * calls[0]  # searched 4x deeper once the first depth fell short
    truth = exact_filtered(store, vectors[3] / np.linalg.norm(vectors[3]), sql, 10)
    assert len(set(found) & set(truth)) >= 9 and not set(found) & set(nearest)


def test_a_filter_that_admits_nothing_and_a_broken_one(store, capsys):
    assert Query.create(store, vector=np.ones(DIM)).where("shot < 0").to_list() == []
    code, _, err = run(capsys, "search", "--store", store.directory, "x", "--where", "shot <")
    assert code in (1, 2) and err.count("\n") == 1
