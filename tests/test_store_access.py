"""Who may read and write a store, and with which weights (issue: store integrity, items 8 and 9)."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest

import cli
from store import Store
from tests.helpers import CAN_DROP_PRIVILEGES, MODEL, clipdex, run


@pytest.fixture
def indexed(tmp_path, small_library):
    library = tmp_path / "lib"
    shutil.copytree(small_library[0], library)
    with pytest.raises(SystemExit):
        cli.main(["index", str(library), "--store", str(tmp_path / "s"), *MODEL])
    return library, tmp_path / "s"


def test_store_files_get_the_process_umask_not_0600(indexed):
    _, store = indexed
    expected = 0o666 & ~_umask()
    assert stat.S_IMODE(os.stat(store / "manifest.json").st_mode) == expected


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.skipif(not CAN_DROP_PRIVILEGES, reason="needs root and setpriv (root ignores file modes)")
@pytest.mark.parametrize("how", ["read-only", "foreign-owned"])
def test_a_store_we_may_not_write_is_read_and_refuses_writes_in_one_line(indexed, how):
    library, store = indexed
    if how == "read-only":
        subprocess_chmod = ["chmod", "-R", "a-w", str(store)]
    else:
        subprocess_chmod = ["chown", "-R", "nobody", str(store)]
    import subprocess

    subprocess.run(subprocess_chmod, check=True)
    try:
        info = clipdex("info", "--store", store, "--json", unprivileged=True)
        assert info.returncode == 0 and json.loads(info.stdout)["count"] == 12, info.stderr
        search = clipdex("search", "a circle", "--store", store, "-k", "3", "--json", unprivileged=True)
        assert search.returncode == 0 and len(json.loads(search.stdout)) == 3, search.stderr
        write = clipdex("index", library, "--store", store, *MODEL, unprivileged=True)
        assert write.returncode == 1 and write.stderr.count("\n") == 1 and "is read-only" in write.stderr
        assert "Traceback" not in write.stderr
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(store)], check=True)
        subprocess.run(["chown", "-R", "root", str(store)], check=True)


def test_an_output_file_in_a_missing_folder_is_one_line(capsys, indexed, tmp_path):
    import numpy as np

    _, store = indexed
    np.save(tmp_path / "q.npy", np.ones((2, 64), np.float32))
    code, _, err = run(capsys, "cache", "query", "--store", store, "--queries", tmp_path / "q.npy",
                       "--out", tmp_path / "missing" / "dir" / "b.npy")
    assert code == 1 and err.strip() == f"error: cannot write {tmp_path / 'missing' / 'dir' / 'b.npy'}: the folder " \
                                        f"{tmp_path / 'missing' / 'dir'} does not exist"


def test_an_os_error_is_one_line_not_a_traceback(capsys, tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "s"))

    monkeypatch.setattr("indexer.run.index_paths", full_disk)
    monkeypatch.setattr(cli, "index_paths", full_disk)
    code, _, err = run(capsys, "index", tmp_path, "--store", tmp_path / "s", *MODEL)
    assert code == 1 and err == f"error: No space left on device: {tmp_path / 's'}\n"


# 9. Checkpoints are known by their content


def test_the_same_weights_at_a_new_path_are_accepted_and_recorded(capsys, tmp_path, small_library):
    import torch

    from encoder import BUNDLED_MODELS, weights_sha256

    weights = tmp_path / "a" / "shapes.pt"
    weights.parent.mkdir()
    shutil.copy(BUNDLED_MODELS["clipdex-shapes"].weights, weights)
    code, _, _ = run(capsys, "index", small_library[0], "--store", tmp_path / "s", "--model", "clipdex-shapes",
                     "--pretrained", weights, "--device", "cpu", "--workers", "0")
    assert code == 0 and Store.open(tmp_path / "s").manifest.weights_sha256 == weights_sha256(str(weights))
    moved = weights.rename(tmp_path / "elsewhere.pt")
    code, out, err = run(capsys, "index", small_library[0], "--store", tmp_path / "s", "--model", "clipdex-shapes",
                         "--pretrained", moved, "--device", "cpu", "--workers", "0", "--json")
    assert code == 0 and json.loads(out)["embedded"] == 0, err
    assert Store.open(tmp_path / "s").manifest.pretrained == str(moved)
    code, _, _ = run(capsys, "search", "a red circle", "--store", tmp_path / "s", "-k", "1")
    assert code == 0  # the store now loads the weights from where they are

    other = tmp_path / "other.pt"
    state = torch.load(moved, map_location="cpu")
    torch.save({name: value + 0.01 if value.is_floating_point() else value for name, value in state.items()}, other)
    code, _, err = run(capsys, "index", small_library[0], "--store", tmp_path / "s", "--model", "clipdex-shapes",
                       "--pretrained", other, "--device", "cpu", "--workers", "0")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "checkpoints differ" in err
    assert weights_sha256(str(other))[:16] in err and weights_sha256(str(moved))[:16] in err


@pytest.fixture
def small_disk(tmp_path):
    """A 200 KiB tmpfs, grown on request; skipped where this process may not mount."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")

    def grow() -> None:
        subprocess.run(["mount", "-o", "remount,size=8M", str(mount)], check=True)

    yield mount, grow
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_one_line_and_the_store_keeps_its_last_commit(capsys, small_disk, small_library, tmp_path):
    from demo.shapes import write_library

    mount, grow = small_disk
    store = mount / "store"
    code, _, _ = run(capsys, "index", small_library[0], "--store", store, *MODEL)
    assert code == 0
    write_library(tmp_path / "more", 150, 5)
    code, _, err = run(capsys, "index", tmp_path / "more", "--store", store, "--commit-every", "16", *MODEL)
    assert code == 1 and err.count("\n") == 1 and "No space left on device" in err and "keeps its last commit" in err
    code, out, _ = run(capsys, "search", "a circle", "--store", store, "-k", "3", "--json")
    assert code == 0 and len(json.loads(out)) == 3  # still opens and answers
    grow()
    code, out, _ = run(capsys, "index", tmp_path / "more", "--store", store, "--json", *MODEL)
    assert code == 0
    report = json.loads(run(capsys, "info", "--store", store, "--json")[1])
    assert report["count"] == report["report"]["distinct_paths"] == 162 and report["report"]["index_is_current"]


