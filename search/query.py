"""Text/image search over a store as a typed fluent chain:

    (Query.create(Store.open("photos.clipdex"), "a dog on the grass")
     .add("2:sunset").where("width > 500").limit(10).to_arrow())

Setters return new queries and validate at once; ``to_arrow`` is the one terminal, ``to_list``
builds on it. The combined query vector is normalize(sum of weight * term embedding), with
subtracted terms weighted negatively (rclip-style query algebra).

The query is given its encoder (anything with ``encode_texts`` and ``encode_images``, such as a
:class:`encoder.ClipModel` or the server's batching encoder); without one it asks the process's
model pool for the store's model, when a text or image term first needs it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from encoder import MODELS, load_image
from encoder.precision import DEFAULT_PRECISION
from search.filtered import FilteredIndex
from search.filters import combine, parse_filter
from search.hybrid import HYBRID_DEPTH, informative, rrf
from search.terms import Term, check_k, check_min_score, parse_term
from store.errors import InputError, NotFoundError, first_line
from store.tables import PHOTO_COLUMNS

if TYPE_CHECKING:
    from typing import Self

    from PIL import Image

    from encoder.pool import TextEncoder
    from store.store import Store

LOG = logging.getLogger(__name__)
RESULT_COLUMNS = ("id", "path", "width", "height", "caption", "bytes", "mtime", "hash", *PHOTO_COLUMNS)
DEFAULT_K = 10
# A search sorted by a column after a relevance cut-off orders every match above the cut-off, up
# to this many (it searches deeper until the scores fall below the cut-off or this is reached).
SORT_POOL = 10_000
SORT_FIRST_DEPTH = 256  # how deep such a search looks first; 4x deeper each time every match still passes


class TermEncoder(Protocol):
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...

    def encode_images(self, images: Sequence["Image.Image"]) -> np.ndarray: ...


@dataclass(frozen=True, eq=False)
class Query:
    store: "Store"
    terms: tuple[Term, ...] = ()
    filters: tuple[str, ...] = ()
    k: int = DEFAULT_K
    device: str = "auto"
    columns: tuple[str, ...] = field(default=RESULT_COLUMNS)
    encoder: TermEncoder | None = None  # None: the store's model from the shared pool
    threshold: float | None = None  # .min_score(): results below this cosine are left out
    order: tuple[str, bool] | None = None  # .sort(): (column, descending)
    mode: str = "vector"  # .hybrid(), .full_text(): search.hybrid.MODES
    precision: str = DEFAULT_PRECISION  # how text and image terms are embedded: encoder.precision

    @classmethod
    def create(cls, store: "Store", text: str | None = None, *, image: str | None = None,
               vector: np.ndarray | None = None, encoder: TermEncoder | None = None,
               device: str = "auto", precision: str = DEFAULT_PRECISION) -> "Query":
        given = [x for x in (text, image, vector) if x is not None]
        if len(given) != 1:
            raise InputError("search needs exactly one of a text, an image or a vector")
        query = cls(store, encoder=encoder, device=device, precision=precision)
        if text is not None:
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
        return replace(self, terms=self.terms + (term.negated(),))

    def where(self, sql: str) -> "Self":
        """A SQL prefilter on the metadata columns, one condition (``"width > 500"``); several are
        AND-ed. Parsed, never pasted: see :mod:`search.filters`."""
        tables = self.store.tables
        return replace(self, filters=self.filters + (parse_filter(sql, tables.filter_columns(), tables.time_columns()),))

    def limit(self, k: int, maximum: int | None = None) -> "Self":
        return replace(self, k=check_k(k, maximum))

    def min_score(self, score: float | None) -> "Self":
        """Only results whose cosine similarity is at least *score* (still at most k); None: all."""
        return replace(self, threshold=check_min_score(score))

    def sort(self, column: str | None) -> "Self":
        """Order the results by a table column, ``-column`` for descending, ties by score. After a
        :meth:`min_score`, every match above it (up to SORT_POOL) is ordered and the first k kept
        ("the newest photos of the beach"); without one, the k best matches are reordered."""
        if column is None:
            return replace(self, order=None)
        if not isinstance(column, str) or not column.strip("-"):
            raise InputError(f"sort needs a column name, optionally with '-' for descending; got {column!r}")
        name, descending = column.removeprefix("-"), column.startswith("-")
        allowed = self.store.tables.filter_columns()
        if name not in allowed:
            raise InputError(f"cannot sort by {name!r}: the store's columns are {', '.join(sorted(allowed))}")
        return replace(self, order=(name, descending))

    def hybrid(self, on: bool = True) -> "Self":
        """Rank by the caption's words (BM25) beside the embedding, fused by reciprocal rank; the
        words are the query's text. ``score`` stays the cosine; a result that matched the words
        passes :meth:`min_score` whatever its cosine."""
        return replace(self, mode="hybrid" if on else "vector")

    def full_text(self, on: bool = True) -> "Self":
        """Rank by the caption's words alone (BM25, ``score`` is BM25's): needs no model."""
        return replace(self, mode="fts" if on else "vector")

    def to_query_object(self) -> dict[str, Any]:
        """A JSON-able description (cache keys, HTTP payloads)."""
        return {"terms": [t.describe() for t in self.terms], "where": list(self.filters), "k": self.k,
                "min_score": self.threshold, "mode": self.mode, "sort": None if self.order is None else
                ("-" if self.order[1] else "") + self.order[0]}

    def vector(self) -> np.ndarray:
        """The combined, L2-normalised query vector ``[dim]``."""
        if not self.terms:
            raise InputError("the query has no terms: give a text, an image, an id or a vector")
        dim = self.store.manifest.dim
        total = np.zeros(dim, np.float64)
        for term in self.terms:
            total += term.weight * self._embed(term)
        norm = np.linalg.norm(total)
        if not np.isfinite(norm) or norm == 0:
            raise InputError("the query terms cancel out (or contain NaN): nothing to search for")
        return (total / norm).astype(np.float32)

    def _encoder(self) -> TermEncoder:
        if self.encoder is not None:
            return self.encoder
        return MODELS.for_manifest(self.store.manifest, self.device, self.precision)

    def _text_encoder(self) -> "TextEncoder":
        if self.encoder is not None:
            return self.encoder
        return MODELS.text_encoder(self.store.manifest, self.device, self.precision)

    def _embed(self, term: Term) -> np.ndarray:
        dim = self.store.manifest.dim
        if term.vector is not None or term.id is not None:
            vector = np.asarray(term.vector if term.vector is not None else self._stored(term.id), np.float64)
            if vector.shape != (dim,):
                raise InputError(f"the query vector has {vector.size} values; this store's vectors have {dim}")
            return vector / (np.linalg.norm(vector) or 1.0)
        if term.text is not None:
            return self._text_encoder().encode_texts([term.text])[0]
        picture = term.picture if term.picture is not None else load_image(os.path.expanduser(term.image))
        return self._encoder().encode_images([picture])[0]

    def _stored(self, image_id: int) -> np.ndarray:
        rows = self.store.tables.rows_by_id([image_id], ["id", "embedding"]).to_pylist()
        if not rows:
            raise NotFoundError(f"no image with id {image_id} in this store")
        return np.asarray(rows[0]["embedding"], np.float32)

    def _searcher(self):
        """The store's index, restricted to the rows the filters admit by the plan their measured
        selectivity calls for (:mod:`search.filtered`)."""
        index = self.store.ann_index()
        if not self.filters:
            return index
        sql = combine(self.filters)
        try:
            return FilteredIndex(index, self.store.tables, sql, self.store.stored_values())
        except Exception as error:  # lance reports SQL problems as ValueError/RuntimeError/its own
            raise InputError(f"invalid where filter {sql!r}: {first_line(error)}") from error

    def to_arrow(self) -> pa.Table:
        """Results best first (or in :meth:`sort`'s order): the metadata columns plus ``score``
        (cosine similarity; BM25's score for :meth:`full_text`)."""
        manifest = self.store.manifest
        if manifest.index.table_version != self.store.tables.version():
            LOG.warning("the index is older than the table (an index run was interrupted or is under way); "
                        "run `clipdex index` to include the latest changes")
        if self.mode == "fts":
            ids, scores = self._keyword_ids(self.k)
        elif self.mode == "hybrid":
            ids, scores = self._hybrid(self._searcher())
        else:
            ids, scores = self._neighbours(self._searcher(), self.vector()[None, :], self.k)
        if not len(ids):
            return self._empty()
        columns = list(self.columns) + ([self.order[0]] if self.order and self.order[0] not in self.columns else [])
        rows = self.store.tables.rows_by_id(ids.tolist(), columns)
        position = {row_id: i for i, row_id in enumerate(rows.column("id").to_pylist())}
        order = [position[i] for i in ids.tolist() if i in position]  # rows deleted since the index: dropped
        found = rows.take(pa.array(order, pa.int64()))
        by_id = dict(zip(ids.tolist(), scores.tolist()))
        found = found.append_column("score", pa.array([by_id[i] for i in found.column("id").to_pylist()], pa.float32()))
        if self.order is not None:
            name, descending = self.order
            # Arrow's sort is stable: rows equal in the column keep their order by score.
            key = (name, "descending" if descending else "ascending", "at_end")  # rows without a value last
            found = found.take(pc.sort_indices(found, sort_keys=[key]))[:self.k]
            found = found.select([*self.columns, "score"])
        return found

    def _neighbours(self, index, vector: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) best first, at least :meth:`min_score`: the *depth* best, or for a search
        sorted after a cut-off, every match above it up to SORT_POOL (searched deeper while the
        last one found still passes)."""
        pool = self.order is not None and self.threshold is not None
        if pool:
            depth = min(max(self.k, SORT_FIRST_DEPTH), SORT_POOL)
        while True:
            scores, ids = index.search(vector, depth)
            keep = ids[0] >= 0
            ids, scores = ids[0][keep], scores[0][keep]
            if self.threshold is not None:
                passing = scores >= self.threshold
                full = bool(passing.all()) and len(ids) == depth
                ids, scores = ids[passing], scores[passing]
            else:
                full = False
            if not pool or not full or depth >= SORT_POOL:
                return ids, scores
            depth = min(depth * 4, SORT_POOL)

    def _words(self) -> str:
        """The text the caption index is asked: the query's text term."""
        texts = [term.text for term in self.terms if term.text is not None and term.weight > 0]
        if not texts:
            raise InputError("hybrid and full-text search need a text query (the words searched in the captions)")
        if self.mode == "fts" and len(self.terms) > 1:
            raise InputError("full-text search takes one text and nothing else: no images, ids or vectors, no "
                             "--add or --subtract")
        tables = self.store.tables
        # The index exists only where captions do: the caption column is scanned only to say why not.
        if tables.has_caption_index():
            return texts[0]
        if not tables.has_captions():
            raise InputError(f"the store {self.store.directory} has no captions to search: hybrid and full-text "
                             "search read the caption column (index with --captions FILE, or sidecar .txt files)")
        raise InputError(f"the store {self.store.directory} has no full-text index on its captions yet: "
                         "`clipdex reindex` (or the next `clipdex index`) makes it")

    def _keyword_ids(self, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, BM25 scores) of the captions that best match the query's words, among the filter's rows."""
        if self.threshold is not None and self.mode == "fts":
            raise InputError("--min-score is a cosine similarity; a full-text search ranks by BM25 (use --hybrid)")
        words = self._words()
        try:
            found = self.store.tables.full_text(words, depth, combine(self.filters) if self.filters else None)
        except (ValueError, RuntimeError, OSError) as error:
            raise InputError(f"full-text search for {words!r} failed: {first_line(error)}") from error
        return found.column("id").to_numpy(), found.column("bm25").to_numpy()

    def _hybrid(self, index) -> tuple[np.ndarray, np.ndarray]:
        """(ids, cosines) ordered by reciprocal rank fusion of the vector and the caption rankings:
        the k first that pass :meth:`min_score` or matched the words."""
        depth = max(2 * self.k, HYBRID_DEPTH)
        vector = self.vector()
        keyword_ids, bm25 = self._keyword_ids(depth)
        keyword_ids = np.asarray(informative(keyword_ids.tolist(), bm25.tolist()), np.int64)
        threshold, unfiltered = self.threshold, replace(self, threshold=None)
        vector_ids, vector_scores = unfiltered._neighbours(index, vector[None, :], depth)
        cosine = dict(zip(vector_ids.tolist(), vector_scores.tolist()))
        unscored = [i for i in keyword_ids.tolist() if i not in cosine]
        if unscored:  # found by their words only: their cosine from the stored vectors
            rows = self.store.tables.rows_by_id(unscored, ["id", "embedding"])
            stored = np.asarray(rows.column("embedding").to_pylist(), np.float32).reshape(len(rows), -1)
            cosine.update(zip(rows.column("id").to_pylist(), (stored @ vector).tolist()))
        matched = set(keyword_ids.tolist())
        order = [i for i in rrf(vector_ids.tolist(), keyword_ids.tolist()) if i in cosine
                 and (threshold is None or i in matched or cosine[i] >= threshold)][:self.k]
        return np.asarray(order, np.int64), np.asarray([cosine[i] for i in order], np.float32)

    def _empty(self) -> pa.Table:
        schema = self.store.tables.images.schema
        return pa.schema([schema.field(c) for c in self.columns] + [pa.field("score", pa.float32())]).empty_table()

    def to_list(self) -> list[dict[str, Any]]:
        return self.to_arrow().to_pylist()
