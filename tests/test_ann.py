"""The store's FAISS index: kind chosen by size, ANN results agree with exact search, ids are stable."""

from __future__ import annotations

import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

from search import Query
from store.ann import AnnConfig, build_index, choose_kind, load_index, memory_bytes, save_index
from store.errors import InputError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.synthetic import clustered  # noqa: E402


def overlap_with_exact(index, data: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int = 10) -> float:
    """Mean fraction of the exact top-k (by stable id) that *index* returns."""
    exact = faiss.IndexFlatIP(data.shape[1])
    exact.add(data)
    _, truth = exact.search(queries, k)
    _, found = index.search(queries, k)
    return float(np.mean([len(set(ids[t]) & set(f)) / k for t, f in zip(truth, found)]))


@pytest.fixture(scope="module")
def data():
    vectors = clustered(20_000, 32, 40, spread=0.6, seed=3)
    ids = np.arange(len(vectors), dtype=np.int64) * 7 + 1000  # stable ids, not positions
    rng = np.random.default_rng(4)
    queries = clustered(100, 32, 40, spread=0.6, seed=3)[:50] + 0.05 * rng.normal(size=(50, 32)).astype(np.float32)
    return vectors, ids, queries


def test_ivf_reaches_its_target_recall_and_agrees_with_exact(data, tmp_path):
    vectors, ids, queries = data
    built = build_index(ids, vectors, AnnConfig(kind="ivf", target_recall=0.95))
    assert built.kind == "ivf" and built.key.startswith("IVF") and built.params.startswith("nprobe=")
    assert built.recall_at_10 >= 0.95 and built.recall_queries == 256
    assert overlap_with_exact(built.index, vectors, ids, queries) >= 0.9
    _, found = built.index.search(queries[:5], 10)
    assert set(found.ravel()) <= set(ids)  # FAISS ids are the stable ids
    save_index(built.index, tmp_path / "ivf.faiss")
    loaded = load_index(tmp_path / "ivf.faiss", built.params)
    assert f"nprobe={faiss.extract_index_ivf(loaded).nprobe}" == built.params


def test_lower_target_recall_means_fewer_probes(data):
    vectors, ids, _ = data
    loose = build_index(ids, vectors, AnnConfig(kind="ivf", target_recall=0.5))
    strict = build_index(ids, vectors, AnnConfig(kind="ivf", target_recall=0.999))
    assert int(loose.params.split("=")[1]) <= int(strict.params.split("=")[1])
    assert strict.recall_at_10 >= loose.recall_at_10


def test_autofaiss_index_agrees_with_exact(data):
    vectors, ids, queries = data
    small, small_ids = vectors[:5000], ids[:5000]
    built = build_index(small_ids, small, AnnConfig(kind="autofaiss", max_memory="50M", max_query_ms=5))
    assert built.kind == "autofaiss" and built.key and built.recall_at_10 >= 0.9
    assert overlap_with_exact(built.index, small, small_ids, queries) >= 0.9
    assert_restricted_search(built.index, small, small_ids, queries)


def test_lossy_codes_are_reranked_by_exact_cosine_to_the_target_recall(data):
    """8-bit codes blur close neighbours; the tuned rerank depth orders candidates by the exact
    values, so recorded recall meets the target and scores are exact cosines."""
    from store.ann import AnnIndex
    from store.values import StoredValues

    vectors, ids, queries = data
    built = build_index(ids, vectors, AnnConfig(kind="ivf-sq8", target_recall=0.99))
    assert built.key.endswith(",SQ8") and built.rerank > 1 and built.recall_at_10 >= 0.99
    reranked = AnnIndex(built.index, StoredValues.from_arrays(ids, vectors), built.rerank)
    scores, found = reranked.search(queries[:5], 10)
    exact = np.einsum("bc,bkc->bk", queries[:5], vectors[np.searchsorted(ids, found)])
    assert np.allclose(scores, exact, atol=1e-5) and (np.diff(scores, axis=1) <= 0).all()
    assert not np.allclose(AnnIndex(built.index).search(queries[:5], 10)[0], exact, atol=1e-5)  # codes are lossy
    assert overlap_with_exact(reranked, vectors, ids, queries) >= 0.95
    assert_restricted_search(reranked, vectors, ids, queries)


def assert_restricted_search(index, vectors, ids, queries):
    """A prefiltered search returns only allowed ids, and the same best hits as exact over them."""
    from store.ann import AnnIndex

    allowed = ids[::3]
    _, found = (index if isinstance(index, AnnIndex) else AnnIndex(index)).search(queries[:5], 10, allowed_ids=allowed)
    assert set(found.ravel()) - {-1} <= set(allowed)
    subset = vectors[::3]
    best = allowed[np.argmax(queries[:5] @ subset.T, axis=1)]
    assert np.mean(found[:, 0] == best) >= 0.8


def test_restricted_search_on_flat_and_ivf(data):
    vectors, ids, queries = data
    for kind in ("flat", "ivf"):
        built = build_index(ids, vectors, AnnConfig(kind=kind, target_recall=0.95))
        assert_restricted_search(built.index, vectors, ids, queries)


