"""Webdataset shards as index inputs (issue 30): img2dataset's layout, KEY.jpg + KEY.txt + KEY.json
in .tar shards, indexes to the same rows, captions and vectors as the same images on disk; reruns
skip unchanged shards without opening them; a changed shard is read again; broken members are
failures; the server serves a member's bytes from its shard."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from demo.shapes import read_labels, write_library
from indexer import shards as shards_module
from indexer.config import IndexConfig
from indexer.run import index_paths
from store.store import Store
from store.tables import column_vectors
from tests.helpers import MODEL, local_client, run

CONFIG = IndexConfig(model="clipdex-shapes", device="cpu", workers=0, progress=False)
MTIME = 1_700_000_000


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), MTIME
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, items: list[tuple[str, dict]]) -> Path:
    """A shard as img2dataset writes one: for each (key, labels row) the image, its caption and its metadata."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for key, row in items:
            add_member(tar, key + Path(row["path"]).suffix, Path(row["path"]).read_bytes())
            add_member(tar, key + ".txt", row["caption"].encode())
            add_member(tar, key + ".json", json.dumps({
                "key": key, "url": f"https://example.com/{key}", "status": "success", "caption": row["caption"],
                "original_width": 100 + int(key[-2:]), "exif": {"Make": "clipdex"}}).encode())
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """12 demo images on disk (with labels.csv) and the same images in three shards of four."""
    root = tmp_path_factory.mktemp("wds")
    labels = write_library(root / "library", 12, 3)
    rows = read_labels(labels)
    (root / "shards").mkdir()
    keys = {}
    for shard in range(3):
        items = [(f"{shard:05d}{i:04d}", row) for i, row in enumerate(rows[shard * 4:(shard + 1) * 4])]
        write_shard(root / "shards" / f"{shard:05d}.tar", items)
        keys.update({key: row for key, row in items})
    return root, labels, keys


def stored(store_dir: Path) -> dict[str, dict]:
    table = Store.open(store_dir).tables.images.to_arrow()
    vectors = column_vectors(table)
    return {row["path"]: {**row, "vector": vector} for row, vector in zip(table.to_pylist(), vectors)}


def test_shards_index_to_the_same_rows_as_the_files(dataset, tmp_path, capsys):
    root, labels, keys = dataset
    code, out, err = run(capsys, "index", root / "shards" / "{00000..00002}.tar", "--store", tmp_path / "shards",
                         *MODEL)
    assert code == 0, err
    index_paths([root / "library"], tmp_path / "files", replace(CONFIG, captions=(str(labels),)))
    from_shards, from_files = stored(tmp_path / "shards"), stored(tmp_path / "files")
    assert len(from_shards) == len(keys) == 12
    for key, row in keys.items():
        shard = root / "shards" / f"{key[:5]}.tar"
        member = from_shards[f"{shard}/{key}{Path(row['path']).suffix}"]
        file = from_files[row["path"]]
        assert (member["shard"], member["key"]) == (str(shard), key)
        assert member["caption"] == file["caption"] == row["caption"]  # KEY.txt
        assert member["hash"] == file["hash"] and (member["width"], member["height"]) == (file["width"], file["height"])
        np.testing.assert_allclose(member["vector"], file["vector"], atol=1e-6)
        # KEY.json's fields, named as `clipdex import` names clip-retrieval's metadata columns
        assert member["url"] == f"https://example.com/{key}" and member["status"] == "success"
        assert "source_key" not in member and member["source_caption"] == row["caption"]
        assert member["original_width"] == 100 + int(key[-2:]) and json.loads(member["exif"]) == {"Make": "clipdex"}
    code, out, _ = run(capsys, "search", "red", "--store", tmp_path / "shards", "--where", "key = '000010002'",
                       "--json")
    assert code == 0 and [hit["path"] for hit in json.loads(out)] == [
        f"{root}/shards/00001.tar/000010002{Path(keys['000010002']['path']).suffix}"]


def test_a_rerun_skips_unchanged_shards_without_opening_them(dataset, tmp_path, monkeypatch):
    root, _, _ = dataset
    first = index_paths([root / "shards"], tmp_path / "s", CONFIG)
    ids = {path: row["id"] for path, row in stored(tmp_path / "s").items()}

    def refuse(shard, storage=()):
        raise AssertionError(f"{shard.path} was opened although it did not change")

    monkeypatch.setattr(shards_module, "list_members", refuse)
    again = index_paths([root / "shards"], tmp_path / "s", CONFIG)
    assert first.embedded == 12 and (again.embedded, again.unchanged, again.removed) == (0, 12, 0)
    assert {path: row["id"] for path, row in stored(tmp_path / "s").items()} == ids


