"""The server serves only what was indexed, to the hosts it was meant for (issue: serve only what
was indexed). Each test makes the attack itself: a symlink swapped after indexing, an imported
key naming /etc/passwd, a foreign Host, a filter that closes its own parenthesis."""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from indexer import IndexConfig, index_paths
from search import Query
from server import LiveStore, ServeConfig, create_app
from store import ImportConfig, InputError, Store, import_features
from store.files import THUMBNAIL_DIR
from tests.helpers import local_client, run

INDEX = IndexConfig(model="clipdex-shapes", device="cpu", workers=0, progress=False)
ROUTES = [("GET", "/health"), ("GET", "/info"), ("GET", "/"), ("GET", "/openapi.json"), ("POST", "/search"),
          ("GET", "/images/1"), ("GET", "/thumbnails/1"), ("POST", "/classify"), ("POST", "/cache/blend")]


@pytest.fixture
def library(tmp_path, small_library):
    target = tmp_path / "lib"
    shutil.copytree(small_library[0], target)
    real = next(target.rglob("*.png"))
    (target / "evil.png").symlink_to(real.rename(tmp_path / "outside.png"))  # a link out of the library
    index_paths([target], tmp_path / "store", INDEX)
    return target, tmp_path / "store"


def row_of(store_dir, name: str) -> dict:
    return next(r for r in Store.open(store_dir).tables.file_rows().to_pylist() if r["path"].endswith(name))


# 1. A row serves only its own file


def test_a_symlink_swapped_after_indexing_is_refused(library):
    folder, store = library
    evil = row_of(store, "evil.png")
    with local_client(create_app(ServeConfig(store=store))) as client:
        assert client.get(f"/images/{evil['id']}").status_code == 200  # the file it was indexed from
        (folder / "evil.png").unlink()
        (folder / "evil.png").symlink_to("/etc/passwd")
        for url in (f"/images/{evil['id']}", f"/thumbnails/{evil['id']}"):
            response = client.get(url)
            assert response.status_code == 410 and "another file than the one indexed" in response.json()["error"]
            assert b"root:" not in response.content


def test_a_file_edited_or_replaced_by_a_link_is_refused(library):
    folder, store = library
    edited, replaced = sorted(folder.rglob("shape_*"))[:2]
    ids = {name: row_of(store, name.name)["id"] for name in (edited, replaced)}
    with local_client(create_app(ServeConfig(store=store))) as client:
        edited.write_bytes(edited.read_bytes() + b"changed")
        replaced.unlink()
        replaced.symlink_to("/etc/passwd")
        for path in (edited, replaced):
            response = client.get(f"/images/{ids[path]}")
            assert response.status_code == 410 and b"root:" not in response.content, path
        os.utime(edited, ns=(0, 0))  # touched but the same content as indexed: still served
        edited.write_bytes(edited.read_bytes()[:-len(b"changed")])
        assert client.get(f"/images/{ids[edited]}").status_code == 200


def test_imported_rows_have_no_file_to_serve(tmp_path):
    np.save(tmp_path / "f.npy", np.ones((3, 8), np.float32) + np.eye(3, 8, dtype=np.float32))
    pq.write_table(pa.table({"path": ["/etc/passwd", "/etc/shadow", "/etc/hosts"]}), tmp_path / "meta.parquet")
    import_features([tmp_path / "f.npy"], tmp_path / "store", ImportConfig(metadata=str(tmp_path / "meta.parquet")))
    ids = [r["id"] for r in Store.open(tmp_path / "store").tables.file_rows().to_pylist()]
    with local_client(create_app(ServeConfig(store=tmp_path / "store"))) as client:
        for image_id in ids:
            for url in (f"/images/{image_id}", f"/thumbnails/{image_id}"):
                response = client.get(url)
                assert response.status_code == 404 and "imported" in response.json()["error"]


def test_thumbnails_are_keyed_by_content_and_cleaned_when_rows_go(library):
    folder, store = library
    victim = sorted(folder.rglob("shape_*"))[0]
    row = row_of(store, victim.name)
    with local_client(create_app(ServeConfig(store=store))) as client:
        assert client.get(f"/thumbnails/{row['id']}").status_code == 200
    thumbs = list((store / THUMBNAIL_DIR).rglob("*.jpg"))
    assert [t.name for t in thumbs] == [f"{row['hash']}-256.jpg"]
    victim.unlink()
    index_paths([folder], store, INDEX)
    assert not list((store / THUMBNAIL_DIR).rglob("*.jpg"))


# 2. Host check


@pytest.mark.parametrize("method, url", ROUTES)
def test_a_foreign_host_is_refused_on_every_route(library, method, url):
    _, store = library
    with local_client(create_app(ServeConfig(store=store))) as client:
        response = client.request(method, url, headers={"Host": "attacker.example"}, json={})
        assert response.status_code == 400 and "does not answer to the host 'attacker.example'" in response.json()["error"]
        for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
            assert "does not answer to the host" not in client.request(method, url, headers={"Host": host}, json={}).text


