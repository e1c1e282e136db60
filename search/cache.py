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
from search.blend import WEIGHTINGS, BlendParams, Weighting, blend, unit_rows
from search.terms import check_k
from store.ann import AnnIndex
from store.errors import InputError, StoreError, first_line
from store.store import Store
from store.values import id_positions

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
        # FAISS index over the same vectors with ids as FAISS ids (CPU search), as an AnnIndex when its
        # codes are lossy and reranked from exact values
        self.index = index if index is None or isinstance(index, AnnIndex) else AnnIndex(index)
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
        index = None if device.startswith("cuda") else store.ann_index()
        mapped = store.stored_values()
        if mapped is not None and mapped.values.dtype.itemsize < {"float32": 4, "float64": 8}.get(dtype, 2):
            mapped = None  # the build keeps float16 values: float32 ones come from the table
        if mapped is not None and not device.startswith("cuda"):
            # neighbours are gathered from the file: no copy of every vector in memory
            cache = cls(mapped.ids, mapped.values, index, device)
        else:
            ids, vectors = (mapped.ids, mapped.values) if mapped is not None else store.tables.vectors()
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
    def from_faiss(cls, path: "str | Path", device: str = "auto", dtype: str = "float16",
                   params: str = "") -> "CacheRetriever":
        """A cache straight from a FAISS index file, like the ``knn.index`` ImageBind-LLM downloads:
        an IndexFlatIP (or one in an IndexIDMap), or an IVF index with a direct map. Keys are searched
        with that index (*params*, e.g. ``"nprobe=16"``, set on it); values are its vectors,
        reconstructed a chunk at a time into one id-sorted *dtype* matrix and L2-normalised (IVF codes
        may be lossy). Holds the index and that matrix, as the authors' code holds the index."""
        import faiss
        import torch

        try:
            index = faiss.read_index(str(Path(path).expanduser()))
        except RuntimeError as error:
            raise InputError(f"cannot read {path} as a FAISS index: {first_line(error)}") from error
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise InputError(f"{path} is not an inner-product index: its scores are not cosines")
        if params:
            faiss.ParameterSpace().set_index_parameters(index, params)
        ids = np.sort(_faiss_ids(index, path))
        if not len(ids):
            raise InputError(f"{path} holds no vectors")
        values = np.empty((len(ids), index.d), np.dtype(dtype))
        for start in range(0, len(ids), 65536):
            values[start:start + 65536] = unit_rows(index.reconstruct_batch(ids[start:start + 65536]).astype(np.float64))
        device = resolve_device(device)
        if device.startswith("cuda"):
            return cls(ids, torch.from_numpy(values).to(device), None, device)
        return cls(ids, values, index, device)

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

    def _search(self, queries: Any, k: int) -> Any:
        """Row positions ``[B, k]`` of the top-k keys for unit *queries*: a tensor on CUDA, else numpy."""
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
        queries = np.asarray(queries)
        _, found = self.index.search(queries, k)
        short = (found < 0).any(axis=1)  # an ANN index found fewer than k candidates: exact for those rows
        if short.any():
            found[short] = self.ids[self._exact_rows(queries[short], k)]
        return id_positions(self.ids, found)

    def _exact_rows(self, queries: np.ndarray, k: int) -> np.ndarray:
        scores = np.concatenate([queries @ np.asarray(self._rows(slice(i, i + 65536))).T
                                 for i in range(0, self.size, 65536)], 1)
        return np.argsort(-scores, axis=1, kind="stable")[:, :k]

    def _rows(self, which) -> Any:
        """Rows of the values as float32 (a slice, or positions ``[B, k]``): numpy when the values
        are a (memory-mapped) array, else a tensor on their device."""
        import torch

        if not torch.is_tensor(self.values):  # an array, a memory map, or the build's values under a delta
            return torch.from_numpy(self.values[which]).float().numpy()  # torch widens float16 10x faster
        which = which if isinstance(which, (slice, torch.Tensor)) else torch.as_tensor(which, device=self.values.device)
        return self.values[which].float()

    def blend(self, queries: Any, k: int = BlendParams.k, alpha: float = BlendParams.alpha,
              weighting: Weighting = BlendParams.weighting, temperature: float = BlendParams.temperature,
              restore_norm: bool = BlendParams.restore_norm, return_neighbours: bool = False) -> Any:
        """Blend each query with its *k* nearest cache values (see :mod:`search.blend` for the formulas).

        *queries*: torch tensor or numpy array ``[B, C]`` or ``[C]``, any float dtype and device. The
        output has the same type, dtype, device and shape: unit rows, or scaled back to each query's
        norm with ``restore_norm``. With ``return_neighbours`` a
        :class:`Blended` (features, ids, scores) is returned, ids and scores as ``[B, k]``.
        """
        import torch

        k = self._check_request(queries, k, alpha, weighting, temperature)
        # numpy queries over values in a file stay numpy (a third of torch's per-operation cost on a
        # CPU); tensors, and anything on CUDA, go through torch.
        in_numpy = isinstance(queries, np.ndarray) and not torch.is_tensor(self.values)
        single = queries.ndim == 1
        if in_numpy:
            work = np.asarray(queries, np.float64).reshape(1, -1) if single else np.asarray(queries, np.float64)
        else:
            original = torch.from_numpy(queries) if isinstance(queries, np.ndarray) else queries
            work = (original.reshape(1, -1) if single else original).detach().to(self.device, torch.float64)
        # float64 for the split into direction and norm: float32 squares of a 1e-25 query underflow to 0.
        norm = ((work * work).sum(-1, keepdims=True)) ** 0.5
        _check_norms(norm)  # the one pass over the values that validation needs
        unit = (work / norm).astype(np.float32) if in_numpy else (work / norm).float()
        positions = self._search(unit, k)
        values = self._rows(positions)  # [B, k, C]: one gather, no per-neighbour loop
        if in_numpy:
            scores = np.einsum("bc,bkc->bk", unit, values)  # S_topk = q . F_key, exact
            out = blend(unit, norm.astype(np.float32), scores, values, alpha, weighting, temperature, restore_norm)
            features = (out[0] if single else out).astype(queries.dtype, copy=False)
        else:
            scores = torch.linalg.vecdot(values, unit.unsqueeze(1))  # (a bmm is 7x slower on a CPU)
            out = blend(unit, norm.float(), scores, values, alpha, weighting, temperature, restore_norm)
            features = _like(out[0] if single else out, original, isinstance(queries, np.ndarray))
        if not return_neighbours:
            return features
        ids = self.ids[np.asarray(positions.cpu() if isinstance(positions, torch.Tensor) else positions)]
        if in_numpy or isinstance(queries, np.ndarray):
            scores = np.asarray(scores.cpu() if isinstance(scores, torch.Tensor) else scores)
            return Blended(features, ids[0] if single else ids, scores[0] if single else scores)
        ids, scores = torch.from_numpy(ids).to(original.device), scores.to(original.device)
        return Blended(features, ids[0] if single else ids, scores[0] if single else scores)

    def check(self, queries: Any, k: int, alpha: float, weighting: str, temperature: float,
              restore_norm: bool = False) -> int:
        """Validate a blend request (raising InputError with the reason); returns the k to use.
        Takes a whole ``BlendParams`` tuple: *restore_norm* is valid either way."""
        import torch

        k = self._check_request(queries, k, alpha, weighting, temperature)
        original = torch.from_numpy(queries) if isinstance(queries, np.ndarray) else queries
        _check_norms(original.detach().double().norm(dim=-1))
        return k

    def _check_request(self, queries: Any, k: int, alpha: float, weighting: str, temperature: float) -> int:
        """Everything but the queries' values (see :func:`_check_norms`)."""
        import torch

        if not isinstance(queries, (np.ndarray, torch.Tensor)):
            raise InputError(f"queries must be a torch tensor or a numpy array, not {type(queries).__name__}")
        is_float = queries.dtype.is_floating_point if isinstance(queries, torch.Tensor) else queries.dtype.kind == "f"
        if not is_float:
            raise InputError(f"queries must have a float dtype, not {queries.dtype}")
        if queries.ndim not in (1, 2) or queries.shape[-1] != self.dim:
            raise InputError(f"queries must be [B, {self.dim}] or [{self.dim}]; got shape {tuple(queries.shape)}")
        if queries.ndim == 2 and queries.shape[0] == 0:
            raise InputError("the batch of queries is empty")
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


