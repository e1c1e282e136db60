"""`clipdex export` writes every store shape the product makes, and only where it should (issue 23,
item 6): never into the store it reads, never through a link or onto a device, FIFO or socket,
never over a folder of the user's, never through a planted temporary name, never over something
that appeared meanwhile; and to standard output with `--out -`."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import lance
import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from demo.shapes import write_library
from indexer.run import IndexConfig, index_paths
from store.importer import ImportConfig, import_features
from store.tables import INTERNAL_COLUMNS
from tests.helpers import ROOT, run

DEMO = IndexConfig(model="clipdex-shapes", device="cpu", progress=False)
SHAPES = ["captions", "no-captions", "some-captions", "imported-npy", "imported-clip-retrieval", "older-layout",
          "older-layout-no-captions", "empty", "one-row"]
FORMATS = {"parquet": "rows.parquet", "csv": "rows.csv", "clip-retrieval": "shards"}

# Every format of one store in a process of its own, so that a crash (pyarrow's SIGSEGV casting the
# all-null caption batches of a store without captions) fails the test instead of killing pytest.
EXPORT_EVERY_FORMAT = """
import sys
import cli
store, out = sys.argv[1], sys.argv[2]
for kind, name in {formats}.items():
    try:
        cli.main(["export", "--store", store, "--out", f"{{out}}/{{name}}", "--format", kind])
    except SystemExit as done:
        if done.code:
            sys.exit(f"{{kind}}: exit {{done.code}}")
""".format(formats=FORMATS)


def _older_layout(store: Path) -> None:
    """What an older clipdex left: a fixed-size caption_embedding, a v4 manifest (blake2b hashes)."""
    table = lancedb.connect(str(store / "lance")).open_table("images")
    dim = table.schema.field("embedding").type.list_size
    table.alter_columns({"path": "caption_embedding", "data_type": pa.list_(pa.float32(), dim)})
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["version"] = 4
    manifest.pop("content_hash", None)
    (store / "manifest.json").write_text(json.dumps(manifest))


def _some_captions(library: Path, labels: Path) -> Path:
    lines = labels.read_text().splitlines()
    half = library / "half.csv"
    half.write_text("\n".join(lines[:7]) + "\n")  # the header and 6 of the 12 images
    return half


def build(name: str, root: Path) -> Path:
    store, library = root / name / "store", root / name / "library"
    if name in ("captions", "no-captions", "some-captions", "older-layout", "older-layout-no-captions"):
        labels = write_library(library, 12, 3)
        captions = {"captions": (str(labels),), "some-captions": (str(_some_captions(library, labels)),),
                    "older-layout": (str(_some_captions(library, labels)),)}.get(name, ())
        index_paths([library], store, dataclasses.replace(DEMO, captions=captions))
        if name.startswith("older-layout"):
            _older_layout(store)
    elif name == "one-row":
        write_library(library, 1, 4)
        index_paths([library], store, DEMO)
    elif name == "empty":
        write_library(library, 3, 5)
        index_paths([library], store, DEMO)
        for image in library.rglob("shape_*"):
            image.unlink()
        index_paths([library], store, dataclasses.replace(DEMO, prune=True))
    else:
        rng = np.random.default_rng(1)
        features = rng.normal(size=(30, 16)).astype(np.float32)
        paths = [f"s3://bucket/{i:03d}.jpg" for i in range(30)]
        library.mkdir(parents=True)
        if name == "imported-npy":
            np.save(library / "features.npy", features)
            pq.write_table(pa.table({"url": paths, "score": np.arange(30.0)}), library / "meta.parquet")
            import_features([library / "features.npy"], store,
                            ImportConfig(metadata=str(library / "meta.parquet")))
        else:  # clip-retrieval shards with text_emb/: caption embeddings on every row
            for part in ("img_emb", "text_emb", "metadata"):
                (library / part).mkdir()
            for shard, rows in enumerate((slice(0, 20), slice(20, 30))):
                np.save(library / "img_emb" / f"img_emb_{shard}.npy", features[rows])
                np.save(library / "text_emb" / f"text_emb_{shard}.npy", features[rows][:, ::-1].copy())
                pq.write_table(pa.table({"image_path": paths[rows], "caption": [f"c{i}" for i in range(30)][rows]}),
                               library / "metadata" / f"metadata_{shard}.parquet")
            import_features([library], store)
    return store


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Each store shape, built the first time a test asks for it (read only)."""
    root, built = tmp_path_factory.mktemp("shapes"), {}

    def store_of(name: str) -> Path:
        if name not in built:
            built[name] = build(name, root)
        return built[name]

    return store_of


