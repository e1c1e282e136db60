"""A damaged store says so in one line and heals (issue 26).

A real store, indexed in three runs (several fragments, a deletion, a failure recorded), has one
piece damaged at a time as rsync, a full disk or a hand edit would: Lance data, deletion and
version files, the table's id index, the manifest, the FAISS index and its values, the failures
table, each truncated, deleted, overwritten with garbage or given wrong types. Then every
command answers in one line, never a traceback; `check` names the damaged file; `repair`
brings the store back, and `index` on the same folders embeds exactly the files whose rows were
lost, every row back exactly once.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import MODEL, run, run_quietly

LIBRARY_PARTS = ("a", "b", "c")
PER_PART = 24


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """(store, library, rows): a store of three folders indexed in two runs, one file deleted since
    the first (a deletion file), one file that is not an image (a failure)."""
    from demo.shapes import write_library

    root = tmp_path_factory.mktemp("damaged")
    library, store = root / "library", root / "store"
    for seed, part in enumerate(LIBRARY_PARTS):
        write_library(library / part, PER_PART, seed + 20)
        (library / part / "labels.csv").unlink()
    (library / "a" / "not-an-image.jpg").write_bytes(b"this is text")
    code, _, err = run_quietly("index", library / "a", library / "b", "--store", store, *MODEL)
    assert code == 0, err
    # One run that deletes a file and adds a folder: a deletion file on the indexed fragment, and a
    # fragment of its own for the new rows (not merged: one is covered by the id index, one not).
    next(iter(sorted((library / "a").rglob("*.png")))).unlink()
    code, _, err = run_quietly("index", library, "--store", store, *MODEL)
    assert code == 0, err
    dataset = _dataset(store)
    assert len(dataset.get_fragments()) >= 2, "the test needs a store of several fragments"
    assert any(f.metadata.deletion_file is not None for f in dataset.get_fragments()), "and a deletion file"
    return store, library, dataset.count_rows()


@pytest.fixture
def store(pristine, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(pristine[0], copy)
    return copy


def _dataset(store: Path, table: str = "images"):
    import lance

    return lance.dataset(str(store / "lance" / f"{table}.lance"))


def _data_files(store: Path, table: str = "images") -> list[Path]:
    """The data files of the table's current version, largest first."""
    dataset = _dataset(store, table)
    files = [store / "lance" / f"{table}.lance" / "data" / f.path for fr in dataset.get_fragments()
             for f in fr.metadata.files]
    return sorted(files, key=lambda p: -p.stat().st_size)


def _newest_version(store: Path, table: str = "images") -> Path:
    return min((store / "lance" / f"{table}.lance" / "_versions").glob("*.manifest"), key=lambda p: int(p.stem))


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _garbage(path: Path) -> None:
    path.write_bytes(np.random.default_rng(1).bytes(path.stat().st_size))


def _manifest_types(store: Path) -> None:
    data = json.loads((store / "manifest.json").read_text())
    data["dim"], data["index"]["count"] = "sixty-four", [1, 2]
    (store / "manifest.json").write_text(json.dumps(data))


def _deletion_file(store: Path) -> Path:
    return next((store / "lance" / "images.lance" / "_deletions").iterdir())


def _id_index(store: Path) -> Path:
    return store / "lance" / "images.lance" / "_indices" / _dataset(store).list_indices()[0]["uuid"]


def _faiss(store: Path, key: str) -> Path:
    return store / json.loads((store / "manifest.json").read_text())["index"][key]


DAMAGE = {
    # what is damaged: (how, the path `check` must name, rows that cannot come back without re-embedding)
    "data file truncated": (lambda s: _truncate(_data_files(s)[0]), lambda s: _data_files(s)[0].name),
    "data file deleted": (lambda s: _data_files(s)[0].unlink(), None),
    "data file garbage": (lambda s: _garbage(_data_files(s)[-1]), lambda s: _data_files(s)[-1].name),
    "deletion file deleted": (lambda s: _deletion_file(s).unlink(), lambda s: _deletion_file(s).name),
    "newest version garbage": (lambda s: _garbage(_newest_version(s)), lambda s: _newest_version(s).name),
    "newest version truncated": (lambda s: _truncate(_newest_version(s)), lambda s: _newest_version(s).name),
    "table versions deleted": (lambda s: shutil.rmtree(s / "lance" / "images.lance" / "_versions"),
                               lambda s: "lance/images.lance"),
    "id index deleted": (lambda s: shutil.rmtree(_id_index(s)), lambda s: _id_index(s).name),
    "manifest garbage": (lambda s: _garbage(s / "manifest.json"), lambda s: "manifest.json"),
    "manifest truncated": (lambda s: _truncate(s / "manifest.json"), lambda s: "manifest.json"),
    "manifest wrong types": (_manifest_types, lambda s: "manifest.json"),
    "manifest deleted": (lambda s: (s / "manifest.json").unlink(), lambda s: "manifest.json"),
    "failures data deleted": (lambda s: _data_files(s, "failures")[0].unlink(), None),
    "index truncated": (lambda s: _truncate(_faiss(s, "file")), lambda s: _faiss(s, "file").name),
    "index deleted": (lambda s: _faiss(s, "file").unlink(), lambda s: _faiss(s, "file").name),
    "values truncated": (lambda s: _truncate(_faiss(s, "values") / "values.npy"), lambda s: _faiss(s, "values").name),
    "values deleted": (lambda s: shutil.rmtree(_faiss(s, "values")), lambda s: _faiss(s, "values").name),
}


