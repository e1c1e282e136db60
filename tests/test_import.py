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
from store.importer import ImportConfig, import_features
from store.store import Store
from tests.helpers import run

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
        summary = import_features(sources, tmp_path / f"store-{name}",
                                  ImportConfig(metadata=metadata and str(metadata), model_name="imagebind_huge"))
        assert summary.imported == COUNT and summary.dim == DIM and summary.space == "imagebind_huge"
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
    import_features([tmp_path / "a.npy"], tmp_path / "store", ImportConfig(model_name="imagebind_huge"))
    store = Store.open(tmp_path / "store")
    ids_before = store.tables.images.search().select(["id", "path"]).to_arrow().to_pylist()
    again = import_features([tmp_path / "a.npy"], tmp_path / "store", ImportConfig(model_name="imagebind_huge"))
    assert again.imported == 0 and again.skipped == 200
    more = import_features([tmp_path / "b.npy"], tmp_path / "store", ImportConfig(model_name="imagebind_huge"))
    assert more.imported == COUNT - 200 and more.count == COUNT
    store.refresh()
    table = store.tables.images.search().select(["id", "path", "embedding"]).to_arrow()
    after = {r["path"]: r["id"] for r in table.select(["id", "path"]).to_pylist()}
    assert all(after[r["path"]] == r["id"] for r in ids_before)  # ids stay stable
    norms = np.linalg.norm(np.array(table.column("embedding").to_pylist()), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    assert store.manifest.space == "imagebind_huge" and not store.manifest.has_text_encoder


def test_text_search_on_a_space_without_text_encoder_is_refused(tmp_path, raw):
    np.save(tmp_path / "f.npy", raw)
    import_features([tmp_path / "f.npy"], tmp_path / "store", ImportConfig(model_name="imagebind_huge"))
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
                  "--restore-norm", "--out", tmp_path / "out.npy", "--neighbours-out", tmp_path / "n.parquet"]):
        with pytest.raises(SystemExit) as caught:
            cli.main([str(a) for a in argv])
        assert caught.value.code == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["imported"] == COUNT
    blended = np.load(tmp_path / "out.npy")
    assert blended.shape == (4, DIM) and blended.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(blended, axis=1), np.linalg.norm(raw[:4] * 3, axis=1), rtol=1e-4)
    with pytest.raises(SystemExit) as caught:  # the default: the released code's LLM path, unit rows
        cli.main([str(a) for a in argv[:-4] if a != "--restore-norm"] + ["--out", str(tmp_path / "unit.npy")])
    assert caught.value.code == 0
    np.testing.assert_allclose(np.linalg.norm(np.load(tmp_path / "unit.npy"), axis=1), 1.0, rtol=1e-4)
    neighbours = pq.read_table(tmp_path / "n.parquet").to_pylist()
    assert len(neighbours) == 20 and neighbours[0]["rank"] == 1 and neighbours[0]["id"] == 1  # itself first

    with pytest.raises(SystemExit) as caught:
        cli.main(["cache", "query", "--store", str(tmp_path / "s"), "--queries", str(tmp_path / "f.npy"),
                  "--alpha", "2", "--out", str(tmp_path / "x.npy")])
    err = capsys.readouterr().err
    assert caught.value.code == 1 and err.startswith("error: alpha must be within [0, 1]") and len(err.splitlines()) == 1


def test_float16_features_are_taken_as_they_are(tmp_path):
    raw = np.random.default_rng(5).normal(size=(50, 16)).astype(np.float16)
    np.save(tmp_path / "half.npy", raw)
    import_features([tmp_path / "half.npy"], tmp_path / "store")
    store = Store.open(tmp_path / "store")
    rows = store.tables.rows_by_id(list(range(1, 51)), ["id", "embedding"]).to_pylist()
    expected = raw.astype(np.float64) / np.linalg.norm(raw.astype(np.float64), axis=1, keepdims=True)
    for row in rows:
        np.testing.assert_allclose(row["embedding"], expected[row["id"] - 1], atol=1e-6)


