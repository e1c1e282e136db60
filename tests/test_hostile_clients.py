"""Hostile clients against the real server, over a socket, as `clipdex serve` runs with its defaults.

Each test makes one attack as a web page, a local user who can write to the library or the store,
or a careless admin would make it, and checks that it is refused (4xx or one line at start-up),
that the server is alive afterwards, that no byte of a file that was not indexed is served, and
that no descriptor is left open. The attacks fixed in earlier rounds are here too.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from demo.shapes import write_library
from indexer import IndexConfig, index_paths
from server import ServeConfig, create_app
from store import InputError, Store
from store.files import thumbnail_file
from tests.helpers import bitmap, clipdex, local_client

REPO = Path(__file__).resolve().parents[1]
INDEX = IndexConfig(model="clipdex-shapes", device="cpu", workers=0, progress=False)
APP_ORIGIN = "https://app.example"
EVIL_ORIGIN = "https://evil.example"
QUERY = json.dumps({"text": "a red circle", "k": 3}).encode()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`clipdex serve` in a process of its own, and raw HTTP requests to it."""

    def __init__(self, store: Path, *args: str) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-c", "import cli; cli.main()", "serve", "--store", str(store), "--port", str(self.port),
             *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 90
        while True:
            try:
                if self.request("GET", "/health")[0] == 200:
                    break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start: {self.process.communicate()[1][-2000:]}")
                time.sleep(0.2)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
        """Exactly these headers (and Host, Content-Length): http.client adds no Content-Type."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            connection.close()

    def search(self, body: dict, headers: dict | None = None) -> tuple[int, dict | list]:
        status, _, data = self.request("POST", "/search", json.dumps(body).encode(),
                                       {"Content-Type": "application/json", **(headers or {})})
        return status, json.loads(data)

    def alive(self) -> bool:
        return self.process.poll() is None and self.request("GET", "/health")[0] == 200

    def descriptors(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A library with a folder per attack, its store, and a server with one named CORS origin."""
    root = tmp_path_factory.mktemp("hostile")
    library = root / "library"
    write_library(library / "shapes", 12, 5)
    real = bitmap(library / "album" / "photo.bmp", (200, 0, 0))
    bitmap(library / "inplace" / "photo.bmp", (0, 200, 0))
    bitmap(library / "folder" / "photo.bmp", (0, 0, 200))
    for name, colour in (("link", (10, 20, 30)), ("dir", (30, 20, 10)), ("fifo", (20, 30, 10)),
                         ("top", (90, 90, 10))):
        bitmap(library / "thumbs" / f"{name}.bmp", colour)
    # Never indexed: the same name, size and mtime as album/photo.bmp, other pixels.
    decoy = bitmap(root / "elsewhere" / "album" / "photo.bmp", (0, 0, 0))
    os.utime(decoy, ns=(real.stat().st_atime_ns, real.stat().st_mtime_ns))
    store = root / "store"
    index_paths([library], store, INDEX)
    server = Server(store, "--cors-origin", APP_ORIGIN)
    yield {"root": root, "library": library, "store": store, "server": server, "rows": rows_by_name(store)}
    server.stop()


def rows_by_name(store: Path) -> dict[str, dict]:
    return {os.path.relpath(r["path"], store.parent / "library"): r
            for r in Store.open(store).tables.file_rows().to_pylist()}


# 1. Filters that cannot be weapons


@pytest.mark.parametrize("where", [
    "length(repeat(path, 30000000)) > 0",  # a 66 GB allocation, then an abort, on the unpatched server
    "(" * 50 + "width > 1" + ")" * 50,  # RecursionError: a 500
    "NOT " * 400 + "width > 1",
    "width > " + "+".join(["1"] * 1500),  # Lance's planner overflows its stack: a segfault
    "lpad(path, 2000000000, 'x') = ''",
    "width IN (SELECT width FROM images)",
    "1=1) OR (1=1",
])
def test_a_weaponised_filter_is_refused_and_the_server_lives(site, where):
    server = site["server"]
    status, body = server.search({"text": "a shape", "k": 3, "where": where})
    assert status == 400 and "where filter" in body["error"], (where[:60], status, body)
    assert server.alive()


def test_plain_filters_still_work(site):
    status, hits = site["server"].search({"text": "a shape", "k": 50, "where": "lower(path) LIKE '%album%' AND width = 32"})
    assert status == 200 and [os.path.basename(h["path"]) for h in hits] == ["photo.bmp"]


# 2. No cross-site requests