def stored(store: Path) -> pa.Table:
    return lance.dataset(store / "lance" / "images.lance").to_table().sort_by("id")


def matrix(column, dim: int) -> np.ndarray:
    return np.asarray(column.to_pylist(), np.float32).reshape(len(column), dim)


@pytest.mark.parametrize("shape", SHAPES)
def test_every_store_shape_exports_to_every_format_and_reads_back(stores, tmp_path, shape):
    store = stores(shape)
    done = subprocess.run([sys.executable, "-c", EXPORT_EVERY_FORMAT, str(store), str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"exit {done.returncode} (negative: killed by that signal): {done.stderr[-2000:]}"
    rows = stored(store)
    ids, dim = rows.column("id").to_pylist(), rows.schema.field("embedding").type.list_size
    captions = rows.column("caption_embedding")
    assert len(ids) == {"empty": 0, "one-row": 1, "imported-npy": 30, "imported-clip-retrieval": 30}.get(shape, 12)

    table = pq.read_table(tmp_path / "rows.parquet").sort_by("id")  # pyarrow, the reader most will use
    assert table.column("id").to_pylist() == ids
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), dim)
    np.testing.assert_array_equal(matrix(table.column("embedding"), dim), matrix(rows.column("embedding"), dim))
    assert table.column("caption_embedding").to_pylist() == captions.to_pylist()  # null where none, else equal
    assert table.schema.field("caption_embedding").type == (pa.list_(pa.float32(), dim) if captions.null_count == 0
                                                            else pa.list_(pa.float32()))
    for name in rows.column_names:
        if name not in ("embedding", "caption_embedding", *INTERNAL_COLUMNS):
            assert table.column(name).to_pylist() == rows.column(name).to_pylist(), name

    with open(tmp_path / "rows.csv", newline="") as handle:
        lines = list(csv.DictReader(handle))
    assert sorted(int(line["id"]) for line in lines) == ids
    assert "embedding" not in (lines[0] if lines else {}) and "caption_embedding" not in (lines[0] if lines else {})

    shards = tmp_path / "shards"
    meta = pa.concat_tables([pq.read_table(p) for p in sorted((shards / "metadata").iterdir())])
    images = np.concatenate([np.load(p) for p in sorted((shards / "img_emb").iterdir())])
    order = np.argsort(meta.column("id").to_numpy())
    assert meta.column("id").to_numpy()[order].tolist() == ids and images.shape == (len(ids), dim)
    np.testing.assert_array_equal(images[order], matrix(rows.column("embedding"), dim))
    assert (shards / "text_emb").is_dir() == (captions.null_count == 0)
    if captions.null_count == 0:
        texts = np.concatenate([np.load(p) for p in sorted((shards / "text_emb").iterdir())])
        np.testing.assert_array_equal(texts[order], matrix(captions, dim))


def test_the_shapes_without_captions_are_all_null_where_export_crashed(stores):
    """The shapes that crashed (pyarrow's SIGSEGV casting an all-null caption batch) are such stores."""
    assert stored(stores("no-captions")).column("caption_embedding").null_count == 12
    assert stored(stores("older-layout-no-captions")).column("caption_embedding").null_count == 12


