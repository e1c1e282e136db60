"""index / info / search as a user meets them: JSON shapes, exit codes, one-line errors."""

import json
import shutil

import pytest

import cli


def run(capsys, *args):
    with pytest.raises(SystemExit) as caught:
        cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return caught.value.code, out, err


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, small_library):
    store = tmp_path_factory.mktemp("cli") / "store"
    with pytest.raises(SystemExit) as caught:
        cli.main(["index", str(small_library[0]), "--store", str(store), "--model", "clipdex-shapes",
                  "--device", "cpu", "--workers", "0"])
    assert caught.value.code == 0
    return store


def test_index_json_summary(capsys, small_library, tmp_path):
    code, out, _ = run(capsys, "index", small_library[0], "--store", tmp_path / "s", "--model", "clipdex-shapes",
                       "--workers", "0", "--json")
    summary = json.loads(out)
    assert code == 0 and {"scanned", "embedded", "reused", "removed", "failed", "seconds"} <= set(summary)
    assert summary["scanned"] == summary["embedded"] == 12


def test_info_json(capsys, store_dir):
    code, out, _ = run(capsys, "info", "--store", store_dir, "--json")
    info = json.loads(out)
    assert code == 0 and info["model"] == "clipdex-shapes" and info["pretrained"] == "bundled"
    assert info["dim"] == 64 and info["count"] == 12 and info["failures"] == 0
    assert info["index"]["type"] == "flat" and info["index"]["recall_at_10"] == 1.0
    assert info["preprocess"]["size"] == [64, 64] and info["version"] >= 1
    code, out, _ = run(capsys, "info", "--store", store_dir)
    assert "clipdex-shapes" in out and "recall@10 1.000" in out


def test_search_text_image_and_json(capsys, store_dir, small_library):
    code, out, _ = run(capsys, "search", "a red circle", "--store", store_dir, "-k", 3, "--json")
    hits = json.loads(out)
    assert code == 0 and len(hits) == 3 and {"id", "path", "score"} <= set(hits[0])
    example = small_library[1][4]["path"]
    code, out, _ = run(capsys, "search", "--image", example, "--store", store_dir, "-k", 2)
    assert code == 0 and out.splitlines()[0].split()[-1] == example
    code, out, _ = run(capsys, "search", "a star", "--store", store_dir, "--where", "width > 100000")
    assert code == 0 and out.strip() == "no results"


@pytest.mark.parametrize("args, message", [
    (["search", "x", "--store", "{store}", "--where", "widht >>> 3"], "invalid where filter"),
    (["search", "x", "--store", "{store}", "-k", "0"], "k must be at least 1"),
    (["search", "  ", "--store", "{store}"], "search text is empty"),
    (["search", "--store", "{store}"], "give a QUERY text"),
    (["search", "x", "--store", "{missing}"], "no store at"),
    (["info", "--store", "{missing}"], "no store at"),
    (["index", "{missing}", "--store", "{store}"], "no such file or folder"),
    (["search", "x", "--store", "{store}", "--image", "{missing}"], "missing"),
])
def test_store_mistakes_are_one_line(capsys, store_dir, tmp_path, args, message):
    argv = [a.format(store=store_dir, missing=tmp_path / "nope") for a in args]
    code, out, err = run(capsys, *argv)
    assert code != 0 and err.startswith("error: ") and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_nothing_indexable_exits_nonzero(capsys, tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_text("nope")
    code, out, err = run(capsys, "index", tmp_path / "bad", "--store", tmp_path / "s", "--model", "clipdex-shapes",
                         "--workers", "0", "--json")
    assert code == 1 and json.loads(out)["failed"] == 1 and "nothing could be indexed" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "index", tmp_path / "empty", "--store", tmp_path / "s2", "--model", "clipdex-shapes")
    assert code == 1 and "no image files found" in err and not (tmp_path / "s2").exists()


def test_an_emptied_library_keeps_its_rows_until_pruned(capsys, small_library, tmp_path):
    """An unmounted drive looks exactly like an empty folder: nothing is deleted unless asked."""
    library = tmp_path / "lib"
    shutil.copytree(small_library[0], library)
    code, _, _ = run(capsys, "index", library, "--store", tmp_path / "s", "--model", "clipdex-shapes", "--workers", "0")
    for image in library.rglob("shape_*"):
        image.unlink()
    code, out, err = run(capsys, "index", library, "--store", tmp_path / "s", "--json")
    summary = json.loads(out)
    assert code == 3 and summary["removed"] == 0 and summary["count"] == 12
    assert summary["unavailable"] == {str(library.resolve()): 12}
    assert err.strip() == (f"warning: {library.resolve()} is missing, unreadable or empty; its 12 images are kept "
                           "(pass --prune to remove them)")
    code, out, _ = run(capsys, "index", library, "--store", tmp_path / "s", "--json", "--prune")
    assert code == 0 and json.loads(out)["removed"] == 12 and json.loads(out)["count"] == 0


def test_store_of_another_model_is_refused(capsys, store_dir, small_library, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(store_dir, copy)
    code, _, err = run(capsys, "index", small_library[0], "--store", copy, "--model", "RN50", "--pretrained", "openai")
    assert code == 1 and "holds 64-d embeddings of clipdex-shapes" in err and "--model clipdex-shapes" in err
