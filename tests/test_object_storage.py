"""Object storage as index input and export target (issue 30), against a local S3-compatible server
the tests start (moto's server mode): s3fs and botocore talk HTTP to it exactly as to AWS or MinIO,
with the credentials and endpoint from the standard AWS environment variables."""

from __future__ import annotations

import io
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from demo.shapes import read_labels, write_library
from indexer.config import IndexConfig
from indexer.run import index_paths
from store.store import Store
from tests.helpers import MODEL, run
from tests.test_webdataset import stored, write_shard

pytest.importorskip("s3fs")
server_module = pytest.importorskip("moto.server")

CONFIG = IndexConfig(model="clipdex-shapes", device="cpu", workers=0, progress=False)
ENVIRONMENT = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")


@pytest.fixture(scope="module")
def endpoint():
    """A local S3 endpoint, named to every client the standard way (AWS_ENDPOINT_URL)."""
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {name: os.environ.get(name) for name in ENVIRONMENT}
    url = f"http://{host}:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=url)
    yield url
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    server.stop()


@pytest.fixture(scope="module")
def bucket(endpoint, tmp_path_factory):
    """A bucket holding a library (images with their caption sidecars) and three shards of it,
    and the same on local disk: (local root, labels rows, s3fs file system)."""
    import s3fs

    root = tmp_path_factory.mktemp("s3")
    rows = read_labels(write_library(root / "library", 12, 5))
    for row in rows:
        Path(row["path"]).with_suffix(".txt").write_text(row["caption"])
    (root / "shards").mkdir()
    for shard in range(3):
        write_shard(root / "shards" / f"{shard:05d}.tar",
                    [(f"{shard:05d}{i:04d}", row) for i, row in enumerate(rows[shard * 4:(shard + 1) * 4])])
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("photos")
    for path in [*(root / "library").rglob("*"), *(root / "shards").iterdir()]:
        if path.is_file() and path.name != "labels.csv":
            fs.put_file(str(path), f"photos/{path.relative_to(root)}")
    return root, rows, fs


def by_name(store_dir: Path, prefix: str) -> dict[str, dict]:
    return {path[len(prefix):]: row for path, row in stored(store_dir).items()}


def test_a_bucket_indexes_to_the_same_rows_as_the_disk(bucket, tmp_path, capsys):
    root, rows, _ = bucket
    code, out, err = run(capsys, "index", "s3://photos/library", "--store", tmp_path / "s3", *MODEL, "--json")
    assert code == 0, err
    first = json.loads(out)
    index_paths([root / "library"], tmp_path / "disk", CONFIG)
    remote, local = by_name(tmp_path / "s3", "s3://photos/library"), by_name(tmp_path / "disk", str(root / "library"))
    assert first["embedded"] == 12 and sorted(remote) == sorted(local)
    for name, row in local.items():
        other = remote[name]
        assert (other["caption"], other["hash"], other["width"]) == (row["caption"], row["hash"], row["width"])
        assert other["etag"] and other["file_ino"] is None
        np.testing.assert_allclose(other["vector"], row["vector"], atol=1e-6)

    code, out, _ = run(capsys, "index", "s3://photos/library", "--store", tmp_path / "s3", *MODEL, "--json")
    again = json.loads(out)
    assert code == 0 and (again["embedded"], again["unchanged"]) == (0, 12)


def test_a_changed_object_is_read_again_by_its_etag(bucket, tmp_path):
    root, rows, fs = bucket
    library = sorted((root / "library").rglob("*.png")) + sorted((root / "library").rglob("*.jpg"))
    fs.copy("photos/library", "photos/edited", recursive=True)
    index_paths(["s3://photos/edited"], tmp_path / "s", CONFIG)
    before = by_name(tmp_path / "s", "s3://photos/edited")
    target = library[0].relative_to(root / "library")
    fs.pipe_file(f"photos/edited/{target}", library[1].read_bytes())  # another picture under the same key
    summary = index_paths(["s3://photos/edited"], tmp_path / "s", CONFIG)
    after = by_name(tmp_path / "s", "s3://photos/edited")
    name = f"/{target}"
    assert summary.embedded == 1 and summary.unchanged == 11
    assert after[name]["id"] == before[name]["id"] and after[name]["etag"] != before[name]["etag"]
    assert after[name]["hash"] == before[f"/{library[1].relative_to(root / 'library')}"]["hash"]


