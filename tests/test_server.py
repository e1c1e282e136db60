"""The HTTP API on a real store: results, strict input (4xx JSON, never 5xx) and the API key."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from search.cache import CacheRetriever
from server import ServeConfig, create_app
from store.store import Store
from tests.helpers import local_client

KEY = "test-key"
MAX_BODY = 1 << 20


@pytest.fixture(scope="module")
def client(served_library):
    store_dir, _ = served_library
    app = create_app(ServeConfig(store=store_dir, api_key=KEY, max_body_bytes=MAX_BODY, max_k=50, max_batch=8))
    with local_client(app, headers={"X-API-Key": KEY}) as client:
        yield client


@pytest.fixture(scope="module")
def rows(served_library):
    """labels.csv rows with the store's id of each file."""
    store_dir, labels = served_library
    stored = Store.open(store_dir).tables.file_rows().to_pylist()
    by_path = {row["path"]: row["id"] for row in stored}
    return [{**row, "id": by_path[row["path"]]} for row in labels if row["path"] in by_path]


def post(client, url, payload):
    response = client.post(url, json=payload)
    return response.status_code, response.json()


def test_text_search_finds_the_described_shapes(client, rows):
    truth = {row["id"]: (row["colour"], row["shape"]) for row in rows}
    colour, shape = rows[0]["colour"], rows[0]["shape"]
    wanted = sum(1 for row in rows if (row["colour"], row["shape"]) == (colour, shape))
    status, hits = post(client, "/search", {"text": f"a {colour} {shape}", "k": 5})
    assert status == 200
    assert set(hits[0]) == {"id", "path", "score", "width", "height", "caption", "taken_at", "camera_make",
                            "camera_model", "lens", "gps_latitude", "gps_longitude"}  # the photo columns too
    assert [truth[h["id"]] for h in hits[:wanted]] == [(colour, shape)] * wanted
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert hits[0]["caption"] and shape in hits[0]["caption"]  # captions came from labels.csv


def test_id_embedding_base64_and_upload_agree(client, rows, served_library):
    row = rows[3]
    status, by_id = post(client, "/search", {"id": row["id"], "k": 4})
    assert status == 200 and by_id[0]["id"] == row["id"] and by_id[0]["score"] == pytest.approx(1.0, abs=1e-5)
    vector = Store.open(served_library[0]).tables.rows_by_id(
        [row["id"]], ["embedding"]).column("embedding").to_pylist()[0]
    _, by_vector = post(client, "/search", {"embedding": (np.asarray(vector) * 3).tolist(), "k": 4})
    assert [h["id"] for h in by_vector] == [h["id"] for h in by_id]
    data = Path(row["path"]).read_bytes()
    _, by_base64 = post(client, "/search", {"image": base64.b64encode(data).decode(), "k": 4})
    _, by_data_url = post(client, "/search", {"image": "data:image/x;base64," + base64.b64encode(data).decode(), "k": 4})
    uploaded = client.post("/search", files={"image": ("x.jpg", data)}, data={"k": "4"}).json()
    assert by_base64[0]["id"] == by_data_url[0]["id"] == uploaded[0]["id"] == row["id"]


def test_add_and_subtract_move_the_query_vector(client, rows):
    a, b = np.eye(64, dtype=np.float32)[3], np.eye(64, dtype=np.float32)[7]
    _, combined = post(client, "/search", {"embedding": a.tolist(), "add": [{"embedding": b.tolist(), "weight": 2}],
                                           "subtract": [{"embedding": a.tolist(), "weight": 0.5}], "k": 6})
    _, direct = post(client, "/search", {"embedding": (0.5 * a + 2 * b).tolist(), "k": 6})
    assert [h["id"] for h in combined] == [h["id"] for h in direct]
    assert [h["score"] for h in combined] == pytest.approx([h["score"] for h in direct], abs=1e-5)
    _, text_only = post(client, "/search", {"text": "a red circle", "k": 6})
    _, moved = post(client, "/search", {"text": "a red circle", "subtract": [{"text": "red"}], "add": [{"text": "blue"}],
                                        "k": 6})
    assert [h["id"] for h in moved] != [h["id"] for h in text_only]


