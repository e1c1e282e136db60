"""`clipdex dupes` (issue 28, item 3) on a planted library: exact copies, and near-duplicates as a
photo library gets them (a JPEG re-encoded at quality 40, a copy at 60 % size, one stored rotated
with its EXIF turning it back), among distinct look-alikes of the demo library."""

from __future__ import annotations

import csv
import io
import itertools
import json
import shutil

import pytest
from PIL import Image

from tests.helpers import MODEL, run, run_quietly


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """(library, store, {original: [its planted copies]}, the exact copy's path)."""
    from demo.shapes import write_library

    root = tmp_path_factory.mktemp("dupes")
    library = root / "library"
    write_library(library, 80, 71)
    originals = sorted(p for p in library.rglob("*.png"))[:6]
    truth = {}
    for original in originals:
        image = Image.open(original).convert("RGB")
        stem = original.with_suffix("")
        image.save(f"{stem}_q40.jpg", quality=40)
        image.resize((int(image.width * 0.6), int(image.height * 0.6))).save(f"{stem}_small.jpg", quality=90)
        exif = Image.Exif()
        exif[0x0112] = 6
        image.transpose(Image.Transpose.ROTATE_90).save(f"{stem}_rotated.jpg", quality=90, exif=exif.tobytes())
        truth[str(original)] = [f"{stem}_{kind}.jpg" for kind in ("q40", "small", "rotated")]
    copy = library / "copy of the first.png"
    shutil.copy(originals[0], copy)
    code, _, err = run_quietly("index", library, "--store", root / "store", *MODEL)
    assert code == 0, err
    return library, root / "store", truth, str(copy)


def groups_of(capsys, store, *options):
    code, out, err = run(capsys, "dupes", "--store", store, "--json", *options)
    assert code == 0, err
    return json.loads(out)


def test_exact_copies_and_planted_near_duplicates_are_grouped_with_few_look_alikes(capsys, planted):
    _, store, truth, copy = planted
    groups = groups_of(capsys, store)
    exact = [g for g in groups if g["kind"] == "exact"]
    assert len(exact) == 1 and set(exact[0]["paths"]) == {copy, next(iter(truth))} and exact[0]["score"] == 1.0
    true_pairs = {frozenset(p) for original, copies in truth.items() for p in itertools.combinations([original, *copies], 2)}
    found = {frozenset(p) for g in groups if g["kind"] == "near" for p in itertools.combinations(g["paths"], 2)}
    recall = len(found & true_pairs) / len(true_pairs)
    precision = len(found & true_pairs) / max(len(found), 1)
    assert recall >= 0.8 and precision >= 0.9, (recall, precision)
    near_members = [i for g in groups if g["kind"] == "near" for i in g["ids"]]
    assert len(near_members) == len(set(near_members))  # a photo is in one near group at most,
    assert exact[0]["ids"][1] not in near_members  # and a copy only in its exact group: its keeper stands for it
    for group in groups:
        assert set(group) == {"kind", "ids", "paths", "bytes", "times", "score", "keep"}
        assert group["keep"] == group["ids"][0] and len(group["ids"]) == len(group["paths"]) >= 2
    for original in truth:  # the original is the keeper of its group: the largest
        group = next((g for g in groups if g["kind"] == "near" and original in g["paths"]), None)
        if group is not None:
            assert group["paths"][0] == original


def test_a_lower_threshold_finds_more_and_exact_only_finds_copies(capsys, planted):
    _, store, _, copy = planted
    strict, loose = groups_of(capsys, store, "--threshold", "0.999"), groups_of(capsys, store, "--threshold", "0.95")
    assert sum(len(g["ids"]) for g in loose) > sum(len(g["ids"]) for g in strict)
    only = groups_of(capsys, store, "--exact-only")
    assert [g["kind"] for g in only] == ["exact"] and copy in only[0]["paths"]


def test_where_restricts_the_search(capsys, planted):
    _, store, truth, _ = planted
    groups = groups_of(capsys, store, "--where", "path LIKE '%_q40.jpg' OR path LIKE '%_small.jpg'")
    for group in groups:
        assert all(path.endswith(("_q40.jpg", "_small.jpg")) for path in group["paths"])
    assert any(g["kind"] == "near" for g in groups)


def test_csv_text_and_mistakes(capsys, planted):
    _, store, _, copy = planted
    code, out, _ = run(capsys, "dupes", "--store", store, "--csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and rows and set(rows[0]) == {"group", "kind", "score", "keep", "id", "path", "bytes", "time"}
    assert any(row["path"] == copy and row["kind"] == "exact" for row in rows)
    code, out, err = run(capsys, "dupes", "--store", store)
    assert code == 0 and "keep" in out and "groups" in err
    code, _, err = run(capsys, "dupes", "--store", store, "--json", "--csv")
    assert code == 1 and err.count("\n") == 1
    code, _, err = run(capsys, "dupes", "--store", store, "--threshold", "3")
    assert code == 2


def test_http_gives_what_the_command_line_gives(capsys, planted):
    from server import ServeConfig, create_app
    from tests.helpers import local_client

    _, store, _, _ = planted
    with local_client(create_app(ServeConfig(store=store))) as client:
        assert client.get("/duplicates").json() == groups_of(capsys, store)
        only = client.get("/duplicates", params={"exact_only": "true"}).json()
        assert [g["kind"] for g in only] == ["exact"]
        narrowed = client.get("/duplicates", params={"where": "path LIKE '%_q40.jpg' OR path LIKE '%_small.jpg'"})
        assert narrowed.status_code == 200 and narrowed.json() == groups_of(
            capsys, store, "--where", "path LIKE '%_q40.jpg' OR path LIKE '%_small.jpg'")
        for params, status in (({"threshold": "2"}, 422), ({"threshold": "nan"}, 422), ({"where": "widht >"}, 400)):
            response = client.get("/duplicates", params=params)
            assert response.status_code == status and "error" in response.json(), (params, response.text)
