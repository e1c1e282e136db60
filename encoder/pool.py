"""The one model cache of the process: every command, query and server asks it for a model, so
a model is loaded once however many callers use it (the indexer, the queries after it, the demo,
every request of the server)."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Callable

from encoder.model import ClipModel, load_model, resolve_device
from encoder.registry import pretrained_label
from store.errors import NoEncoderError

if TYPE_CHECKING:
    from store.manifest import Manifest


class ModelPool:
    """Loaded models keyed by (name, weights, device); *loader* is :func:`load_model` unless a
    test injects another."""

    def __init__(self, loader: Callable[[str, str | None, str], ClipModel] = load_model) -> None:
        self._loader = loader
        self._models: dict[tuple[str, str, str], ClipModel] = {}
        self._lock = threading.Lock()  # two threads asking at once load the model once

    def get(self, name: str, pretrained: str | None = None, device: str = "auto") -> ClipModel:
        device = resolve_device(device)
        key = (name, pretrained_label(name, pretrained), device)
        with self._lock:
            if key not in self._models:
                self._models[key] = self._loader(name, pretrained, device)
            return self._models[key]

    def for_manifest(self, manifest: "Manifest", device: str = "auto") -> ClipModel:
        """The model that made a store's vectors, or :class:`NoEncoderError` for imported features
        that clipdex has no encoder for (they answer vector queries and the cache only)."""
        if not manifest.has_text_encoder:
            raise NoEncoderError(
                f"this store holds '{manifest.space}' features, which have no text or image encoder in clipdex: "
                "query it with vectors (search(vector=...), an id, an embedding) or the cache")
        return self.get(manifest.model, manifest.pretrained, device)


MODELS = ModelPool()
