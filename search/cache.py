"""The LLM pipeline's cache: batched top-k neighbours of a store plus residual feature blending.

Keys = values = the store's L2-normalised features, held once as a contiguous matrix sorted by id
(float16 by default). Search runs where the queries are: on CUDA an exact matmul + top-k over
GPU-resident keys (chunked), on the CPU the store's FAISS index. Values are gathered with one
vectorised indexing op, and S_topk is recomputed exactly as q . key for the gathered keys, so an
approximate index changes which neighbours are found, never their weights.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from encoder import resolve_device
from search.blend import WEIGHTINGS, BlendParams, Weighting, blend
from search.terms import check_k
from store.ann import search as ann_search
from store.errors import InputError, StoreError
from store.store import Store

if TYPE_CHECKING:
    import torch

LOG = logging.getLogger(__name__)
# The smallest normal float32: below it a query's norm and its output cannot be represented.
SMALLEST_NORM = float(np.finfo(np.float32).tiny)
GPU_CHUNK_ROWS = 1 << 20  # keys scored per matmul on CUDA, bounding the [B, chunk] score buffer


class Blended(NamedTuple):
    """Result of ``blend(..., return_neighbours=True)``: ids and scores are ``[B, k]`` (``[k]`` for one query)."""

    features: Any
    ids: Any
    scores: Any


class CacheRetriever:
    """Top-k cache retrieval with residual blending over one store (or raw arrays)."""

    def __init__(self, ids: np.ndarray, values: "torch.Tensor | np.ndarray", index: Any = None,
                 device: str = "cpu") -> None:
        self.ids = ids  # sorted int64, row i of values belongs to ids[i]
        self.values = values  # a tensor, or on a CPU a memory-mapped array (see open)
        self.index = index  # FAISS index over the same vectors with ids as FAISS ids (CPU search)
        self.device = device
        # Measured recall@10 of the search: exact (1.0) unless opened on a store's ANN index.
        self.recall_at_10: float | None = 1.0

    @property
    def size(self) -> int:
        return int(self.values.shape[0])

    @property
    def dim(self) -> int:
        return int(self.values.shape[1])

    @classmethod
    def open(cls, store: "Store | str | Path", device: str = "auto", dtype: str = "float16") -> "CacheRetriever":
        store = store if isinstance(store, Store) else Store.open(store)
        device = resolve_device(device)
        index = None if device.startswith("cuda") else store.faiss_index()
        mapped = _mapped_values(store)
        if mapped is not None and not device.startswith("cuda"):
            ids, values = mapped  # neighbours are gathered from the file: no copy of every vector in memory
            cache = cls(ids, values, index, device)
        else:
            ids, vectors = mapped if mapped is not None else store.tables.vectors()
            if not len(ids):
                raise StoreError(f"the store {store.directory} is empty: nothing to retrieve from")
            cache = cls.from_arrays(ids, vectors, device=device, dtype=dtype, index=index)
        if not cache.size:
            raise StoreError(f"the store {store.directory} is empty: nothing to retrieve from")
        if index is not None:
            cache.recall_at_10 = store.manifest.index.recall_at_10
            LOG.info("cache of %d x %d on %s, %s index, recall@10 %s", cache.size, cache.dim, device,
                     store.manifest.index.type, cache.recall_at_10)
        return cache

    @classmethod
    def from_arrays(cls, ids: np.ndarray, features: np.ndarray, device: str = "auto", dtype: str = "float16",
                    index: Any = None) -> "CacheRetriever":
        """A cache over *features* ``[N, C]`` (L2-normalised) under *ids*; builds an exact index if none."""
        import torch

        ids = np.asarray(ids, np.int64)
        order = np.argsort(ids, kind="stable")
        features = np.ascontiguousarray(np.asarray(features, np.float32)[order])
        device = resolve_device(device)
        if index is None and not device.startswith("cuda"):
            import faiss

            index = faiss.IndexIDMap2(faiss.IndexFlatIP(features.shape[1]))
            index.add_with_ids(features, ids[order])
        values = torch.from_numpy(features).to(device=device, dtype=getattr(torch, dtype))
        return cls(ids[order], values.contiguous(), index, device)

    def _search(self, queries: "torch.Tensor", k: int) -> "torch.Tensor":
        """Row positions ``[B, k]`` of the top-k keys for unit *queries* (on this cache's device)."""
        import torch

        if self.device.startswith("cuda"):
            best_scores, best_rows = None, None
            for start in range(0, self.size, GPU_CHUNK_ROWS):
                chunk = self.values[start:start + GPU_CHUNK_ROWS]
                scores = queries.to(chunk.dtype) @ chunk.T
                top = torch.topk(scores.float(), min(k, chunk.shape[0]), dim=1)
                rows = top.indices + start
                if best_scores is not None:
                    merged = torch.topk(torch.cat([best_scores, top.values], 1), k, dim=1)
                    best_rows = torch.gather(torch.cat([best_rows, rows], 1), 1, merged.indices)
                    best_scores = merged.values
                else:
                    best_scores, best_rows = top.values, rows
            return best_rows
        _, found = ann_search(self.index, queries.numpy(), k)
        short = (found < 0).any(axis=1)  # an ANN index found fewer than k candidates: exact for those rows
        if short.any():
            found[short] = self.ids[self._exact_rows(queries[torch.from_numpy(short)], k)]
        positions = np.minimum(np.searchsorted(self.ids, found), self.size - 1)
        if not np.array_equal(self.ids[positions], found):
            raise StoreError("the FAISS index and the cache's features disagree: rebuild it with `clipdex index`")
        return torch.from_numpy(positions)

    def _exact_rows(self, queries: "torch.Tensor", k: int) -> np.ndarray:
        import torch

        scores = torch.cat([queries @ self._rows(slice(i, i + 65536)).T for i in range(0, self.size, 65536)], 1)
        return torch.topk(scores, k, dim=1).indices.numpy()

    def _rows(self, which) -> "torch.Tensor":
        """Rows of the values as float32 (a slice, or positions ``[B, k]``), wherever they are."""
        import torch

        if isinstance(self.values, np.ndarray):
            index = which.cpu().numpy() if isinstance(which, torch.Tensor) else which
            return torch.from_numpy(np.asarray(self.values[index], np.float32))
        return self.values[which].float()

    def blend(self, queries: Any, k: int = BlendParams.k, alpha: float = BlendParams.alpha,
              weighting: Weighting = BlendParams.weighting, temperature: float = BlendParams.temperature,
              return_neighbours: bool = False) -> Any:
        """Blend each query with its *k* nearest cache values (see :mod:`search.blend` for the formulas).

        *queries*: torch tensor or numpy array ``[B, C]`` or ``[C]``, any float dtype and device. The
        output has the same type, dtype, device and shape. With ``return_neighbours`` a
        :class:`Blended` (features, ids, scores) is returned, ids and scores as ``[B, k]``.
        """
        import torch

        k = self.check(queries, k, alpha, weighting, temperature)
        is_numpy = isinstance(queries, np.ndarray)
        original = torch.from_numpy(queries) if is_numpy else queries
        single = original.dim() == 1
        work = original.reshape(1, -1) if single else original
        # float64 for the split into direction and norm: float32 squares of a 1e-25 query underflow to 0.
        work = work.detach().to(device=self.device, dtype=torch.float64)
        norm = work.norm(dim=-1, keepdim=True)
        unit = (work / norm).float()
        positions = self._search(unit, k)
        values = self._rows(positions).to(unit.device)  # [B, k, C]: one gather, no per-neighbour loop
        scores = torch.einsum("bc,bkc->bk", unit, values)
        out = blend(unit, norm.float(), scores, values, alpha, weighting, temperature)
        features = _like(out[0] if single else out, original, is_numpy)
        if not return_neighbours:
            return features
        ids = torch.from_numpy(self.ids)[positions.cpu()]
        ids, scores = (ids[0], scores[0]) if single else (ids, scores)
        if is_numpy:
            return Blended(features, ids.numpy(), scores.cpu().numpy())
        return Blended(features, ids.to(original.device), scores.to(original.device))

    def check(self, queries: Any, k: int, alpha: float, weighting: str, temperature: float) -> int:
        """Validate a blend request (raising InputError with the reason); returns the k to use."""
        import torch

        if not isinstance(queries, (np.ndarray, torch.Tensor)):
            raise InputError(f"queries must be a torch tensor or a numpy array, not {type(queries).__name__}")
        is_float = queries.dtype.is_floating_point if isinstance(queries, torch.Tensor) \
            else np.issubdtype(queries.dtype, np.floating)
        if not is_float:
            raise InputError(f"queries must have a float dtype, not {queries.dtype}")
        if queries.ndim not in (1, 2) or queries.shape[-1] != self.dim:
            raise InputError(f"queries must be [B, {self.dim}] or [{self.dim}]; got shape {tuple(queries.shape)}")
        if queries.ndim == 2 and queries.shape[0] == 0:
            raise InputError("the batch of queries is empty")
        finite = torch.isfinite(queries).all().item() if isinstance(queries, torch.Tensor) \
            else bool(np.isfinite(queries).all())
        if not finite:
            raise InputError("queries contain NaN or infinite values")
        norms = queries.double().norm(dim=-1) if isinstance(queries, torch.Tensor) \
            else np.linalg.norm(queries.astype(np.float64), axis=-1)
        if bool((norms == 0).any()):
            raise InputError("a query is all zeros: it has no direction to search in")
        if bool((norms < SMALLEST_NORM).any()):
            raise InputError(f"a query's norm is below {SMALLEST_NORM:.1e}: too small to carry a direction "
                             "(rescale the features)")
        if weighting not in WEIGHTINGS:
            raise InputError(f"unknown weighting '{weighting}': use {' or '.join(WEIGHTINGS)}")
        if not 0.0 <= float(alpha) <= 1.0:
            raise InputError(f"alpha must be within [0, 1], got {alpha}")
        if not np.isfinite(temperature) or temperature <= 0:
            raise InputError(f"temperature must be a positive number, got {temperature}")
        k = check_k(k)
        if k > self.size:
            warnings.warn(f"k={k} is larger than the cache ({self.size} features): using k={self.size}", stacklevel=3)
            return self.size
        return k


def _mapped_values(store: Store) -> tuple[np.ndarray, np.ndarray] | None:
    """The id-sorted values the index build wrote (ids, memory-mapped values), if they are there."""
    folder = store.manifest.index.values
    if not folder:
        return None
    try:
        return (np.load(store.directory / folder / "ids.npy"),
                np.load(store.directory / folder / "values.npy", mmap_mode="r"))
    except (OSError, ValueError):  # replaced by a newer build meanwhile: read the table instead
        return None


def _like(result: "torch.Tensor", original: "torch.Tensor", is_numpy: bool) -> Any:
    out = result.to(device=original.device, dtype=original.dtype)
    return out.numpy() if is_numpy else out
