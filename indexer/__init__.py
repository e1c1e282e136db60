"""clipdex indexer: models, image decoding, and the synthetic demo library."""

from indexer.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, decode_bytes, is_image_path, load_image
from indexer.models import (
    BUNDLED_MODELS,
    DEFAULT_MODEL,
    DEFAULT_PRETRAINED,
    ClipModel,
    ModelInfo,
    list_models,
    load_model,
    resolve_pretrained,
)
from indexer.run import IndexConfig, IndexSummary, index_paths
from indexer.shapes import ShapeLabel, read_labels, write_library
from store.errors import ClipdexError, ImageError, InputError, ModelLoadError

__all__ = [
    "BUNDLED_MODELS", "DEFAULT_MAX_PIXELS", "DEFAULT_MODEL", "DEFAULT_PRETRAINED", "IMAGE_EXTENSIONS",
    "ClipModel", "ClipdexError", "ImageError", "IndexConfig", "IndexSummary", "InputError", "ModelInfo", "ModelLoadError", "ShapeLabel",
    "decode_bytes", "index_paths", "is_image_path", "list_models", "load_image", "load_model", "read_labels", "resolve_pretrained",
    "write_library",
]
