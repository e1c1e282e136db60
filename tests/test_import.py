"""`clipdex import` from every accepted layout gives the same store and the same cache results."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import cli
from search import Query
from search.cache import CacheRetriever
from store.errors import InputError, NoEncoderError
from store.importer import import_features
from store.store import Store

DIM, COUNT = 24, 300


@pytest.fixture(scope="module")
def raw():
    rng = np.random.default_rng(5)
    return (rng.normal(size=(COUNT, DIM)) * rng.uniform(0.5, 2, size=(COUNT, 1))).astype(np.float32)  # unnormalised


@pytest.fixture(scope="module")
def paths():
    return [f"s3://cc3m/{i:06d}.jpg" for i in range(COUNT)]


def layouts(root, raw, paths):
    meta = pa.table({"url": paths, "caption": [f"caption {i}" for i in range(COUNT)]})
    (root / "npy").mkdir()
    np.save(root / "npy" / "features.npy", raw)
    pq.write_table(meta, root / "npy" / "meta.parquet")
    cr = root / "clip_retrieval"
    (cr / "img_emb").mkdir(parents=True)
    (cr / "metadata").mkdir()
    for shard, (start, stop) in enumerate([(0, 120), (120, COUNT)]):
        np.save(cr / "img_emb" / f"img_emb_{shard}.npy", raw[start:stop])
        pq.write_table(meta.slice(start, stop - start), cr / "metadata" / f"metadata_{shard}.parquet")
    table = meta.append_column("embedding", pa.array(list(raw), pa.list_(pa.float32())))
    pq.write_table(table, root / "features.parquet")
    import lancedb

    lancedb.connect(str(root / "lance")).create_table("features", table)
    return {
        "npy": ([root / "npy" / "features.npy"], root / "npy" / "meta.parquet"),
        "clip-retrieval": ([cr], None),
        "parquet": ([root / "features.parquet"], None),
        "lance": ([root / "lance" / "features.lance"], None),
    }


def test_every_layout_gives_identical_results(tmp_path, raw, paths):
    queries = np.random.default_rng(9).normal(size=(5, DIM)).astype(np.float32)
    results = {}
    for name, (sources, metadata) in layouts(tmp_path, raw, paths).items():
        summary = import_features(sources, tmp_path / f"store-{name}", metadata and str(metadata), "imagebind_huge")
        assert summary["imported"] == COUNT and summary["dim"] == DIM and summary["space"] == "imagebind_huge"
        store = Store.open(tmp_path / f"store-{name}")
        rows = store.tables.images.search().select(["id", "path", "caption"]).to_arrow().sort_by("id").to_pylist()
        assert [r["path"] for r in rows] == paths and rows[3]["caption"] == "caption 3"
        cache = CacheRetriever.open(store, device="cpu")
        assert cache.recall_at_10 == store.manifest.index.recall_at_10 == 1.0
        results[name] = cache.blend(queries, k=7, weighting="reference", return_neighbours=True)
    first = results["npy"]
    for name, result in results.items():
        np.testing.assert_array_equal(result.ids, first.ids, err_msg=name)
        np.testing.assert_allclose(result.features, first.features, atol=1e-6, err_msg=name)


def test_import_normalises_extends_and_is_idempotent(tmp_path, raw, paths):
    np.save(tmp_path / "a.npy", raw[:200])
    np.save(tmp_path / "b.npy", raw[200:])
    import_features([tmp_path / "a.npy"], tmp_path / "store", model_name="imagebind_huge")
    store = Store.open(tmp_path / "store")
    ids_before = store.tables.images.search().select(["id", "path"]).to_arrow().to_pylist()
    again = import_features([tmp_path / "a.npy"], tmp_path / "store", model_name="imagebind_huge")
    assert again["imported"] == 0 and again["skipped"] == 200
    more = import_features([tmp_path / "b.npy"], tmp_path / "store", model_name="imagebind_huge")
    assert more["imported"] == COUNT - 200 and more["count"] == COUNT
    store.refresh()
    table = store.tables.images.search().select(["id", "path", "embedding"]).to_arrow()
    after = {r["path"]: r["id"] for r in table.select(["id", "path"]).to_pylist()}
    assert all(after[r["path"]] == r["id"] for r in ids_before)  # ids stay stable
    norms = np.linalg.norm(np.array(table.column("embedding").to_pylist()), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    assert store.manifest.space == "imagebind_huge" and not store.manifest.has_text_encoder


def test_text_search_on_a_space_without_text_encoder_is_refused(tmp_path, raw):
    np.save(tmp_path / "f.npy", raw)
    import_features([tmp_path / "f.npy"], tmp_path / "store", model_name="imagebind_huge")
    store = Store.open(tmp_path / "store")
    with pytest.raises(NoEncoderError, match="'imagebind_huge' features, which have no text or image encoder"):
        Query.create(store, "a dog").to_list()
    hits = Query.create(store, vector=raw[3]).limit(1).to_list()  # vector search still works
    assert hits[0]["path"].endswith("#3")


@pytest.mark.parametrize("make, message", [
    (lambda d: np.save(d / "x.npy", np.zeros((3, 4, 5), np.float32)) or [d / "x.npy"], "features must be"),
    (lambda d: np.save(d / "x.npy", np.full((3, 4), np.nan, np.float32)) or [d / "x.npy"], "NaN"),
    (lambda d: [d / "missing.npy"], "no such features"),
    (lambda d: pq.write_table(pa.table({"a": [1]}), d / "x.parquet") or [d / "x.parquet"], "no embedding column"),
])
def test_bad_features_are_clear_errors(tmp_path, make, message):
    with pytest.raises(InputError, match=message):
        import_features(make(tmp_path), tmp_path / "store")


def test_cli_import_and_cache_query(tmp_path, raw, capsys):
    np.save(tmp_path / "f.npy", raw)
    np.save(tmp_path / "q.npy", raw[:4] * 3)
    for argv in (["import", tmp_path / "f.npy", "--store", tmp_path / "s", "--model-name", "imagebind_huge", "--json"],
                 ["cache", "query", "--store", tmp_path / "s", "--queries", tmp_path / "q.npy", "-k", "5",
                  "--weighting", "reference", "--out", tmp_path / "out.npy", "--neighbours-out", tmp_path / "n.parquet"]):
        with pytest.raises(SystemExit) as caught:
            cli.main([str(a) for a in argv])
        assert caught.value.code == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["imported"] == COUNT
    blended = np.load(tmp_path / "out.npy")
    assert blended.shape == (4, DIM) and blended.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(blended, axis=1), np.linalg.norm(raw[:4] * 3, axis=1), rtol=1e-4)
    neighbours = pq.read_table(tmp_path / "n.parquet").to_pylist()
    assert len(neighbours) == 20 and neighbours[0]["rank"] == 1 and neighbours[0]["id"] == 1  # itself first

    with pytest.raises(SystemExit) as caught:
        cli.main(["cache", "query", "--store", str(tmp_path / "s"), "--queries", str(tmp_path / "f.npy"),
                  "--alpha", "2", "--out", str(tmp_path / "x.npy")])
    err = capsys.readouterr().err
    assert caught.value.code == 1 and err.startswith("error: alpha must be within [0, 1]") and len(err.splitlines()) == 1