@pytest.mark.parametrize("headers", [
    {"Origin": EVIL_ORIGIN},  # fetch(url, {method: "POST", body}) with no type: no preflight
    {"Origin": EVIL_ORIGIN, "Content-Type": "text/plain;charset=UTF-8"},
    {"Origin": EVIL_ORIGIN, "Content-Type": "application/json"},  # what a preflight would have guarded
    {"Origin": "null"},  # a sandboxed frame or a file:// page
    {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"},
    {"Sec-Fetch-Site": "same-site", "Content-Type": "application/json"},  # another port of localhost
])
def test_a_page_on_another_site_cannot_search(site, headers):
    server = site["server"]
    status, response_headers, body = server.request("POST", "/search", QUERY, headers)
    assert status == 403 and b"may not call this server from a browser" in body, (status, body)
    assert "access-control-allow-origin" not in response_headers and b"path" not in body
    assert server.alive()


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_bodies_are_json_or_multipart_only(site, content_type):
    server = site["server"]
    headers = {"Content-Type": content_type} if content_type else {}
    for path, body in (("/search", QUERY), ("/cache/blend", json.dumps({"queries": [[0.1] * 64]}).encode()),
                       ("/classify", json.dumps({"id": 1, "labels": ["a", "b"]}).encode())):
        status, _, answer = server.request("POST", path, body, headers)
        assert status == 415 and b"application/json or multipart/form-data" in answer, (path, content_type, status)


def test_images_are_not_embedded_in_other_sites(site):
    server, row = site["server"], site["rows"]["album/photo.bmp"]
    image = f"/images/{row['id']}"
    for headers in ({"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"},
                    {"Sec-Fetch-Site": "cross-site", "Referer": f"{EVIL_ORIGIN}/gallery.html"},
                    {"Origin": EVIL_ORIGIN}):
        status, _, body = server.request("GET", image, headers=headers)
        assert status == 403 and not body.startswith(b"BM"), headers
        status, _, _ = server.request("OPTIONS", "/search", headers={**headers, "Access-Control-Request-Method": "POST"})
        assert status == 403


def test_the_own_page_the_named_origin_and_plain_clients_are_answered(site):
    server, row = site["server"], site["rows"]["album/photo.bmp"]
    own = {"Origin": f"http://{server.host}", "Content-Type": "application/json"}
    assert server.request("POST", "/search", QUERY, own)[0] == 200
    assert server.request("POST", "/search", QUERY, {"Content-Type": "application/json",
                                                     "Sec-Fetch-Site": "same-origin"})[0] == 200
    status, headers, _ = server.request("POST", "/search", QUERY, {**own, "Origin": APP_ORIGIN})
    assert status == 200 and headers["access-control-allow-origin"] == APP_ORIGIN
    assert "access-control-allow-credentials" not in headers
    img = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Referer": f"{APP_ORIGIN}/photos"}
    assert server.request("GET", f"/images/{row['id']}", headers=img)[0] == 200
    link = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
    assert server.request("GET", "/", headers=link)[0] == 200  # a link followed from elsewhere
    assert server.request("POST", "/search", QUERY, {"Content-Type": "application/json"})[0] == 200  # curl


def test_any_origin_needs_a_key_and_never_credentials(site, tmp_path):
    with pytest.raises(InputError, match="--api-key"):
        create_app(ServeConfig(store=site["store"], cors_origins=("*",)))
    for bad in ("app.example", "https://app.example/page", "ftp://app.example"):
        with pytest.raises(InputError, match="not an origin"):
            create_app(ServeConfig(store=site["store"], cors_origins=(bad,)))
    result = clipdex("serve", "--store", site["store"], "--port", free_port(), "--cors-origin", "*")
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "--api-key" in result.stderr
    app = create_app(ServeConfig(store=site["store"], cors_origins=("*",), api_key="k"))
    with local_client(app, headers={"X-API-Key": "k"}) as client:
        response = client.post("/search", json={"text": "a", "k": 1}, headers={"Origin": EVIL_ORIGIN})
        assert response.status_code == 200 and response.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in response.headers
        assert client.post("/search", json={"text": "a", "k": 1}, headers={"Origin": EVIL_ORIGIN,
                                                                             "X-API-Key": ""}).status_code == 401


# 3. A file served is the file indexed, race-free


def test_a_flipped_parent_folder_never_serves_another_file(site):
    server, row = site["server"], site["rows"]["album/photo.bmp"]
    album, held = site["library"] / "album", site["library"] / "album.held"
    indexed = (album / "photo.bmp").read_bytes()
    decoy = site["root"] / "elsewhere" / "album"
    stop = threading.Event()

    def flip() -> None:  # album/ becomes a link to a folder holding a file of the same size and mtime, and back
        while not stop.is_set():
            os.rename(album, held)
            os.symlink(decoy, album)
            time.sleep(0.0005)
            os.unlink(album)
            os.rename(held, album)
            time.sleep(0.0005)

    flipper = threading.Thread(target=flip)
    flipper.start()
    served = other = 0
    try:
        for _ in range(400):
            status, _, body = server.request("GET", f"/images/{row['id']}")
            assert status in (200, 404, 410), status
            if status == 200:
                served += 1
                other += body != indexed
    finally:
        stop.set()
        flipper.join()
    assert other == 0, f"{other} of {served} answers were a file that was never indexed"
    assert server.request("GET", f"/images/{row['id']}")[2] == indexed


def test_a_same_size_rewrite_with_its_mtime_set_back_is_refused(site):
    server, row = site["server"], site["rows"]["inplace/photo.bmp"]
    photo = site["library"] / "inplace" / "photo.bmp"
    before = photo.stat()
    original = photo.read_bytes()
    try:
        Image.new("RGB", (32, 32), (255, 255, 255)).save(photo, "BMP")
        os.utime(photo, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert photo.stat().st_size == before.st_size and photo.stat().st_mtime == row["mtime"]
        status, _, body = server.request("GET", f"/images/{row['id']}")
        assert status == 410 and b"changed since it was indexed" in body
        assert server.request("GET", f"/thumbnails/{row['id']}")[0] == 410
    finally:
        photo.write_bytes(original)
    assert server.request("GET", f"/images/{row['id']}")[2] == original  # the same content again: served


def test_a_file_turned_into_a_folder_leaks_no_descriptor(site):
    server, row = site["server"], site["rows"]["folder/photo.bmp"]
    photo = site["library"] / "folder" / "photo.bmp"
    kept = photo.read_bytes()
    photo.unlink()
    photo.mkdir()
    try:
        server.request("GET", f"/images/{row['id']}")  # the thread pool's first use opens nothing later
        before = server.descriptors()
        for url in [f"/images/{row['id']}", f"/thumbnails/{row['id']}"] * 50:
            status, _, body = server.request("GET", url)
            assert status == 410 and b"no longer a regular file" in body
        deadline = time.monotonic() + 5  # the last connections' sockets close in the server's own time
        while server.descriptors() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.descriptors() <= before
    finally:
        photo.rmdir()
        photo.write_bytes(kept)
    assert server.alive()


# 4. Thumbnails: only the store's own regular files


def test_a_planted_link_folder_or_fifo_in_the_thumbnail_cache_is_replaced(site):
    server, store = site["server"], site["store"]
    planted = {}
    for name in ("link", "dir", "fifo"):
        row = site["rows"][f"thumbs/{name}.bmp"]
        target = thumbnail_file(store, row["hash"], 256)
        target.parent.mkdir(parents=True, exist_ok=True)
        if name == "link":
            target.symlink_to("/etc/passwd")
        elif name == "dir":
            (target / "inner").mkdir(parents=True)
        else:
            os.mkfifo(target)
        planted[name] = (row, target)
    for name, (row, target) in planted.items():
        status, headers, body = server.request("GET", f"/thumbnails/{row['id']}", timeout=10)
        assert status == 200 and body.startswith(b"\xff\xd8") and b"root:" not in body, name
        assert target.is_file() and not target.is_symlink(), name
        assert server.request("GET", f"/thumbnails/{row['id']}")[2] == body  # now served from the cache


def test_a_thumbnail_folder_linked_elsewhere_is_never_read_or_written(site):
    server, store, row = site["server"], site["store"], site["rows"]["thumbs/top.bmp"]
    outside = site["root"] / "outside-thumbnails"
    secret = outside / thumbnail_file(store, row["hash"], 256).relative_to(store / "thumbnails")
    secret.parent.mkdir(parents=True)
    secret.write_bytes(b"root:x:0:0:secret")
    own = store / "thumbnails"
    moved = store / "thumbnails.own"
    if own.exists():
        own.rename(moved)
    own.symlink_to(outside)
    try:
        status, _, body = server.request("GET", f"/thumbnails/{row['id']}")
        assert status == 200 and body.startswith(b"\xff\xd8") and b"root:" not in body
        assert secret.read_bytes() == b"root:x:0:0:secret"  # not written through the link either
    finally:
        if own.is_symlink():
            own.unlink()
        else:
            shutil.rmtree(own)
        if moved.exists():
            moved.rename(own)


# 7. The small ones


def test_an_unwritable_access_log_is_one_line_at_start_up(site, tmp_path):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    started = clipdex("serve", "--store", site["store"], "--port", free_port(), "--access-log", folder, wait=False)
    try:
        _, err = started.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # it serves: every request would be a 500
        started.kill()
        started.communicate()
        pytest.fail("the server started with an access log it cannot write")
    assert started.returncode == 1 and err.startswith("error: cannot write the access log") and err.count("\n") == 1
    with pytest.raises(InputError, match="cannot write the access log"):
        create_app(ServeConfig(store=site["store"], access_log=str(folder)))


# Attacks fixed in earlier rounds, over the socket as well


def test_earlier_attacks_stay_refused(site):
    server = site["server"]
    status, _, body = server.request("GET", "/health", headers={"Host": "attacker.example"})
    assert status == 400 and b"does not answer to the host" in body  # DNS rebinding
    for path in ("/images/..%2f..%2fetc%2fpasswd", "/images/-1", "/images/99999999999999999999", "/thumbnails/%00"):
        status, _, body = server.request("GET", path)
        assert 400 <= status < 500 and b"root:" not in body, path
    status, _, _ = server.request("POST", "/search", b"{}", {"Content-Type": "application/json",
                                                             "Content-Length": str(1 << 40)})
    assert status == 413
    assert server.search({"text": "a", "k": "3x"})[0] == 422  # a string where a number belongs
    assert server.search({"text": "a", "where": "1=1) OR (1=1"})[0] == 400
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as cut:  # a body cut mid-stream
        cut.sendall(b"POST /search HTTP/1.1\r\nHost: " + server.host.encode() +
                    b"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"text\": ")
    assert server.alive()