def test_a_broken_checkpoint_is_one_whole_sentence(capsys, tmp_path, small_library):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    code, _, err = run(capsys, "compare", next(small_library[0].rglob("*.png")), "--text", "x",
                       "--model", "clipdex-shapes", "--pretrained", broken)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert f"could not load 'clipdex-shapes' from {broken}: it is not a checkpoint" in err
    assert err.strip().endswith("saved from this architecture") and "PyTorch 2.6" not in err


def test_an_import_of_another_dimension_names_both(capsys, tmp_path):
    import numpy as np

    np.save(tmp_path / "f8.npy", np.ones((3, 8), np.float32))
    np.save(tmp_path / "f16.npy", np.ones((3, 16), np.float32))
    run(capsys, "import", tmp_path / "f8.npy", "--store", tmp_path / "s", "--model-name", "imagebind_huge")
    code, _, err = run(capsys, "import", tmp_path / "f16.npy", "--store", tmp_path / "s", "--model-name",
                       "imagebind_huge")
    assert code == 1 and "holds 8-d embeddings" in err and "cannot take 16-d embeddings" in err


@pytest.mark.parametrize("name, options", [("rows.parquet", []), ("shards", ["--format", "clip-retrieval"])])
def test_an_export_to_a_full_disk_is_one_line_and_leaves_nothing(capsys, small_disk, served_library, name, options):
    mount, _ = small_disk
    (mount / "filler").write_bytes(b"\0" * 196_000)  # a page or so left of the 200 KiB
    code, out, err = run(capsys, "export", "--store", served_library[0], "--out", mount / name, *options)
    assert code == 1 and "No space left on device" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in mount.iterdir()) == ["filler"]
