"""store.nofollow: no symbolic link is ever followed, by openat2 or by the portable walk."""

from __future__ import annotations

import errno
import os

import pytest

from store import nofollow
from store.nofollow import folder_beneath, open_no_symlinks, rename_no_replace, replace_beneath, walk_open


@pytest.fixture(params=["openat2", "walk"])
def opener(request, monkeypatch):
    if request.param == "walk":
        monkeypatch.setattr(nofollow, "_openat2_works", False)  # as on a kernel before 5.6, or macOS
    elif not nofollow._LIBC:
        pytest.skip("openat2 is Linux's")
    return open_no_symlinks


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "real" / "inner").mkdir(parents=True)
    (tmp_path / "real" / "inner" / "file").write_bytes(b"indexed")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file").write_bytes(b"never indexed")
    (tmp_path / "linked").symlink_to(tmp_path / "real")  # a folder on the way
    (tmp_path / "real" / "inner" / "alias").symlink_to(tmp_path / "other" / "file")  # the last component
    return tmp_path


def read(fd: int) -> bytes:
    try:
        return os.read(fd, 100)
    finally:
        os.close(fd)


def test_real_paths_open_and_links_anywhere_on_the_way_do_not(opener, tree):
    assert read(opener(str(tree / "real" / "inner" / "file"))) == b"indexed"
    for path in (tree / "linked" / "inner" / "file", tree / "real" / "inner" / "alias", tree / "linked"):
        with pytest.raises(OSError) as refused:
            opener(str(path), os.O_RDONLY)
        assert refused.value.errno in (errno.ELOOP, errno.ENOTDIR), path
    root = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert read(opener("real/inner/file", dir_fd=root)) == b"indexed"
        with pytest.raises(OSError):
            opener("linked/inner/file", dir_fd=root)
    finally:
        os.close(root)
    with pytest.raises(OSError):
        walk_open(str(tree / "real" / ".." / "other" / "file"), os.O_RDONLY)


def test_a_folder_in_the_way_of_the_cache_is_replaced_and_nothing_is_written_through_a_link(opener, tree):
    store = tree / "store"
    store.mkdir()
    (store / "thumbnails").symlink_to(tree / "other")
    (tree / "other" / "ab").mkdir()
    (tree / "other" / "ab" / "x.jpg").write_bytes(b"theirs")
    fd = os.open(store, os.O_RDONLY | os.O_DIRECTORY)
    try:
        folder = folder_beneath(fd, ["thumbnails", "ab"])
        try:
            replace_beneath(folder, "x.jpg", b"ours", 0o644)
        finally:
            os.close(folder)
    finally:
        os.close(fd)
    assert not (store / "thumbnails").is_symlink() and (store / "thumbnails" / "ab" / "x.jpg").read_bytes() == b"ours"
    assert (tree / "other" / "ab" / "x.jpg").read_bytes() == b"theirs"


def test_a_rename_never_replaces_what_is_there(tmp_path):
    (tmp_path / "new").write_bytes(b"new")
    (tmp_path / "there").symlink_to("/etc/passwd")
    with pytest.raises(FileExistsError):
        rename_no_replace(tmp_path / "new", tmp_path / "there")
    assert (tmp_path / "there").is_symlink()
    rename_no_replace(tmp_path / "new", tmp_path / "free")
    assert (tmp_path / "free").read_bytes() == b"new" and not (tmp_path / "new").exists()
