"""An index that takes new, changed and removed rows without a full build (issue 25, item 2).

Adding 1,000 rows to a 3M x 1024 store used to retrain and refill the whole index (5 minutes).
Now the rows new or changed since the build go into a delta searched beside the trained
index, and the built rows removed or changed since are hidden from it (store/delta.py); a full
build comes when the delta outgrows the index. The tests lower ``delta_min_rows`` (a store under
50,000 rows is rebuilt: a second or two) so a small library takes the path a large one takes.
"""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from indexer.run import IndexConfig, index_paths
from search.cache import CacheRetriever
from store.ann import AnnConfig
from store.delta import CHANGES_DIR
from store.importer import ImportConfig, import_features
from store.store import Store, reindex
from store.tables import column_vectors
from tests.helpers import demo_jpegs

ANN = AnnConfig(kind="ivf", delta_min_rows=0)
INDEX = IndexConfig(model="clipdex-shapes", device="cpu", progress=False, ann=ANN)


@pytest.fixture()
def library(tmp_path):
    return demo_jpegs(tmp_path / "lib", 1500, 31, (64, 96))


def vectors_by_path(store_dir) -> dict[str, tuple[int, np.ndarray]]:
    rows = Store.open(store_dir).tables.images.search().select(["id", "path", "embedding"]).to_arrow()
    return {path: (row_id, vector) for path, row_id, vector in
            zip(rows.column("path").to_pylist(), rows.column("id").to_pylist(), column_vectors(rows))}


def answers(store_dir, queries: np.ndarray, k: int = 10) -> np.ndarray:
    return Store.open(store_dir).ann_index().search(queries, k)[1]


def change(library, rng) -> dict:
    """100 files deleted, 40 new, 10 modified in place."""
    files = sorted(library.glob("*.jpg"))
    deleted, modified = files[:100], files[100:110]
    for path in deleted:
        path.unlink()
    for number, path in enumerate(modified):
        Image.new("RGB", (80, 80), tuple(int(c) for c in rng.integers(0, 255, 3))).save(path)
    demo_jpegs(library / "new", 40, 32, (64, 96))
    return {"deleted": [str(p) for p in deleted], "modified": [str(p) for p in modified]}


def test_changes_go_into_a_delta_and_search_answers_as_a_fresh_build(library, tmp_path):
    index_paths([library], tmp_path / "store", INDEX)
    built = Store.open(tmp_path / "store").manifest.index
    before = vectors_by_path(tmp_path / "store")
    changed = change(library, np.random.default_rng(0))
    summary = index_paths([library], tmp_path / "store", INDEX)
    info = Store.open(tmp_path / "store").manifest.index
    assert (summary.embedded, summary.removed) == (50, 100)
    assert info.file == built.file and info.values == built.values  # the trained index was not touched
    assert (info.delta_rows, info.hidden_rows, info.built_rows, info.count) == (50, 110, 1500, 1440)
    assert list((tmp_path / "store" / CHANGES_DIR).iterdir())  # the rewritten ids, kept until a full build
    delta = Store.open(tmp_path / "store").delta()
    assert delta.index.ntotal == 50 and delta.index.nlist == 32  # an IVF on the build's own quantizer

    after = vectors_by_path(tmp_path / "store")
    # Removed rows are never returned, even to a query that is their own vector.
    gone = np.stack([before[path][1] for path in changed["deleted"]])
    assert not set(answers(tmp_path / "store", gone).ravel().tolist()) & {before[p][0] for p in changed["deleted"]}
    # A modified file is found by its new vector, under its old id; new files are found.
    for path in changed["modified"] + [str(p) for p in sorted((library / "new").iterdir())[:10]]:
        row_id, vector = after[path]
        assert answers(tmp_path / "store", vector[None, :], 1)[0, 0] == row_id, path

    fresh = tmp_path / "fresh"
    shutil.copytree(tmp_path / "store", fresh)
    rebuilt = reindex(fresh, ANN)
    assert rebuilt.delta == "" and rebuilt.built_rows == rebuilt.count == 1440
    assert not list((fresh / CHANGES_DIR).iterdir())  # the full build covers them
    queries = np.stack([vector for _, vector in list(after.values())[::7]])
    overlap = [len(set(a) & set(b)) / 10 for a, b in zip(answers(tmp_path / "store", queries).tolist(),
                                                        answers(fresh, queries).tolist())]
    assert np.mean(overlap) >= 0.99
    assert abs(info.recall_at_10 - rebuilt.recall_at_10) <= 0.01
    np.testing.assert_allclose(CacheRetriever.open(tmp_path / "store", device="cpu").blend(queries, k=5),
                               CacheRetriever.open(fresh, device="cpu").blend(queries, k=5), atol=2e-3)


def test_an_import_of_changed_features_updates_them_in_the_delta(tmp_path):
    rng = np.random.default_rng(4)
    features = rng.normal(size=(3000, 32)).astype(np.float32)
    np.save(tmp_path / "a.npy", features)
    config = ImportConfig(ann=ANN)
    import_features([tmp_path / "a.npy"], tmp_path / "store", config)
    features[:5] = rng.normal(size=(5, 32))
    np.save(tmp_path / "a.npy", features)
    summary = import_features([tmp_path / "a.npy"], tmp_path / "store", config)
    info = Store.open(tmp_path / "store").manifest.index
    assert summary.updated == 5 and (info.delta_rows, info.hidden_rows) == (5, 5)
    unit = features[:5] / np.linalg.norm(features[:5], axis=1, keepdims=True)
    found = Store.open(tmp_path / "store").ann_index().search(unit, 1)
    assert found[1][:, 0].tolist() == [1, 2, 3, 4, 5] and np.allclose(found[0][:, 0], 1, atol=1e-4)


