"""Store integrity under the faults real libraries meet (issue: store integrity, items 1-7, 11).

Each test causes the fault itself: concurrent writers, an emptied, moved or unreadable folder, a
renamed or symlinked library, hostile file names, changed captions and features."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from indexer.plan import content_hash
from indexer.run import IndexConfig, index_paths
from store import ImportConfig, Store, import_features
from store.errors import StoreBusyError
from store.lock import writer_lock
from store.tables import file_path
from tests.helpers import CAN_DROP_PRIVILEGES, MODEL, clipdex, local_client, run

DEMO = IndexConfig(model="clipdex-shapes", device="cpu", progress=False)


def rows_of(store_dir) -> list[dict]:
    return Store.open(store_dir).tables.file_rows().to_pylist()


def assert_each_file_once(store_dir, files) -> None:
    """Rows = the files, one each, with unique ids, each row's hash that of the file at its path."""
    rows, hashing = rows_of(store_dir), Store.open(store_dir).manifest.content_hash
    paths = [file_path(r["path"], r["path_bytes"]) for r in rows]
    assert sorted(paths) == sorted(str(f) for f in files)
    assert len({r["id"] for r in rows}) == len(rows)
    for row, path in zip(rows, paths):
        assert row["hash"] == content_hash(path, hashing), path


def images(folder) -> list[Path]:
    return sorted(p.resolve() for p in Path(folder).rglob("*") if p.suffix in (".jpg", ".png"))


@pytest.fixture
def library(tmp_path, small_library):
    target = tmp_path / "lib"
    shutil.copytree(small_library[0], target)
    return target


@pytest.fixture(scope="module")
def big_library(tmp_path_factory):
    from demo.shapes import write_library

    folder = tmp_path_factory.mktemp("big")
    write_library(folder / "a", 40, 21)
    write_library(folder / "b", 40, 22)
    return folder


# 1. One writer per store


def test_a_second_writer_fails_at_once_naming_the_holder(library, tmp_path):
    store = tmp_path / "store"
    with writer_lock(store):
        with pytest.raises(StoreBusyError, match=f"being written by process {os.getpid()}"):
            with writer_lock(store):
                pass
        second = clipdex("index", library, "--store", store, *MODEL)
        assert second.returncode == 1 and second.stderr.count("\n") == 1
        assert f"is being written by process {os.getpid()}" in second.stderr and "--wait" in second.stderr
        waiting = clipdex("index", library, "--store", store, "--wait", *MODEL, wait=False)
        with pytest.raises(subprocess.TimeoutExpired):
            waiting.wait(timeout=8)  # queued behind the lock this test holds
    assert waiting.wait(timeout=300) == 0, waiting.stderr.read()
    assert_each_file_once(store, images(library))


def test_two_concurrent_runs_on_one_folder_leave_each_file_once(big_library, tmp_path):
    store = tmp_path / "store"
    runs = [clipdex("index", big_library, "--store", store, "--wait", "--commit-every", "4", *MODEL, wait=False)
            for _ in range(2)]
    assert [run.wait(timeout=300) for run in runs] == [0, 0], [run.stderr.read() for run in runs]
    assert_each_file_once(store, images(big_library))
    assert Store.open(store).manifest.index.count == 80


def test_concurrent_runs_on_different_folders_never_share_an_id(big_library, tmp_path):
    store = tmp_path / "store"
    runs = [clipdex("index", big_library / part, "--store", store, "--wait", "--commit-every", "4", *MODEL, wait=False)
            for part in ("a", "b")]
    assert [run.wait(timeout=300) for run in runs] == [0, 0], [run.stderr.read() for run in runs]
    assert_each_file_once(store, images(big_library))


# 2. No silent mass deletion


