"""clipdex storage layer: LanceDB rows + FAISS index behind one Store, and the error hierarchy."""

import os

# torch and faiss each bring their own OpenMP runtime; with the default active waiting, each one's
# idle threads spin on the cores the other needs. Passive waiting measured 30x faster for a FAISS
# search next to torch ops and 2x for a large search (BENCHMARKS.md). Set before either loads;
# a value the user exported wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from store.ann import AnnConfig  # noqa: E402  (after the OpenMP setting above)
from store.errors import (  # noqa: E402
    ClipdexError,
    ImageError,
    InputError,
    ModelLoadError,
    ModelMismatchError,
    NoEncoderError,
    NotFoundError,
    StoreError,
)
from store.importer import ImportConfig, ImportSummary, import_features  # noqa: E402
from store.manifest import MANIFEST_VERSION, IndexInfo, Manifest  # noqa: E402
from store.store import Store  # noqa: E402

__all__ = [
    "MANIFEST_VERSION", "AnnConfig", "ClipdexError", "ImageError", "ImportConfig", "ImportSummary", "IndexInfo",
    "InputError", "Manifest", "ModelLoadError", "ModelMismatchError", "NoEncoderError", "NotFoundError", "Store",
    "StoreError", "import_features",
]
