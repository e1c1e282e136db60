"""One path from user input to a query: the same mistake gets the same error class and message
from Python, the CLI and HTTP, and one HTTP status (issue: one-way layers, item 3)."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

import cli
from encoder import MODELS, ModelPool
from search import Query
from server import ServeConfig, create_app
from store import InputError, NoEncoderError, Store, import_features

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
    import_features([root / "f.npy"], root / "store", model_name="imagebind_huge")
    return root / "store"


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_same_mistake_reads_the_same_everywhere(case, capsys, served_library):
    python_call, cli_args, body, error_class, message = CASES[case]
    store_dir = served_library[0]
    with pytest.raises(error_class) as caught:
        python_call(Store.open(store_dir))
    assert str(caught.value) == message
    assert cli_error(capsys, *cli_args, "--store", store_dir, "--device", "cpu") == message
    with TestClient(create_app(ServeConfig(store=store_dir))) as client:
        response = client.post("/search", json=body)
    assert (response.status_code, response.json()) == (400, {"error": message})


def test_a_store_without_encoder_refuses_text_alike_everywhere(capsys, vector_store):
    with pytest.raises(NoEncoderError) as caught:
        Query.create(Store.open(vector_store), "a dog").to_list()
    message = str(caught.value)
    assert "'imagebind_huge' features, which have no text or image encoder" in message
    assert cli_error(capsys, "search", "a dog", "--store", vector_store) == message
    with TestClient(create_app(ServeConfig(store=vector_store))) as client:
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