def test_a_folder_moved_away_keeps_its_rows_and_ids(capsys, library, tmp_path):
    code, _, _ = run(capsys, "index", library, "--store", tmp_path / "s", *MODEL)
    before = {r["path"]: r["id"] for r in rows_of(tmp_path / "s")}
    library.rename(tmp_path / "away")  # an unmounted drive: the folder is gone
    code, out, err = run(capsys, "index", library, "--store", tmp_path / "s", "--json", *MODEL)
    assert code == 3 and json.loads(out)["removed"] == 0 and "is missing, unreadable or empty" in err
    (tmp_path / "away").rename(library)  # mounted again: same ids, nothing embedded
    code, out, _ = run(capsys, "index", library, "--store", tmp_path / "s", "--json", *MODEL)
    assert code == 0 and json.loads(out)["embedded"] == 0
    assert {r["path"]: r["id"] for r in rows_of(tmp_path / "s")} == before


def test_a_root_that_never_existed_is_still_an_error(capsys, library, tmp_path):
    run(capsys, "index", library, "--store", tmp_path / "s", *MODEL)
    code, _, err = run(capsys, "index", tmp_path / "typo", "--store", tmp_path / "s", *MODEL)
    assert code == 1 and "no such file or folder" in err


@pytest.mark.skipif(not CAN_DROP_PRIVILEGES, reason="needs root and setpriv to make a folder unreadable")
def test_an_unreadable_folder_is_a_failure_not_an_empty_folder(library, tmp_path):
    store = tmp_path / "store"
    hidden = library / "private"
    hidden.mkdir()
    for picture in sorted(library.rglob("*.png"))[:4]:
        picture.rename(hidden / picture.name)
    assert clipdex("index", library, "--store", store, *MODEL).returncode == 0
    count = len(rows_of(store))
    hidden.chmod(0)
    try:
        result = clipdex("index", library, "--store", store, "--json", *MODEL, unprivileged=True)
    finally:
        hidden.chmod(0o755)
    summary = json.loads(result.stdout)
    assert result.returncode == 0 and summary["removed"] == 0 and summary["count"] == count
    failures = Store.open(store).tables.failures.search().to_arrow().to_pylist()
    assert [(f["path"], f["reason"]) for f in failures] == [(str(hidden.resolve()), "unreadable")]


# 3. Paths and moves


def test_a_renamed_library_keeps_every_id_and_embeds_nothing(capsys, library, tmp_path):
    run(capsys, "index", library, "--store", tmp_path / "s", *MODEL)
    before = {Path(r["path"]).relative_to(library.resolve()): r["id"] for r in rows_of(tmp_path / "s")}
    renamed = library.rename(tmp_path / "photos-2024")
    code, out, _ = run(capsys, "index", renamed, "--store", tmp_path / "s", "--json", *MODEL)
    summary = json.loads(out)
    assert code == 0 and summary["embedded"] == 0 and summary["moved"] == 12 and summary["count"] == 12
    after = {Path(r["path"]).relative_to(renamed.resolve()): r["id"] for r in rows_of(tmp_path / "s")}
    assert after == before
    code, out, _ = run(capsys, "search", "a circle", "--store", tmp_path / "s", "-k", "12", "--json")
    hits = json.loads(out)
    assert len(hits) == len({h["path"] for h in hits}) == 12  # no hit twice


def test_a_symlinked_or_relative_root_is_the_same_library(capsys, library, tmp_path, monkeypatch):
    run(capsys, "index", library, "--store", tmp_path / "s", *MODEL)
    (tmp_path / "link").symlink_to(library)
    monkeypatch.chdir(tmp_path)
    for given in ("link", "./lib", str(library) + "/"):
        code, out, _ = run(capsys, "index", given, "--store", tmp_path / "s", "--json", *MODEL)
        summary = json.loads(out)
        assert code == 0 and summary["unchanged"] == 12 and summary["embedded"] == summary["removed"] == 0
    assert len(rows_of(tmp_path / "s")) == 12


# 4. The store's own folder


def test_the_store_inside_the_library_is_never_indexed(capsys, library):
    store = library / ".clipdex"
    run(capsys, "index", library, "--store", store, *MODEL)
    shutil.copy(next(library.rglob("*.png")), store / "lance" / "looks-like-a-photo.png")
    code, out, _ = run(capsys, "index", library, "--store", store, "--json", *MODEL)
    assert code == 0 and json.loads(out)["count"] == 12
    assert not any(str(store.resolve()) in r["path"] for r in rows_of(store))


