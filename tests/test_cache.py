"""Cache retrieval + residual blending against a plain float64 reference written from the formulas.

Tolerances: float32 keys agree with the float64 reference to 1e-5; float16 keys (the default
storage) to 3e-3, the rounding of 10 half-precision values summed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from search.cache import CacheRetriever
from store.errors import InputError

DIM, SIZE = 32, 400


def features(count: int = SIZE, dim: int = DIM, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, dim))
    data = centres[rng.integers(0, 20, count)] + 0.3 * rng.normal(size=(count, dim))
    return (data / np.linalg.norm(data, axis=1, keepdims=True)).astype(np.float32)


def reference(queries: np.ndarray, keys: np.ndarray, k: int, alpha: float, weighting: str, t: float = 20.0,
              restore_norm: bool = False):
    """float64, one query at a time, straight from eq. 3-4 and the authors' code; *restore_norm*
    scales each output back to its query's norm (their image generation path)."""
    keys = keys.astype(np.float64)
    out = []
    for q in np.atleast_2d(queries).astype(np.float64):
        norm = np.linalg.norm(q)
        unit = q / norm
        sims = keys @ unit
        top = np.argsort(-sims, kind="stable")[:k]
        s, v = sims[top], keys[top]
        if weighting == "paper":
            blended = alpha * (s[:, None] * v).sum(0) + (1 - alpha) * unit
        else:
            w = np.exp(t * s - np.max(t * s))
            w /= w.sum()
            aggregate = (w[:, None] * v).sum(0)
            aggregate /= np.linalg.norm(aggregate)
            mixed = alpha * aggregate + (1 - alpha) * unit
            blended = mixed / np.linalg.norm(mixed)
        out.append(blended * norm if restore_norm else blended)
    return np.array(out)


@pytest.fixture(scope="module")
def keys():
    return features()


@pytest.fixture(scope="module")
def queries():
    rng = np.random.default_rng(1)
    return (features(7, seed=2) * rng.uniform(0.5, 3.0, size=(7, 1))).astype(np.float32)  # unnormalised


@pytest.mark.parametrize("weighting", ["paper", "reference"])
@pytest.mark.parametrize("dtype, atol", [("float32", 1e-5), ("float16", 3e-3)])
@pytest.mark.parametrize("restore_norm", [False, True])
def test_blend_equals_float64_reference(keys, queries, weighting, dtype, atol, restore_norm):
    cache = CacheRetriever.from_arrays(np.arange(SIZE) * 10 + 5, keys, device="cpu", dtype=dtype)
    out = cache.blend(queries, k=10, alpha=0.5, weighting=weighting, restore_norm=restore_norm)
    expected = reference(queries, keys, 10, 0.5, weighting, restore_norm=restore_norm)
    np.testing.assert_allclose(out, expected, atol=atol * (3 if restore_norm else 1))  # norms up to 3