def test_a_changed_shard_is_read_again_and_keeps_its_ids(dataset, tmp_path, monkeypatch):
    root, _, keys = dataset
    folder = tmp_path / "shards"
    folder.mkdir()
    items = sorted(keys.items())
    for shard in range(3):
        write_shard(folder / f"{shard:05d}.tar", items[shard * 4:(shard + 1) * 4])
    index_paths([folder], tmp_path / "s", CONFIG)
    before = stored(tmp_path / "s")

    # Shard 1 written again: one image dropped, one replaced by another picture, one re-captioned.
    changed = dict(items[4:8])
    dropped, replaced_key, recaptioned = "000010000", "000010001", "000010002"
    del changed[dropped]
    suffix = Path(changed[replaced_key]["path"]).suffix
    source_key, source = next((k, row) for k, row in items[:4] + items[8:] if row["path"].endswith(suffix))  # same name: KEY.EXT
    changed[replaced_key] = source
    changed[recaptioned] = {**changed[recaptioned], "caption": "a new caption"}
    time.sleep(0.01)
    write_shard(folder / "00001.tar", sorted(changed.items()))
    listed = []
    real = shards_module.list_members
    monkeypatch.setattr(shards_module, "list_members", lambda shard, storage=(): listed.append(shard.path) or real(shard, storage))
    summary = index_paths([folder], tmp_path / "s", CONFIG)
    after = stored(tmp_path / "s")

    assert listed == [str(folder / "00001.tar")]  # the other two were not opened
    assert summary.removed == 1 and not any(row["key"] == dropped for row in after.values())
    by_key = {row["key"]: row for row in after.values()}
    old_by_key = {row["key"]: row for row in before.values()}
    assert {key: row["id"] for key, row in by_key.items()} == {key: old_by_key[key]["id"] for key in by_key}
    assert by_key[recaptioned]["caption"] == "a new caption"
    assert by_key[replaced_key]["hash"] == old_by_key[source_key]["hash"] != old_by_key[replaced_key]["hash"]
    np.testing.assert_allclose(by_key[replaced_key]["vector"], old_by_key[source_key]["vector"], atol=1e-6)
    # Each stored offset still points at its own bytes in the rewritten shard.
    data = (folder / "00001.tar").read_bytes()
    for row in by_key.values():
        if row["shard"].endswith("00001.tar"):
            member = data[row["shard_offset"]:row["shard_offset"] + row["bytes"]]
            assert member == Path(changed[row["key"]]["path"]).read_bytes()


def test_a_shard_written_again_unchanged_embeds_nothing(dataset, tmp_path):
    root, _, keys = dataset
    shard = tmp_path / "only.tar"
    items = sorted(keys.items())[:4]
    write_shard(shard, items)
    index_paths([shard], tmp_path / "s", CONFIG)
    write_shard(shard, items[::-1])  # the same images, in another order: other offsets
    summary = index_paths([shard], tmp_path / "s", CONFIG)
    assert (summary.embedded, summary.removed) == (0, 0)
    data = shard.read_bytes()
    for row in stored(tmp_path / "s").values():
        assert data[row["shard_offset"]:row["shard_offset"] + row["bytes"]] == Path(keys[row["key"]]["path"]).read_bytes()