# 5. Captions


def test_captions_survive_a_rerun_without_a_captions_source(capsys, small_library, tmp_path):
    library = tmp_path / "lib"
    shutil.copytree(small_library[0], library)
    labels = library / "labels.csv"
    run(capsys, "index", library, "--store", tmp_path / "s", "--captions", labels, *MODEL)
    captioned = {r["path"]: r["caption"] for r in rows_of(tmp_path / "s")}
    assert all(captioned.values())
    code, out, _ = run(capsys, "index", library, "--store", tmp_path / "s", "--json", *MODEL)
    assert code == 0 and json.loads(out)["unchanged"] == 12
    assert {r["path"]: r["caption"] for r in rows_of(tmp_path / "s")} == captioned
    moved = library / "part-000" / "renamed.png"
    first = next(p for p in sorted(library.rglob("*.png")))
    first.rename(moved)  # a moved file keeps its caption too
    run(capsys, "index", library, "--store", tmp_path / "s", *MODEL)
    assert {r["path"]: r["caption"] for r in rows_of(tmp_path / "s")}[str(moved.resolve())] == captioned[str(first.resolve())]


# 6. Any file name the OS allows


def test_hostile_file_names_are_indexed_and_printed_escaped(capsys, library, tmp_path):
    source = next(library.rglob("*.png")).read_bytes()
    names = [b"bad\xffname.png", b"new\nline.png", b"-leading-dash.png", b"x" * 251 + b".png"]
    for name in names:
        with open(os.path.join(os.fsencode(library), name), "wb") as out:
            out.write(source[:-1] + bytes([source[-1]]))  # same pixels: these are copies
    code, out, err = run(capsys, "index", library, "--store", tmp_path / "s", "--json", *MODEL)
    assert code == 0 and json.loads(out)["failed"] == 0 and json.loads(out)["count"] == 16
    stored = {os.fsencode(file_path(r["path"], r["path_bytes"])) for r in rows_of(tmp_path / "s")}
    assert {os.path.join(os.fsencode(library.resolve()), name) for name in names} <= stored
    texts = {r["path"] for r in rows_of(tmp_path / "s")}
    assert str(library.resolve() / "bad\\xffname.png") in texts  # shown escaped, kept exact in path_bytes
    code, out, _ = run(capsys, "search", "a shape", "--store", tmp_path / "s", "-k", "16")
    assert code == 0 and len(out.strip().splitlines()) == 16  # the newline name printed on one line
    assert "new\\nline.png" in out
    code, out, _ = run(capsys, "index", library, "--store", tmp_path / "s", "--json", *MODEL)
    assert code == 0 and json.loads(out)["unchanged"] == 16  # and found again by its exact name


def test_a_non_utf8_file_is_served_by_id(library, tmp_path):

    from server import ServeConfig, create_app

    data = next(library.rglob("*.png")).read_bytes()
    with open(os.path.join(os.fsencode(library), b"caf\xe9.png"), "wb") as out:
        out.write(data + b"\0")  # other bytes, so not a copy of another file
    from indexer import IndexConfig, index_paths

    index_paths([library], tmp_path / "s", IndexConfig(model="clipdex-shapes", device="cpu", workers=0, progress=False))
    row = next(r for r in rows_of(tmp_path / "s") if r["path_bytes"] is not None)
    with local_client(create_app(ServeConfig(store=tmp_path / "s"))) as client:
        response = client.get(f"/images/{row['id']}")
    assert response.status_code == 200 and response.content == data + b"\0"


# 7. Re-import