def test_where_prefilters(client):
    status, hits = post(client, "/search", {"text": "a shape", "k": 50, "where": "width > 400"})
    assert status == 200 and hits and all(h["width"] > 400 for h in hits)
    _, everything = post(client, "/search", {"text": "a shape", "k": 50})
    assert len(hits) == sum(1 for h in everything if h["width"] > 400)


def test_images_and_thumbnails_serve_only_stored_files(client, rows):
    row = rows[0]
    response = client.get(f"/images/{row['id']}")
    assert response.status_code == 200 and response.content == Path(row["path"]).read_bytes()
    thumb = client.get(f"/thumbnails/{row['id']}")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    picture = Image.open(io.BytesIO(thumb.content))
    assert max(picture.size) <= 256 and picture.format == "JPEG"
    assert client.get(f"/thumbnails/{row['id']}").content == thumb.content  # cached copy
    for url in ("/images/999999", "/thumbnails/999999"):
        assert client.get(url).status_code == 404
    for url in ("/images/..%2F..%2Fetc%2Fpasswd", "/images/-1", "/thumbnails/%2Fetc%2Fpasswd", "/images/1.5"):
        response = client.get(url)
        assert 400 <= response.status_code < 500 and "error" in response.json(), url


def test_classify_by_id_and_upload(client, rows):
    shapes = sorted({row["shape"] for row in rows})
    right = 0
    for row in rows[:10]:
        status, top = post(client, "/classify", {"id": row["id"], "labels": shapes, "k": 2})
        assert status == 200 and len(top) == 2 and top[0]["prob"] >= top[1]["prob"]
        right += top[0]["label"] == row["shape"]
    assert right >= 8
    data = Path(rows[0]["path"]).read_bytes()
    response = client.post("/classify", files={"image": ("a.jpg", data)}, data={"labels": shapes, "k": "1"})
    assert response.status_code == 200
    by_id = post(client, "/classify", {"id": rows[0]["id"], "labels": shapes, "k": 1})[1]
    assert response.json()[0]["label"] == by_id[0]["label"]


@pytest.mark.parametrize("weighting, restore_norm", [("paper", False), ("reference", False), ("reference", True)])
def test_cache_blend_matches_the_library(client, served_library, weighting, restore_norm):
    queries = np.random.default_rng(0).normal(size=(3, 64)).astype(np.float32)
    status, body = post(client, "/cache/blend", {"queries": queries.tolist(), "k": 5, "alpha": 0.3,
                                                 "weighting": weighting, "temperature": 10,
                                                 "restore_norm": restore_norm, "return_neighbours": True})
    assert status == 200 and body["k"] == 5
    expected = CacheRetriever.open(served_library[0], device="cpu").blend(
        queries, 5, 0.3, weighting, 10.0, restore_norm, return_neighbours=True)
    if weighting == "reference":  # unit rows by default, as the LLM path uses; the query's norm on request
        np.testing.assert_allclose(np.linalg.norm(body["features"], axis=1),
                                   np.linalg.norm(queries, axis=1) if restore_norm else 1.0, rtol=1e-5)
    np.testing.assert_allclose(body["features"], expected.features, atol=1e-6)
    assert body["ids"] == expected.ids.tolist()
    np.testing.assert_allclose(body["scores"], expected.scores, atol=1e-6)
    status, plain = post(client, "/cache/blend", {"queries": queries[:1].tolist(), "k": 45})
    assert status == 200 and plain["k"] == 40 and plain.get("ids") is None  # clamped to the cache size