def test_import_streams_in_chunks_and_checks_everything_before_writing(tmp_path, monkeypatch):
    import store.importer as importer

    monkeypatch.setattr(importer, "IMPORT_CHUNK", 7)  # many chunks, keys repeated across them
    raw = np.random.default_rng(6).normal(size=(40, 8)).astype(np.float32)
    paths = [f"/photos/{i % 30}.jpg" for i in range(40)]  # rows 30-39 repeat keys 0-9: the last wins
    pq.write_table(pa.table({"path": paths}), tmp_path / "meta.parquet")
    np.save(tmp_path / "f.npy", raw)
    summary = import_features([tmp_path / "f.npy"], tmp_path / "store",
                              ImportConfig(metadata=str(tmp_path / "meta.parquet")))
    assert (summary.imported, summary.count) == (30, 30)
    rows = {r["path"]: r for r in Store.open(tmp_path / "store").tables.file_rows().to_pylist()}
    vectors = Store.open(tmp_path / "store").tables.rows_by_id([rows["/photos/3.jpg"]["id"]], ["embedding"])
    np.testing.assert_allclose(vectors.column("embedding")[0].as_py(), raw[33] / np.linalg.norm(raw[33]), atol=1e-6)
    bad = raw.copy()
    bad[38, 2] = np.nan  # in the last chunk: found before the first chunk is written
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(InputError, match="NaN or infinite values \\(row 38\\)"):
        import_features([tmp_path / "bad.npy"], tmp_path / "other")
    assert not Store.exists(tmp_path / "other")


def test_a_build_that_died_is_recovered_by_reindex_or_the_next_import(tmp_path, monkeypatch, capsys):
    from store.store import Store as StoreClass

    raw = np.random.default_rng(7).normal(size=(60, 8)).astype(np.float32)
    np.save(tmp_path / "f.npy", raw)

    def killed(self, *args):
        raise KeyboardInterrupt  # the process dies during the index build

    with monkeypatch.context() as patch:
        patch.setattr(StoreClass, "rebuild_index", killed)
        with pytest.raises(KeyboardInterrupt):
            import_features([tmp_path / "f.npy"], tmp_path / "store")
    store = Store.open(tmp_path / "store")
    assert store.tables.count() == 60 and not store.manifest.index.file
    code, out, _ = run(capsys, "info", "--store", tmp_path / "store")
    assert "no index yet" in out
    code, out, err = run(capsys, "reindex", "--store", tmp_path / "store", "--json")
    assert code == 0 and json.loads(out)["count"] == 60, err
    for name in ("manifest.json",):  # and an import with nothing new rebuilds a stale index too
        manifest = json.loads((tmp_path / "store" / name).read_text())
        manifest["index"] = {}
        (tmp_path / "store" / name).write_text(json.dumps(manifest))
    summary = import_features([tmp_path / "f.npy"], tmp_path / "store")
    assert summary.imported == 0 and summary.index == "flat" and Store.open(tmp_path / "store").manifest.index.file


def test_the_table_streams_its_vectors_in_bounded_batches(tmp_path):
    raw = np.random.default_rng(8).normal(size=(1000, 8)).astype(np.float32)
    np.save(tmp_path / "f.npy", raw)
    import_features([tmp_path / "f.npy"], tmp_path / "store")
    source = Store.open(tmp_path / "store").tables.vector_source(batch_bytes=128 * 8 * 4)
    seen = [ids for ids, _ in source.batches()]
    assert max(len(ids) for ids in seen) <= 128 and sorted(np.concatenate(seen).tolist()) == list(range(1, 1001))
    assert sorted(source.all_ids().tolist()) == list(range(1, 1001))
    sample_ids, sample = source.sample(50, seed=0)
    assert len(set(sample_ids.tolist())) == 50 and sample.shape == (50, 8)