def test_the_default_is_the_released_codes_llm_path(keys, queries):
    """forward_visual: softmax(20 S) weights, aggregate and blend renormalised, k 10, weight 0.5,
    and the query's norm not restored."""
    cache = CacheRetriever.from_arrays(np.arange(SIZE), keys, device="cpu", dtype="float32")
    out = cache.blend(queries)
    np.testing.assert_allclose(out, reference(queries, keys, 10, 0.5, "reference", 20.0), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("weighting", ["paper", "reference"])
def test_k1_alpha_extremes_and_temperature(keys, queries, weighting):
    cache = CacheRetriever.from_arrays(np.arange(SIZE), keys, device="cpu", dtype="float32")
    for k, alpha, t in [(1, 0.5, 20.0), (10, 0.0, 20.0), (10, 1.0, 20.0), (5, 0.3, 3.0)]:
        out = cache.blend(queries, k=k, alpha=alpha, weighting=weighting, temperature=t)
        np.testing.assert_allclose(out, reference(queries, keys, k, alpha, weighting, t), atol=1e-5)
    unit = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    alpha0 = cache.blend(queries, k=10, alpha=0.0, weighting=weighting)
    np.testing.assert_allclose(alpha0, unit, atol=1e-5)
    np.testing.assert_allclose(cache.blend(queries, k=10, alpha=0.0, weighting=weighting, restore_norm=True),
                               queries, atol=1e-5)


def test_k_beyond_cache_is_clamped_with_a_warning(queries):
    small = features(6)
    cache = CacheRetriever.from_arrays(np.arange(6), small, device="cpu", dtype="float32")
    with pytest.warns(UserWarning, match="larger than the cache"):
        out = cache.blend(queries, k=50, weighting="reference", return_neighbours=True)
    assert out.ids.shape == (7, 6)
    np.testing.assert_allclose(out.features, reference(queries, small, 6, 0.5, "reference"), atol=1e-5)


def test_batch_equals_row_by_row_and_neighbours(keys, queries):
    ids = np.arange(SIZE, dtype=np.int64)[::-1] * 3 + 100  # stable ids, unsorted on purpose
    cache = CacheRetriever.from_arrays(ids, keys, device="cpu")
    batch = cache.blend(queries, k=8, return_neighbours=True)
    for i, query in enumerate(queries):
        single = cache.blend(query, k=8, return_neighbours=True)
        np.testing.assert_allclose(single.features, batch.features[i], atol=1e-6)
        np.testing.assert_array_equal(single.ids, batch.ids[i])
    assert batch.ids.shape == batch.scores.shape == (7, 8) and batch.ids.dtype == np.int64
    row_of = {int(i): r for r, i in enumerate(ids)}
    unit = queries[0] / np.linalg.norm(queries[0])
    expected = keys @ unit
    np.testing.assert_allclose(batch.scores[0], [expected[row_of[int(i)]] for i in batch.ids[0]], atol=2e-3)
    assert list(batch.scores[0]) == sorted(batch.scores[0], reverse=True)


@pytest.mark.parametrize("make", [
    lambda q: q.astype(np.float64), lambda q: q.astype(np.float16), lambda q: q[0],
    lambda q: torch.from_numpy(q), lambda q: torch.from_numpy(q).to(torch.bfloat16),
    lambda q: torch.from_numpy(q).half()[2], lambda q: torch.from_numpy(q).double(),
])
def test_type_dtype_device_and_shape_are_preserved(keys, queries, make):
    cache = CacheRetriever.from_arrays(np.arange(SIZE), keys, device="cpu")
    given = make(queries)
    out = cache.blend(given, k=4, weighting="reference")
    assert type(out) is type(given) and out.dtype == given.dtype and tuple(out.shape) == tuple(given.shape)
    if isinstance(given, torch.Tensor):
        assert out.device == given.device


@pytest.mark.parametrize("bad, kwargs, message", [
    (np.zeros((2, DIM + 1), np.float32), {}, "must be"),
    (np.full((1, DIM), np.nan, np.float32), {}, "NaN"),
    (np.full((1, DIM), np.inf, np.float32), {}, "NaN or infinite"),
    (np.zeros((0, DIM), np.float32), {}, "empty"),
    (np.zeros((1, DIM), np.float32), {}, "all zeros"),
    (np.ones((1, DIM), np.int64), {}, "float dtype"),
    ([[0.1] * DIM], {}, "torch tensor or a numpy array"),
    (np.ones((1, DIM), np.float32), {"k": 0}, "k must be at least 1"),
    (np.ones((1, DIM), np.float32), {"alpha": 1.5}, "alpha"),
    (np.ones((1, DIM), np.float32), {"alpha": -0.1}, "alpha"),
    (np.ones((1, DIM), np.float32), {"weighting": "mean"}, "unknown weighting"),
    (np.ones((1, DIM), np.float32), {"temperature": 0}, "temperature"),
])
def test_bad_input_raises_input_error(keys, bad, kwargs, message):
    cache = CacheRetriever.from_arrays(np.arange(SIZE), keys, device="cpu")
    with pytest.raises(InputError, match=message):
        cache.blend(bad, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_queries_stay_on_the_gpu(keys, queries):
    cache = CacheRetriever.from_arrays(np.arange(SIZE), keys, device="cuda", dtype="float32")
    out = cache.blend(torch.from_numpy(queries).cuda(), k=10, weighting="reference")
    assert out.is_cuda
    np.testing.assert_allclose(out.cpu().numpy(), reference(queries, keys, 10, 0.5, "reference"), atol=1e-4)


def test_ann_index_short_of_k_falls_back_to_exact(keys, queries):
    import faiss

    ivf = faiss.index_factory(DIM, "IVF20,Flat", faiss.METRIC_INNER_PRODUCT)
    ivf.train(keys)
    ivf.nprobe = 1  # some lists hold fewer than k vectors: FAISS pads with -1
    index = faiss.IndexIDMap2(ivf)
    index.add_with_ids(keys, np.arange(SIZE, dtype=np.int64))
    cache = CacheRetriever.from_arrays(np.arange(SIZE), keys, device="cpu", dtype="float32", index=index)
    k = 60
    assert (index.search(queries, k)[1] < 0).any(), "the setup must produce short results"
    out = cache.blend(queries, k=k, weighting="reference")
    short = (index.search(queries, k)[1] < 0).any(axis=1)
    np.testing.assert_allclose(out[short], reference(queries[short], keys, k, 0.5, "reference"), atol=1e-5)


@pytest.mark.parametrize("weighting", ["paper", "reference"])
def test_tiny_queries_blend_like_unit_ones_and_underflow_is_refused(weighting):
    """A query of norm 1e-25 squares to 1e-50, below float32: the split into direction and norm must
    not underflow into NaN, and the paper weighting must not depend on the query's scale."""
    keys = features()
    cache = CacheRetriever.from_arrays(np.arange(SIZE), keys, device="cpu", dtype="float32")
    unit = features(4, seed=3)
    tiny = unit * np.float32(1e-25)
    got = cache.blend(tiny, k=10, weighting=weighting)
    assert np.isfinite(got).all()
    expected = reference(unit, keys, 10, 0.5, weighting)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    restored = cache.blend(tiny, k=10, weighting=weighting, restore_norm=True)
    np.testing.assert_allclose(restored / np.float32(1e-25), expected, atol=1e-5)
    with pytest.raises(InputError, match="too small to carry a direction"):
        cache.blend(unit * np.float32(1e-39), k=10, weighting=weighting)


def forward_visual_cache_block(queries: np.ndarray, index, k: int = 10, temperature: float = 20.0,
                               alpha: float = 0.5) -> np.ndarray:
    """float64, written from the description of ImageBind-LLM's ``forward_visual`` cache step: search
    the FAISS index, read each neighbour back, softmax(20 S) weights, aggregate renormalised, 0.5
    blend with the unit query, renormalised; the query's norm is not restored."""
    out = []
    for q in np.atleast_2d(queries).astype(np.float64):
        unit = q / np.linalg.norm(q)
        scores, ids = index.search(unit[None].astype(np.float32), k)
        values = np.array([index.reconstruct(int(i)) for i in ids[0]], np.float64)
        values /= np.linalg.norm(values, axis=1, keepdims=True)
        s = values @ unit
        w = np.exp(temperature * (s - s.max()))
        aggregate = (w / w.sum()) @ values
        mixed = alpha * aggregate / np.linalg.norm(aggregate) + (1 - alpha) * unit
        out.append(mixed / np.linalg.norm(mixed))
    return np.array(out)


@pytest.mark.parametrize("kind", ["flat", "idmap", "ivf"])
def test_a_cache_straight_from_a_faiss_file_is_a_drop_in_for_forward_visual(tmp_path, keys, queries, kind):
    import faiss

    if kind == "flat":
        index = faiss.IndexFlatIP(DIM)
        index.add(keys)
    elif kind == "idmap":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
        index.add_with_ids(keys, np.arange(SIZE, dtype=np.int64)[::-1] * 7 + 3)
    else:
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(DIM), DIM, 8, faiss.METRIC_INNER_PRODUCT)
        index.train(keys)
        index.add_with_ids(keys, np.arange(SIZE, dtype=np.int64) * 5 + 11)
        index.set_direct_map_type(faiss.DirectMap.Hashtable)  # ids that are not 0..n-1
        index.nprobe = 8  # every list: the same neighbours as exact search
    faiss.write_index(index, str(tmp_path / "knn.index"))
    cache = CacheRetriever.from_faiss(tmp_path / "knn.index", device="cpu", dtype="float32")
    assert cache.size == SIZE
    np.testing.assert_allclose(cache.blend(queries), forward_visual_cache_block(queries, index), atol=1e-5)
    np.testing.assert_allclose(cache.blend(queries), reference(queries, keys, 10, 0.5, "reference"), atol=1e-5)


def test_faiss_files_the_cache_cannot_use_are_refused_in_one_line(tmp_path, keys):
    import faiss

    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(DIM), DIM, 8, faiss.METRIC_INNER_PRODUCT)
    ivf.train(keys)
    ivf.add(keys)
    faiss.write_index(ivf, str(tmp_path / "no-map.index"))
    l2 = faiss.IndexFlatL2(DIM)
    l2.add(keys)
    faiss.write_index(l2, str(tmp_path / "l2.index"))
    (tmp_path / "junk.index").write_bytes(b"not an index")
    for name, message in [("no-map.index", "no direct map"), ("l2.index", "not an inner-product index"),
                          ("junk.index", "cannot read"), ("missing.index", "cannot read")]:
        with pytest.raises(InputError, match=message):
            CacheRetriever.from_faiss(tmp_path / name, device="cpu")
