"""The index build that scales out (issue 14, item 2): trained once, shards added in parallel,
merged on disk; recall within 0.01 of the single-machine build, and a store that opens anywhere."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

from search import Query
from search.cache import CacheRetriever
from store.ann import AnnConfig
from store.importer import ImportConfig, import_features
from store.sharded import Workers
from store.store import Store, reindex

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.synthetic import clustered  # noqa: E402

IVF = AnnConfig(kind="ivf-sq8", target_recall=0.95)
COUNT, DIM = 20_000, 32


def in_order(function, jobs):  # the simplest parallel map: one after another, here
    return [function(job) for job in jobs]


@pytest.fixture(scope="module")
def local_store(tmp_path_factory):
    """20k clustered vectors, imported and indexed on this machine as today."""
    root = tmp_path_factory.mktemp("sharded")
    np.save(root / "features.npy", clustered(COUNT, DIM, 40, spread=0.6, seed=8))
    import_features([root / "features.npy"], root / "store", ImportConfig(ann=IVF))
    return root / "store"


def files(store) -> list[str]:
    return sorted(p.name for p in (store / "faiss").iterdir())


def test_a_sharded_build_matches_the_local_recall_and_opens_wherever_the_store_goes(local_store, tmp_path):
    local = Store.open(local_store).manifest.index
    store = tmp_path / "store"
    shutil.copytree(local_store, store)
    info = reindex(store, IVF, workers=Workers(in_order, 4))
    assert info.key == local.key and info.count == COUNT
    assert abs(info.recall_at_10 - local.recall_at_10) <= 0.01, (info.recall_at_10, local.recall_at_10)
    stem = info.file.split("/")[1].removesuffix(".faiss")
    assert files(store) == sorted(["index.faiss", f"{stem}.faiss", f"{stem}.ivfdata", info.values.split("/")[1]])

    query = np.load(local_store.parent / "features.npy")[:3]
    expected = [hit["id"] for hit in Query.create(Store.open(local_store), vector=query[0]).limit(10).to_list()]
    moved = tmp_path / "elsewhere"
    os.rename(store, moved)  # the lists are found beside the index, not where they were written
    got = [hit["id"] for hit in Query.create(Store.open(moved), vector=query[0]).limit(10).to_list()]
    assert len(set(got) & set(expected)) >= 9
    blended = CacheRetriever.open(moved, device="cpu").blend(query, k=5)
    assert blended.shape == (3, DIM) and np.isfinite(blended).all()
    plain = faiss.read_index(str(moved / "faiss" / "index.faiss"), faiss.IO_FLAG_ONDISK_SAME_DIR)
    assert plain.ntotal == COUNT


def test_a_small_table_is_built_here_whatever_the_map(tmp_path):
    np.save(tmp_path / "f.npy", clustered(500, 8, 4, spread=0.5, seed=1))
    called = []
    import_features([tmp_path / "f.npy"], tmp_path / "store",
                    workers=Workers(lambda function, jobs: called.append(jobs) or in_order(function, jobs), 2))
    assert Store.open(tmp_path / "store").manifest.index.type == "flat" and not called


def test_the_ray_build_reaches_the_single_machine_recall(local_store, tmp_path):
    ray = pytest.importorskip("ray")
    from indexer.ray_engine import RayConfig, ray_session

    store = tmp_path / "store"
    shutil.copytree(local_store, store)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with ray_session(RayConfig()) as cluster:
            info = reindex(store, IVF, workers=cluster)
    finally:
        ray.shutdown()
    assert abs(info.recall_at_10 - Store.open(local_store).manifest.index.recall_at_10) <= 0.01
    assert (store / info.file.replace(".faiss", ".ivfdata")).is_file()


def test_import_with_the_ray_engine_builds_the_index_in_shards(capfd, local_store, tmp_path):
    pytest.importorskip("ray")
    from tests.helpers import run

    code, out, err = run(capfd, "import", local_store.parent / "features.npy", "--store", tmp_path / "store",
                         "--index-type", "ivf-sq8", "--target-recall", "0.95", "--engine", "ray", "--json")
    assert code == 0, err
    summary = json.loads(out)  # nothing FAISS prints while merging gets into the JSON
    info = Store.open(tmp_path / "store").manifest.index
    assert summary["imported"] == COUNT and (tmp_path / "store" / info.file.replace(".faiss", ".ivfdata")).is_file()
    assert abs(summary["recall_at_10"] - Store.open(local_store).manifest.index.recall_at_10) <= 0.01