BAD_REQUESTS = [
    ("/search", {"text": ""}, 400, "the search text is empty"),
    ("/search", {"text": "   "}, 400, "empty"),
    ("/search", {}, 422, "exactly one"),
    ("/search", {"text": "a", "id": 1}, 422, "exactly one"),
    ("/search", {"embedding": [0.1] * 63}, 400, "64"),
    ("/search", {"embedding": [0.0] * 64}, 400, "cancel out"),
    ("/search", {"embedding": [1e39] * 64}, 400, "float32"),
    ("/search", {"text": "a", "k": 0}, 400, "k must be at least 1"),
    ("/search", {"text": "a", "k": 51}, 400, "maximum of 50"),
    ("/search", {"text": "a", "k": "ten"}, 422, "k"),
    ("/search", {"id": 987654321}, 404, "no image with id"),
    ("/search", {"id": -3}, 422, "id"),
    ("/search", {"text": "a", "where": "widht >>> 3"}, 400, "invalid where filter"),
    ("/search", {"text": "a", "where": "width > 1; DROP TABLE images"}, 400, "invalid where filter"),
    ("/search", {"image": "not base64!"}, 400, "base64"),
    ("/search", {"image": base64.b64encode(b"GIF89a but not really").decode()}, 400, "not an image"),
    ("/search", {"text": "a", "color": "red"}, 422, "color"),
    ("/classify", {"id": 1, "labels": []}, 422, "labels"),
    ("/classify", {"id": 1, "labels": ["a"], "k": 0}, 400, "k must be at least 1"),
    ("/classify", {"id": 1, "labels": ["a"], "k": 51}, 400, "maximum of 50"),
    ("/classify", {"id": 1, "labels": ["a"], "template": "no slot"}, 400, "{}"),
    ("/classify", {"labels": ["a"]}, 422, "exactly one"),
    ("/classify", {"id": 987654321, "labels": ["a"]}, 404, "no image with id"),
    ("/cache/blend", {"queries": [[0.1] * 63]}, 400, "64 values"),
    ("/cache/blend", {"queries": [[0.1] * 64, [0.1] * 10]}, 400, "64 values"),
    ("/cache/blend", {"queries": []}, 422, "queries"),
    ("/cache/blend", {"queries": [[0.0] * 64]}, 400, "all zeros"),
    ("/cache/blend", {"queries": [[1e39] * 64]}, 400, "infinite"),
    ("/cache/blend", {"queries": [[0.1] * 64] * 9}, 400, "maximum batch of 8"),
    ("/cache/blend", {"queries": [[0.1] * 64], "alpha": 1.5}, 422, "alpha"),
    ("/cache/blend", {"queries": [[0.1] * 64], "weighting": "magic"}, 422, "weighting"),
    ("/cache/blend", {"queries": [[0.1] * 64], "temperature": 0}, 422, "temperature"),
    ("/cache/blend", {"queries": [[0.1] * 64], "k": 0}, 400, "k must be at least 1"),
    ("/cache/blend", {"queries": [[0.1] * 64], "k": 51}, 400, "maximum of 50"),
]


@pytest.mark.parametrize("url, payload, status, message", BAD_REQUESTS)
def test_bad_requests_are_4xx_with_a_message(client, url, payload, status, message):
    got, body = post(client, url, payload)
    assert (got, set(body)) == (status, {"error"})
    assert message in body["error"]


def test_nan_and_malformed_json_are_rejected(client):
    for raw in ('{"embedding": [NaN' + ", 0.1" * 63 + "]}", '{"text": "a", "add": [{"text": "b", "weight": Infinity}]}',
                '{"queries": [[-Infinity' + ", 0.1" * 63 + "]]}", '{"text": ', "[1, 2]", "\xff\xfe"):
        url = "/cache/blend" if "queries" in raw else "/search"
        response = client.post(url, content=raw.encode("utf-8", "surrogateescape"),
                               headers={"Content-Type": "application/json"})
        assert response.status_code == 422 and "error" in response.json(), raw


