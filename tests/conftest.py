from __future__ import annotations

import pytest

from demo.shapes import read_labels, write_library

HELDOUT_SEED = 7  # the bundled model was trained on seed 0 and checked on seed 99
HELDOUT_COUNT = 320


@pytest.fixture(scope="session", autouse=True)
def user_cache(tmp_path_factory):
    """Exported encoders go to a cache of the test session's own, never the user's."""
    import os

    folder = tmp_path_factory.mktemp("user-cache")
    saved = os.environ.get("CLIPDEX_CACHE_DIR")
    os.environ["CLIPDEX_CACHE_DIR"] = str(folder)
    yield folder
    if saved is None:
        os.environ.pop("CLIPDEX_CACHE_DIR", None)
    else:
        os.environ["CLIPDEX_CACHE_DIR"] = saved


@pytest.fixture(scope="session")
def demo_model():
    from encoder.model import load_model

    return load_model("clipdex-shapes", device="cpu")


@pytest.fixture(scope="session")
def heldout_library(tmp_path_factory):
    """A held-out library of real JPEG/PNG files: (directory, rows of labels.csv)."""
    directory = tmp_path_factory.mktemp("heldout")
    return directory, read_labels(write_library(directory, HELDOUT_COUNT, HELDOUT_SEED))


@pytest.fixture(scope="session")
def small_library(tmp_path_factory):
    directory = tmp_path_factory.mktemp("small")
    return directory, read_labels(write_library(directory, 12, 3))


@pytest.fixture(scope="session")
def served_library(tmp_path_factory):
    """A store of 40 captioned demo images for the server tests: (store dir, rows of labels.csv)."""
    from indexer.run import IndexConfig, index_paths

    root = tmp_path_factory.mktemp("served")
    labels = write_library(root / "library", 40, 11)
    index_paths([root / "library"], root / "store",
                IndexConfig(model="clipdex-shapes", device="cpu", captions=(str(labels),), progress=False))
    return root / "store", read_labels(labels)
