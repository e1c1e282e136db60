"""A run that never holds the library (issue 30, "the plan streams in bounded chunks"): the walk is
planned, embedded and committed a chunk at a time, and what only the whole walk can tell (a
file moved from a folder walked later, a row whose file is gone) is settled after it. A run in
chunks of two files must leave the store a run in one chunk leaves."""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest

from indexer import run as run_module
from indexer.config import IndexConfig
from indexer.run import index_paths
from store.store import Store
from store.tables import column_vectors
from tests.helpers import demo_jpegs
from tests.test_webdataset import dataset, write_shard  # noqa: F401 (a fixture)

WHOLE = IndexConfig(model="clipdex-shapes", device="cpu", workers=0, progress=False)
CHUNKS = replace(WHOLE, chunk_files=2)


@pytest.fixture()
def library(tmp_path):
    root = tmp_path / "lib"
    for folder, count, seed in (("a", 3, 1), ("b", 4, 2), ("c", 2, 3)):
        demo_jpegs(root / folder, count, seed, (40, 72))
    return root


def rows(store_dir) -> dict[str, tuple]:
    """path -> (id, hash, caption, vector)."""
    table = Store.open(store_dir).tables.images.to_arrow()
    return {row["path"]: (row["id"], row["hash"], row["caption"], vector)
            for row, vector in zip(table.select(["path", "id", "hash", "caption"]).to_pylist(), column_vectors(table))}


def assert_same(found: dict, expected: dict) -> None:
    """The same rows; vectors to 1e-5 (a forward pass over another batch differs in the last bits)."""
    assert {path: value[:3] for path, value in found.items()} == {path: value[:3] for path, value in expected.items()}
    for path, value in found.items():
        np.testing.assert_allclose(value[3], expected[path][3], atol=1e-5)


def relative(found: dict, root) -> dict:
    return {path[len(str(root)):]: value for path, value in found.items()}


def test_a_run_in_chunks_leaves_the_store_a_run_in_one_chunk_leaves(library, tmp_path):
    whole = index_paths([library], tmp_path / "whole", WHOLE)
    chunked = index_paths([library], tmp_path / "chunks", CHUNKS)
    assert_same(rows(tmp_path / "chunks"), rows(tmp_path / "whole"))
    assert (chunked.embedded, chunked.scanned, chunked.count) == (whole.embedded, whole.scanned, whole.count) == (9,) * 3
    again = index_paths([library], tmp_path / "chunks", CHUNKS)
    assert (again.embedded, again.unchanged, again.removed) == (0, 9, 0)


def test_the_walk_is_embedded_a_chunk_at_a_time(library, tmp_path, monkeypatch):
    """The first chunk is committed before the walk has gone past it: the run holds a chunk."""
    walked_at_write, sizes = [], []
    write, chunk = run_module._Done.write, run_module.Planner.chunk

    def recording_write(self, run, session, plan, progress):
        walked_at_write.append(sum(run.walk.found_under.values()))
        return write(self, run, session, plan, progress)

    def recording_chunk(self, files, found_rows=None):
        sizes.append(len(files))
        return chunk(self, files, found_rows)

    monkeypatch.setattr(run_module._Done, "write", recording_write)
    monkeypatch.setattr(run_module.Planner, "chunk", recording_chunk)
    index_paths([library], tmp_path / "store", CHUNKS)
    assert sizes == [2, 2, 2, 2, 1]
    assert walked_at_write == [2, 4, 6, 8, 9, 9]  # five chunks, then what the whole walk settles


def test_a_folder_renamed_to_sort_first_is_moved_not_embedded(library, tmp_path):
    """Its files are walked before the chunk that would find their old rows: they wait for the walk's end."""
    index_paths([library], tmp_path / "store", CHUNKS)
    before = relative(rows(tmp_path / "store"), library)
    (library / "c").rename(library / "0")
    summary = index_paths([library], tmp_path / "store", CHUNKS)
    assert (summary.embedded, summary.moved, summary.removed, summary.count) == (0, 2, 0, 9)
    after = relative(rows(tmp_path / "store"), library)
    assert_same({path.replace("/0/", "/c/"): value for path, value in after.items()}, before)