def test_kind_is_chosen_by_size_and_memory():
    config = AnnConfig(ann_threshold=200_000, max_memory="16G")
    assert choose_kind(500, 512, AnnConfig(kind="autofaiss")) == "flat"  # too few to train on
    assert choose_kind(200_000, 512, config) == "flat"
    assert choose_kind(1_000_000, 1024, config) == "ivf"  # 4 GB of vectors fit 16G
    assert choose_kind(1_000_000, 1024, AnnConfig(max_memory="2G")) == "ivf-sq8"  # a byte per dimension fits
    assert choose_kind(1_000_000, 1024, AnnConfig(max_memory="1G")) == "autofaiss"  # must compress further
    assert choose_kind(50_000, 64, AnnConfig(kind="ivf")) == "ivf"


def test_memory_sizes_and_bad_config():
    assert memory_bytes("4G") == 4 * 1024 ** 3 and memory_bytes("512M") == 512 * 1024 ** 2 and memory_bytes("1.5g") > 0
    with pytest.raises(InputError, match="memory size"):
        AnnConfig(max_memory="lots")
    with pytest.raises(InputError, match="index type"):
        AnnConfig(kind="annoy")
    with pytest.raises(InputError, match="target recall"):
        AnnConfig(target_recall=0)


def test_store_above_threshold_serves_from_ivf(data, tmp_path):
    from store.importer import ImportConfig, import_features
    from store.store import Store

    vectors, _, queries = data
    np.save(tmp_path / "f.npy", vectors)
    import_features([tmp_path / "f.npy"], tmp_path / "store",
                    ImportConfig(model_name="synthetic", ann=AnnConfig(ann_threshold=5_000)))
    store = Store.open(tmp_path / "store")
    assert store.manifest.index.type == "ivf" and store.manifest.index.recall_at_10 >= 0.98
    hits = Query.create(store, vector=queries[0]).limit(10).to_list()
    exact = np.argsort(-(vectors @ (queries[0] / np.linalg.norm(queries[0]))))[:10] + 1  # import ids start at 1
    assert len({h["id"] for h in hits} & set(exact.tolist())) >= 9


def test_a_streamed_build_equals_the_in_memory_one_and_reads_in_batches(data):
    """build_from reads the vectors only through bounded batches and samples."""
    from store.ann import ArraySource, build_from
    from store.values import KeptValues

    vectors, ids, queries = data

    class Counting(ArraySource):
        largest = 0

        def batches(self):
            for batch_ids, batch in super().batches():
                Counting.largest = max(Counting.largest, len(batch_ids))
                yield batch_ids, batch

    source = Counting(ids, vectors, batch_rows=4096)
    streamed = build_from(source, AnnConfig(kind="ivf", target_recall=0.95), KeptValues(ids, vectors))
    whole = build_index(ids, vectors, AnnConfig(kind="ivf", target_recall=0.95))
    assert Counting.largest == 4096 and streamed.index.ntotal == whole.index.ntotal == len(ids)
    assert (streamed.key, streamed.params) == (whole.key, whole.params)
    assert overlap_with_exact(streamed.index, vectors, ids, queries) >= 0.9


def test_ground_truth_folded_over_batches_is_exact(data):
    import faiss

    from store.ann import ArraySource, ground_truth

    vectors, ids, _ = data
    truth = ground_truth(ArraySource(ids, vectors, batch_rows=1000), 32)
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, rows = exact.search(truth.queries, 10)
    assert (truth.ids == ids[rows]).all()


def test_saved_indexes_open_memory_mapped_with_the_same_answers(data, tmp_path):
    import faiss

    vectors, ids, queries = data
    for kind in ("ivf", "flat"):
        built = build_index(ids, vectors, AnnConfig(kind=kind, target_recall=0.95))
        save_index(built.index, tmp_path / f"{kind}.faiss")
        opened = load_index(tmp_path / f"{kind}.faiss", built.params)
        np.testing.assert_array_equal(opened.search(queries, 10)[1], built.index.search(queries, 10)[1])
        if kind == "ivf":  # the inverted lists stay in the file, mapped
            lists = faiss.extract_index_ivf(opened).invlists
            assert type(faiss.downcast_InvertedLists(lists)).__name__ == "OnDiskInvertedLists"


def test_the_builds_positioned_reads_return_the_mapped_rows(tmp_path):
    from store.errors import StoreError
    from store.values import StoredValues, ValuesWriter

    rng = np.random.default_rng(3)
    ids = rng.permutation(np.arange(10, 5010, dtype=np.int64))
    vectors = rng.normal(size=(5000, 12)).astype(np.float32)
    writer = ValuesWriter(tmp_path / "values", ids, 12)
    for start in range(0, 5000, 700):
        writer.write(ids[start:start + 700], vectors[start:start + 700])
    read = writer.finish()  # what the build measures recall with
    mapped = StoredValues.open(tmp_path / "values")
    positions = rng.integers(0, 5000, size=(7, 9))
    assert type(read.values).__name__ == "FileRows" and isinstance(mapped.values, np.ndarray)
    np.testing.assert_array_equal(read.values[positions], mapped.values[positions])
    queries = rng.normal(size=(7, 12)).astype(np.float32)
    for a, b in zip(read.rerank(queries, ids[positions], 4), mapped.rerank(queries, ids[positions], 4)):
        np.testing.assert_array_equal(a, b)
    with open(tmp_path / "values" / "values.npy", "r+b") as cut:
        cut.truncate(cut.seek(0, 2) - 24)  # the last row cut short after it was opened
    with pytest.raises(StoreError, match="cut short"):
        read.values[np.array([4999])]
