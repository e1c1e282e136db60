"""The engine seam (issue 24): both engines take IndexConfig whole, and every option means on the
Ray engine what it means locally. The Ray actor used to load its own feed with decoder "auto"
and a batch of 64 and read and decode on one thread, so `--engine ray --decoder torchvision
--batch-size 2 --readers 3` ignored all three."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import pytest

from demo.shapes import sample
from indexer import engines
from indexer.config import IndexConfig, RayConfig
from indexer.local_engine import LocalSession
from indexer.run import index_paths
from store.errors import InputError
from store.store import Store
from store.tables import column_vectors
from tests.helpers import MODEL, demo_jpegs, run

LOCAL = IndexConfig(model="clipdex-shapes", device="cpu", workers=0, progress=False)
# One actor of one CPU, so the reading threads of the run are the actor's.
RAY = replace(LOCAL, engine="ray", ray=RayConfig(workers=1))
# Each changes something else: the decoder the small JPEGs' vectors, the batch size the forward
# passes, the readers the reading threads, the pixel limit refuses the large JPEG (1500 x 1798).
CHANGED = dict(decoder="torchvision", batch_size=2, readers=3, max_pixels=1_000_000)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    folder = demo_jpegs(tmp_path_factory.mktemp("engines") / "lib", 5, 7, (300, 300), "small_{}.jpg")
    # Large enough to be decoded reduced by default (and not with --exact-decode).
    sample(7, 9, short_side=(1500, 1500))[0].save(folder / "large.jpg", quality=90)
    return folder


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def outcome(library, store_dir, config: IndexConfig) -> dict:
    """What a run did: each file's vector, the failures, the forward passes and reading threads."""
    shutil.rmtree(store_dir, ignore_errors=True)
    summary = index_paths([library], store_dir, config)
    store = Store.open(store_dir)
    rows = store.tables.images.to_arrow()
    failures = store.tables.failures.to_arrow().to_pylist()
    return {"vectors": {p.rsplit("/", 1)[1]: v for p, v in zip(rows.column("path").to_pylist(), column_vectors(rows))},
            "failures": sorted((f["path"].rsplit("/", 1)[1], f["reason"]) for f in failures),
            "batches": summary.feed["batches"], "readers": summary.feed["stages"]["read"]["threads"]}


def assert_same(local: dict, on_ray: dict) -> None:
    assert on_ray["failures"] == local["failures"]
    assert (on_ray["batches"], on_ray["readers"]) == (local["batches"], local["readers"])
    assert sorted(on_ray["vectors"]) == sorted(local["vectors"])
    for name, vector in local["vectors"].items():
        np.testing.assert_allclose(on_ray["vectors"][name], vector, atol=1e-6, err_msg=name)


def differ(a: dict, b: dict, name: str) -> bool:
    return float(np.abs(a["vectors"][name] - b["vectors"][name]).max()) > 1e-4


def test_every_option_changes_the_ray_engine_as_it_changes_the_local_one(cluster, library, tmp_path):
    results = {}
    for label, options in {"default": {}, "changed": CHANGED, "exact": dict(exact_decode=True)}.items():
        local = outcome(library, tmp_path / "local", replace(LOCAL, **options))
        on_ray = outcome(library, tmp_path / "ray", replace(RAY, **options))
        assert_same(local, on_ray)
        results[label] = on_ray
    default, changed, exact = results["default"], results["changed"], results["exact"]
    assert default["failures"] == [] and changed["failures"] == [("large.jpg", "too large")]  # --max-pixels
    assert (default["batches"], changed["batches"]) == (1, 3)  # --batch-size 2: 6 files, 3 forward passes
    assert (default["readers"], changed["readers"]) == (1, 3)  # --readers 3
    assert all(differ(default, changed, f"small_{i}.jpg") for i in range(5))  # --decoder torchvision
    assert differ(default, exact, "large.jpg")  # --exact-decode: the large JPEG decoded at full size
    assert not any(differ(default, exact, f"small_{i}.jpg") for i in range(5))


def test_the_local_engine_refuses_the_ray_options(capsys, library, tmp_path):
    with pytest.raises(InputError, match="go with --engine ray"):
        index_paths([library], tmp_path / "store", replace(LOCAL, ray=RayConfig(address="10.0.0.1:6379")))
    code, out, err = run(capsys, "index", library, "--store", tmp_path / "store", *MODEL, "--cpus-per-worker", "2")
    assert code == 1 and err.strip() == ("error: --ray-address, --cpus-per-worker and --gpus-per-worker go with "
                                         "--engine ray")
    assert not (tmp_path / "store").exists()


def test_an_unknown_engine_is_one_line(library, tmp_path):
    with pytest.raises(InputError, match=r"unknown engine 'spark' \(one of local, ray\)"):
        index_paths([library], tmp_path / "store", replace(LOCAL, engine="spark"))


class Recording:
    """An engine added as data: the local session, wrapped to record what it is handed."""
    name = "recording"

    def __init__(self) -> None:
        self.checked, self.embedded = [], []

    def check(self, config):
        self.checked.append(config)

    @contextmanager
    def session(self, config):
        engine = self

        class Session(LocalSession):
            def embed(self, target, jobs, progress):
                engine.embedded.append(len(jobs))
                return super().embed(target, jobs, progress)

        yield Session(config)


def test_an_engine_is_one_entry_in_the_registry(monkeypatch, library, tmp_path):
    recording = Recording()
    monkeypatch.setitem(engines.ENGINES, "recording", recording)
    config = replace(LOCAL, engine="recording", batch_size=4)
    summary = index_paths([library], tmp_path / "store", config)
    assert recording.checked == [config] and recording.embedded == [6]
    assert summary.embedded == Store.open(tmp_path / "store").tables.count() == 6
