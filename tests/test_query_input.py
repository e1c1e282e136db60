"""One path from user input to a query: the same mistake gets the same error class and message
from Python, the CLI and HTTP, and one HTTP status (issue: one-way layers, item 3)."""

from __future__ import annotations

import numpy as np
import pytest

import cli
from encoder import MODELS, ModelPool
from search import Query
from server import ServeConfig, create_app
from store import ImportConfig, InputError, NoEncoderError, Store, import_features
from tests.helpers import local_client

CASES = {  # name: (python call on a store, CLI arguments, HTTP body, error class, message)
    "empty text": (lambda s: Query.create(s, "   "), ["search", "   "], {"text": "   "},
                   InputError, "the search text is empty"),
    "k below 1": (lambda s: Query.create(s, "a circle").limit(0), ["search", "a circle", "-k", "0"],
                  {"text": "a circle", "k": 0}, InputError, "k must be at least 1, got 0"),
}


def cli_error(capsys, *args) -> str:
    with pytest.raises(SystemExit) as caught:
        cli.main([str(a) for a in args])
    assert caught.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    return err.removeprefix("error: ")


@pytest.fixture(scope="module")
def vector_store(tmp_path_factory):
    """A store of imported features from a space clipdex has no encoder for."""
    root = tmp_path_factory.mktemp("vectors")
    np.save(root / "f.npy", np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32))
    import_features([root / "f.npy"], root / "store", ImportConfig(model_name="imagebind_huge"))
    return root / "store"


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_same_mistake_reads_the_same_everywhere(case, capsys, served_library):
    python_call, cli_args, body, error_class, message = CASES[case]
    store_dir = served_library[0]
    with pytest.raises(error_class) as caught:
        python_call(Store.open(store_dir))
    assert str(caught.value) == message
    assert cli_error(capsys, *cli_args, "--store", store_dir, "--device", "cpu") == message
    with local_client(create_app(ServeConfig(store=store_dir))) as client:
        response = client.post("/search", json=body)
    assert (response.status_code, response.json()) == (400, {"error": message})


def test_a_store_without_encoder_refuses_text_alike_everywhere(capsys, vector_store):
    with pytest.raises(NoEncoderError) as caught:
        Query.create(Store.open(vector_store), "a dog").to_list()
    message = str(caught.value)
    assert "'imagebind_huge' features, which have no text or image encoder" in message
    assert cli_error(capsys, "search", "a dog", "--store", vector_store) == message
    with local_client(create_app(ServeConfig(store=vector_store))) as client:
        response = client.post("/search", json={"text": "a dog"})
        assert (response.status_code, response.json()) == (400, {"error": message})
        vector = client.post("/search", json={"embedding": [0.1] * 8, "k": 3})
        assert vector.status_code == 200 and len(vector.json()) == 3  # vectors still work


def test_the_pool_loads_a_model_once_for_every_caller(served_library):
    loads = []

    def loader(name, pretrained, device):
        loads.append((name, pretrained, device))
        return MODELS.get(name, pretrained, device)

    pool = ModelPool(loader)
    manifest = Store.open(served_library[0]).manifest
    first = pool.for_manifest(manifest, "cpu")
    assert pool.get("clipdex-shapes", None, "cpu") is first  # the default weights are the bundled ones
    assert pool.get("clipdex-shapes", "bundled", "cpu") is first
    assert len(loads) == 1


@pytest.mark.parametrize("spec, message", [
    ("1:/nonexistent.jpg", "no such image file: /nonexistent.jpg"),
    ("./missing.png", "no such image file: ./missing.png"),
    ("abc:red", "the weight 'abc' is not a number"),
    (":", "nothing before the colon"),
    (":red", "nothing before the colon"),
    ("2:", "a query term is empty"),
])
def test_malformed_terms_are_errors_not_text(spec, message, capsys, served_library):
    from search import parse_term

    with pytest.raises(InputError, match=message.replace(".", r"\.")):
        parse_term(spec)
    assert message in cli_error(capsys, "search", "a circle", "--add", spec, "--store", served_library[0])


def test_terms_that_are_text_or_files(tmp_path, monkeypatch):
    from search import parse_term

    assert parse_term("note: cat").text == "note: cat"  # a colon followed by a space is text
    assert parse_term("AC/DC poster").text == "AC/DC poster"
    assert (parse_term("-0.5:red").weight, parse_term("-0.5:red").text) == (-0.5, "red")
    (tmp_path / "photo.jpg").write_bytes(b"x")
    monkeypatch.setenv("HOME", str(tmp_path))
    term = parse_term("2:~/photo.jpg")
    assert (term.weight, term.image) == (2.0, str(tmp_path / "photo.jpg"))


def test_tilde_is_expanded_for_libraries_and_stores(tmp_path, monkeypatch, small_library):
    import shutil

    from indexer import IndexConfig, index_paths

    shutil.copytree(small_library[0], tmp_path / "Pictures")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # where an unexpanded "~" folder would appear
    summary = index_paths(["~/Pictures"], "~/pictures.clipdex",
                          IndexConfig(model="clipdex-shapes", device="cpu", workers=0, progress=False))
    assert summary.embedded == 12 and (tmp_path / "pictures.clipdex" / "manifest.json").is_file()
    assert not (tmp_path / "~").exists()
    assert Store.open("~/pictures.clipdex").manifest.roots == (str((tmp_path / "Pictures").resolve()),)


def test_a_tiny_query_over_http_is_refused_not_nan(served_library):
    with local_client(create_app(ServeConfig(store=served_library[0]))) as client:
        response = client.post("/cache/blend", json={"queries": [[1e-40] * 64]})
        assert response.status_code == 400 and "too small" in response.json()["error"]
        scaled = client.post("/cache/blend", json={"queries": [[1e-25] * 64], "weighting": "reference"})
        assert scaled.status_code == 200 and all(v is not None for v in scaled.json()["features"][0])