def test_broken_shards_and_members_are_failures(dataset, tmp_path):
    root, _, keys = dataset
    items = sorted(keys.items())
    folder = tmp_path / "shards"
    folder.mkdir()
    whole = write_shard(folder / "whole.tar", items[:2])
    cut = write_shard(folder / "cut.tar", items[2:5])
    with tarfile.open(cut) as tar:
        last = [m for m in tar.getmembers() if not m.name.endswith((".txt", ".json"))][-1]
    cut.write_bytes(cut.read_bytes()[:last.offset_data + last.size // 2])  # a copy that stopped inside the last image
    (folder / "not-a-tar.tar").write_bytes(b"this is no tar file" * 100)
    with tarfile.open(folder / "odd.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        add_member(tar, "garbage.jpg", b"\xff\xd8\xff not a jpeg at all" * 10)
        add_member(tar, "../escape.jpg", Path(items[5][1]["path"]).read_bytes())
        add_member(tar, "fine.png", Path(items[6][1]["path"]).read_bytes()) if items[6][1]["path"].endswith(".png") \
            else add_member(tar, "fine.jpg", Path(items[6][1]["path"]).read_bytes())
    summary = index_paths([folder], tmp_path / "s", CONFIG)
    store = Store.open(tmp_path / "s")
    failures = {(row["path"].replace(str(folder) + "/", ""), row["reason"])
                for row in store.tables.failures.to_arrow().to_pylist()}
    cut_key = [k for k, _ in items[2:5]][-1]
    assert ("not-a-tar.tar", "corrupt") in failures
    assert (f"cut.tar/{cut_key}{Path(keys[cut_key]['path']).suffix}", "truncated") in failures
    assert ("odd.tar", "unsafe name") in failures
    assert any(path == "odd.tar/garbage.jpg" for path, _ in failures)
    paths = {path.replace(str(folder) + "/", "") for path in stored(tmp_path / "s")}
    assert {p for p in paths if p.startswith("whole.tar/")} and len([p for p in paths if p.startswith("cut.tar/")]) == 2
    assert any(p.startswith("odd.tar/fine.") for p in paths) and summary.failed == len(failures)

    again = index_paths([folder], tmp_path / "s", CONFIG)  # failures are tried again, rows are kept
    assert again.embedded == 0 and again.count == summary.count and again.failed == summary.failed
    assert whole.exists()


def clipdex_script() -> str:
    import shutil
    import sys

    return shutil.which("clipdex") or str(Path(sys.executable).parent / "clipdex")


def test_a_run_killed_inside_a_shard_finishes_it_on_the_rerun(heldout_library, tmp_path):
    directory, rows = heldout_library
    shard = write_shard(tmp_path / "big.tar", [(f"{i:06d}", row) for i, row in enumerate(rows[:96])])
    store_dir = tmp_path / "store"
    command = [clipdex_script(), "index", str(shard), "--store", str(store_dir), "--model", "clipdex-shapes",
               "--device", "cpu", "--batch-size", "8", "--commit-every", "8", "--workers", "1", "--json"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120

    def committed() -> int:
        try:
            return Store.open(store_dir).tables.count()
        except Exception:  # not created yet
            return 0

    while committed() < 16 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    partial = committed()
    assert 16 <= partial < 96, "the run must be killed inside the shard for this test to mean anything"
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert (summary["unchanged"], summary["embedded"]) == (partial, 96 - partial)
    keys = Store.open(store_dir).tables.images.search().select(["key"]).to_arrow().column("key").to_pylist()
    assert sorted(keys) == [f"{i:06d}" for i in range(96)]  # each image exactly once


def test_the_server_serves_a_member_from_its_shard(dataset, tmp_path):
    from server.app import create_app
    from server.config import ServeConfig

    root, _, keys = dataset
    items = sorted(keys.items())[:4]
    shard = write_shard(tmp_path / "served.tar", items)
    index_paths([shard], tmp_path / "s", CONFIG)
    rows = {row["key"]: row for row in stored(tmp_path / "s").values()}
    key, labels = items[1]
    with local_client(create_app(ServeConfig(store=tmp_path / "s"))) as client:
        served = client.get(f"/images/{rows[key]['id']}")
        assert served.status_code == 200 and served.content == Path(labels["path"]).read_bytes()
        assert served.headers["content-length"] == str(rows[key]["bytes"])
        thumbnail = client.get(f"/thumbnails/{rows[key]['id']}")
        assert thumbnail.status_code == 200 and thumbnail.content[:2] == b"\xff\xd8"

        other = sorted(keys.items())[5][1]["path"]  # the shard written again with another picture there
        write_shard(shard, [items[0], (key, {**labels, "path": other}), *items[2:]])
        assert client.get(f"/images/{rows[key]['id']}").status_code == 410
        write_shard(shard, items)  # the same bytes again, a new file: served after its content is checked
        assert client.get(f"/images/{rows[key]['id']}").content == Path(labels["path"]).read_bytes()
        shard.unlink()
        os.symlink(tmp_path / "elsewhere.tar", shard)
        assert client.get(f"/images/{rows[key]['id']}").status_code in (404, 410)
        shard.unlink()
        assert client.get(f"/images/{rows[key]['id']}").status_code == 404


def test_a_pattern_that_names_nothing_is_one_line(tmp_path, capsys):
    code, _, err = run(capsys, "index", tmp_path / "shards" / "{00000..00002}.tar", "--store", tmp_path / "s", *MODEL)
    assert code != 0 and "no such file or folder" in err and "00000.tar" in err and len(err.strip().splitlines()) == 1


def test_the_ray_engine_indexes_shards_as_the_local_one_does(dataset, tmp_path):
    from indexer.config import RayConfig

    ray = pytest.importorskip("ray")
    root, _, _ = dataset
    shutil.copytree(root / "shards", tmp_path / "first")
    index_paths([tmp_path / "first"], tmp_path / "local", CONFIG)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = replace(CONFIG, engine="ray", ray=RayConfig(workers=1, batch_size=5))
        summary = index_paths([tmp_path / "first"], tmp_path / "ray", on_ray)
        again = index_paths([tmp_path / "first"], tmp_path / "ray", on_ray)
        # A renamed folder of shards: every member's content is hashed (on the cluster's tasks) and
        # recognised as a move of its row, nothing embedded again.
        (tmp_path / "first").rename(tmp_path / "renamed")
        renamed = index_paths([tmp_path / "renamed"], tmp_path / "ray", on_ray)
        moved = stored(tmp_path / "ray")
    finally:
        ray.shutdown()
    assert (renamed.embedded, renamed.moved) == (0, 12) and all("/renamed/" in path for path in moved)
    for path in list(moved):
        moved[path.replace(str(tmp_path / "renamed"), str(tmp_path / "first"))] = moved.pop(path)
    local, remote = stored(tmp_path / "local"), moved
    assert summary.embedded == 12 and again.embedded == 0 and sorted(local) == sorted(remote)
    for path, row in local.items():
        other = remote[path]
        assert {k: other[k] for k in ("key", "caption", "hash", "url", "original_width", "shard_offset")} == \
            {k: row[k] for k in ("key", "caption", "hash", "url", "original_width", "shard_offset")}
        np.testing.assert_allclose(other["vector"], row["vector"], atol=1e-6)


def test_shards_to_list_and_files_to_hash_go_to_the_cluster(dataset, tmp_path):
    """With a cluster's workers, the driver lists no shard and hashes no file itself."""
    from indexer.plan import make_plan
    from indexer.scanner import scan
    from store.files import DEFAULT_CONTENT_HASH
    from store.sharded import Workers

    root, _, _ = dataset
    calls = []

    def cluster_map(function, jobs):
        calls.append((function.__name__, len(jobs)))
        return [function(job) for job in jobs]

    workers = Workers(cluster_map, shards=1)
    shutil.copytree(root / "shards", tmp_path / "first")
    index_paths([tmp_path / "first"], tmp_path / "s", CONFIG)
    rows = Store.open(tmp_path / "s").tables.file_rows()

    # Copied while the shards are still where they were indexed: not moves (their rows stay
    # theirs) but copies, new rows with the vectors of the rows whose files are still there.
    shutil.copytree(tmp_path / "first", tmp_path / "copied")
    copied = make_plan(shards_module.list_shards(scan([tmp_path / "copied"]), rows, ()), rows, 100,
                       lambda path: None, hashing=DEFAULT_CONTENT_HASH)
    assert not copied.moves and not copied.embed and len(copied.copies) == 12

    (tmp_path / "first").rename(tmp_path / "renamed")
    listed = shards_module.list_shards(scan([tmp_path / "renamed"]), rows, (), workers=workers)
    plan = make_plan(listed, rows, 100, lambda path: None, workers, hashing=DEFAULT_CONTENT_HASH)
    assert ("_list_task", 3) in calls and ("_hash_task", 1) in calls
    assert len(plan.moves) == 12 and not plan.embed


def test_hostile_shard_contents_cost_a_row_at_most(dataset, tmp_path):
    """Odd names and odd JSON in a shard someone else wrote: never a crash, never a column per image."""
    from server.app import create_app
    from server.config import ServeConfig

    root, _, keys = dataset
    items = sorted(keys.items())
    folder = tmp_path / "lib"
    folder.mkdir()
    shard = os.path.join(os.fsencode(folder), b"caf\xe9.tar")  # a shard whose name is not UTF-8
    image = Path(items[0][1]["path"])
    with tarfile.open(os.fsdecode(shard), "w", format=tarfile.GNU_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tar:
        add_member(tar, os.fsdecode(b"odd\xff") + image.suffix, image.read_bytes())  # nor is this member's
        add_member(tar, os.fsdecode(b"odd\xff") + ".json", json.dumps({"a b": 1, "a_b": 2}).encode())
        for i, (key, row) in enumerate(items[1:6]):
            add_member(tar, key + Path(row["path"]).suffix, Path(row["path"]).read_bytes())
            # a field per image (an id as a key), a list, and text that is not JSON
            add_member(tar, key + ".json", json.dumps({f"id-{i}-{n}": n for n in range(40)}).encode() if i < 4
                       else b"[1, 2, 3]")
        add_member(tar, "not-json.json", b"{not json")
    summary = index_paths([folder], tmp_path / "s", CONFIG)
    store = Store.open(tmp_path / "s")
    assert summary.embedded == 6 and summary.failed == 0
    names = store.tables.images.schema.names
    assert "a_b" in names and 90 < len([n for n in names if n.startswith("id_")]) < shards_module.MAX_METADATA_FIELDS
    odd = next(row for row in stored(tmp_path / "s").values() if row["key"] == "odd\\xff")  # shown escaped
    assert odd["a_b"] == 1 and odd["shard"] == f"{folder}/caf\\xe9.tar"
    with local_client(create_app(ServeConfig(store=tmp_path / "s"))) as client:
        served = client.get(f"/images/{odd['id']}")
        assert served.status_code == 200 and served.content == image.read_bytes()
    again = index_paths([folder], tmp_path / "s", CONFIG)
    assert again.embedded == 0 and again.unchanged == 6