def test_shards_in_a_bucket_index_like_shards_on_disk(bucket, tmp_path, capsys):
    root, _, _ = bucket
    code, _, err = run(capsys, "index", "s3://photos/shards/{00000..00002}.tar", "--store", tmp_path / "s3", *MODEL)
    assert code == 0, err
    index_paths([root / "shards"], tmp_path / "disk", CONFIG)
    remote, local = by_name(tmp_path / "s3", "s3://photos/shards"), by_name(tmp_path / "disk", str(root / "shards"))
    assert len(local) == 12 and sorted(remote) == sorted(local)
    for name, row in local.items():
        other = remote[name]
        assert (other["key"], other["caption"], other["hash"], other["url"], other["shard_offset"]) == (
            row["key"], row["caption"], row["hash"], row["url"], row["shard_offset"])
        np.testing.assert_allclose(other["vector"], row["vector"], atol=1e-6)
    again = index_paths(["s3://photos/shards/{00000..00002}.tar"], tmp_path / "s3", CONFIG)
    assert (again.embedded, again.unchanged) == (0, 12)


def test_the_endpoint_as_a_storage_option(bucket, endpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    code, out, err = run(capsys, "index", "s3://photos/library/part-000", "--store", tmp_path / "s", *MODEL,
                         "--storage-option", f"endpoint_url={endpoint}", "--json")
    assert code == 0, err
    assert json.loads(out)["embedded"] > 0


def test_object_storage_mistakes_are_one_line(bucket, tmp_path, capsys):
    code, _, err = run(capsys, "index", "s3://no-such-bucket/photos", "--store", tmp_path / "s", *MODEL)
    assert code != 0 and "no such file or folder: s3://no-such-bucket/photos" in err
    code, _, err = run(capsys, "index", "ftp://host/photos", "--store", tmp_path / "s", *MODEL)
    assert code != 0 and "s3:// and gs://" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "index", "s3://photos/library", "--store", tmp_path / "s", *MODEL,
                       "--storage-option", "no-equals-sign")
    assert code != 0 and "KEY=VALUE" in err


def test_export_to_a_bucket(bucket, tmp_path, capsys):
    root, _, fs = bucket
    index_paths([root / "shards"], tmp_path / "s", CONFIG)
    assert run(capsys, "export", "--store", tmp_path / "s", "--out", tmp_path / "local.parquet")[0] == 0
    code, _, err = run(capsys, "export", "--store", tmp_path / "s", "--out", "s3://photos/exports/rows.parquet")
    assert code == 0, err
    local = pq.read_table(tmp_path / "local.parquet")
    remote = pq.read_table(io.BytesIO(fs.cat_file("photos/exports/rows.parquet")))
    assert remote.equals(local)

    code, _, err = run(capsys, "export", "--store", tmp_path / "s", "--out", "s3://photos/exports/rows.parquet")
    assert code != 0 and "already exists" in err and "--overwrite" in err

    code, _, err = run(capsys, "export", "--store", tmp_path / "s", "--out", "s3://photos/exports/cr",
                       "--format", "clip-retrieval", "--shard-rows", "5")
    assert code == 0, err
    assert sorted(name.rsplit("/", 2)[-2] + "/" + name.rsplit("/", 1)[-1] for name in fs.find("photos/exports/cr")) == [
        "img_emb/img_emb_0.npy", "img_emb/img_emb_1.npy", "img_emb/img_emb_2.npy",
        "metadata/metadata_0.parquet", "metadata/metadata_1.parquet", "metadata/metadata_2.parquet",
        "text_emb/text_emb_0.npy", "text_emb/text_emb_1.npy", "text_emb/text_emb_2.npy"]
    images = np.concatenate([np.load(io.BytesIO(fs.cat_file(f"photos/exports/cr/img_emb/img_emb_{n}.npy")))
                             for n in range(3)])
    assert images.shape == (12, 64)
    code, _, err = run(capsys, "export", "--store", tmp_path / "s", "--out", "s3://photos/library",
                       "--format", "clip-retrieval", "--overwrite")
    assert code != 0 and "not a clip-retrieval export" in err