def test_allowed_hosts_are_answered(library):
    _, store = library
    with local_client(create_app(ServeConfig(store=store, host="0.0.0.0", allow_hosts=("photos.lan",)))) as client:
        assert client.get("/health", headers={"Host": "photos.lan:8000"}).status_code == 200
        assert client.get("/health", headers={"Host": "evil.lan"}).status_code == 400


# 3. Filters parsed, not pasted


ESCAPES = ["1=1) OR (1=1", "width > 1; DROP TABLE images", "(SELECT 1)", "width > (SELECT max(width) FROM images)",
           "colour = 'red'", "images.width > 1", "width"]


@pytest.mark.parametrize("sql", ESCAPES)
def test_a_filter_cannot_escape_its_parentheses(sql, capsys, library):
    _, store = library
    guarded = Query.create(Store.open(store), "a shape").where("width > 100000")
    with pytest.raises(InputError, match="invalid where filter"):
        guarded.where(sql)
    code, _, err = run(capsys, "search", "a shape", "--store", store, "--where", sql)
    assert code == 1 and err.startswith("error: invalid where filter") and err.count("\n") == 1
    with local_client(create_app(ServeConfig(store=store))) as client:
        response = client.post("/search", json={"text": "a shape", "where": sql})
        assert response.status_code == 400 and "invalid where filter" in response.json()["error"]


def test_good_filters_still_work_and_combine(library):
    _, store = library
    query = Query.create(Store.open(store), "a shape").limit(20)
    wide = query.where("width > 300").where("path LIKE '%.jpg' OR path LIKE '%.png'").to_list()
    assert wide and all(hit["width"] > 300 for hit in wide)
    assert query.where("width > 100000").where("1=1 OR 1=1").to_list() == []  # AND-ed as whole conditions
    assert query.where("caption IS NULL AND lower(path) LIKE '%shape%' AND id IN (1, 2, 3)").to_list()


# 4. Strict types


@pytest.mark.parametrize("body", [{"text": "a", "k": "5"}, {"text": "a", "k": True}, {"text": "a", "k": 5.0},
                                  {"embedding": ["0.1"] * 64}])
def test_strings_and_booleans_are_not_numbers(library, body):
    _, store = library
    with local_client(create_app(ServeConfig(store=store))) as client:
        response = client.post("/search", json=body)
        assert response.status_code == 422 and "error" in response.json()
        blend = client.post("/cache/blend", json={"queries": [[0.1] * 64], "alpha": "0.5"})
        assert blend.status_code == 422


# 5. A store that disappears while served


def test_a_store_moved_away_keeps_serving_logs_once_and_creates_nothing(library, caplog):
    folder, store = library
    live = LiveStore(store, refresh_seconds=3600, cache_rows=1000)
    app = create_app(ServeConfig(store=store, refresh_seconds=3600), live)
    some = row_of(store, ".jpg")
    with local_client(app) as client:
        store.rename(store.with_name("moved"))
        caplog.set_level(logging.WARNING)
        for _ in range(5):
            assert not live.poll()
        assert len([r for r in caplog.records if "cannot be read" in r.getMessage()]) == 1
        hits = client.post("/search", json={"text": "a shape", "k": 3})
        assert hits.status_code == 200 and len(hits.json()) == 3
        client.get(f"/thumbnails/{some['id']}")
        assert not store.exists()  # nothing recreated at the old path
        store.with_name("moved").rename(store)
        live.poll()
        assert any("readable again" in r.getMessage() for r in caplog.records)


# 6. Opt-in CORS and an access log


def test_cors_is_off_by_default_and_on_for_named_origins(library):
    _, store = library
    asked = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    with local_client(create_app(ServeConfig(store=store))) as client:
        assert "access-control-allow-origin" not in client.get("/health", headers=asked).headers
    with local_client(create_app(ServeConfig(store=store, cors_origins=("https://app.example",)))) as client:
        assert client.get("/health", headers=asked).headers["access-control-allow-origin"] == "https://app.example"
        preflight = client.options("/search", headers=asked)
        assert preflight.status_code == 200
        other = client.get("/health", headers={"Origin": "https://evil.example"})
        assert other.status_code == 403 and "access-control-allow-origin" not in other.headers


def test_the_access_log_has_one_line_per_request(library, tmp_path):
    _, store = library
    log = tmp_path / "access.log"
    with local_client(create_app(ServeConfig(store=store, access_log=str(log)))) as client:
        client.get("/health")
        client.post("/search", json={"text": "a shape", "k": 2})
        client.get("/images/987654")
    lines = log.read_text().splitlines()
    assert [line.split('"')[1] for line in lines] == ["GET /health", "POST /search", "GET /images/987654"]
    assert [line.split('"')[2].split()[0] for line in lines] == ["200", "200", "404"]


def test_serve_on_all_interfaces_without_allowed_hosts_warns(capsys, library, monkeypatch):
    import cli

    monkeypatch.setattr("server.serve", lambda config, app=None: None)
    monkeypatch.setattr(cli, "_check_port_free", lambda host, port: None)
    _, store = library
    code, out, err = run(capsys, "serve", "--store", store, "--host", "0.0.0.0", "--api-key", "k")
    assert code == 0 and "give it with --allow-host" in err
