"""The readers of `clipdex import`: each layout goes to its own, and a new one is a reader listed."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import store.sources as sources
from store.errors import InputError
from store.importer import ImportConfig, import_features
from store.sources import Part, PartSchema, reader_for
from store.store import Store

DIM, COUNT = 8, 20


@pytest.fixture()
def layouts(tmp_path):
    raw = np.random.default_rng(3).normal(size=(COUNT, DIM)).astype(np.float32)
    meta = pa.table({"path": [f"/photos/{i}.jpg" for i in range(COUNT)], "caption": [f"c{i}" for i in range(COUNT)]})
    np.save(tmp_path / "features.npy", raw)
    (tmp_path / "shards").mkdir()
    np.save(tmp_path / "shards" / "part_0.npy", raw[:10])
    pq.write_table(meta.slice(0, 10), tmp_path / "shards" / "part_0.parquet")
    np.save(tmp_path / "shards" / "part_1.npy", raw[10:])
    pq.write_table(meta.slice(10), tmp_path / "shards" / "part_1.parquet")
    table = meta.append_column("embedding", pa.array(list(raw), pa.list_(pa.float32())))
    pq.write_table(table, tmp_path / "features.parquet")
    import lancedb

    lancedb.connect(str(tmp_path / "lance")).create_table("features", table)
    cr = tmp_path / "cr"
    for folder in ("img_emb", "metadata", "text_emb"):
        (cr / folder).mkdir(parents=True)
    np.save(cr / "img_emb" / "img_emb_0.npy", raw)
    np.save(cr / "text_emb" / "text_emb_0.npy", raw)
    pq.write_table(meta, cr / "metadata" / "metadata_0.parquet")
    return {"npy": tmp_path / "features.npy", "npy-folder": tmp_path / "shards", "parquet": tmp_path / "features.parquet",
            "lance": tmp_path / "lance" / "features.lance", "clip-retrieval": cr}


def test_each_layout_goes_to_its_reader_which_tells_its_schema_from_headers(layouts):
    for name, path in layouts.items():
        reader = reader_for(path)
        assert reader.name == name, path
        schema = reader.schema(path)
        assert schema.dim == DIM and schema.columns == (() if name == "npy" else ("path", "caption")), name
        assert sum(len(part.features) for part in reader.parts(path)) == COUNT, name


def test_a_layout_no_reader_knows_is_refused_naming_those_there_are(tmp_path):
    (tmp_path / "features.npz").write_bytes(b"")
    with pytest.raises(InputError, match="not a layout clipdex imports .*clip-retrieval output folder.*Lance table"):
        import_features([tmp_path / "features.npz"], tmp_path / "store")
    assert not Store.exists(tmp_path / "store")


class TextRows:
    """A toy layout: features as whitespace-separated text, one row a line."""
    name = "text"
    describe = "a .txt file of features, one row a line"

    def detect(self, path):
        return path.suffix == ".txt"

    def schema(self, path, metadata=None):
        return PartSchema(len(path.read_text().splitlines()[0].split()))

    def parts(self, path, metadata=None):
        yield Part(str(path), np.loadtxt(path, ndmin=2),
                   pa.table({"url": [f"https://example.com/{i}" for i in range(len(path.read_text().splitlines()))]}))


def test_a_new_layout_is_one_reader_in_the_registry(tmp_path, monkeypatch):
    np.savetxt(tmp_path / "features.txt", np.random.default_rng(4).normal(size=(5, 3)))
    with pytest.raises(InputError, match="not a layout"):
        import_features([tmp_path / "features.txt"], tmp_path / "store")
    monkeypatch.setattr(sources, "READERS", (TextRows(), *sources.READERS))
    summary = import_features([tmp_path / "features.txt"], tmp_path / "store")
    assert (summary.imported, summary.dim) == (5, 3)
    rows = Store.open(tmp_path / "store").tables.file_rows().sort_by("id").to_pylist()
    assert [r["path"] for r in rows] == [f"https://example.com/{i}" for i in range(5)]


def test_a_key_a_later_part_changes_is_updated_in_place_not_added_twice(tmp_path):
    """Rows the first shard added are old to the second: its rows of the same paths replace them."""
    rng = np.random.default_rng(5)
    (tmp_path / "shards").mkdir()
    for number, count in ((0, 6), (1, 3)):
        np.save(tmp_path / "shards" / f"part_{number}.npy", rng.normal(size=(count, DIM)).astype(np.float32))
        pq.write_table(pa.table({"path": [f"/p/{i}.jpg" for i in range(count)]}),
                       tmp_path / "shards" / f"part_{number}.parquet")
    summary = import_features([tmp_path / "shards"], tmp_path / "store")
    assert (summary.read, summary.imported, summary.updated, summary.count) == (9, 6, 3, 6)
    store = Store.open(tmp_path / "store")
    rows = store.tables.images.to_arrow().sort_by("id")
    assert rows.column("id").to_pylist() == list(range(1, 7))
    second = np.load(tmp_path / "shards" / "part_1.npy")
    np.testing.assert_allclose(np.array(rows.column("embedding").to_pylist())[:3],
                               second / np.linalg.norm(second, axis=1, keepdims=True), atol=1e-6)


def test_a_caption_kept_by_one_update_survives_the_next(tmp_path):
    """Three shards of one run change a row's features; only the first gives its caption. Each
    later write keeps the caption the row has (the importer used to remember the source's empty
    caption after the first update, so the third write dropped it)."""
    rng = np.random.default_rng(6)
    (tmp_path / "shards").mkdir()
    for number in range(3):
        np.save(tmp_path / "shards" / f"part_{number}.npy", rng.normal(size=(1, DIM)).astype(np.float32))
        pq.write_table(pa.table({"path": ["/p/a.jpg"], "caption": ["a red circle" if number == 0 else None]},
                                schema=pa.schema([("path", pa.string()), ("caption", pa.string())])),
                       tmp_path / "shards" / f"part_{number}.parquet")
    summary = import_features([tmp_path / "shards"], tmp_path / "store")
    assert (summary.imported, summary.updated, summary.count) == (1, 2, 1)
    assert Store.open(tmp_path / "store").tables.images.to_arrow().column("caption").to_pylist() == ["a red circle"]


def test_a_source_of_another_dimension_is_refused_before_any_row_is_written(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((4, DIM), np.float32))
    np.save(tmp_path / "b.npy", np.ones((4, DIM + 1), np.float32))
    with pytest.raises(InputError, match=f"b.npy has {DIM + 1}-d features; the store holds {DIM}-d features"):
        import_features([tmp_path / "a.npy", tmp_path / "b.npy"], tmp_path / "store", ImportConfig())
    assert Store.open(tmp_path / "store").tables.count() == 0
