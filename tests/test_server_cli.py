"""`clipdex serve` as users start it: a real process, one-line errors for mistakes, and stores
without an encoder (imported features) served for vector search and the cache."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import cli
from server import ServeConfig, create_app
from store.importer import ImportConfig, import_features
from tests.helpers import local_client

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as caught:
        cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return caught.value.code, out, err


def get(url: str, key: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers={"X-API-Key": key} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_serve_process_starts_guards_and_stops(served_library):
    port = free_port()
    env = {**os.environ, "CLIPDEX_API_KEY": "from-env"}
    server = subprocess.Popen([sys.executable, "-c", "import cli; cli.main()", "serve", "--store",
                               str(served_library[0]), "--port", str(port)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status, health = get(f"http://127.0.0.1:{port}/health")
                break
            except OSError:
                assert server.poll() is None, server.communicate()
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        assert status == 200 and health["count"] == 40
        assert get(f"http://127.0.0.1:{port}/info")[0] == 401
        assert get(f"http://127.0.0.1:{port}/info", key="from-env")[0] == 200
        with socket.socket() as other:  # loopback only by default
            listening = other.connect_ex(("127.0.0.1", port)) == 0
        assert listening
    finally:
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=30)
    assert server.returncode == 0, err
    assert f"http://127.0.0.1:{port}/" in out and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--store", "{missing}"], "no store at"),
    (["--store", "{store}", "--api-key", " "], "--api-key is empty"),
    (["--store", "{store}", "--port", "{busy}"], "cannot listen on"),
    (["--store", "{store}", "--host", "no.such.host.invalid"], "not an address of this machine"),
    (["--store", "{store}", "--port", "70000"], "70000"),
])
def test_serve_mistakes_are_one_line(capsys, tmp_path, served_library, args, message):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        values = {"missing": tmp_path / "nope", "store": served_library[0], "busy": busy.getsockname()[1]}
        code, _, err = run_cli(capsys, "serve", *[a.format(**values) for a in args])
    assert code in (1, 2) and message in err and err.startswith("error:") and len(err.strip().splitlines()) == 1


def test_a_store_without_an_index_is_refused(capsys, tmp_path):
    from store.store import Store

    Store.create(tmp_path / "empty", "clipdex-shapes", "bundled", 64)
    code, _, err = run_cli(capsys, "serve", "--store", tmp_path / "empty")
    assert code == 1 and "no index yet" in err


def test_imported_features_serve_vectors_and_the_cache(tmp_path):
    features = np.random.default_rng(1).normal(size=(30, 32)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    np.save(tmp_path / "f.npy", features)
    import_features([tmp_path / "f.npy"], tmp_path / "store", ImportConfig(model_name="imagebind_huge"))
    with local_client(create_app(ServeConfig(store=tmp_path / "store"))) as client:
        text = client.post("/search", json={"text": "a dog"})
        assert text.status_code == 400 and "no text or image encoder" in text.json()["error"]
        hits = client.post("/search", json={"embedding": features[4].tolist(), "k": 3}).json()
        assert hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
        same = client.post("/search", json={"id": hits[0]["id"], "k": 3}).json()
        assert [h["id"] for h in same] == [h["id"] for h in hits]
        blend = client.post("/cache/blend", json={"queries": [features[4].tolist()], "k": 5})
        assert blend.status_code == 200 and len(blend.json()["features"][0]) == 32
        assert client.post("/classify", json={"id": hits[0]["id"], "labels": ["dog"]}).status_code == 400