def test_the_cache_gathers_from_the_values_file_not_a_copy_in_memory(tmp_path, monkeypatch):
    raw = np.random.default_rng(9).normal(size=(3000, 16)).astype(np.float32)
    np.save(tmp_path / "f.npy", raw)
    import_features([tmp_path / "f.npy"], tmp_path / "store")
    store = Store.open(tmp_path / "store")
    values = tmp_path / "store" / store.manifest.index.values
    assert np.load(values / "values.npy").dtype == np.float16 and (np.diff(np.load(values / "ids.npy")) > 0).all()

    def no_full_copy(self):
        raise AssertionError("the cache read every vector from the table")

    from store.tables import Tables

    with monkeypatch.context() as patch:
        patch.setattr(Tables, "vectors", no_full_copy)
        cache = CacheRetriever.open(tmp_path / "store", device="cpu")
    assert isinstance(cache.values.base, np.memmap)  # a view of the mapped file, not a copy
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    in_memory = CacheRetriever.from_arrays(np.arange(1, 3001), unit, device="cpu")
    queries = np.random.default_rng(10).normal(size=(8, 16)).astype(np.float32)
    for weighting in ("paper", "reference"):
        ours = cache.blend(queries, k=10, weighting=weighting, return_neighbours=True)
        theirs = in_memory.blend(queries, k=10, weighting=weighting, return_neighbours=True)
        np.testing.assert_array_equal(ours.ids, theirs.ids)
        np.testing.assert_allclose(ours.features, theirs.features, atol=2e-3)  # float16 storage

    import shutil

    shutil.rmtree(values)  # a store built before the values file, or one replaced meanwhile: the table serves
    assert CacheRetriever.open(tmp_path / "store", device="cpu").size == 3000


def test_a_rebuild_never_writes_over_the_files_readers_use(tmp_path, monkeypatch):
    """A reindex at the same table version used to reopen the live values file for writing: a
    reader saw zeros, and a rebuild that died left the manifest naming a half-written file."""
    import store.store as store_module

    raw = np.random.default_rng(11).normal(size=(2000, 16)).astype(np.float32)
    np.save(tmp_path / "f.npy", raw)
    import_features([tmp_path / "f.npy"], tmp_path / "store")
    queries = np.random.default_rng(12).normal(size=(4, 16)).astype(np.float32)
    reader = CacheRetriever.open(tmp_path / "store", device="cpu")
    before = reader.blend(queries, k=5)

    def dies(source, config, values, queries=None):  # the rebuild dies halfway through writing the values
        ids, vectors = next(iter(source.batches()))
        values.write(ids[:1000], vectors[:1000] * 0.5)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(store_module, "build_from", dies)
        with pytest.raises(KeyboardInterrupt):
            store_module.reindex(tmp_path / "store")
    np.testing.assert_array_equal(reader.blend(queries, k=5), before)
    np.testing.assert_array_equal(CacheRetriever.open(tmp_path / "store", device="cpu").blend(queries, k=5), before)
    store_module.reindex(tmp_path / "store")  # a rebuild that lives replaces the files and the leftovers go
    np.testing.assert_array_equal(reader.blend(queries, k=5), before)  # the old files stay mapped
    manifest = Store.open(tmp_path / "store").manifest.index
    assert sorted(p.name for p in (tmp_path / "store" / "faiss").iterdir()) == sorted(
        [manifest.file.split("/")[1], manifest.values.split("/")[1], "index.faiss"])
    np.testing.assert_allclose(CacheRetriever.open(tmp_path / "store", device="cpu").blend(queries, k=5), before,
                               atol=1e-6)