def _one_line(code, out, err, command) -> None:
    """Either it worked, or it said why in one line: no traceback, whatever the damage."""
    assert "Traceback" not in out + err, (command, err)
    if code != 0:
        assert len(err.strip().splitlines()) == 1, (command, err)


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_store_is_one_line_then_repair_and_index_bring_every_row_back(damage, store, pristine, capsys,
                                                                                 tmp_path):
    _, library, rows = pristine
    how, named = DAMAGE[damage]
    expected_name = named(store) if named else None
    how(store)
    queries = tmp_path / "q.npy"
    np.save(queries, np.eye(64, dtype=np.float32)[:2])
    failed = []
    for command in (["search", "a red circle", "-k", "3"], ["info"], ["info", "--failures"],
                    ["export", "--out", tmp_path / "out.parquet"],
                    ["cache", "query", "--queries", queries, "--out", tmp_path / "b.npy"]):
        code, out, err = run(capsys, *command, "--store", store)
        _one_line(code, out, err, command)
        if code:
            failed.append(err)
            assert code in (1, 4) and "clipdex repair" in err or "reindex" in err or "clipdex index" in err, err
    # Without the values, a flat index still searches and the cache reads the table: only `check` notices.
    assert failed or damage.startswith(("failures", "values")), "the damage went unnoticed"

    code, out, err = run(capsys, "check", "--store", store)
    assert code == 4 and "Traceback" not in out + err, out + err
    if expected_name:
        assert expected_name in out, out

    code, out, err = run(capsys, "repair", "--store", store, "--json")
    assert code == 0 and "Traceback" not in err, err
    repaired = json.loads(out)
    code, out, err = run(capsys, "check", "--store", store)
    assert code == 0, out + err

    code, out, err = run(capsys, "index", library, "--store", store, "--json", *MODEL)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["embedded"] == repaired["lost"], (summary, repaired)
    ids = _dataset(store).to_table(columns=["id", "path"])
    assert ids.num_rows == rows and len(set(ids.column("id").to_pylist())) == rows
    assert len(set(ids.column("path").to_pylist())) == rows
    code, out, _ = run(capsys, "search", "a red circle", "--store", store, "-k", "3", "--json")
    assert code == 0 and len(json.loads(out)) == 3


def test_index_and_reindex_on_a_damaged_table_are_one_line(store, pristine, capsys):
    damaged = _data_files(store)[0]
    _truncate(damaged)
    for command in (["index", pristine[1], *MODEL], ["reindex"], ["import", store / "missing.npy"]):
        code, out, err = run(capsys, *command, "--store", store)
        _one_line(code, out, err, command)
        assert code in (1, 4)
    code, _, err = run(capsys, "reindex", "--store", store)
    assert code == 4 and "is damaged" in err and "clipdex repair --store" in err and damaged.name in err


def test_repair_takes_rows_back_from_the_version_before_a_compaction(store, pristine, capsys):
    """A compaction's file, which only the newest version uses, is damaged: the version before
    has every row in files that still read, so nothing is lost and nothing is embedded again."""
    dataset = _dataset(store)
    before = {f.path for fr in dataset.get_fragments() for f in fr.metadata.files}
    dataset.optimize.compact_files(materialize_deletions_threshold=0.0)
    dataset = _dataset(store)
    written = [f.path for fr in dataset.get_fragments() for f in fr.metadata.files if f.path not in before]
    assert written and dataset.count_rows() == pristine[2]
    (Path(dataset.uri) / "data" / written[0]).unlink()
    code, out, _ = run(capsys, "repair", "--store", store, "--json")
    report = json.loads(out)
    assert code == 0 and report["lost"] == 0 and report["rows_after"] == pristine[2], report
    assert any(f"took {pristine[2]} of their rows back" in line for line in report["actions"]), report
    code, out, _ = run(capsys, "index", pristine[1], "--store", store, "--json", *MODEL)
    assert code == 0 and json.loads(out)["embedded"] == 0


