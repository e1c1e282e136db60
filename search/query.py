"""Text/image search over a store as a typed fluent chain:

    Store.open("photos.clipdex").search("a dog on the grass").add("2:sunset").where("width > 500").limit(10).to_arrow()

Setters return new queries and validate at once; ``to_arrow`` is the one terminal, ``to_list``
builds on it. The combined query vector is normalize(sum of weight * term embedding), with
subtracted terms weighted negatively (rclip-style query algebra).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from store.errors import InputError, StoreError, first_line

if TYPE_CHECKING:
    from typing import Self

    from indexer.models import ClipModel
    from store.store import Store

LOG = logging.getLogger(__name__)
RESULT_COLUMNS = ("id", "path", "width", "height", "caption", "bytes", "mtime", "hash")
_MODELS: dict[tuple[str, str, str], "ClipModel"] = {}


@dataclass(frozen=True)
class Term:
    weight: float
    text: str | None = None
    image: str | None = None
    vector: tuple[float, ...] | None = None

    def describe(self) -> str:
        what = self.text if self.text is not None else self.image if self.image else "<vector>"
        return f"{self.weight:g}:{what}"


def parse_term(spec: str, weight: float = 1.0) -> Term:
    """'cat', '2:cat', '0.5:photo.jpg' -> Term; an existing image file path is an image term."""
    from indexer.images import is_image_path

    head, sep, tail = spec.partition(":")
    if sep:
        try:
            weight, spec = weight * float(head), tail
        except ValueError:
            pass  # a colon inside the text itself ("note: cat")
    if not spec.strip():
        raise InputError("a query term is empty: give some text or an image path")
    if is_image_path(spec) and os.path.exists(spec):
        return Term(weight, image=spec)
    return Term(weight, text=spec)


def encoder_for(store: "Store", device: str = "auto") -> "ClipModel":
    """The store's model, loaded once per process."""
    from indexer.models import load_model

    manifest = store.manifest
    if not manifest.has_text_encoder:
        raise StoreError(f"the store {store.directory} holds '{manifest.space}' features, which have no text or "
                         "image encoder here: query it with vectors (search(vector=...)) or the cache API")
    key = (manifest.model, manifest.pretrained, device)
    if key not in _MODELS:
        _MODELS[key] = load_model(manifest.model, manifest.pretrained, device)
    return _MODELS[key]


@dataclass(frozen=True, eq=False)
class Query:
    store: "Store"
    terms: tuple[Term, ...] = ()
    filters: tuple[str, ...] = ()
    k: int = 10
    device: str = "auto"
    columns: tuple[str, ...] = field(default=RESULT_COLUMNS)

    @classmethod
    def create(cls, store: "Store", text: str | None = None, image: str | None = None,
               vector: np.ndarray | None = None) -> "Query":
        given = [x for x in (text, image, vector) if x is not None]
        if len(given) != 1:
            raise InputError("search needs exactly one of a text, an image or a vector")
        query = cls(store)
        if text is not None:
            if not text.strip():
                raise InputError("the search text is empty")
            return query.add(Term(1.0, text=text))
        if image is not None:
            return query.add(Term(1.0, image=str(image)))
        return query.add(Term(1.0, vector=tuple(np.asarray(vector, np.float32).reshape(-1).tolist())))

    def add(self, term: "str | Term", weight: float = 1.0) -> "Self":
        """Add a weighted term: text, an image path, or 'weight:term'."""
        term = parse_term(term, weight) if isinstance(term, str) else term
        return replace(self, terms=self.terms + (term,))

    def subtract(self, term: "str | Term", weight: float = 1.0) -> "Self":
        term = parse_term(term, weight) if isinstance(term, str) else term
        return replace(self, terms=self.terms + (replace(term, weight=-term.weight),))

    def where(self, sql: str) -> "Self":
        """A LanceDB SQL prefilter on the metadata columns; several are AND-ed."""
        if not sql or not sql.strip():
            raise InputError("the where filter is empty")
        return replace(self, filters=self.filters + (sql.strip(),))

    def limit(self, k: int) -> "Self":
        if int(k) < 1:
            raise InputError(f"k must be at least 1, got {k}")
        return replace(self, k=int(k))

    def to_query_object(self) -> dict[str, Any]:
        """A JSON-able description (cache keys, HTTP payloads)."""
        return {"terms": [t.describe() for t in self.terms], "where": list(self.filters), "k": self.k}

    def vector(self) -> np.ndarray:
        """The combined, L2-normalised query vector ``[dim]``."""
        dim = self.store.manifest.dim
        total = np.zeros(dim, np.float64)
        for term in self.terms:
            total += term.weight * self._embed(term)
        norm = np.linalg.norm(total)
        if not np.isfinite(norm) or norm == 0:
            raise InputError("the query terms cancel out (or contain NaN): nothing to search for")
        return (total / norm).astype(np.float32)

    def _embed(self, term: Term) -> np.ndarray:
        dim = self.store.manifest.dim
        if term.vector is not None:
            vector = np.asarray(term.vector, np.float64)
            if vector.shape != (dim,):
                raise InputError(f"the query vector has {vector.size} values; this store's vectors have {dim}")
            return vector / (np.linalg.norm(vector) or 1.0)
        model = encoder_for(self.store, self.device)
        if term.text is not None:
            return model.encode_texts([term.text])[0]
        from indexer.images import load_image

        return model.encode_images([load_image(term.image)])[0]

    def _allowed_ids(self) -> np.ndarray | None:
        if not self.filters:
            return None
        sql = " AND ".join(f"({f})" for f in self.filters)
        try:
            rows = self.store.tables.images.search().where(sql).select(["id"]).to_arrow()
        except Exception as error:  # lance reports SQL problems as ValueError/RuntimeError/its own
            raise InputError(f"invalid where filter {sql!r}: {first_line(error)}") from error
        return rows.column("id").to_numpy()

    def to_arrow(self) -> pa.Table:
        """Results best first: the metadata columns plus ``score`` (cosine similarity)."""
        from store.faiss_io import search

        manifest = self.store.manifest
        if manifest.index.table_version != self.store.tables.version():
            LOG.warning("the index is older than the table (an index run was interrupted or is under way); "
                        "run `clipdex index` to include the latest changes")
        index = self.store.faiss_index()
        allowed = self._allowed_ids()
        if allowed is not None and len(allowed) == 0:
            return self._empty()
        scores, ids = search(index, self.vector()[None, :], self.k, allowed)
        keep = ids[0] >= 0
        ids, scores = ids[0][keep], scores[0][keep]
        rows = self.store.tables.rows_by_id(ids.tolist(), self.columns)
        position = {row_id: i for i, row_id in enumerate(rows.column("id").to_pylist())}
        order = [position[i] for i in ids.tolist() if i in position]  # rows deleted since the index: dropped
        found = rows.take(pa.array(order, pa.int64()))
        by_id = dict(zip(ids.tolist(), scores.tolist()))
        return found.append_column("score", pa.array([by_id[i] for i in found.column("id").to_pylist()], pa.float32()))

    def _empty(self) -> pa.Table:
        schema = self.store.tables.images.schema
        return pa.schema([schema.field(c) for c in self.columns] + [pa.field("score", pa.float32())]).empty_table()

    def to_list(self) -> list[dict[str, Any]]:
        return self.to_arrow().to_pylist()
