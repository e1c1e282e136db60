"""`clipdex export --format faiss` (issue 31): a knn.index that ImageBind-LLM's released code uses
unchanged. `released_block` below is that code's cache block (LLaMA-Adapter `imagebind_LLM`,
`forward_visual`) transcribed in float64 and run on the exported file exactly as it calls FAISS:
`faiss.read_index`, `index.search(feats, k)`, `index.reconstruct(i)` for every neighbour. It must
equal `clipdex cache query` on the store."""

from __future__ import annotations

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from store.errors import InputError
from store.export_faiss import export_faiss
from store.importer import ImportConfig, import_features
from store.store import Store
from tests.helpers import run

DIM, SIZE = 64, 3000


def features(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, DIM))
    data = centres[rng.integers(0, 40, count)] + 0.4 * rng.normal(size=(count, DIM))
    return (data / np.linalg.norm(data, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store of imported features (ids from 1, captions on some rows) whose rows were deleted in
    the middle, so stable ids and row numbers differ."""
    folder = tmp_path_factory.mktemp("faiss")
    np.save(folder / "f.npy", features(SIZE, 0))
    import_features([folder / "f.npy"], folder / "store", ImportConfig())
    opened = Store.open(folder / "store", writable=True)
    opened.tables.delete_ids(range(100, 400))
    opened.tables.compact()
    opened.rebuild_index()
    return folder / "store"


def released_block(index_path, queries: np.ndarray, cache_size: int = 10, cache_t: float = 20.0,
                   cache_weight: float = 0.5) -> np.ndarray:
    """The released forward_visual's knn block, a query at a time (its `sims @ prototypes` mixes
    the queries of a batch above one), in float64 after FAISS's float32 search and reconstruct."""
    index = faiss.read_index(str(index_path))
    out = []
    for feats in np.atleast_2d(queries).astype(np.float32):
        sims, indices = index.search(feats[None, :], int(cache_size))
        prototypes = np.vstack([index.reconstruct(int(x)) for x in indices.reshape(-1).tolist()])
        sims = sims[0].astype(np.float64) * cache_t
        weights = np.exp(sims - sims.max())
        weights /= weights.sum()
        visual = weights @ prototypes.astype(np.float64)
        visual /= np.linalg.norm(visual)
        visual = (1 - cache_weight) * feats.astype(np.float64) + cache_weight * visual
        out.append(visual / np.linalg.norm(visual))
    return np.array(out)


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivf"])
def test_the_exported_index_answers_row_numbers_and_reconstructs_the_stored_features(store, tmp_path, index_type):
    summary = export_faiss(Store.open(store), tmp_path / "knn.index", index_type, show_progress=False)
    index = faiss.read_index(str(tmp_path / "knn.index"))
    rows = pq.read_table(tmp_path / "knn.rows.parquet")
    assert summary.rows == index.ntotal == rows.num_rows == SIZE - 300 and index.d == DIM
    assert rows.column("row").to_pylist() == list(range(SIZE - 300))
    stored = Store.open(store).tables.images.to_arrow()
    by_id = dict(zip(stored.column("id").to_pylist(), np.stack(stored.column("embedding").to_numpy(zero_copy_only=False))))
    ids = rows.column("id").to_pylist()
    for row in (0, 98, 99, 1234, SIZE - 301):
        assert np.array_equal(index.reconstruct(row), by_id[ids[row]])  # exactly the stored feature
    _, found = index.search(by_id[ids[1234]][None, :], 1)
    assert found[0, 0] == 1234
    assert summary.recall["image"] >= (1.0 if index_type == "flat" else 0.95)


def test_the_released_cache_block_on_the_file_equals_clipdex_cache_query(store, tmp_path, capsys):
    queries = features(12, 5)
    np.save(tmp_path / "q.npy", queries)
    code, out, err = run(capsys, "export", "--store", store, "--out", tmp_path / "knn.index")
    assert code == 0, err
    assert "recall@10 image 1.0000" in out and "knn.rows.parquet" in out
    released = released_block(tmp_path / "knn.index", queries)
    for dtype, tolerance in (("float32", 1e-5), ("float16", 3e-3)):  # float16: the default, half the memory
        code, out, err = run(capsys, "cache", "query", "--store", store, "--queries", tmp_path / "q.npy",
                             "--dtype", dtype, "--out", tmp_path / f"{dtype}.npy")
        assert code == 0, err
        np.testing.assert_allclose(np.load(tmp_path / f"{dtype}.npy"), released, atol=tolerance)
    assert np.abs(released - queries).max() > 1e-2  # the cache did move the features


def test_the_released_block_mixes_a_batch_where_a_query_at_a_time_does_not(store, tmp_path):
    """Why the transcription goes a query at a time: `sims @ prototypes` of [B, k] and [B, k, C]
    broadcasts to [B, B, C], every query's weights over every query's prototypes."""
    import torch

    export_faiss(Store.open(store), tmp_path / "knn.index", show_progress=False)
    index = faiss.read_index(str(tmp_path / "knn.index"))
    feats = features(2, 7)
    sims, indices = index.search(feats, 10)
    prototypes = torch.tensor(np.vstack([index.reconstruct(int(x)) for x in indices.reshape(-1)]).reshape(2, 10, -1))
    batched = (torch.tensor(sims) * 20).softmax(dim=-1) @ prototypes
    assert tuple(batched.shape) == (2, 2, DIM)


def test_mistakes_are_one_line_and_a_big_in_memory_build_is_refused(store, tmp_path, capsys):
    code, _, err = run(capsys, "export", "--store", store, "--out", tmp_path / "knn.index", "--index-type", "hnsw",
                       "--index-memory", "1M")
    assert code == 1 and "built in memory" in err and "--index-type flat" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "knn.index").exists() and not (tmp_path / "knn.rows.parquet").exists()
    code, _, err = run(capsys, "export", "--store", store, "--out", "-", "--format", "faiss")
    assert code == 1 and "writes a local file" in err
    run(capsys, "export", "--store", store, "--out", tmp_path / "knn.index")
    code, _, err = run(capsys, "export", "--store", store, "--out", tmp_path / "knn.index")
    assert code == 1 and "--overwrite" in err
    with pytest.raises(InputError, match="no rows to export match"):
        export_faiss(Store.open(store), tmp_path / "none.index", where="id < 0", show_progress=False)


def test_a_filtered_export_maps_its_rows(store, tmp_path):
    summary = export_faiss(Store.open(store), tmp_path / "knn.index", where="id >= 2000", show_progress=False)
    rows = pq.read_table(tmp_path / "knn.rows.parquet")
    assert summary.rows == rows.num_rows == SIZE - 2000 + 1 and min(rows.column("id").to_pylist()) == 2000
