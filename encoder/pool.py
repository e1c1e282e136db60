"""The one model cache of the process: every command, query and server asks it for a model, so
a model is loaded once however many callers use it (the indexer, the queries after it, the demo,
every request of the server)."""

from __future__ import annotations

import inspect
import os
import threading
from typing import TYPE_CHECKING, Callable

from encoder.checkpoints import check_sha256
from encoder.model import ClipModel, load_model, resolve_device
from encoder.registry import pretrained_label
from encoder.registry import weights_sha256 as weights_sha256_of
from store.errors import NoEncoderError

if TYPE_CHECKING:
    from store.manifest import Manifest


class ModelPool:
    """Loaded models keyed by (name, weights, device, recorded hash); *loader* is :func:`load_model`
    unless a test injects another.

    The hash a store recorded for a local checkpoint is part of the key: a model is handed to a
    store's readers only if it was checked against that hash as it was read, and once loaded it is
    kept, whatever happens to the file afterwards.
    """

    def __init__(self, loader: Callable[..., ClipModel] = load_model) -> None:
        self._loader = loader
        self._checks = _takes_hash(loader)  # else a stand-in: the pool checks the file before calling it
        self._models: dict[tuple[str, str, str, str], ClipModel] = {}
        self._lock = threading.Lock()  # two threads asking at once load the model once

    def get(self, name: str, pretrained: str | None = None, device: str = "auto",
            weights_sha256: str = "") -> ClipModel:
        """The model, loaded once; with *weights_sha256* (a store's record of its local checkpoint)
        the file must have that hash, else :class:`ModelMismatchError`."""
        device = resolve_device(device)
        label = pretrained_label(name, pretrained)
        key = (name, label, device, weights_sha256)
        with self._lock:
            if key not in self._models:
                self._models[key] = self._load(name, pretrained, device, label, weights_sha256)
            return self._models[key]

    def _load(self, name: str, pretrained: str | None, device: str, label: str, weights_sha256: str) -> ClipModel:
        if not weights_sha256:
            return self._loader(name, pretrained, device)
        if self._checks:
            return self._loader(name, pretrained, device, weights_sha256=weights_sha256)
        if os.path.isfile(label):
            check_sha256(label, weights_sha256, weights_sha256_of(label))
        return self._loader(name, pretrained, device)

    def for_manifest(self, manifest: "Manifest", device: str = "auto") -> ClipModel:
        """The model that made a store's vectors, or :class:`NoEncoderError` for imported features
        that clipdex has no encoder for (they answer vector queries and the cache only). A local
        checkpoint must be the file the store recorded (:class:`ModelMismatchError`)."""
        if not manifest.has_text_encoder:
            raise NoEncoderError(
                f"this store holds '{manifest.space}' features, which have no text or image encoder in clipdex: "
                "query it with vectors (search(vector=...), an id, an embedding) or the cache")
        return self.get(manifest.model, manifest.pretrained, device, weights_sha256=manifest.weights_sha256)


def _takes_hash(loader: Callable[..., ClipModel]) -> bool:
    try:
        parameters = inspect.signature(loader).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "weights_sha256" or p.kind is p.VAR_KEYWORD for p in parameters)


MODELS = ModelPool()
