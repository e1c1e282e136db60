"""A relevance cut-off and results sorted by a column (issue 27, items 1 and 3), through Python,
the command line and HTTP, checked against exact scores over every stored vector."""

from __future__ import annotations

import json

import numpy as np
import pytest

from search.query import Query
from server import ServeConfig, create_app
from store.errors import InputError
from store.store import Store
from tests.helpers import local_client, run

TEXT = "a red circle"


@pytest.fixture(scope="module")
def store(served_library):
    return Store.open(served_library[0])


@pytest.fixture(scope="module")
def exact(store):
    """Every row's exact cosine with TEXT and its metadata, best first: (ids, scores, rows by id)."""
    ids, vectors = store.tables.vectors()
    scores = vectors @ Query.create(store, TEXT).vector()
    order = np.argsort(-scores, kind="stable")
    rows = {row["id"]: row for row in store.tables.file_rows(["id", "mtime", "width", "path"]).to_pylist()}
    return ids[order], scores[order], rows


def test_min_score_keeps_exactly_the_results_at_or_above_it_at_most_k(store, exact):
    ids, scores, _ = exact
    cut = float(scores[7]) - 1e-6  # eight rows pass
    found = Query.create(store, TEXT).limit(20).min_score(cut).to_list()
    assert [row["id"] for row in found] == ids[:8].tolist()
    assert all(row["score"] >= cut for row in found)
    assert len(Query.create(store, TEXT).limit(3).min_score(cut).to_list()) == 3  # still at most k
    assert Query.create(store, TEXT).min_score(0.999).to_list() == []
    assert len(Query.create(store, TEXT).limit(40).min_score(-1).to_list()) == 40


@pytest.mark.parametrize("bad", [1.5, -1.01, float("nan"), "0.3", True])
def test_a_min_score_that_is_no_cosine_is_one_message(store, bad):
    with pytest.raises(InputError, match="min_score"):
        Query.create(store, TEXT).min_score(bad)


def test_sorting_after_a_cut_off_orders_every_match_above_it_not_only_the_k_best(store, exact):
    ids, scores, rows = exact
    cut = float(scores[19]) - 1e-6  # twenty rows pass; the five newest of them are wanted, not of the best five
    found = Query.create(store, TEXT).limit(5).min_score(cut).sort("-mtime").to_list()
    passing = sorted(ids[:20].tolist(), key=lambda i: -rows[i]["mtime"])
    assert [row["id"] for row in found] == passing[:5]
    assert set(passing[:5]) != set(ids[:5].tolist())  # the test would not tell the two apart otherwise
    ascending = Query.create(store, TEXT).limit(5).min_score(cut).sort("mtime").to_list()
    assert [row["id"] for row in ascending] == sorted(ids[:20].tolist(), key=lambda i: rows[i]["mtime"])[:5]


def test_a_sorted_search_looks_deeper_while_every_match_still_passes(store, exact, monkeypatch):
    import search.query

    ids, scores, rows = exact
    monkeypatch.setattr(search.query, "SORT_FIRST_DEPTH", 2)  # k=3: depths 3, 12, 48 for the 30 passing rows
    cut = float(scores[29]) - 1e-6
    found = Query.create(store, TEXT).limit(3).min_score(cut).sort("mtime").to_list()
    assert [row["id"] for row in found] == sorted(ids[:30].tolist(), key=lambda i: rows[i]["mtime"])[:3]


def test_sorting_without_a_cut_off_reorders_the_k_best_and_keeps_ties_by_score(store, exact):
    ids, _, rows = exact
    found = Query.create(store, TEXT).limit(10).sort("-width").to_list()
    assert {row["id"] for row in found} == set(ids[:10].tolist())
    widths = [row["width"] for row in found]
    assert widths == sorted(widths, reverse=True)
    for a, b in zip(found, found[1:]):
        if a["width"] == b["width"]:
            assert a["score"] >= b["score"]


@pytest.mark.parametrize("column", ["nope", "embedding", "path_bytes", "-", ""])
def test_sorting_by_what_is_not_a_column_is_one_message(store, column):
    with pytest.raises(InputError, match="sort|column"):
        Query.create(store, TEXT).sort(column)


def test_the_command_line_takes_both(capsys, served_library, exact):
    ids, scores, rows = exact
    cut = float(scores[19]) - 1e-6
    code, out, err = run(capsys, "search", TEXT, "--store", served_library[0], "-k", "5", "--min-score", cut,
                         "--sort=-mtime", "--json")
    assert code == 0, err
    found = json.loads(out)
    assert [row["id"] for row in found] == sorted(ids[:20].tolist(), key=lambda i: -rows[i]["mtime"])[:5]
    assert all("mtime" in row for row in found)
    code, out, _ = run(capsys, "search", TEXT, "--store", served_library[0], "--min-score", "0.999")
    assert code == 0 and out.startswith("no results at or above --min-score")
    code, _, err = run(capsys, "search", TEXT, "--store", served_library[0], "--sort", "colour")
    assert code == 1 and err.count("\n") == 1 and "cannot sort by 'colour'" in err
    code, _, err = run(capsys, "search", TEXT, "--store", served_library[0], "--min-score", "7")
    assert code == 2 and "--min-score" in err


def test_http_takes_both_as_json_and_as_an_upload(served_library, exact):
    ids, scores, rows = exact
    cut = float(scores[19]) - 1e-6
    app = create_app(ServeConfig(store=served_library[0]))
    with local_client(app) as client:
        found = client.post("/search", json={"text": TEXT, "k": 5, "min_score": cut, "sort": "-mtime"}).json()
        assert [row["id"] for row in found] == sorted(ids[:20].tolist(), key=lambda i: -rows[i]["mtime"])[:5]
        assert client.post("/search", json={"text": TEXT, "min_score": 0.999}).json() == []
        for body, status in (({"text": TEXT, "min_score": 2}, 422), ({"text": TEXT, "min_score": "0.3"}, 422),
                             ({"text": TEXT, "sort": "width; drop"}, 422), ({"text": TEXT, "sort": "colour"}, 400)):
            response = client.post("/search", json=body)
            assert response.status_code == status and "error" in response.json(), (body, response.text)
        with open(rows[int(ids[0])]["path"], "rb") as handle:
            data = handle.read()
        upload = client.post("/search", files={"image": ("a.png", data)},
                             data={"k": "4", "min_score": "0.5", "sort": "-width"})
        assert upload.status_code == 200, upload.text
        hits = upload.json()
        assert hits and all(hit["score"] >= 0.5 for hit in hits)
        assert [hit["width"] for hit in hits] == sorted((hit["width"] for hit in hits), reverse=True)