def clip_retrieval_output(folder, raw, paths, shards=12, name=lambda n: f"{n:02d}", texts=None):
    """clip-retrieval's layout: img_emb/img_emb_00.npy + metadata/metadata_00.parquet (+ text_emb/),
    with the metadata columns a real `clip-retrieval inference` run over an img2dataset output writes."""
    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    if texts is not None:
        (folder / "text_emb").mkdir()
    bounds = np.linspace(0, len(raw), shards + 1).astype(int)
    for number, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        rows = range(start, stop)
        np.save(folder / "img_emb" / f"img_emb_{name(number)}.npy", raw[start:stop])
        if texts is not None:
            np.save(folder / "text_emb" / f"text_emb_{name(number)}.npy", texts[start:stop])
        pq.write_table(pa.table({
            "image_path": paths[start:stop], "caption": [f"caption {i}" for i in rows],
            "url": [f"https://example.com/{i}.jpg" for i in rows], "key": [f"{i:09d}" for i in rows],
            "status": ["success"] * len(rows), "error_message": pa.nulls(len(rows), pa.string()),
            "width": [256 + i for i in rows], "height": [192 + i % 7 for i in rows],
            "original_width": [1024 + i for i in rows], "original_height": [768] * len(rows),
            "exif": ['{"Image Make": "Canon"}'] * len(rows), "sha256": [f"{i:064x}" for i in rows],
        }), folder / "metadata" / f"metadata_{name(number)}.parquet")


@pytest.mark.parametrize("name", [lambda n: f"{n:02d}", lambda n: f"{n}"], ids=["zero-padded", "plain"])
def test_clip_retrieval_shards_keep_their_metadata_however_numbered(tmp_path, raw, paths, name):
    """With 10 or more zero-padded shards, 00-09 used to miss their metadata: rows got
    ``<file>#<row>`` keys instead of their paths, exit 0, no warning."""
    clip_retrieval_output(tmp_path / "cr", raw, paths, name=name)
    summary = import_features([tmp_path / "cr"], tmp_path / "store")
    rows = Store.open(tmp_path / "store").tables.file_rows().to_pylist()
    assert summary.imported == COUNT
    assert sorted(r["path"] for r in rows) == sorted(paths)
    assert sorted(r["caption"] for r in rows) == sorted(f"caption {i}" for i in range(COUNT))


def test_a_clip_retrieval_shard_without_its_metadata_is_refused(tmp_path, raw, paths):
    clip_retrieval_output(tmp_path / "cr", raw, paths)
    (tmp_path / "cr" / "metadata" / "metadata_07.parquet").unlink()
    with pytest.raises(InputError, match="no metadata_N.parquet for img_emb_07.npy while the other shards"):
        import_features([tmp_path / "cr"], tmp_path / "store")
    assert not Store.exists(tmp_path / "store")


def unit(rows):
    rows = np.asarray(rows, np.float64)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_clip_retrieval_round_trip_keeps_every_path_caption_and_embedding(capsys, tmp_path, raw, paths):
    """12 zero-padded shards with text_emb/ -> import -> export --format clip-retrieval -> import."""
    texts = np.random.default_rng(9).normal(size=raw.shape).astype(np.float16)
    clip_retrieval_output(tmp_path / "cr", raw.astype(np.float16), paths, texts=texts)
    import_features([tmp_path / "cr"], tmp_path / "store")
    assert run(capsys, "export", "--store", tmp_path / "store", "--out", tmp_path / "out",
               "--format", "clip-retrieval", "--shard-rows", "23")[0] == 0  # across the 25-row fragments
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "img_emb").iterdir())[:2] == ["img_emb_00.npy", "img_emb_01.npy"]
    assert len(list((out / "text_emb").iterdir())) == len(list((out / "metadata").iterdir())) == 14
    meta = pa.concat_tables([pq.read_table(p) for p in sorted((out / "metadata").iterdir())])
    images = np.concatenate([np.load(p) for p in sorted((out / "img_emb").iterdir())])
    captions = np.concatenate([np.load(p) for p in sorted((out / "text_emb").iterdir())])
    row = {path: i for i, path in enumerate(meta.column("image_path").to_pylist())}
    order = [row[p] for p in paths]
    assert meta.column("caption").take(order).to_pylist() == [f"caption {i}" for i in range(COUNT)]
    assert meta.column("key").take(order).to_pylist() == [f"{i:09d}" for i in range(COUNT)]
    np.testing.assert_allclose(images[order], unit(raw.astype(np.float16)), atol=1e-6)
    np.testing.assert_allclose(captions[order], unit(texts), atol=1e-6)

    from embedding_reader import EmbeddingReader  # how autofaiss and clip-retrieval's tools read such a folder

    reader = EmbeddingReader(str(out / "img_emb"), file_format="parquet_npy", metadata_folder=str(out / "metadata"),
                             meta_columns=["image_path", "caption"])
    read = [(vectors, meta) for vectors, meta in reader(batch_size=64, show_progress=False)]
    read_paths = [p for _, meta in read for p in meta["image_path"]]
    read_vectors = np.concatenate([vectors for vectors, _ in read])
    assert sorted(read_paths) == sorted(paths)
    np.testing.assert_array_equal(read_vectors[[read_paths.index(p) for p in paths]], images[order])

    import_features([out], tmp_path / "again")  # and clipdex reads what it wrote
    again = Store.open(tmp_path / "again").tables.images.to_arrow()
    assert sorted(again.column("path").to_pylist()) == sorted(paths)
    assert again.num_rows == COUNT and again.column("caption_embedding").null_count == 0


