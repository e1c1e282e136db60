"""make_plan decides the least work from files on disk and rows in the store, without a model:
unchanged, touched, modified, moved, copied, new and removed files, and the ids each one gets."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from indexer.plan import content_hash, make_plan
from indexer.scanner import scan
from store.errors import StoreError
from store.files import DEFAULT_CONTENT_HASH, bytes_hash
from store.store import Store

MTIME = 1_700_000_000.0
HASHING = DEFAULT_CONTENT_HASH


def write(path, data: bytes, mtime: float = MTIME) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))
    return str(path)


def rows(*entries) -> pa.Table:
    """Store rows from (id, path, content, mtime[, caption]); bytes and hash follow the content."""
    table = {"id": [], "hash": [], "path": [], "bytes": [], "mtime": [], "caption": []}
    for entry in entries:
        row_id, path, content, mtime, *caption = entry
        table["id"].append(row_id)
        table["hash"].append(bytes_hash(content, HASHING))
        table["path"].append(str(path))
        table["bytes"].append(len(content))
        table["mtime"].append(mtime)
        table["caption"].append(caption[0] if caption else None)
    return pa.table(table)


def no_caption(_: str) -> None:
    return None


def test_new_files_get_consecutive_ids_from_the_first_free_one(tmp_path):
    paths = [write(tmp_path / name, name.encode()) for name in ("b.jpg", "a.jpg", "c.png")]
    plan = make_plan(scan([tmp_path]), rows(), 41, no_caption, hashing=HASHING)
    assert [(job.id, job.file.path) for job in plan.embed] == list(zip([41, 42, 43], sorted(paths)))
    assert (plan.first_new_id, plan.next_id, plan.new_ids) == (41, 44, 3)
    assert not plan.moves and not plan.copies and not plan.removed_ids


def test_unchanged_files_are_not_read(tmp_path):
    path = write(tmp_path / "a.jpg", b"pixels")
    # The stored hash is deliberately wrong: a file whose size and mtime match is trusted, not hashed.
    stored = rows((7, path, b"pixelz", MTIME))
    plan = make_plan(scan([tmp_path]), stored, 8, no_caption, hashing=HASHING)
    assert plan.unchanged == 1 and not plan.embed and not plan.moves and plan.new_ids == 0


def test_touched_file_keeps_its_id_and_embedding(tmp_path):
    path = write(tmp_path / "a.jpg", b"pixels", mtime=MTIME + 60)
    plan = make_plan(scan([tmp_path]), rows((7, path, b"pixels", MTIME)), 8, no_caption, hashing=HASHING)
    assert [(job.id, job.source_id) for job in plan.moves] == [(7, None)] and not plan.embed


def test_modified_file_is_embedded_again_under_its_id(tmp_path):
    path = write(tmp_path / "a.jpg", b"new pixels", mtime=MTIME + 60)
    plan = make_plan(scan([tmp_path]), rows((7, path, b"old pixels", MTIME)), 8, no_caption, hashing=HASHING)
    assert [job.id for job in plan.embed] == [7] and plan.new_ids == 0 and not plan.removed_ids


def test_moved_file_keeps_its_id_and_is_not_removed(tmp_path):
    new = write(tmp_path / "albums" / "a.jpg", b"pixels")
    plan = make_plan(scan([tmp_path]), rows((7, tmp_path / "a.jpg", b"pixels", MTIME)), 8, no_caption, hashing=HASHING)
    assert [(job.id, job.file.path, job.source_id) for job in plan.moves] == [(7, new, 7)]
    assert not plan.embed and not plan.removed_ids and plan.reused == 1


def test_copy_of_a_present_file_gets_a_new_id_and_reuses_the_embedding(tmp_path):
    original = write(tmp_path / "a.jpg", b"pixels")
    copy = write(tmp_path / "copy.jpg", b"pixels")
    plan = make_plan(scan([tmp_path]), rows((7, original, b"pixels", MTIME)), 8, no_caption, hashing=HASHING)
    assert [(job.id, job.file.path, job.source_id) for job in plan.copies] == [(8, copy, 7)]
    assert plan.unchanged == 1 and plan.new_ids == 1 and plan.reused == 1


def test_identical_new_files_are_each_embedded_with_their_own_id(tmp_path):
    write(tmp_path / "a.jpg", b"same")
    write(tmp_path / "b.jpg", b"same")
    plan = make_plan(scan([tmp_path]), rows(), 1, no_caption, hashing=HASHING)
    assert sorted(job.id for job in plan.embed) == [1, 2] and not plan.copies  # no row to copy from yet


def test_removed_only_under_the_scanned_roots(tmp_path):
    keep = write(tmp_path / "lib" / "a.jpg", b"a")
    stored = rows((1, keep, b"a", MTIME), (2, tmp_path / "lib" / "gone.jpg", b"g", MTIME),
                  (3, tmp_path / "other" / "elsewhere.jpg", b"e", MTIME))
    plan = make_plan(scan([tmp_path / "lib"]), stored, 4, no_caption, hashing=HASHING)
    assert plan.removed_ids == [2] and plan.unchanged == 1


def test_caption_change_of_an_unchanged_file_is_a_recaption(tmp_path):
    path = write(tmp_path / "a.jpg", b"pixels")
    plan = make_plan(scan([tmp_path]), rows((7, path, b"pixels", MTIME, "old")), 8, lambda _: "new", hashing=HASHING)
    assert [(job.id, job.caption) for job in plan.recaption] == [(7, "new")] and plan.unchanged == 1


def test_content_hash_is_of_the_bytes(tmp_path):
    one, two = write(tmp_path / "a.jpg", b"x" * 3_000_000), write(tmp_path / "b.jpg", b"x" * 3_000_000)
    assert content_hash(one, HASHING) == content_hash(two, HASHING) != content_hash(write(tmp_path / "c.jpg", b"y"), HASHING)


def test_ids_are_reserved_past_every_row_and_never_handed_out_twice(tmp_path):
    store = Store.create(tmp_path / "store", "m", "p", 4)
    assert store.next_free_id() == 1
    assert store.reserve_ids(5) == 1 and store.manifest.next_id == 6
    assert Store.open(tmp_path / "store").next_free_id() == 6  # recorded, not just in memory
    with pytest.raises(StoreError, match="already reserved"):
        store.reserve_ids(3, first=4)


def test_rows_written_past_the_manifest_push_the_first_free_id(tmp_path):
    import numpy as np

    from store.tables import image_rows

    store = Store.create(tmp_path / "store", "m", "p", 4)
    store.tables.add(image_rows(4, id=[50], hash=["h"], path=["/x.jpg"], embedding=np.eye(4, dtype=np.float32)[:1]))
    assert store.next_free_id() == 51


def test_the_row_builder_fills_the_schema_and_refuses_unknown_columns():
    import numpy as np

    from store.tables import image_rows, image_schema

    full = image_rows(3, id=[1, 2], hash=["a", "b"], path=["/a", "/b"], embedding=np.ones((2, 3), np.float32))
    assert full.schema == image_schema(3) and full.column("caption").null_count == 2
    partial = image_rows(3, partial=True, id=[1], caption=["hello"])
    assert partial.column_names == ["id", "caption"]
    with pytest.raises(TypeError, match="no column"):
        image_rows(3, id=[1], hash=["a"], path=["/a"], embedding=np.ones((1, 3)), colour=["red"])
    with pytest.raises(TypeError, match="need the column 'hash'"):
        image_rows(3, id=[1], path=["/a"], embedding=np.ones((1, 3)))


def test_only_files_that_share_a_size_are_hashed_before_embedding(tmp_path):
    """Content is only comparable at equal sizes: a file of a size no row has is left for the
    embedding stage to hash as it reads it (read once, not twice, and on the engine's workers).
    Two new files of one size are both embedded whatever their content, so they are not hashed
    first either (issue 30: the first plan of a 100M-image run hashed nearly every file)."""
    unique = write(tmp_path / "new" / "unique.jpg", b"u" * 11)
    twins = [write(tmp_path / "new" / f"twin{i}.jpg", b"t" * 12) for i in (1, 2)]
    like_gone = write(tmp_path / "new" / "like_gone.jpg", b"g" * 13)
    grown = write(tmp_path / "grown.jpg", b"x" * 14, mtime=MTIME + 5)
    touched = write(tmp_path / "touched.jpg", b"y" * 15, mtime=MTIME + 5)
    stored = rows((1, tmp_path / "elsewhere" / "gone.jpg", b"h" * 13, MTIME), (2, grown, b"x" * 9, MTIME),
                  (3, touched, b"y" * 15, MTIME))
    plan = make_plan(scan([tmp_path]), stored, 4, no_caption, hashing=HASHING)
    hashes = {job.file.path: job.hash for job in plan.embed + plan.moves + plan.copies}
    assert hashes[unique] is None and hashes[grown] is None  # grown keeps id 2, hashed when embedded
    assert [job.id for job in plan.embed if job.file.path == grown] == [2]
    assert all(hashes[path] is None for path in twins) and len([j for j in plan.embed if j.file.path in twins]) == 2
    assert all(hashes[path] == content_hash(path, HASHING) for path in (like_gone, touched))
    assert [job.file.path for job in plan.moves] == [touched]  # same size, same content: touched