def _faiss_ids(index, path) -> np.ndarray:
    """The ids an index returns, for the index types :meth:`CacheRetriever.from_faiss` takes."""
    import faiss

    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        if not isinstance(faiss.downcast_index(index.index), faiss.IndexFlat):
            raise InputError(f"{path}: only an IndexIDMap over a flat index is supported")
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    if isinstance(index, faiss.IndexFlat):
        return np.arange(index.ntotal, dtype=np.int64)
    if not isinstance(index, faiss.IndexIVF):
        raise InputError(f"{path}: a {type(index).__name__} is not supported: use an IndexFlatIP or an IVF index "
                         "with a direct map")
    if index.direct_map.type == faiss.DirectMap.NoMap:
        raise InputError(f"{path}: the IVF index has no direct map, so its vectors cannot be read back: "
                         "call index.make_direct_map() and write it again")
    lists = index.invlists
    return np.concatenate([faiss.rev_swig_ptr(lists.get_ids(number), lists.list_size(number)).copy()
                           for number in range(index.nlist)] + [np.zeros(0, np.int64)]).astype(np.int64)


def _check_norms(norms: Any) -> None:
    """Queries whose float64 norms are NaN or infinite (a NaN or infinite value), zero, or too
    small to divide by are refused; one comparison when all are fine."""
    if not isinstance(norms, np.ndarray):  # a few values: numpy's checks cost a tenth of torch's
        norms = norms.detach().cpu().numpy()
    if bool(((norms >= SMALLEST_NORM) & (norms < np.inf)).all()):
        return
    if not np.isfinite(norms).all():
        raise InputError("queries contain NaN or infinite values")
    if bool((norms == 0).any()):
        raise InputError("a query is all zeros: it has no direction to search in")
    raise InputError(f"a query's norm is below {SMALLEST_NORM:.1e}: too small to carry a direction "
                     "(rescale the features)")


def _like(result: "torch.Tensor", original: "torch.Tensor", is_numpy: bool) -> Any:
    out = result.to(device=original.device, dtype=original.dtype)
    return out.numpy() if is_numpy else out