def test_clip_retrieval_metadata_is_kept_and_filterable(tmp_path, raw, paths):
    clip_retrieval_output(tmp_path / "cr", raw, paths)
    import_features([tmp_path / "cr"], tmp_path / "store")
    store = Store.open(tmp_path / "store")
    rows = store.tables.images.to_arrow()
    by_path = {r["path"]: r for r in rows.to_pylist()}
    first = by_path[paths[3]]
    assert (first["width"], first["height"]) == (259, 195)  # clipdex's own columns, filled
    assert first["url"] == "https://example.com/3.jpg" and first["key"] == "000000003"
    assert first["original_width"] == 1027 and first["status"] == "success" and first["error_message"] is None
    assert first["exif"] == '{"Image Make": "Canon"}'
    for column in ("url", "key", "status", "original_width", "sha256"):
        assert column in store.tables.filter_columns()
    hits = Query.create(store, vector=raw[0]).where("original_width < 1030").limit(10).to_list()
    assert sorted(hit["path"] for hit in hits) == sorted(paths[:6])


def test_metadata_named_like_a_clipdex_column_is_kept_under_another_name(tmp_path, raw, paths):
    np.save(tmp_path / "f.npy", raw)
    pq.write_table(pa.table({"path": paths, "hash": [f"md5-{i}" for i in range(COUNT)],
                             "Camera Model": ["X100"] * COUNT, "tags": [["a", "b"]] * COUNT}), tmp_path / "m.parquet")
    import_features([tmp_path / "f.npy"], tmp_path / "store", ImportConfig(metadata=str(tmp_path / "m.parquet")))
    row = Store.open(tmp_path / "store").tables.images.to_arrow().to_pylist()[0]
    assert row["source_hash"].startswith("md5-") and row["hash"] != row["source_hash"]
    assert row["Camera_Model"] == "X100" and json.loads(row["tags"]) == ["a", "b"]


def test_metadata_of_another_type_than_the_stored_column_is_one_line(tmp_path, raw, paths):
    np.save(tmp_path / "a.npy", raw[:10])
    pq.write_table(pa.table({"path": paths[:10], "rating": list(range(10))}), tmp_path / "a.parquet")
    import_features([tmp_path / "a.npy"], tmp_path / "store", ImportConfig(metadata=str(tmp_path / "a.parquet")))
    np.save(tmp_path / "b.npy", raw[10:20])
    pq.write_table(pa.table({"path": paths[10:20], "rating": ["good"] * 10}), tmp_path / "b.parquet")
    with pytest.raises(InputError, match="metadata column 'rating' holds string values but the store's 'rating'"):
        import_features([tmp_path / "b.npy"], tmp_path / "store",
                        ImportConfig(metadata=str(tmp_path / "b.parquet")))
    assert Store.open(tmp_path / "store").tables.count() == 10
