"""clipdex storage layer (LanceDB rows + FAISS index) and the project's error hierarchy."""

from store.errors import ClipdexError, ImageError, InputError, ModelLoadError, ModelMismatchError, StoreError

__all__ = ["ClipdexError", "ImageError", "InputError", "ModelLoadError", "ModelMismatchError", "StoreError"]