def test_parquet_through_a_pipe_reads_back_and_the_summary_goes_to_stderr(stores):
    store = stores("some-captions")
    # pyarrow 25 aborts about half the time at exit after reading Parquet from a Python file
    # object ("terminate called without an active exception"), whoever wrote it: the reader
    # leaves with os._exit once it has said what it read.
    read = ("import io, json, os, sys; import pyarrow.parquet as pq; "
            "t = pq.read_table(io.BytesIO(sys.stdin.buffer.read())); "
            "print(json.dumps([t.num_rows, sorted(t.column('id').to_pylist()), t.column('caption_embedding').null_count]),"
            " flush=True); os._exit(0)")
    pipeline = (f"{sys.executable} -c 'import cli; cli.main()' export --store {store} --out - --format parquet --json"
                f" | {sys.executable} -c \"{read}\"")
    done = subprocess.run(["bash", "-o", "pipefail", "-c", pipeline], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    rows = stored(store)
    assert json.loads(done.stdout) == [12, rows.column("id").to_pylist(), 6]
    assert json.loads(done.stderr.strip().splitlines()[-1])["out"] == "-"


def test_csv_is_the_default_on_standard_output_and_nothing_else_is_printed_there(stores):
    store = stores("captions")
    done = subprocess.run([sys.executable, "-c", "import cli; cli.main()", "export", "--store", str(store),
                           "--out", "-", "--columns", "id,path"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = list(csv.DictReader(done.stdout.splitlines()))
    assert sorted(int(line["id"]) for line in lines) == stored(store).column("id").to_pylist()
    assert list(lines[0]) == ["id", "path"] and "exported 12 rows" in done.stderr


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_reader_that_stops_early_gets_one_line_not_a_traceback(stores, fmt):
    """`clipdex export --out - | head`: the pipe closes before the rows are written."""
    done = subprocess.Popen([sys.executable, "-c", "import cli; cli.main()", "export", "--store", str(stores("captions")),
                             "--out", "-", "--format", fmt], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done.stdout.close()  # before the process has started writing: every write meets a closed pipe
    err = done.stderr.read().decode()
    assert done.wait(timeout=300) == 1 and err == "error: standard output was closed before the export finished\n"


def test_clip_retrieval_to_standard_output_is_one_line(capsys, stores):
    code, out, err = run(capsys, "export", "--store", stores("captions"), "--out", "-", "--format", "clip-retrieval")
    assert code == 1 and not out and "is a folder of shards" in err and len(err.strip().splitlines()) == 1


# --- where export may write -------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under *folder*: its kind and, for a file, its content's hash."""
    seen = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        content = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(info.st_mode) else None
        seen[str(path.relative_to(folder))] = (stat.S_IFMT(info.st_mode), content)
    return seen


@pytest.fixture
def own_store(stores, tmp_path):
    """A copy of a store to attack, in tmp_path/holder/store, with its snapshot."""
    store = tmp_path / "holder" / "store"
    shutil.copytree(stores("captions"), store)
    return store, snapshot(store)


@pytest.mark.parametrize("out, options", [
    ("{store}/manifest.json", ["--format", "csv", "--overwrite"]),
    ("{store}/lance", ["--format", "csv", "--overwrite"]),
    ("{store}/lance/images.lance", ["--format", "parquet", "--overwrite"]),
    ("{store}", ["--format", "clip-retrieval", "--overwrite"]),
    ("{store}/new.parquet", []),
    ("{store}/lance/../new.csv", []),
    ("{tmp}/alias/manifest.json", ["--format", "csv", "--overwrite"]),  # alias: a link to the store
    ("{tmp}/alias", ["--format", "clip-retrieval", "--overwrite"]),
    ("{tmp}/to-manifest.csv", ["--overwrite"]),  # a link to the store's manifest
    ("{tmp}/holder", ["--format", "clip-retrieval", "--overwrite"]),  # the folder that holds the store
    ("{tmp}", ["--format", "clip-retrieval", "--overwrite"]),
], ids=["manifest", "lance-folder", "images-table", "the-store", "new-file", "dot-dot", "via-linked-folder",
        "linked-folder", "link-to-manifest", "folder-holding-it", "its-grandparent"])
def test_an_out_in_or_holding_the_store_is_refused_naming_both(capsys, own_store, tmp_path, out, options):
    store, before = own_store
    (tmp_path / "alias").symlink_to(store)
    (tmp_path / "to-manifest.csv").symlink_to(store / "manifest.json")
    target = out.format(store=store, tmp=tmp_path)
    code, printed, err = run(capsys, "export", "--store", store, "--out", target, *options)
    assert code == 1 and not printed and len(err.strip().splitlines()) == 1, err
    assert target in err and str(store) in err and "store" in err
    assert snapshot(store) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alias", "holder", "to-manifest.csv"]
    assert (tmp_path / "alias").is_symlink() and (tmp_path / "to-manifest.csv").is_symlink()


def _socket(path: Path):
    server = socket.socket(socket.AF_UNIX)
    cwd = os.getcwd()
    os.chdir(path.parent)  # a short relative name: AF_UNIX paths are limited to 108 bytes
    try:
        server.bind(path.name)
    finally:
        os.chdir(cwd)
    return server


@pytest.mark.parametrize("kind", ["fifo", "socket", "device", "link-to-file", "dangling-link", "link-to-folder",
                                  "link-to-stdout"])
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_target_that_is_not_a_regular_file_is_refused_even_with_overwrite(capsys, stores, tmp_path, kind, fmt):
    out = tmp_path / f"out.{fmt}"
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    handle = None
    if kind == "fifo":
        os.mkfifo(out)
    elif kind == "socket":
        handle = _socket(out)
    elif kind == "device":
        try:
            os.mknod(out, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # what /dev/null is
        except PermissionError:
            pytest.skip("cannot make a device node here")
    elif kind == "link-to-folder":
        (tmp_path / "folder").mkdir()
        out.symlink_to(tmp_path / "folder")
    elif kind == "link-to-stdout":  # what /dev/stdout is: `--out /dev/stdout --overwrite` replaced it
        out.symlink_to("/proc/self/fd/1")
    else:
        out.symlink_to(victim if kind == "link-to-file" else tmp_path / "nothing")
    before = out.lstat()
    try:
        code, printed, err = run(capsys, "export", "--store", stores("captions"), "--out", out, "--overwrite")
    finally:
        if handle is not None:
            handle.close()
    what = {"fifo": "a FIFO", "socket": "a socket", "device": "a device"}.get(kind, "a symbolic link")
    assert code == 1 and not printed and f"is {what}" in err and len(err.strip().splitlines()) == 1, err
    after = out.lstat()
    assert (after.st_ino, stat.S_IFMT(after.st_mode)) == (before.st_ino, stat.S_IFMT(before.st_mode))
    assert victim.read_bytes() == b"keep me" and not (tmp_path / "nothing").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    if kind == "link-to-folder":
        assert list((tmp_path / "folder").iterdir()) == []


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_folder_is_not_replaced_by_a_file_export(capsys, stores, tmp_path, fmt):
    out = tmp_path / f"photos.{fmt}"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"irreplaceable")
    code, printed, err = run(capsys, "export", "--store", stores("captions"), "--out", out, "--overwrite")
    assert code == 1 and "is a folder" in err and (out / "holiday.jpg").read_bytes() == b"irreplaceable"


@pytest.mark.parametrize("contents, message", [
    ({"holiday.jpg": b"irreplaceable"}, "holds more than a clip-retrieval export"),
    ({"img_emb/img_emb_0.npy": b"x", "img_emb/notes.txt": b"mine"}, "holds more than a clip-retrieval export"),
    ({"img_emb/img_emb_0.npy": b"x", "thesis/chapter1.tex": b"mine"}, "holds more than a clip-retrieval export"),
    (None, "is a file: a clip-retrieval export is a folder"),
], ids=["photos", "a-file-among-shards", "a-folder-beside-shards", "a-file"])
def test_clip_retrieval_overwrites_only_a_previous_export(capsys, stores, tmp_path, contents, message):
    out = tmp_path / "out"
    if contents is None:
        out.write_bytes(b"irreplaceable")
    else:
        for name, data in contents.items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(data)
    before = snapshot(tmp_path)
    code, printed, err = run(capsys, "export", "--store", stores("captions"), "--out", out, "--format",
                             "clip-retrieval", "--overwrite")
    assert code == 1 and not printed and message in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(tmp_path) == before


def test_clip_retrieval_replaces_its_own_previous_export_and_an_empty_folder(capsys, stores, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    store = stores("captions")
    assert run(capsys, "export", "--store", store, "--out", out, "--format", "clip-retrieval", "--overwrite")[0] == 0
    assert run(capsys, "export", "--store", store, "--out", out, "--format", "clip-retrieval", "--overwrite",
               "--where", "width >= 300")[0] == 0
    meta = pa.concat_tables([pq.read_table(p) for p in (out / "metadata").iterdir()])
    assert meta.num_rows == lance.dataset(store / "lance" / "images.lance").count_rows(filter="width >= 300")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("fmt, name", [("parquet", "rows.parquet"), ("csv", "rows.csv"),
                                       ("clip-retrieval", "shards")])
def test_a_planted_partial_name_is_never_followed_nor_removed(capsys, stores, tmp_path, monkeypatch, fmt, name):
    """The temporary name was `.NAME.partial-PID`: a link planted there was written through (a
    folder's shards into wherever it led) or removed. Now the name is random and made with O_EXCL,
    so even a link planted at the very name drawn is passed over."""
    import secrets

    victim_file, victim_folder = tmp_path / "victim-file", tmp_path / "victim-folder"
    victim_file.write_bytes(b"keep me")
    victim_folder.mkdir()
    drawn = iter(["planted"])
    real = secrets.token_hex
    monkeypatch.setattr(secrets, "token_hex", lambda n=None: next(drawn, None) or real(n))
    victim = victim_folder if fmt == "clip-retrieval" else victim_file
    planted = [tmp_path / f".{name}.partial-{os.getpid()}", tmp_path / f".{name}.partial-planted"]
    for link in planted:
        link.symlink_to(victim)
    code, _, err = run(capsys, "export", "--store", stores("captions"), "--out", tmp_path / name, "--format", fmt)
    assert code == 0, err
    assert victim_file.read_bytes() == b"keep me" and list(victim_folder.iterdir()) == []
    assert all(link.is_symlink() and link.resolve() == victim for link in planted)
    assert not (tmp_path / name).is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == sorted(p.name for p in planted)


@pytest.mark.parametrize("fmt, name", [("parquet", "rows.parquet"), ("clip-retrieval", "shards")])
@pytest.mark.parametrize("overwrite", [False, True])
def test_what_appears_at_out_meanwhile_is_never_replaced(capsys, stores, tmp_path, monkeypatch, fmt, name, overwrite):
    """While the rows are written, someone puts a link (or a file of their own) at --out: export
    keeps it and exports nothing, rather than renaming over it."""
    import store.export as export

    out, victim = tmp_path / name, tmp_path / "victim"
    victim.write_bytes(b"keep me")
    if overwrite:  # a previous export, checked and agreed to be replaced, swapped for a link meanwhile
        assert run(capsys, "export", "--store", stores("captions"), "--out", out, "--format", fmt)[0] == 0
    writer = "_clip_retrieval" if fmt == "clip-retrieval" else "_table_file"
    real = getattr(export, writer)

    def meanwhile(*args, **kwargs):
        if out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)
        elif os.path.lexists(out):
            out.unlink()
        out.symlink_to(victim)
        return real(*args, **kwargs)

    monkeypatch.setattr(export, writer, meanwhile)
    code, printed, err = run(capsys, "export", "--store", stores("captions"), "--out", out, "--format", fmt,
                             *(["--overwrite"] if overwrite else []))
    assert code == 1 and not printed and "while the export ran" in err and len(err.strip().splitlines()) == 1, err
    assert out.is_symlink() and out.resolve() == victim and victim.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "victim"])  # no partial, no old copy


@pytest.mark.parametrize("fmt, name", [("parquet", "rows.parquet"), ("csv", "rows.csv"),
                                       ("clip-retrieval", "shards")])
def test_outputs_get_the_permissions_of_a_normally_created_file(capsys, stores, tmp_path, fmt, name):
    mask = os.umask(0)
    os.umask(mask)
    assert run(capsys, "export", "--store", stores("captions"), "--out", tmp_path / name, "--format", fmt)[0] == 0
    out = tmp_path / name
    files = [p for p in out.rglob("*") if p.is_file()] if out.is_dir() else [out]
    assert files and {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o666 & ~mask}
    if out.is_dir():
        assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
