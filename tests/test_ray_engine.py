"""`clipdex index --engine ray` on a local Ray cluster of 2 CPUs gives what the local engine gives
(issue 14): the same store, the same incremental behaviour, every image once after a SIGKILL."""

from __future__ import annotations

import shutil
import signal
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from demo.shapes import write_library
from indexer.ray_engine import RayConfig
from indexer.run import IndexConfig, index_paths
from store.errors import InputError
from store.store import Store
from tests.helpers import MODEL, clipdex, run

ray = pytest.importorskip("ray")

LOCAL = IndexConfig(model="clipdex-shapes", device="cpu", workers=0, progress=False, commit_every=16)
RAY = replace(LOCAL, engine="ray", ray=RayConfig(batch_size=8))


@pytest.fixture(scope="module")
def cluster():
    """One local cluster of 2 CPUs for the module (the engine joins it rather than starting one)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def rows(store_dir, root) -> dict[str, dict]:
    """Each row by its path relative to *root*."""
    table = Store.open(store_dir).tables.images.to_arrow()
    return {row["path"][len(str(root)) + 1:]: row for row in table.to_pylist()}


def assert_same_store(local_dir, local_root, ray_dir, ray_root) -> None:
    expected, got = rows(local_dir, local_root), rows(ray_dir, ray_root)
    assert sorted(got) == sorted(expected)
    ids = [row["id"] for row in got.values()]
    assert len(set(ids)) == len(ids)
    for path, row in expected.items():
        other = got[path]
        assert (other["id"], other["hash"], other["width"], other["height"], other["caption"]) == \
            (row["id"], row["hash"], row["width"], row["height"], row["caption"])
        np.testing.assert_allclose(other["embedding"], row["embedding"], atol=1e-6)
        assert (other["caption_embedding"] is None) == (row["caption_embedding"] is None)


def test_the_ray_engine_gives_the_same_store_as_the_local_one(cluster, tmp_path):
    labels = write_library(tmp_path / "lib", 40, 21)
    (tmp_path / "lib" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    captions = replace(LOCAL, captions=(str(labels),))
    local = index_paths([tmp_path / "lib"], tmp_path / "local", captions)
    on_ray = index_paths([tmp_path / "lib"], tmp_path / "ray", replace(RAY, captions=(str(labels),)))
    assert (on_ray.embedded, on_ray.failed, on_ray.count) == (local.embedded, local.failed, local.count) == (40, 1, 40)
    assert_same_store(tmp_path / "local", tmp_path / "lib", tmp_path / "ray", tmp_path / "lib")
    failures = [[(f["path"], f["reason"], f["detail"]) for f in Store.open(d).tables.failures.to_arrow().to_pylist()]
                for d in (tmp_path / "local", tmp_path / "ray")]
    assert failures[1] == failures[0] and failures[0][0][0].endswith("broken.jpg")
    assert len(Store.open(tmp_path / "ray").tables.images.to_lance().get_fragments()) == 1  # compacted


def change(library) -> None:
    """New, moved, copied, modified and deleted files at once."""
    images = sorted(p for p in library.rglob("*") if p.suffix in (".jpg", ".png"))
    shutil.copy(images[0], library / "copy_of_first.jpg" if images[0].suffix == ".jpg" else library / "copy.png")
    images[1].rename(library / f"moved{images[1].suffix}")
    images[2].unlink()
    Image.new("RGB", (300, 200), (200, 30, 30)).save(images[3])  # modified in place: same path, new content
    Image.new("RGB", (240, 320), (20, 90, 200)).save(library / "new.png")


def test_incremental_reruns_behave_as_the_local_engine(cluster, tmp_path):
    write_library(tmp_path / "a", 24, 22)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    index_paths([tmp_path / "a"], tmp_path / "local", LOCAL)
    index_paths([tmp_path / "b"], tmp_path / "ray", RAY)
    change(tmp_path / "a")
    change(tmp_path / "b")
    local = index_paths([tmp_path / "a"], tmp_path / "local", LOCAL)
    on_ray = index_paths([tmp_path / "b"], tmp_path / "ray", RAY)
    summary = ("embedded", "reused", "moved", "removed", "unchanged", "failed", "count")
    assert [getattr(on_ray, f) for f in summary] == [getattr(local, f) for f in summary]
    assert (local.embedded, local.moved, local.removed) == (2, 1, 1)  # new + modified; the move; the deletion
    assert_same_store(tmp_path / "local", tmp_path / "a", tmp_path / "ray", tmp_path / "b")


def test_the_actors_load_the_model_once_for_every_chunk(cluster, tmp_path, monkeypatch):
    """A run in chunks embeds each on the same actors: a model loaded per chunk cost ~10 s a chunk."""
    from indexer import ray_engine

    write_library(tmp_path / "lib", 20, 23)
    started, calls = [], []
    grow, embed = ray_engine.RaySession._grow, ray_engine.RaySession.embed

    def recording_grow(self, ray_module, work, wanted):
        before = len(self.actors)
        grow(self, ray_module, work, wanted)
        started.append(len(self.actors) - before)

    def recording_embed(self, target, jobs, progress):
        calls.append(len(jobs))
        return embed(self, target, jobs, progress)

    monkeypatch.setattr(ray_engine.RaySession, "_grow", recording_grow)
    monkeypatch.setattr(ray_engine.RaySession, "embed", recording_embed)
    chunked = index_paths([tmp_path / "lib"], tmp_path / "ray", replace(RAY, chunk_files=6))
    assert chunked.embedded == 20 and calls == [6, 6, 6, 2]
    assert started[0] >= 1 and sum(started[1:]) == 0  # started once, on the first chunk
    local = index_paths([tmp_path / "lib"], tmp_path / "local", LOCAL)
    assert local.embedded == 20
    assert_same_store(tmp_path / "local", tmp_path / "lib", tmp_path / "ray", tmp_path / "lib")


def test_a_driver_killed_mid_run_and_rerun_leaves_every_image_once(tmp_path):
    write_library(tmp_path / "lib", 120, 23)
    store = tmp_path / "store"
    command = ["index", tmp_path / "lib", "--store", store, *MODEL[:4], "--engine", "ray", "--batch-size", "4",
               "--commit-every", "8"]
    driver = clipdex(*command, wait=False)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and driver.poll() is None:
        if Store.exists(store) and (store / "lance" / "images.lance").is_dir() and \
                Store.open(store).tables.images.count_rows() >= 8:
            break
        time.sleep(0.2)
    assert driver.poll() is None, driver.communicate()[1][-2000:]
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    committed = Store.open(store).tables.images.count_rows()
    assert 8 <= committed < 120

    finished = clipdex(*command, "--json")
    assert finished.returncode == 0, finished.stderr[-2000:]
    table = Store.open(store).tables.images.to_arrow()
    paths, ids = table.column("path").to_pylist(), table.column("id").to_pylist()
    assert len(paths) == len(set(paths)) == 120 and len(set(ids)) == 120
    assert Store.open(store).manifest.index.count == 120


def test_the_ray_engine_without_ray_installed_is_one_line(capsys, tmp_path, monkeypatch, small_library):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(InputError, match=r"needs Ray: pip install 'clipdex\[ray\]'"):
        index_paths([small_library[0]], tmp_path / "store", RAY)
    code, out, err = run(capsys, "index", small_library[0], "--store", tmp_path / "store", *MODEL, "--engine", "ray")
    assert code == 1 and err.strip() == "error: the ray engine needs Ray: pip install 'clipdex[ray]'"
    assert not (tmp_path / "store").exists()


def test_an_unreachable_cluster_is_one_line_and_touches_nothing(capsys, tmp_path, small_library):
    code, out, err = run(capsys, "index", small_library[0], "--store", tmp_path / "store", *MODEL, "--engine", "ray",
                         "--ray-address", "127.0.0.1:1")
    assert code == 1 and err.strip().startswith("error: cannot reach the Ray cluster at 127.0.0.1:1: ")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "store").exists()