def test_repair_dry_run_changes_nothing(store, capsys):
    _truncate(_data_files(store)[0])
    before = sorted((p.relative_to(store), p.stat().st_size) for p in store.rglob("*") if p.is_file())
    code, out, _ = run(capsys, "repair", "--store", store, "--dry-run")
    assert code == 0 and "would drop 1 unreadable fragment" in out, out
    after = sorted((p.relative_to(store), p.stat().st_size) for p in store.rglob("*") if p.is_file())
    assert before == after
    assert run(capsys, "check", "--store", store)[0] == 4


def test_overwritten_vectors_are_found_by_a_deep_check_and_only_their_files_embedded_again(store, pristine, capsys):
    """Bytes overwritten inside a data file read back without an error (Lance keeps no
    checksums): a deep check finds the vectors that are no longer unit length."""
    import lance

    dataset = _dataset(store)
    victims = dataset.to_table(columns=["id"]).column("id").to_pylist()[:3]
    path = _data_files(store)[0]
    # Where the victims' vectors are: found by their bytes, then overwritten in place.
    vectors = dataset.to_table(columns=["embedding"], filter=f"id IN ({','.join(map(str, victims))})")
    data = bytearray(path.read_bytes())
    for row in vectors.column("embedding").to_numpy(zero_copy_only=False):
        start = data.find(np.asarray(row, np.float32).tobytes())
        assert start >= 0
        data[start:start + 8] = b"\x7f" * 8
    path.write_bytes(bytes(data))
    assert run(capsys, "check", "--store", store)[0] == 0  # sizes and footers are intact
    code, out, _ = run(capsys, "check", "--store", store, "--deep", "--json")
    assert code == 4 and "not unit length" in out
    code, out, _ = run(capsys, "repair", "--store", store, "--deep", "--json")
    assert code == 0 and json.loads(out)["lost"] == 3
    assert run(capsys, "check", "--store", store, "--deep")[0] == 0
    code, out, _ = run(capsys, "index", pristine[1], "--store", store, "--json", *MODEL)
    assert json.loads(out)["embedded"] == 3
    assert lance.dataset(str(store / "lance" / "images.lance")).count_rows() == pristine[2]


def test_a_lost_manifest_is_rebuilt_with_the_store_s_identity(store, pristine, capsys):
    before = json.loads((store / "manifest.json").read_text())
    (store / "manifest.json").unlink()
    code, _, err = run(capsys, "index", pristine[1], "--store", store, "--model", "ViT-B-32")
    assert code == 4 and "no manifest.json" in err and "clipdex repair" in err  # never a new store over the rows
    assert run(capsys, "repair", "--store", store)[0] == 0
    after = json.loads((store / "manifest.json").read_text())
    for key in ("model", "pretrained", "dim", "space", "preprocess", "content_hash", "roots", "created"):
        assert after[key] == before[key], key
    assert after["next_id"] >= before["next_id"] - 1 and after["count"] == pristine[2]


def test_a_store_whose_table_records_no_identity_is_repaired_with_the_model_given(store, pristine, capsys):
    """A store made before the table kept the store's identity: its manifest lost, repair asks for
    the model in one line, then rebuilds it with the one given."""
    import lance

    uri = store / "lance" / "images.lance"
    rows = _dataset(store).to_table()
    shutil.rmtree(uri)
    lance.write_dataset(rows, str(uri))  # one version, no metadata: as an older clipdex left it
    (store / "manifest.json").write_text("{")
    code, _, err = run(capsys, "repair", "--store", store)
    assert code == 1 and "--model NAME" in err and len(err.strip().splitlines()) == 1
    code, out, err = run(capsys, "repair", "--store", store, "--model", "clipdex-shapes", "--pretrained", "bundled")
    assert code == 0, err
    manifest = json.loads((store / "manifest.json").read_text())
    assert (manifest["model"], manifest["dim"], manifest["count"]) == ("clipdex-shapes", 64, pristine[2])
    code, out, _ = run(capsys, "search", "a red circle", "--store", store, "-k", "3", "--json")
    assert code == 0 and len(json.loads(out)) == 3


