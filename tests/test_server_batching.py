"""Concurrent requests are batched together; each must still get exactly its own answer."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from search.cache import CacheRetriever
from server import ServeConfig, create_app
from server.batching import MicroBatcher
from tests.helpers import local_client


def test_micro_batcher_batches_and_routes_results():
    sizes = []

    def double(items):
        sizes.append(len(items))
        time.sleep(0.01)  # let the next requests queue up
        return [2 * item for item in items]

    batcher = MicroBatcher(double, max_batch=16)
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(batcher, range(200)))
    assert results == [2 * i for i in range(200)]
    assert sum(sizes) == 200 and max(sizes) > 1 and max(sizes) <= 16


def test_micro_batcher_passes_errors_to_every_waiter_and_lives_on():
    gate = threading.Event()

    def compute(items):
        gate.wait(5)
        if "bad" in items:
            raise ValueError("bad item")
        return items

    batcher = MicroBatcher(compute)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(batcher, "bad")
        time.sleep(0.05)
        gate.set()
        with pytest.raises(ValueError, match="bad item"):
            first.result(timeout=5)
    assert batcher("good") == "good"


@pytest.fixture(scope="module")
def client(served_library):
    with local_client(create_app(ServeConfig(store=served_library[0]))) as client:
        yield client


def test_concurrent_blends_with_mixed_parameters_get_their_own_results(client, served_library):
    rng = np.random.default_rng(5)
    jobs = [(rng.normal(size=(int(rng.integers(1, 4)), 64)).astype(np.float32), int(rng.choice([3, 7])),
             str(rng.choice(["paper", "reference"]))) for _ in range(60)]

    def call(job):
        queries, k, weighting = job
        response = client.post("/cache/blend", json={"queries": queries.tolist(), "k": k, "weighting": weighting,
                                                     "return_neighbours": True})
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(call, jobs))
    cache = CacheRetriever.open(served_library[0], device="cpu")
    for (queries, k, weighting), answer in zip(jobs, answers):
        expected = cache.blend(queries, k, weighting=weighting, return_neighbours=True)
        np.testing.assert_allclose(answer["features"], expected.features, atol=1e-6)
        assert answer["ids"] == expected.ids.tolist()


def test_one_bad_blend_request_does_not_fail_its_neighbours(client):
    good = {"queries": [[0.1] * 64], "k": 3}
    bad = {"queries": [[0.0] * 64], "k": 3}
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda body: client.post("/cache/blend", json=body).status_code, [good, bad] * 20))
    assert codes == [200, 400] * 20


def test_concurrent_text_searches_match_sequential_ones(client):
    texts = [f"a {c} {s}" for c in ("red", "blue", "green", "yellow") for s in ("circle", "star", "square")]
    sequential = [client.post("/search", json={"text": t, "k": 5}).json() for t in texts]
    with ThreadPoolExecutor(12) as pool:
        concurrent = list(pool.map(lambda t: client.post("/search", json={"text": t, "k": 5}).json(), texts * 3))
    for position, hits in enumerate(concurrent):
        expected = sequential[position % len(texts)]
        assert [h["id"] for h in hits] == [h["id"] for h in expected]
        assert [h["score"] for h in hits] == pytest.approx([h["score"] for h in expected], abs=1e-5)
