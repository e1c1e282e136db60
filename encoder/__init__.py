"""clipdex encoder: the model registry (bundled + open_clip), model loading (checkpoints read as
weights only), image decoding, and the one model pool every other package shares."""

from encoder.checkpoints import read_state_dict
from encoder.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, decode_bytes, decode_image, is_image_path, load_image
from encoder.model import ClipModel, load_model, resolve_device
from encoder.pool import MODELS, ModelPool
from encoder.registry import (
    BUNDLED_MODELS,
    BUNDLED_TAG,
    DEFAULT_MODEL,
    DEFAULT_PRETRAINED,
    ModelInfo,
    can_load,
    list_models,
    pretrained_label,
    resolve_pretrained,
    weights_sha256,
)

__all__ = [
    "BUNDLED_MODELS", "BUNDLED_TAG", "DEFAULT_MAX_PIXELS", "DEFAULT_MODEL", "DEFAULT_PRETRAINED", "IMAGE_EXTENSIONS",
    "MODELS", "ClipModel", "ModelInfo", "ModelPool", "can_load", "decode_bytes", "decode_image", "is_image_path",
    "list_models", "load_image", "load_model", "pretrained_label", "read_state_dict", "resolve_device",
    "resolve_pretrained", "weights_sha256",
]