def test_a_killed_build_s_leftovers_are_removed_by_the_next_run(store, pristine, capsys):
    """What `kill -9` during a build leaves (an index file, a values folder and a temporary that
    no manifest names) goes with the next writer, even one with nothing to embed."""
    (store / "faiss" / "index-v999.faiss").write_bytes(b"x" * 1000)
    (store / "faiss" / "values-v999").mkdir()
    (store / "faiss" / "values-v999" / "values.npy").write_bytes(b"x" * 1000)
    (store / "faiss" / ".index-v999.faiss.123.tmp").write_bytes(b"x")
    code, out, _ = run(capsys, "check", "--store", store)
    assert code == 0 and "did not finish" in out
    code, out, _ = run(capsys, "index", pristine[1], "--store", store, "--json", *MODEL)
    assert code == 0 and json.loads(out)["embedded"] == 0
    assert not any("999" in p.name for p in (store / "faiss").iterdir())


def test_a_forced_index_type_that_cannot_be_built_says_what_was_built_instead(store, capsys):
    code, out, err = run(capsys, "reindex", "--store", store, "--index-type", "ivf-sq8", "--json")
    assert code == 0 and json.loads(out)["type"] == "flat"
    assert "--index-type ivf-sq8 was not built: it needs at least 1,000 rows to train" in err
    assert "built a flat index instead" in err and len(err.strip().splitlines()) == 1


def test_a_disk_that_fills_while_decoding_is_one_line(tmp_path):
    """Decodes still queued when the write fails are cancelled: their callbacks once printed a
    traceback of their own under the run's one line (in a process of its own: the log is stderr)."""
    import subprocess

    from demo.shapes import write_library
    from tests.helpers import clipdex

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        write_library(tmp_path / "first", 100, 1)
        write_library(tmp_path / "more", 400, 2)
        assert clipdex("index", tmp_path / "first", "--store", disk / "store", *MODEL).returncode == 0
        done = clipdex("index", tmp_path / "more", "--store", disk / "store", "--commit-every", "16",
                       "--batch-size", "32", "--model", "clipdex-shapes", "--device", "cpu", "--workers", "1")
        assert done.returncode == 1 and "No space left on device" in done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
        checked = clipdex("check", "--store", disk / "store")
        assert checked.returncode == 0, checked.stdout  # the store is at its last commit, nothing damaged
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_the_server_answers_a_damaged_store_with_503_and_logs_the_file(store, caplog):
    """A client learns that the store is damaged, not where its files are; the log names the file."""
    from server import ServeConfig, create_app
    from tests.helpers import local_client

    app = create_app(ServeConfig(store=store, refresh_seconds=3600, metadata_cache_rows=0))
    with local_client(app) as client:
        assert client.post("/search", json={"text": "a red circle", "k": 3}).status_code == 200
        damaged = _data_files(store)[0]
        damaged.unlink()
        response = client.post("/search", json={"text": "a red circle", "k": 3})
    assert response.status_code == 503 and "damaged" in response.json()["error"]
    assert str(store) not in response.json()["error"]
    assert damaged.name in caplog.text and "clipdex repair" in caplog.text and "Traceback" not in caplog.text


def test_a_disk_that_fills_during_the_index_build_leaves_no_partial_files(tmp_path, capsys):
    """The rows fit, their index does not: one line, the rows kept, nothing of the dead build left
    to fill the disk further, and a `reindex` once there is room."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        features = tmp_path / "features.npy"
        np.save(features, np.random.default_rng(0).standard_normal((5000, 512)).astype(np.float32))
        code, _, err = run(capsys, "import", features, "--store", disk / "store")
        assert code == 1 and "No space left on device" in err and len(err.strip().splitlines()) == 1, err
        assert not any((disk / "store" / "faiss").iterdir())
        code, out, _ = run(capsys, "check", "--store", disk / "store")
        assert code == 0 and "5,000 rows" in out and "no index has been built" in out
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        code, out, err = run(capsys, "reindex", "--store", disk / "store", "--json")
        assert code == 0 and json.loads(out)["count"] == 5000, err
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_store_with_neither_manifest_nor_table_versions_is_beyond_repair_in_one_line(store, capsys):
    (store / "manifest.json").unlink()
    shutil.rmtree(store / "lance" / "images.lance" / "_versions")
    code, out, _ = run(capsys, "check", "--store", store)
    assert code == 4 and "beyond repair: index the store's folders into a new store" in out
    code, _, err = run(capsys, "repair", "--store", store)
    assert code == 1 and "cannot be repaired" in err and len(err.strip().splitlines()) == 1
