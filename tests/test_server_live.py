"""Live updates: `clipdex index` runs in another process while clients query in a loop. Every
response must be complete and consistent (one published version, never rows without their index
or the reverse), and the new version must be served without a restart."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from fastapi.testclient import TestClient

from demo.shapes import write_library
from indexer.run import IndexConfig, index_paths
from server import ServeConfig, create_app
from tests.helpers import local_client

REPO = Path(__file__).resolve().parents[1]
BEFORE, ADDED, REMOVED = 20, 16, 4


def test_indexing_while_querying(tmp_path):
    old, new, store = tmp_path / "old", tmp_path / "new", tmp_path / "store"
    write_library(old, BEFORE, 21)
    index_paths([old], store, IndexConfig(model="clipdex-shapes", device="cpu", progress=False))
    app = create_app(ServeConfig(store=store, refresh_seconds=0.05))
    seen: list[tuple[str, int, object]] = []
    stop = threading.Event()

    def query_in_a_loop(client: TestClient) -> None:
        while not stop.is_set():
            response = client.post("/search", json={"text": "a red circle", "k": 100})
            seen.append(("search", response.status_code, response.json()))
            response = client.post("/cache/blend", json={"queries": [[0.1] * 64], "k": 100,
                                                         "return_neighbours": True})
            seen.append(("blend", response.status_code, response.json()))
            response = client.get("/health")
            seen.append(("health", response.status_code, response.json()))

    with local_client(app) as client:
        first_version = client.get("/health").json()["version"]
        worker = threading.Thread(target=query_in_a_loop, args=(client,))
        worker.start()
        try:
            write_library(new, ADDED, 22)
            for path in sorted(p for p in old.rglob("*") if p.suffix in (".jpg", ".png"))[:REMOVED]:
                path.unlink()
            subprocess.run([sys.executable, "-c", "import cli; cli.main()", "index", str(old), str(new),
                            "--store", str(store), "--commit-every", "4", "--workers", "0"],
                           cwd=REPO, check=True, capture_output=True, timeout=300)
            deadline = time.monotonic() + 10
            while client.get("/health").json()["version"] == first_version and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)  # a few more rounds on the new version
        finally:
            stop.set()
            worker.join()
        after = client.post("/search", json={"text": "a shape", "k": 100, "where": f"path LIKE '{new}%'"}).json()

    errors = [(kind, status, body) for kind, status, body in seen if status != 200]
    assert not errors, errors[:3]
    final = BEFORE - REMOVED + ADDED
    sizes = {kind: {len(body) if kind == "search" else len(body["ids"][0]) if kind == "blend" else body["count"]
                    for k, _, body in seen if k == kind} for kind in ("search", "blend", "health")}
    assert sizes == {"search": {BEFORE, final}, "blend": {BEFORE, final}, "health": {BEFORE, final}}, sizes
    versions = [body["version"] for kind, _, body in seen if kind == "health"]
    assert versions == sorted(versions) and versions[-1] > first_version
    assert len(after) == ADDED and all(hit["path"].startswith(str(new)) for hit in after)


def test_a_server_started_mid_run_serves_the_indexed_version(tmp_path):
    """Rows committed after the index was built (an index run under way) stay invisible until the
    run publishes its index: a deterministic version of the race above."""
    from store.store import Store

    library, store_dir = tmp_path / "library", tmp_path / "store"
    write_library(library, 12, 23)
    index_paths([library], store_dir, IndexConfig(model="clipdex-shapes", device="cpu", progress=False))
    writer = Store.open(store_dir, writable=True)  # a writer, as `clipdex index` opens it
    gone = writer.tables.file_rows().column("id").to_pylist()[:5]
    writer.tables.delete_ids(gone)  # committed, but not yet indexed or published
    app = create_app(ServeConfig(store=store_dir, refresh_seconds=3600))
    with local_client(app) as client:
        hits = client.post("/search", json={"text": "a shape", "k": 100}).json()
        assert len(hits) == 12 and set(gone) <= {hit["id"] for hit in hits}
        assert client.post("/search", json={"id": gone[0], "k": 1}).status_code == 200
        assert client.get(f"/thumbnails/{gone[0]}").status_code == 200
        assert client.post("/cache/blend", json={"queries": [[0.1] * 64], "k": 3}).status_code == 200
        writer.rebuild_index()  # the run publishes
        assert app.state.context.live.poll()
        assert app.state.context.live.current().has_cache  # made before the swap, as the old one was in use
        hits = client.post("/search", json={"text": "a shape", "k": 100}).json()
        assert len(hits) == 7 and not set(gone) & {hit["id"] for hit in hits}
        assert client.post("/search", json={"id": gone[0], "k": 1}).status_code == 404


def test_a_damaged_or_missing_manifest_keeps_the_last_good_version(tmp_path, caplog):
    library, store_dir = tmp_path / "library", tmp_path / "store"
    write_library(library, 8, 24)
    index_paths([library], store_dir, IndexConfig(model="clipdex-shapes", device="cpu", progress=False))
    app = create_app(ServeConfig(store=store_dir, refresh_seconds=3600))
    live = app.state.context.live
    manifest = store_dir / "manifest.json"
    good = manifest.read_text()
    with local_client(app) as client:
        manifest.write_text("{ half a manifest")
        assert not live.poll() and "damaged" in caplog.text
        manifest.unlink()
        assert not live.poll() and "no store at" in caplog.text
        assert len(client.post("/search", json={"text": "a shape", "k": 20}).json()) == 8
        manifest.write_text(good)
        assert not live.poll()  # the same index as before: nothing to swap
        assert client.get("/health").json()["count"] == 8
