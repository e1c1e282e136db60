"""What every request handler shares: the config, the live store and the model behind one lock."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np

from encoder import MODELS
from search.terms import check_k
from server.batching import MicroBatcher
from server.blending import blend_jobs
from store.errors import NotFoundError

if TYPE_CHECKING:
    from PIL import Image

    from encoder import ClipModel
    from encoder.pool import TextEncoder
    from server.config import ServeConfig
    from server.live import LiveStore, Snapshot


@dataclass
class Encoder:
    """The store's model. One lock: on a CPU torch already spreads one batch over every core, and
    concurrent forwards would only thrash; on a GPU they would queue on the device anyway."""

    device: str = "auto"
    precision: str = "fp32"
    lock: threading.Lock = field(default_factory=threading.Lock)
    _batchers: dict[int, MicroBatcher] = field(default_factory=dict)

    def model(self, snapshot: "Snapshot") -> "ClipModel":
        return MODELS.for_manifest(snapshot.store.manifest, self.device, self.precision)

    def text_encoder(self, snapshot: "Snapshot") -> "TextEncoder":
        """What embeds text queries: on a CPU the text tower exported to ONNX (half of torch's latency)."""
        return MODELS.text_encoder(snapshot.store.manifest, self.device, self.precision)

    def for_snapshot(self, snapshot: "Snapshot") -> "SnapshotEncoder":
        """What a query of this request encodes its terms with (see :class:`search.TermEncoder`)."""
        return SnapshotEncoder(self, snapshot)

    def text(self, snapshot: "Snapshot", text: str) -> np.ndarray:
        """One text's embedding, computed in a batch with the texts of concurrent requests (on a
        CPU by the exported text tower: ONNX Runtime, half the latency of torch's, measured)."""
        model = self.text_encoder(snapshot)
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


@dataclass(frozen=True)
class SnapshotEncoder:
    """The server's encoder bound to one snapshot's model; texts go through the request batcher."""

    encoder: Encoder
    snapshot: "Snapshot"

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self.encoder.text(self.snapshot, text) for text in texts])

    def encode_images(self, images: Sequence["Image.Image"]) -> np.ndarray:
        return self.encoder.images(self.snapshot, images)


@dataclass
class ServerContext:
    config: "ServeConfig"
    live: "LiveStore"
    encoder: Encoder
    blender: MicroBatcher = field(default_factory=lambda: MicroBatcher(blend_jobs, name="clipdex-cache-blend"))

    def check_k(self, k: int) -> int:
        return check_k(k, self.config.max_k)


def stored_row(snapshot: "Snapshot", image_id: int, columns: Sequence[str]) -> dict:
    """The row of *image_id* in the snapshot being served, or a 404."""
    rows = snapshot.store.tables.rows_by_id([image_id], ["id", *columns]).to_pylist()
    if not rows:
        raise NotFoundError(f"no image with id {image_id} in this store")
    return rows[0]