def test_a_failed_export_leaves_no_object(bucket, tmp_path, monkeypatch):
    from store import export as export_module
    from store.export import ExportConfig, export_store

    root, _, fs = bucket
    index_paths([root / "shards"], tmp_path / "s", CONFIG)

    def broken(batches, sink, kind, schema, bar):
        sink.write(b"PAR1" + b"\0" * (6 << 20))  # past s3fs's 5 MB block: a multipart upload has begun
        raise OSError("the disk of the store went away")

    monkeypatch.setattr(export_module, "_table_file", broken)
    with pytest.raises(OSError, match="went away"):
        export_store(Store.open(tmp_path / "s"), ExportConfig(out="s3://photos/exports/broken.parquet", progress=False))
    fs.invalidate_cache()
    assert not fs.exists("photos/exports/broken.parquet")


def test_the_ray_workers_read_the_objects_themselves(bucket, tmp_path):
    from indexer.config import RayConfig

    ray = pytest.importorskip("ray")
    root, _, _ = bucket
    index_paths([root / "library"], tmp_path / "disk", CONFIG)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # after the fixture's environment: the workers inherit it
    on_ray = replace(CONFIG, engine="ray", ray=RayConfig(workers=1, batch_size=5))
    try:
        summary = index_paths(["s3://photos/library"], tmp_path / "ray", on_ray)
        # Shards in the bucket: listed by the cluster's tasks, their members read by range by the actors.
        shards = index_paths(["s3://photos/shards"], tmp_path / "ray-shards", on_ray)
    finally:
        ray.shutdown()
    remote, local = by_name(tmp_path / "ray", "s3://photos/library"), by_name(tmp_path / "disk", str(root / "library"))
    assert summary.embedded == 12 and sorted(remote) == sorted(local)
    for name, row in local.items():
        np.testing.assert_allclose(remote[name]["vector"], row["vector"], atol=1e-6)
    members = {row["key"]: row for row in stored(tmp_path / "ray-shards").values()}
    assert shards.embedded == 12 and len(members) == 12 and all(row["caption"] for row in members.values())


def test_an_object_of_the_same_size_and_time_is_changed_when_its_etag_is(bucket):
    """S3's LastModified has a resolution of a second and an edit may keep the size: the ETag decides."""
    import pyarrow as pa

    from indexer.plan import make_plan
    from indexer.scanner import FoundFile, Scan
    from store.files import DEFAULT_CONTENT_HASH

    bucket[2].pipe_file("photos/etag/a.jpg", b"0123456789")
    url = "s3://photos/etag/a.jpg"
    stored_row = pa.table({"id": [1], "hash": ["h"], "path": [url], "bytes": [10], "mtime": [5.0], "caption": [None],
                           "etag": ["old"]})
    for etag, unchanged in (("old", 1), ("new", 0)):
        found = Scan(("s3://photos",), (FoundFile(url, 10, 5.0, etag=etag),), ())
        plan = make_plan(found, stored_row, 2, lambda path: None, hashing=DEFAULT_CONTENT_HASH)
        assert plan.unchanged == unchanged and len(plan.embed) == 1 - unchanged


