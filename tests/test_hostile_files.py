"""Hostile and careless file systems: a file rewritten to look untouched, an import that names an
indexed file, `clipdex index /`, and other file systems mounted inside a library."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from indexer import IndexConfig, index_paths
from indexer.scanner import PSEUDO_FILE_SYSTEMS, mount_type, scan
from store import ImportConfig, InputError, Store, import_features
from tests.helpers import MODEL, bitmap, run

INDEX = IndexConfig(model="clipdex-shapes", device="cpu", workers=0, progress=False)
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def rows(store) -> dict[str, dict]:
    table = Store.open(store).tables.images.search().select(["id", "path", "hash", "embedding", "bytes"]).to_arrow()
    return {os.path.basename(r["path"]): r for r in table.to_pylist()}


def test_a_same_size_rewrite_with_its_mtime_set_back_is_embedded_again(tmp_path):
    photo = tmp_path / "lib" / "photo.bmp"
    bitmap(photo, (255, 0, 0))
    index_paths([tmp_path / "lib"], tmp_path / "store", INDEX)
    before = photo.stat()
    first = rows(tmp_path / "store")["photo.bmp"]
    bitmap(photo, (0, 0, 255))  # other pixels, the same length
    os.utime(photo, ns=(before.st_atime_ns, before.st_mtime_ns))
    summary = index_paths([tmp_path / "lib"], tmp_path / "store", INDEX)
    after = rows(tmp_path / "store")["photo.bmp"]
    assert summary.embedded == 1 and after["id"] == first["id"]
    assert after["hash"] != first["hash"] and not np.allclose(after["embedding"], first["embedding"])
    os.chmod(photo, 0o600)  # a new ctime, the same content: hashed, not embedded
    summary = index_paths([tmp_path / "lib"], tmp_path / "store", INDEX)
    assert (summary.embedded, summary.unchanged, summary.reused) == (0, 0, 0)
    assert index_paths([tmp_path / "lib"], tmp_path / "store", INDEX).unchanged == 1


def test_an_import_never_replaces_an_indexed_files_row(tmp_path):
    photo = tmp_path / "lib" / "photo.bmp"
    bitmap(photo, (0, 255, 0))
    index_paths([tmp_path / "lib"], tmp_path / "store", INDEX)
    kept = rows(tmp_path / "store")["photo.bmp"]
    np.save(tmp_path / "f.npy", np.random.default_rng(0).normal(size=(2, 64)).astype(np.float32))
    pq.write_table(pa.table({"path": ["/elsewhere/new.jpg", str(photo)]}), tmp_path / "meta.parquet")
    with pytest.raises(InputError, match="a file indexed into this store .* never replaces"):
        import_features([tmp_path / "f.npy"], tmp_path / "store",
                        ImportConfig(metadata=str(tmp_path / "meta.parquet"), model_name="clipdex-shapes",
                                     pretrained="bundled", has_text_encoder=True))
    after = rows(tmp_path / "store")
    assert set(after) == {"photo.bmp"}  # nothing of the source was written, not even its other row
    assert after["photo.bmp"]["hash"] == kept["hash"] and after["photo.bmp"]["bytes"] == kept["bytes"]
    assert np.array_equal(after["photo.bmp"]["embedding"], kept["embedding"])


def test_pseudo_file_systems_are_never_walked():
    assert mount_type("/proc/self") == "proc" and "proc" in PSEUDO_FILE_SYSTEMS
    found = scan(["/proc", "/sys/kernel"])
    assert found.files == () and set(found.skipped) == {"/proc", "/sys/kernel"}
    assert found.skipped_mounts == ()  # nothing worth a word: they hold no photos
    assert not found.covers("/proc/1/photo.jpg")  # rows there, if any, are never taken for deleted


@pytest.mark.skipif(not IS_ROOT, reason="mounting a file system needs root")
def test_a_file_system_mounted_in_the_library_is_entered_only_when_asked(tmp_path, capsys):
    library, mounted = tmp_path / "lib", tmp_path / "lib" / "usb"
    bitmap(library / "home.bmp", (1, 2, 3))
    mounted.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(mounted)], check=True)
    try:
        bitmap(mounted / "usb.bmp", (3, 2, 1))
        code, _, err = run(capsys, "index", library, "--store", tmp_path / "store", *MODEL)
        assert code == 0 and set(rows(tmp_path / "store")) == {"home.bmp"}
        assert f"not entered, being other file systems: {mounted}" in err and "--cross-mounts" in err
        code, _, _ = run(capsys, "index", library, "--store", tmp_path / "store", *MODEL, "--cross-mounts")
        assert code == 0 and set(rows(tmp_path / "store")) == {"home.bmp", "usb.bmp"}
        code, _, _ = run(capsys, "index", library, "--store", tmp_path / "store", *MODEL)  # unmounted or not: kept
        assert code == 0 and set(rows(tmp_path / "store")) == {"home.bmp", "usb.bmp"}
    finally:
        subprocess.run(["umount", str(mounted)], check=True)