def test_a_copy_walked_before_its_source_and_a_file_gone_are_settled_after_the_walk(library, tmp_path):
    index_paths([library], tmp_path / "store", CHUNKS)
    source = sorted((library / "c").glob("*.jpg"))[0]
    (library / "0").mkdir()
    shutil.copy2(source, library / "0" / "copy.jpg")
    gone = sorted((library / "b").glob("*.jpg"))[-1]
    gone.unlink()
    summary = index_paths([library], tmp_path / "store", CHUNKS)
    assert (summary.embedded, summary.reused, summary.moved, summary.removed) == (0, 1, 0, 1)
    found = rows(tmp_path / "store")
    assert str(gone) not in found
    assert np.array_equal(found[str(library / "0" / "copy.jpg")][3], found[str(source)][3])


def test_a_missing_root_the_store_holds_rows_of_keeps_them_and_a_new_one_is_refused(library, tmp_path):
    index_paths([library / "a", library / "b"], tmp_path / "store", CHUNKS)
    shutil.rmtree(library / "a")
    summary = index_paths([library / "a", library / "b"], tmp_path / "store", CHUNKS)
    assert summary.unavailable == {str(library / "a"): 3} and summary.count == 7
    with pytest.raises(Exception, match="no such file or folder: .*nowhere"):
        index_paths([library / "b", tmp_path / "nowhere"], tmp_path / "store", CHUNKS)
    assert Store.open(tmp_path / "store").manifest.count == 7


def test_shards_in_groups_index_as_one_group_and_rerun_unopened(dataset, tmp_path, monkeypatch):  # noqa: F811
    root, _, _ = dataset
    index_paths([root / "shards"], tmp_path / "whole", WHOLE)
    monkeypatch.setattr(run_module, "CHUNK_SHARD_BYTES", 1)  # a shard a group
    groups = []
    listed = run_module.list_shards

    def recording(group, *args, **kwargs):
        groups.append(len(group.shards))
        return listed(group, *args, **kwargs)

    monkeypatch.setattr(run_module, "list_shards", recording)
    summary = index_paths([root / "shards"], tmp_path / "chunks", CHUNKS)
    assert groups == [1, 1, 1] and summary.embedded == 12
    assert_same(rows(tmp_path / "chunks"), rows(tmp_path / "whole"))
    again = index_paths([root / "shards"], tmp_path / "chunks", CHUNKS)
    assert (again.embedded, again.unchanged) == (0, 12)


def test_many_chunks_reserve_ids_once_each(library, tmp_path):
    """Ids continue across chunks and the manifest reserves past the last one."""
    index_paths([library], tmp_path / "store", CHUNKS)
    store = Store.open(tmp_path / "store")
    ids = np.sort(store.tables.images.to_arrow().column("id").to_numpy())
    assert list(ids) == list(range(ids[0], ids[0] + 9)) and store.manifest.next_id >= ids[-1] + 1


def test_files_that_may_be_moves_wait_a_chunk_at_most(library, tmp_path, monkeypatch):
    """A renamed library: every file waits to be settled as a move, never the library at once."""
    index_paths([library], tmp_path / "store", CHUNKS)
    before = relative(rows(tmp_path / "store"), library)
    library.rename(tmp_path / "renamed")
    batches = []
    settle = run_module.Planner._settle

    def recording(self, plan):
        batches.append(len(self.waiting))
        return settle(self, plan)

    monkeypatch.setattr(run_module.Planner, "_settle", recording)
    summary = index_paths([tmp_path / "renamed"], tmp_path / "store", CHUNKS)
    assert (summary.embedded, summary.moved, summary.removed, summary.count) == (0, 9, 0, 9)
    assert max(batches) == 2 and sum(batches) == 9
    assert_same(relative(rows(tmp_path / "store"), tmp_path / "renamed"), before)


def test_a_root_given_inside_another_that_lists_nothing_is_unavailable(library, tmp_path):
    """`index lib lib/c` with lib/c emptied (an unmounted drive looks so): its rows are kept, as
    when lib/c alone is given, though lib's walk is what lists it."""
    index_paths([library, library / "c"], tmp_path / "store", CHUNKS)
    for path in (library / "c").glob("*.jpg"):
        path.unlink()
    summary = index_paths([library, library / "c"], tmp_path / "store", CHUNKS)
    assert summary.unavailable == {str(library / "c"): 2} and summary.count == 9
