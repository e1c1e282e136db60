"""clipdex storage layer: LanceDB rows + FAISS index behind one Store, and the error hierarchy."""

from store.errors import ClipdexError, ImageError, InputError, ModelLoadError, ModelMismatchError, StoreError
from store.faiss_io import AnnConfig
from store.manifest import MANIFEST_VERSION, IndexInfo, Manifest
from store.store import Store

__all__ = [
    "MANIFEST_VERSION", "AnnConfig", "ClipdexError", "ImageError", "IndexInfo", "InputError", "Manifest",
    "ModelLoadError", "ModelMismatchError", "Store", "StoreError",
]