def test_the_server_says_an_object_is_not_served(bucket, tmp_path):
    from server.app import create_app
    from server.config import ServeConfig
    from tests.helpers import local_client

    index_paths(["s3://photos/library/part-000"], tmp_path / "s", CONFIG)
    row = next(iter(stored(tmp_path / "s").values()))
    with local_client(create_app(ServeConfig(store=tmp_path / "s"))) as client:
        answer = client.get(f"/images/{row['id']}")
        assert answer.status_code == 404 and "object storage" in answer.json()["error"]
        assert client.get(f"/thumbnails/{row['id']}").status_code == 404
        assert client.post("/search", json={"text": "a red circle", "k": 3}).status_code == 200


def test_an_object_gone_before_it_is_read_is_a_failure(bucket):
    """Listed, then deleted before a reader got to it: a failure of that image, as a vanished file is."""
    from indexer.sources import JobSources
    from store.errors import ImageError

    fs = bucket[2]
    fs.pipe_file("photos/gone/a.jpg", b"x" * 100)
    fs.pipe_file("photos/gone/s.tar", b"y" * 4096)
    sources = JobSources({"path": ["s3://photos/gone/a.jpg", "s3://photos/gone/s.tar/k.jpg"],
                          "shard": [None, "s3://photos/gone/s.tar"], "shard_offset": [None, 512], "bytes": [100, 50]})
    assert sources.read(0) == b"x" * 100 and sources.read(1) == b"y" * 50  # a member by its byte range
    fs.rm(["photos/gone/a.jpg", "photos/gone/s.tar"])
    for position in (0, 1):
        with pytest.raises(ImageError) as caught:
            JobSources({"path": sources.names, "shard": sources.shards, "shard_offset": sources.offsets,
                        "bytes": sources.sizes}).read(position)
        assert caught.value.reason == "missing"


def test_a_missing_client_library_is_one_line(tmp_path, capsys, monkeypatch):
    import sys

    import fsspec  # noqa: F401 (its registry module is loaded)

    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if clipdex[cloud] were not installed
    monkeypatch.delitem(sys.modules["fsspec.registry"]._registry, "gs", raising=False)  # not imported before
    code, _, err = run(capsys, "index", "gs://bucket/photos", "--store", tmp_path / "s", *MODEL)
    assert code != 0 and "gcsfs" in err and "clipdex[cloud]" in err and len(err.strip().splitlines()) == 1


def test_a_bucket_is_walked_a_prefix_at_a_time_and_its_listings_let_go(bucket, monkeypatch):
    """A bucket of 100M objects is never listed whole: one listing per "folder", in the order of
    the URLs, and none kept in fsspec's cache once walked (s3fs keeps every listing otherwise)."""
    from indexer.scanner import Walk, scan
    from store.remote import filesystem

    root, _, fs = bucket
    (root / "deep").mkdir(exist_ok=True)
    for name in ("x/y/c.jpg", "x/b.jpg", "x-a.jpg"):
        fs.put_file(str(sorted((root / "library").rglob("*.jpg"))[0]), f"photos/nested/{name}")
    listings = []
    walked_fs = filesystem("s3://photos/nested", ())[0]  # fsspec's instance for these options: the walk's
    real_ls = walked_fs.ls

    def counting_ls(path, *args, **kwargs):
        listings.append(path)
        return real_ls(path, *args, **kwargs)

    monkeypatch.setattr(walked_fs, "ls", counting_ls)
    walk = Walk(["s3://photos/nested"])
    found = [f.path for f in walk]
    assert found == ["s3://photos/nested/x-a.jpg", "s3://photos/nested/x/b.jpg", "s3://photos/nested/x/y/c.jpg"]
    assert sorted(listings) == ["photos/nested", "photos/nested/x", "photos/nested/x/y"]
    assert walk._remote["s3://photos/nested"][0] is walked_fs
    assert not any(key.startswith("photos/nested") for key in walked_fs.dircache)
    assert [f.path for f in scan(["s3://photos/nested"]).files] == found
