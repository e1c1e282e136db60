"""A store is open data (issue 13, items 2 and 4): plain LanceDB, DuckDB, Polars and FAISS read it
without clipdex, and `clipdex export` writes its rows out."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import faiss
import lance
import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from indexer.run import IndexConfig, index_paths
from search import Query
from store.ann import AnnConfig
from store.store import Store, reindex
from tests.helpers import run

K = 5


@pytest.fixture(scope="module")
def store_dir(served_library):
    """40 captioned demo images, so caption_embedding holds vectors too (read only: copied to change)."""
    return served_library[0]


def clipdex_top(store_dir, vector, k=K, where=None) -> list[int]:
    query = Query.create(Store.open(store_dir), vector=vector).limit(k)
    return [hit["id"] for hit in (query.where(where) if where else query).to_list()]


def a_query(store_dir) -> np.ndarray:
    rows = lance.dataset(store_dir / "lance" / "images.lance").to_table(columns=["caption_embedding"], limit=1)
    return np.asarray(rows.column("caption_embedding")[0].as_py(), np.float32)


def test_plain_lancedb_searches_the_images_table_without_naming_a_column(store_dir):
    table = lancedb.connect(str(store_dir / "lance")).open_table("images")
    query = a_query(store_dir)
    found = table.search(query).limit(K).to_arrow()  # L2 on unit vectors: the order of cosine
    assert found.column("id").to_pylist() == clipdex_top(store_dir, query)


def test_duckdb_runs_sql_and_an_inner_product_top_k_equal_to_clipdex(store_dir):
    duckdb = pytest.importorskip("duckdb")
    images = lance.dataset(store_dir / "lance" / "images.lance")  # noqa: F841 (DuckDB scans it by name)
    counted = duckdb.sql("SELECT count(*), count(caption) FROM images WHERE width >= 100").fetchall()[0]
    table = images.to_table(columns=["width", "caption"])
    wide = np.asarray(table.column("width")) >= 100
    assert counted == (int(wide.sum()), int(sum(c is not None for c, w in zip(table.column("caption").to_pylist(), wide) if w)))

    query = a_query(store_dir)
    dim = len(query)
    top = duckdb.execute(f"SELECT id FROM images ORDER BY array_inner_product(embedding, ?::FLOAT[{dim}]) DESC "
                         f"LIMIT {K}", [query.tolist()]).fetchall()
    assert [row[0] for row in top] == clipdex_top(store_dir, query)


def test_polars_reads_the_images_table(store_dir):
    polars = pytest.importorskip("polars")
    frame = polars.scan_pyarrow_dataset(lance.dataset(store_dir / "lance" / "images.lance"))
    captioned = frame.filter(polars.col("caption").is_not_null()).select("id", "path", "width").collect()
    assert captioned.height == Store.open(store_dir).tables.count()
    assert captioned["width"].dtype == polars.Int32 and captioned["width"].null_count() == 0


def test_the_current_faiss_index_is_at_a_stable_path_and_replaced_whole(store_dir, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(store_dir, store)
    query = a_query(store)
    index = faiss.read_index(str(store / "faiss" / "index.faiss"))
    _, ids = index.search(query[None, :], K)
    assert ids[0].tolist() == clipdex_top(store, query)

    before = os.stat(store / "faiss" / "index.faiss")
    reindex(store, AnnConfig(kind="flat"))
    after = os.stat(store / "faiss" / "index.faiss")
    manifest_file = store / Store.open(store).manifest.index.file
    assert (after.st_ino, after.st_dev) == (os.stat(manifest_file).st_ino, os.stat(manifest_file).st_dev)
    assert after.st_ino != before.st_ino  # a new file renamed in, never the old one rewritten
    assert sorted(p.name for p in (store / "faiss").iterdir() if p.name.startswith(".")) == []


def test_export_parquet_has_ids_paths_metadata_and_fixed_size_embeddings(capsys, store_dir, tmp_path):
    out = tmp_path / "rows.parquet"
    assert run(capsys, "export", "--store", store_dir, "--out", out)[0] == 0
    table = pq.read_table(out)
    stored = lance.dataset(store_dir / "lance" / "images.lance").to_table().sort_by("id")
    table = table.sort_by("id")
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 64)
    assert table.schema.field("caption_embedding").type == pa.list_(pa.float32(), 64)
    assert "path_bytes" not in table.column_names and "link_target" not in table.column_names
    for column in ("id", "path", "caption", "width", "height", "hash"):
        assert table.column(column).to_pylist() == stored.column(column).to_pylist()
    np.testing.assert_array_equal(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)),
                                  np.stack(stored.column("embedding").to_numpy(zero_copy_only=False)))


def test_export_csv_with_columns_and_where(capsys, store_dir, tmp_path):
    out = tmp_path / "rows.csv"
    code, _, err = run(capsys, "export", "--store", store_dir, "--out", out, "--columns", "id,path,width",
                       "--where", "width >= 300")
    assert code == 0, err
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    stored = lance.dataset(store_dir / "lance" / "images.lance").to_table(columns=["id", "width"]).to_pylist()
    assert sorted(int(r["id"]) for r in rows) == sorted(r["id"] for r in stored if r["width"] >= 300)
    assert list(rows[0]) == ["id", "path", "width"] and 0 < len(rows) < len(stored)


@pytest.mark.parametrize("arguments, message", [
    (["--out", "{tmp}/x.csv", "--columns", "id,embedding"], "a CSV file holds no vectors"),
    (["--out", "{tmp}/x.parquet", "--columns", "id,colour"], "the store has no column colour"),
    (["--out", "{tmp}/x.parquet", "--where", "colour = 'red'"], "unknown column 'colour'"),
    (["--out", "{tmp}/x.json"], "cannot tell the format from"),
    (["--out", "{tmp}/missing/x.parquet"], "does not exist"),
    (["--out", "{tmp}/exists.parquet"], "already exists: pass --overwrite"),
])
def test_export_mistakes_are_one_line(capsys, store_dir, tmp_path, arguments, message):
    (tmp_path / "exists.parquet").write_bytes(b"keep me")
    code, out, err = run(capsys, "export", "--store", store_dir, *[a.format(tmp=tmp_path) for a in arguments])
    assert code != 0 and message in err and len(err.strip().splitlines()) == 1 and not out
    assert (tmp_path / "exists.parquet").read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.parquet"]  # nothing half-written left


def test_export_streams_in_bounded_batches(capsys, store_dir, tmp_path, monkeypatch):
    """A batch never holds more than BATCH_BYTES of vectors, however many rows the store has."""
    import store.export as export

    seen = []
    real = export._conform
    monkeypatch.setattr(export, "BATCH_BYTES", 64 * 4 * 2 * 8)  # 8 rows of both vectors
    monkeypatch.setattr(export, "MIN_BATCH_ROWS", 1)
    monkeypatch.setattr(export, "_conform", lambda batch, schema: seen.append(batch.num_rows) or real(batch, schema))
    assert run(capsys, "export", "--store", store_dir, "--out", tmp_path / "x.parquet")[0] == 0
    assert max(seen) <= 8 and len(seen) >= 5 and sum(seen) == pq.read_metadata(tmp_path / "x.parquet").num_rows


def test_a_store_with_the_old_fixed_size_caption_column_is_opened_up_by_its_next_run(store_dir, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(store_dir, store)
    table = lancedb.connect(str(store / "lance")).open_table("images")
    captions = table.to_arrow().sort_by("id").column("caption_embedding").to_pylist()
    table.alter_columns({"path": "caption_embedding", "data_type": pa.list_(pa.float32(), 64)})  # as clipdex made it
    with pytest.raises(ValueError, match="more than one vector column"):
        table.search(a_query(store)).limit(K).to_arrow()

    library = Path(Store.open(store).manifest.roots[0])
    summary = index_paths([library], store, IndexConfig(model="clipdex-shapes", device="cpu", progress=False))
    assert summary.embedded == 0
    table = lancedb.connect(str(store / "lance")).open_table("images")
    assert table.schema.field("caption_embedding").type == pa.list_(pa.float32())
    assert table.to_arrow().sort_by("id").column("caption_embedding").to_pylist() == captions
    assert table.search(a_query(store)).limit(K).to_arrow().column("id").to_pylist() == clipdex_top(store, a_query(store))


@pytest.mark.parametrize("name, options", [("rows.parquet", []), ("shards", ["--format", "clip-retrieval"])])
def test_export_overwrite_replaces_the_output_whole(capsys, store_dir, tmp_path, name, options):
    out = tmp_path / name
    assert run(capsys, "export", "--store", store_dir, "--out", out, *options)[0] == 0
    assert run(capsys, "export", "--store", store_dir, "--out", out, "--where", "width >= 300", "--overwrite",
               *options)[0] == 0
    files = sorted((out / "metadata").iterdir()) if out.is_dir() else [out]
    exported = sum(pq.read_metadata(f).num_rows for f in files)
    stored = lance.dataset(store_dir / "lance" / "images.lance").count_rows(filter="width >= 300")
    assert exported == stored and sorted(p.name for p in tmp_path.iterdir()) == [name]