def test_uploads_too_large_or_not_images_are_refused(client):
    def upload(files=None, data=None, url="/search"):
        response = client.post(url, files=files, data=data)
        return response.status_code, response.json()["error"] if response.status_code != 200 else None

    status, error = upload({"image": ("big.jpg", b"\xff" * (MAX_BODY + 10))})
    assert status == 413 and "limit" in error
    response = client.post("/search", content=b"{" + b" " * (2 * MAX_BODY) + b"}",
                           headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    assert response.status_code == 413
    assert upload({"image": ("notes.txt", b"hello, world")}) == (400, "the uploaded image: not an image (unrecognised content)")
    assert upload({"image": ("empty.jpg", b"")}) == (400, "the uploaded image: empty file")
    status, error = upload(data={"k": "3"})  # a urlencoded form: what any web page may send unasked
    assert status == 415 and "application/json or multipart/form-data" in error
    status, error = upload({"other": ("a.txt", b"x")}, {"k": "3"})
    assert status == 422 and "image" in error
    status, error = upload({"other": ("a.txt", b"x")}, {"image": "not a file"})
    assert status == 422 and "file upload" in error
    status, error = upload({"image": ("a.jpg", b"x")}, {"k": "3", "colour": "red"})
    assert status == 422 and "colour" in error
    status, error = upload({"image": ("a.jpg", b"x")}, {"k": "0"})
    assert status == 400 and "k must be at least 1" in error
    status, error = upload({"image": ("a.jpg", b"x")}, url="/classify")
    assert status == 422 and "labels" in error
    response = client.post("/search", content=b"text=a red circle", headers={"Content-Type": "text/plain"})
    assert response.status_code == 415 and "application/json or multipart/form-data" in response.json()["error"]
    response = client.post("/search", content=b"--x\r\nbroken", headers={"Content-Type": "multipart/form-data"})
    assert 400 <= response.status_code < 500 and "error" in response.json()


def test_api_key_guards_everything_but_health(served_library):
    app = create_app(ServeConfig(store=served_library[0], api_key=KEY))
    with local_client(app) as anonymous:
        assert anonymous.get("/health").status_code == 200
        for method, url in [("GET", "/info"), ("GET", "/openapi.json"), ("POST", "/search"), ("GET", "/images/1"),
                            ("GET", "/thumbnails/1"), ("POST", "/classify"), ("POST", "/cache/blend")]:
            for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}):
                response = anonymous.request(method, url, headers=headers, json={"text": "a"})
                assert response.status_code == 401 and "API key" in response.json()["error"], (url, headers)
        assert anonymous.get("/").status_code == 401  # the page asks for the key
        ok = {"text": "a red circle", "k": 1}
        assert anonymous.post("/search", json=ok, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert anonymous.post("/search", json=ok, headers={"X-API-Key": KEY}).status_code == 200
        redirect = anonymous.get(f"/?key={KEY}", follow_redirects=False)
        assert redirect.status_code == 303 and "httponly" in redirect.headers["set-cookie"].lower()
        assert anonymous.get("/").status_code == 200  # the cookie now carries the key
        assert anonymous.post("/search", json=ok).status_code == 200
    open_app = create_app(ServeConfig(store=served_library[0]))
    with local_client(open_app) as client:
        assert client.get("/info").status_code == 200 and client.get("/").status_code == 200


def test_health_and_info(client, served_library):
    health = client.get("/health").json()
    info = client.get("/info").json()
    assert health["status"] == "ok" and health["count"] == info["count"] == 40
    assert info["model"] == "clipdex-shapes" and info["dim"] == 64 and info["limits"]["max_k"] == 50
    assert info["serving_version"] == health["version"] == info["index"]["table_version"]
    assert "/search" in client.get("/openapi.json").json()["paths"]


def test_thumbnails_of_a_read_only_store_are_made_in_memory(tmp_path, rows):
    from server.media import thumbnail

    not_a_folder = tmp_path / "store-file"
    not_a_folder.write_text("the store folder cannot take a thumbnails/ folder")
    made = thumbnail(not_a_folder, rows[0]["path"], "abcdef", 64)
    assert isinstance(made, bytes) and max(Image.open(io.BytesIO(made)).size) <= 64


def test_a_client_that_leaves_mid_body_is_not_a_server_error(served_library, caplog):
    import asyncio

    app = create_app(ServeConfig(store=served_library[0]))
    sent = []

    async def scenario():
        messages = iter([{"type": "http.request", "body": b'{"text": "a', "more_body": True},
                         {"type": "http.disconnect"}])

        async def receive():
            return next(messages)

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/search", "raw_path": b"/search", "query_string": b"",
                 "headers": [(b"content-type", b"application/json")], "http_version": "1.1", "scheme": "http",
                 "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 1234), "root_path": "", "app": app}
        await app(scope, receive, send)

    asyncio.run(scenario())
    assert sent[0]["status"] == 400 and "unexpected error" not in caplog.text