def test_a_delta_that_outgrows_the_index_brings_a_full_build(library, tmp_path):
    files = sorted(library.glob("*.jpg"))
    (tmp_path / "first").mkdir()
    for path in files[:1000]:
        path.rename(tmp_path / "first" / path.name)
    index_paths([tmp_path / "first"], tmp_path / "store", replace(INDEX, ann=replace(ANN, rebuild_growth=1.3)))
    for path in sorted(library.glob("*.jpg"))[:200]:
        path.rename(tmp_path / "first" / path.name)
    index_paths([tmp_path / "first"], tmp_path / "store", replace(INDEX, ann=replace(ANN, rebuild_growth=1.3)))
    assert Store.open(tmp_path / "store").manifest.index.delta_rows == 200  # 1.2x: a delta
    for path in sorted(library.glob("*.jpg"))[:200]:
        path.rename(tmp_path / "first" / path.name)
    index_paths([tmp_path / "first"], tmp_path / "store", replace(INDEX, ann=replace(ANN, rebuild_growth=1.3)))
    info = Store.open(tmp_path / "store").manifest.index
    assert (info.delta, info.built_rows, info.count) == ("", 1400, 1400)  # 1.4x: built again
    assert not (tmp_path / "store" / CHANGES_DIR).exists() or not list((tmp_path / "store" / CHANGES_DIR).iterdir())


def test_an_update_killed_before_it_is_published_is_completed_by_the_next_run(library, monkeypatch, tmp_path):
    index_paths([library], tmp_path / "store", INDEX)
    before = Store.open(tmp_path / "store").manifest.index
    demo_jpegs(library / "new", 30, 33, (64, 96))

    def dies(self, **changes):  # the process dies after writing the delta, before the manifest names it
        if "index" in changes:
            raise KeyboardInterrupt
        return original(self, **changes)

    original = Store.update_manifest
    with monkeypatch.context() as patch:
        patch.setattr(Store, "update_manifest", dies)
        with pytest.raises(KeyboardInterrupt):
            index_paths([library], tmp_path / "store", INDEX)
    store = Store.open(tmp_path / "store")
    assert store.manifest.index == before and len(answers(tmp_path / "store", np.eye(64, dtype=np.float32)[:1]))
    summary = index_paths([library], tmp_path / "store", INDEX)
    info = Store.open(tmp_path / "store").manifest.index
    assert summary.count == 1530 and info.delta_rows == 30
    folders = sorted(p.name for p in (tmp_path / "store" / "faiss").iterdir())
    assert folders == sorted([info.file.split("/")[1], info.values.split("/")[1], info.delta.split("/")[1],
                              "index.faiss"])  # the dead update's delta is gone


def test_info_says_what_the_delta_holds(capsys, library, tmp_path):
    from tests.helpers import run

    index_paths([library], tmp_path / "store", INDEX)
    demo_jpegs(library / "new", 20, 34, (64, 96))
    index_paths([library], tmp_path / "store", INDEX)
    code, out, err = run(capsys, "info", "--store", tmp_path / "store")
    assert code == 0 and "over 1520 vectors (built on 1500; 20 new or changed since, searched beside it, " \
                         "0 hidden)" in out


def test_recall_is_measured_after_each_change_and_a_fall_below_target_rebuilds(library, monkeypatch, tmp_path):
    """The build keeps each query's 20 exact neighbours; an update measures the index with the
    delta against them (less the hidden rows, plus the delta's searched exactly)."""
    import store.store as store_module

    index_paths([library], tmp_path / "store", INDEX)
    demo_jpegs(library / "new", 20, 35, (64, 96))
    index_paths([library], tmp_path / "store", INDEX)
    info = Store.open(tmp_path / "store").manifest.index
    assert info.delta_rows == 20 and set(info.recall) == {"image", "text"} and info.recall_at_10 >= 0.98
    assert info.query_sets == {"image": 256, "text": 256}

    demo_jpegs(library / "more", 20, 36, (64, 96))
    monkeypatch.setattr(store_module, "recall_by_set", lambda index, truth: {"image": 0.99, "text": 0.5})
    index_paths([library], tmp_path / "store", INDEX)
    info = Store.open(tmp_path / "store").manifest.index
    assert (info.delta, info.built_rows, info.count) == ("", 1540, 1540)


def test_a_full_build_that_dies_leaves_readers_the_published_delta(library, monkeypatch, tmp_path):
    """A build clears a dead build's leftovers first; the published delta is not one of them (a
    reader opening the store during the minutes a large build takes must still find it)."""
    import store.store as store_module

    index_paths([library], tmp_path / "store", INDEX)
    demo_jpegs(library / "new", 20, 37, (64, 96))
    index_paths([library], tmp_path / "store", INDEX)
    info = Store.open(tmp_path / "store").manifest.index

    def dies(source, config, values, queries=None):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(store_module, "build_from", dies)
        with pytest.raises(KeyboardInterrupt):
            reindex(tmp_path / "store", ANN)
    reader = Store.open(tmp_path / "store")
    assert reader.manifest.index == info and (tmp_path / "store" / info.delta).is_dir()
    row_id, vector = vectors_by_path(tmp_path / "store")[str(sorted((library / "new").iterdir())[0])]
    assert reader.ann_index().search(vector[None, :], 1)[1][0, 0] == row_id
