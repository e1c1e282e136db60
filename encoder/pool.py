"""The one model cache of the process: every command, query and server asks it for a model, so
a model is loaded once however many callers use it (the indexer, the queries after it, the demo,
every request of the server)."""

from __future__ import annotations

import copy
import inspect
import logging
import os
import threading
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

import numpy as np

from encoder import exported
from encoder.checkpoints import check_sha256
from encoder.model import ClipModel, load_model, resolve_device, with_exported_towers
from encoder.precision import DEFAULT_PRECISION, PRECISIONS, check_precision
from encoder.registry import pretrained_label
from encoder.registry import weights_sha256 as weights_sha256_of
from encoder.user_cache import CacheRefused
from store.errors import NoEncoderError

if TYPE_CHECKING:
    from store.manifest import Manifest

LOG = logging.getLogger(__name__)


class TextEncoder(Protocol):
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...


def _on_cpu(device: str) -> bool:
    """Whether *device* is the CPU, told without importing torch: "auto" is the CPU on a machine
    without NVIDIA's driver (where it is loaded, torch decides, as before)."""
    if device != "auto":
        return device == "cpu"
    return not (os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl"))


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
        self._models: dict[tuple[str, str, str, str, str], ClipModel] = {}
        self._texts: dict[tuple[str, str, str, str], TextEncoder] = {}  # (model, pretrained, sha256, precision)
        self._lock = threading.Lock()  # two threads asking at once load the model once

    def get(self, name: str, pretrained: str | None = None, device: str = "auto",
            weights_sha256: str = "", precision: str = DEFAULT_PRECISION) -> ClipModel:
        """The model, loaded once; with *weights_sha256* (a store's record of its local checkpoint)
        the file must have that hash, else :class:`ModelMismatchError`."""
        device = resolve_device(device)
        check_precision(precision, device)
        label = pretrained_label(name, pretrained)
        key = (name, label, device, weights_sha256, precision)
        with self._lock:
            if key not in self._models:
                self._models[key] = self._load(name, pretrained, device, label, weights_sha256, precision)
            return self._models[key]

    def _load(self, name: str, pretrained: str | None, device: str, label: str, weights_sha256: str,
              precision: str) -> ClipModel:
        if PRECISIONS[precision].exported:  # the towers are exported from the fp32 model, loaded once
            fp32 = self._models.get((name, label, device, weights_sha256, DEFAULT_PRECISION)) \
                or self._load(name, pretrained, device, label, weights_sha256, DEFAULT_PRECISION)
            self._models[(name, label, device, weights_sha256, DEFAULT_PRECISION)] = fp32
            return with_exported_towers(copy.copy(fp32), precision, weights_sha256)
        other = {} if precision == DEFAULT_PRECISION else {"precision": precision}  # a stand-in knows fp32 only
        if not weights_sha256:
            return self._loader(name, pretrained, device, **other)
        if self._checks:
            return self._loader(name, pretrained, device, weights_sha256=weights_sha256, **other)
        if os.path.isfile(label):
            check_sha256(label, weights_sha256, weights_sha256_of(label))
        return self._loader(name, pretrained, device, **other)

    def for_manifest(self, manifest: "Manifest", device: str = "auto",
                     precision: str = DEFAULT_PRECISION) -> ClipModel:
        """The model that made a store's vectors, or :class:`NoEncoderError` for imported features
        that clipdex has no encoder for (they answer vector queries and the cache only). A local
        checkpoint must be the file the store recorded (:class:`ModelMismatchError`)."""
        if not manifest.has_text_encoder:
            raise NoEncoderError(
                f"this store holds '{manifest.space}' features, which have no text or image encoder in clipdex: "
                "query it with vectors (search(vector=...), an id, an embedding) or the cache")
        return self.get(manifest.model, manifest.pretrained, device, weights_sha256=manifest.weights_sha256,
                        precision=precision)

    def text_encoder(self, manifest: "Manifest", device: str = "auto",
                     precision: str = DEFAULT_PRECISION) -> "TextEncoder":
        """What embeds a store's text queries most cheaply: on the CPU, its text tower exported to
        ONNX with the tokenizer (no torch, no open_clip: a one-shot search costs less than
        importing torch), built from the model the first time; elsewhere, or where the model
        cannot be exported, the model itself."""
        if not _on_cpu(device) or not manifest.has_text_encoder or precision not in exported.PRECISIONS:
            return self.for_manifest(manifest, device, precision)
        known = (manifest.model, manifest.pretrained, manifest.weights_sha256, precision)
        with self._lock:  # asked once per text query in `serve`: the key hashes bundled weights
            if known in self._texts:
                return self._texts[known]
        key = exported.key_for(manifest.model, manifest.pretrained, manifest.weights_sha256)
        try:
            encoder: TextEncoder = exported.text_encoder(key, precision, lambda: self.for_manifest(manifest, "cpu"))
        except (exported.ExportError, CacheRefused) as error:
            LOG.warning("%s; text queries are embedded by the model itself", error)
            encoder = self.for_manifest(manifest, device, precision)
        with self._lock:
            return self._texts.setdefault(known, encoder)


def _takes_hash(loader: Callable[..., ClipModel]) -> bool:
    try:
        parameters = inspect.signature(loader).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "weights_sha256" or p.kind is p.VAR_KEYWORD for p in parameters)


MODELS = ModelPool()
