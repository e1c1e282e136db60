"""What every request handler shares: the config, the live store and the model behind one lock."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np

from server.batching import MicroBatcher
from server.blending import blend_jobs
from store.errors import InputError, NotFoundError

if TYPE_CHECKING:
    from PIL import Image

    from indexer.models import ClipModel
    from server.config import ServeConfig
    from server.live import LiveStore, Snapshot


@dataclass
class Encoder:
    """The store's model. One lock: on a CPU torch already spreads one batch over every core, and
    concurrent forwards would only thrash; on a GPU they would queue on the device anyway."""

    device: str = "auto"
    lock: threading.Lock = field(default_factory=threading.Lock)
    _batchers: dict[int, MicroBatcher] = field(default_factory=dict)

    def model(self, snapshot: "Snapshot") -> "ClipModel":
        from search.query import encoder_for

        manifest = snapshot.store.manifest
        if not manifest.has_text_encoder:
            raise InputError(f"this store holds imported '{manifest.space}' features and has no text or image "
                             "encoder: search it by embedding or id, or use /cache/blend")
        return encoder_for(snapshot.store, self.device)

    def text(self, snapshot: "Snapshot", text: str) -> np.ndarray:
        """One text's embedding, computed in a batch with the texts of concurrent requests."""
        model = self.model(snapshot)
        batcher = self._batchers.get(id(model))
        if batcher is None:
            def encode(texts: list[str]) -> np.ndarray:
                with self.lock:
                    return model.encode_texts(texts)

            batcher = self._batchers.setdefault(id(model), MicroBatcher(encode, name="clipdex-text-encoder"))
        return batcher(text)

    def images(self, snapshot: "Snapshot", images: Sequence["Image.Image"]) -> np.ndarray:
        model = self.model(snapshot)
        with self.lock:
            return model.encode_images(images)


@dataclass
class ServerContext:
    config: "ServeConfig"
    live: "LiveStore"
    encoder: Encoder
    blender: MicroBatcher = field(default_factory=lambda: MicroBatcher(blend_jobs, name="clipdex-cache-blend"))

    def check_k(self, k: int) -> int:
        if k > self.config.max_k:
            raise InputError(f"k={k} is above this server's maximum of {self.config.max_k} (see --max-k)")
        return k


def stored_row(snapshot: "Snapshot", image_id: int, columns: Sequence[str]) -> dict:
    """The row of *image_id* in the snapshot being served, or a 404."""
    rows = snapshot.store.tables.rows_by_id([image_id], ["id", *columns]).to_pylist()
    if not rows:
        raise NotFoundError(f"no image with id {image_id} in this store")
    return rows[0]


def stored_embedding(snapshot: "Snapshot", image_id: int) -> np.ndarray:
    return np.asarray(stored_row(snapshot, image_id, ["embedding"])["embedding"], np.float32)
