"""Indexing end to end on generated libraries: incremental runs, bad files, ids, filters, quality."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from demo.shapes import write_library
from indexer.run import IndexConfig, index_paths
from search import Query
from store.ann import AnnConfig
from store.errors import ModelMismatchError
from store.store import Store

DEMO = IndexConfig(model="clipdex-shapes", device="cpu", workers=0, progress=False)


def rows_by_path(store: Store) -> dict[str, dict]:
    table = store.tables.images.search().select(["id", "path", "hash", "width", "height", "caption"]).to_arrow()
    return {row["path"]: row for row in table.to_pylist()}


@pytest.fixture
def library(tmp_path, small_library):
    """A private, mutable copy of the 12-image library."""
    source, _ = small_library
    target = tmp_path / "lib"
    shutil.copytree(source, target)
    (target / "labels.csv").unlink()
    return target


def test_first_run_then_nothing_to_do(library, tmp_path):
    first = index_paths([library], tmp_path / "store", DEMO)
    assert (first.scanned, first.embedded, first.reused, first.removed, first.failed) == (12, 12, 0, 0, 0)
    store = Store.open(tmp_path / "store")
    assert store.manifest.count == 12 and store.manifest.index.type == "flat"
    assert store.manifest.index.recall_at_10 == 1.0
    again = index_paths([library], tmp_path / "store", DEMO)
    assert (again.embedded, again.reused, again.removed, again.unchanged) == (0, 0, 0, 12)


def test_incremental_add_modify_delete_move_copy(library, tmp_path):
    index_paths([library], tmp_path / "store", DEMO)
    store = Store.open(tmp_path / "store")
    before = rows_by_path(store)
    files = sorted(p for p in library.rglob("shape_*"))

    moved_from, moved_to = files[0], library / "renamed" / ("x" + files[0].suffix)
    moved_to.parent.mkdir()
    os.rename(moved_from, moved_to)
    shutil.copy(files[1], library / ("copy" + files[1].suffix))
    files[2].unlink()
    modified = files[3]
    Image.new("RGB", (120, 90), (0, 0, 255)).save(modified, format="PNG" if modified.suffix == ".png" else "JPEG")
    write_library(library / "new", 2, seed=11)
    (library / "new" / "labels.csv").unlink()

    summary = index_paths([library], tmp_path / "store", DEMO)
    assert (summary.embedded, summary.reused, summary.removed, summary.failed) == (3, 2, 1, 0)
    store.refresh()
    after = rows_by_path(store)
    assert len(after) == store.manifest.count == 12 - 1 + 1 + 2
    assert after[str(moved_to)]["id"] == before[str(moved_from)]["id"]  # a move keeps its id
    assert str(moved_from) not in after and str(files[2]) not in after
    assert after[str(modified)]["id"] == before[str(modified)]["id"]  # modified in place keeps its id
    assert after[str(modified)]["hash"] != before[str(modified)]["hash"]
    assert (after[str(modified)]["width"], after[str(modified)]["height"]) == (120, 90)
    copy = after[str(library / ("copy" + files[1].suffix))]
    assert copy["hash"] == before[str(files[1])]["hash"] and copy["id"] not in {r["id"] for r in before.values()}
    assert len({r["id"] for r in after.values()}) == len(after)

    embeddings = store.tables.rows_by_id([copy["id"], before[str(files[1])]["id"]], ["id", "embedding"])
    vectors = np.array(embeddings.column("embedding").to_pylist())
    np.testing.assert_array_equal(vectors[0], vectors[1])  # the copy reused the embedding
    ids_in_index = faiss_ids(store)
    assert ids_in_index == {r["id"] for r in after.values()}


def faiss_ids(store: Store) -> set[int]:
    import faiss

    index = store.faiss_index()
    return set(faiss.vector_to_array(index.id_map).tolist())


def test_stable_ids_across_index_rebuilds(library, tmp_path):
    index_paths([library], tmp_path / "store", DEMO)
    store = Store.open(tmp_path / "store")
    ids = {p: r["id"] for p, r in rows_by_path(store).items()}
    store.rebuild_index(AnnConfig(kind="flat"))
    (tmp_path / "store" / store.manifest.index.file).unlink()  # lose the index entirely
    index_paths([library], tmp_path / "store", DEMO)  # notices and rebuilds
    store.refresh()
    assert {p: r["id"] for p, r in rows_by_path(store).items()} == ids
    assert faiss_ids(store) == set(ids.values())
    hits = Query.create(store, vector=store.tables.rows_by_id([min(ids.values())], ["embedding"])
                        .column("embedding").to_pylist()[0]).limit(1).to_list()
    assert hits[0]["id"] == min(ids.values())


def broken_files(folder):
    folder.mkdir(exist_ok=True)
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.png").write_text("this is not a png")
    Image.effect_noise((300, 300), 40).convert("RGB").save(folder / "whole.jpg")
    data = (folder / "whole.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "whole.jpg").unlink()
    Image.new("RGB", (2000, 2000)).save(folder / "bomb.png")
    os.symlink(folder / "nowhere.jpg", folder / "dangling.jpg")
    (folder / "notes.txt").write_text("not an image extension: ignored silently")
    (folder / "data.csv").write_text("a,b\n")
    return {"zero.jpg": "empty file", "text.png": "not an image", "truncated.jpg": "corrupt",
            "bomb.png": "too large", "dangling.jpg": "missing"}


def odd_but_valid_images(folder):
    folder.mkdir(exist_ok=True)
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(np.full((30, 40), 40000, np.uint16)).save(folder / "gray16.png")
    Image.new("P", (40, 30)).save(folder / "palette.gif")
    Image.new("RGBA", (40, 30), (255, 0, 0, 128)).save(folder / "alpha.png")
    Image.new("L", (40, 30), 128).save(folder / "gray.bmp")
    Image.new("RGB", (40, 30), (9, 9, 9)).save(folder / "photo.WEBP")
    Image.new("RGB", (40, 30), (9, 9, 9)).save(folder / "scan.TIFF")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 30), (0, 255, 0)).save(folder / "rotated.jpg", exif=exif)
    return 8


def test_bad_files_never_stop_a_run(library, tmp_path):
    expected = broken_files(library / "broken")
    valid = odd_but_valid_images(library / "odd")
    config = IndexConfig(model="clipdex-shapes", device="cpu", workers=2, progress=False, max_pixels=1_000_000)
    summary = index_paths([library], tmp_path / "store", config)
    assert summary.failed == len(expected) and summary.embedded == 12 + valid
    store = Store.open(tmp_path / "store")
    failures = {os.path.basename(r["path"]): r["reason"] for r in store.tables.failures.search().to_arrow().to_pylist()}
    assert failures == expected
    assert store.manifest.failures == len(expected)
    rows = rows_by_path(store)
    assert (rows[str(library / "odd" / "rotated.jpg")]["width"], rows[str(library / "odd" / "rotated.jpg")]["height"]) == (30, 40)

    (library / "broken" / "zero.jpg").unlink()  # fixed or gone: its failure is forgotten
    index_paths([library], tmp_path / "store", config)
    store.refresh()
    assert store.manifest.failures == len(expected) - 1


def test_model_mismatch_is_refused(library, tmp_path):
    import open_clip
    import torch

    index_paths([library], tmp_path / "store", DEMO)
    with pytest.raises(ModelMismatchError, match="holds 64-d embeddings of clipdex-shapes"):
        index_paths([library], tmp_path / "store", IndexConfig(model="RN50", pretrained="openai", progress=False))
    other = tmp_path / "other.pt"
    torch.save(open_clip.create_model("clipdex-shapes").state_dict(), other)
    with pytest.raises(ModelMismatchError, match=str(other)):
        index_paths([library], tmp_path / "store", IndexConfig(model="clipdex-shapes", pretrained=str(other),
                                                                progress=False))
    # without --model, a rerun uses the store's own model
    assert index_paths([library], tmp_path / "store", IndexConfig(device="cpu", progress=False)).unchanged == 12


def test_captions_from_csv_and_sidecars(library, tmp_path):
    files = sorted(p for p in library.rglob("shape_*"))
    (library / "captions.csv").write_text(f"path,caption\n{files[0].relative_to(library)},a caption from csv\n")
    files[1].with_suffix(".txt").write_text("a caption from a sidecar\n")
    config = IndexConfig(model="clipdex-shapes", device="cpu", workers=0, progress=False,
                         captions=(str(library / "captions.csv"),))
    index_paths([library], tmp_path / "store", config)
    store = Store.open(tmp_path / "store")
    table = store.tables.images.search().select(["path", "caption", "caption_embedding"]).to_arrow().to_pylist()
    by_path = {row["path"]: row for row in table}
    assert by_path[str(files[0])]["caption"] == "a caption from csv"
    assert by_path[str(files[1])]["caption"] == "a caption from a sidecar"
    assert by_path[str(files[2])]["caption"] is None and by_path[str(files[2])]["caption_embedding"] is None
    assert np.linalg.norm(by_path[str(files[0])]["caption_embedding"]) == pytest.approx(1.0, rel=1e-4)


def test_a_file_given_by_itself_takes_its_sidecar_caption(library, tmp_path):
    """The scan lists the sidecars it sees (the planner opens only those): a file given directly
    has no folder listing, so its sidecar is looked for."""
    photo = sorted(library.rglob("shape_*"))[0]
    photo.with_suffix(".txt").write_text("given by itself\n")
    index_paths([photo], tmp_path / "store", IndexConfig(model="clipdex-shapes", device="cpu", progress=False))
    rows = Store.open(tmp_path / "store").tables.images.search().select(["caption"]).to_arrow().to_pylist()
    assert rows == [{"caption": "given by itself"}]


def test_text_search_quality_through_the_pipeline(heldout_library, tmp_path):
    from demo.quality import store_quality

    directory, rows = heldout_library
    summary = index_paths([directory], tmp_path / "store", IndexConfig(model="clipdex-shapes", device="cpu",
                                                                        workers=2, progress=False))
    assert summary.embedded == len(rows)
    quality = store_quality(Store.open(tmp_path / "store"), rows)
    print(quality)
    assert quality["images"] == len(rows) >= 300 and quality["queries"] >= 20
    assert quality["precision_at_5"] >= 0.9 and quality["zero_shot_shape"] >= 0.9


def test_filters_and_query_algebra(heldout_library, tmp_path):
    directory, rows = heldout_library
    index_paths([directory], tmp_path / "store", IndexConfig(model="clipdex-shapes", device="cpu", workers=2,
                                                              progress=False))
    store = Store.open(tmp_path / "store")
    wide = Query.create(store, "a red circle").where("width > 400").limit(10).to_list()
    assert wide and all(hit["width"] > 400 for hit in wide)
    scores = [hit["score"] for hit in wide]
    assert scores == sorted(scores, reverse=True)
    png_only = Query.create(store, "a star").where("path LIKE '%.png'").where("height < 500").limit(50).to_list()
    assert png_only and all(h["path"].endswith(".png") and h["height"] < 500 for h in png_only)
    assert Query.create(store, "a star").where("width < 0").to_list() == []

    truth = {row["path"]: row for row in rows}
    blue = Query.create(store, "a circle").add("2:blue").subtract("red").limit(5).to_list()
    assert sum(truth[h["path"]]["colour"] == "blue" for h in blue) >= 4
    example = rows[0]["path"]
    assert Query.create(store, image=example).limit(1).to_list()[0]["path"] == example