def test_reimporting_changed_features_updates_the_rows_in_place(capsys, tmp_path):
    rng = np.random.default_rng(0)
    first = rng.normal(size=(20, 16)).astype(np.float32)
    np.save(tmp_path / "f.npy", first)
    import_features([tmp_path / "f.npy"], tmp_path / "s", ImportConfig(model_name="imagebind_huge"))
    ids = {r["path"]: r["id"] for r in rows_of(tmp_path / "s")}
    second = first.copy()
    second[:5] = rng.normal(size=(5, 16))
    np.save(tmp_path / "f.npy", second)
    code, out, _ = run(capsys, "import", tmp_path / "f.npy", "--store", tmp_path / "s", "--model-name",
                       "imagebind_huge", "--json")
    summary = json.loads(out)
    assert code == 0 and (summary["imported"], summary["updated"], summary["skipped"], summary["count"]) == (0, 5, 15, 20)
    store = Store.open(tmp_path / "s")
    assert {r["path"]: r["id"] for r in store.tables.file_rows().to_pylist()} == ids
    stored = store.tables.rows_by_id(sorted(ids.values()), ["id", "embedding"]).to_pylist()
    vector_of = {row["id"]: row["embedding"] for row in stored}
    expected = second / np.linalg.norm(second, axis=1, keepdims=True)
    for path, row_id in ids.items():  # keys are "<file>#<row>"
        np.testing.assert_allclose(vector_of[row_id], expected[int(path.rsplit("#", 1)[1])], atol=1e-6)


# 11. info counts what the store holds


def test_info_counts_from_the_table_and_flags_damage(capsys, library, tmp_path):
    run(capsys, "index", library, "--store", tmp_path / "s", "--captions", library / "labels.csv", *MODEL)
    code, out, err = run(capsys, "info", "--store", tmp_path / "s")
    assert code == 0 and not err
    assert "images:    12 (12 with captions)" in out and f"{library.resolve()} (12 images)" in out
    # An interrupted run: rows committed, the index not rebuilt; and one path stored twice.
    store = Store.open(tmp_path / "s")
    duplicate = store.tables.images.search().limit(1).to_arrow()
    store.tables.add(duplicate.set_column(duplicate.schema.get_field_index("id"), duplicate.schema.field("id"),
                                          pa.array([999], pa.int64())))
    code, out, err = run(capsys, "info", "--store", tmp_path / "s", "--json")
    report = json.loads(out)["report"]
    assert json.loads(out)["count"] == 13 and report["duplicate_rows"] == 1 and not report["index_is_current"]
    code, out, err = run(capsys, "info", "--store", tmp_path / "s")
    assert "1 rows repeat a path" in err and "run `clipdex index` to bring the index up to date" in err


def test_info_says_plainly_when_there_is_no_index(capsys, tmp_path):
    Store.create(tmp_path / "s", "m", "p", 4)
    code, out, _ = run(capsys, "info", "--store", tmp_path / "s")
    assert code == 0 and "no index yet" in out and "images:    0" in out


def test_a_store_made_before_blake3_keeps_hashing_with_blake2b(library, tmp_path):
    """Rows hashed with blake2b stay comparable: a touched file is recognised, not re-embedded."""
    store_dir = tmp_path / "store"
    index_paths([library], store_dir, DEMO)
    manifest = json.loads((store_dir / "manifest.json").read_text())
    del manifest["content_hash"]
    manifest["version"] = 4
    (store_dir / "manifest.json").write_text(json.dumps(manifest))
    store = Store.open(store_dir, writable=True)
    assert store.manifest.content_hash == "blake2b-128"
    rows = store.tables.file_rows()
    paths = [file_path(p, b) for p, b in zip(rows.column("path").to_pylist(), rows.column("path_bytes").to_pylist())]
    for row_id, path in zip(rows.column("id").to_pylist(), paths):  # the rows as a v4 store holds them
        store.tables.images.update(where=f"id = {row_id}", values={"hash": content_hash(path, "blake2b-128")})
    touched = images(library)[0]
    os.utime(touched, (1_800_000_000, 1_800_000_000))
    summary = index_paths([library], store_dir, DEMO)
    assert (summary.embedded, summary.reused) == (0, 0) and summary.unchanged == len(paths) - 1
    assert_each_file_once(store_dir, images(library))
