"""Build, measure and persist the store's FAISS index (free functions over arrays).

Exact inner-product search (IndexFlatIP) is the right answer below a few hundred thousand
vectors; above that autofaiss picks and trains an ANN index within the given memory and latency
budgets. Either way the index is wrapped in IndexIDMap2, so FAISS ids are the store's stable ids.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from store.errors import InputError

LOG = logging.getLogger(__name__)
RECALL_K = 10


@dataclass(frozen=True)
class AnnConfig:
    kind: str = "auto"  # auto | flat | autofaiss
    ann_threshold: int = 200_000  # auto: exact search up to this many vectors
    max_memory: str = "4G"  # autofaiss max_index_memory_usage
    max_query_ms: float = 10.0  # autofaiss max_index_query_time_ms
    recall_queries: int = 256
    use_gpu: bool | None = None  # None: when faiss sees a GPU

    def __post_init__(self) -> None:
        if self.kind not in ("auto", "flat", "autofaiss"):
            raise InputError(f"unknown index type '{self.kind}': use auto, flat or autofaiss")


@dataclass(frozen=True)
class BuiltIndex:
    index: object  # faiss.Index
    kind: str
    key: str
    params: str
    recall_at_10: float | None
    recall_queries: int
    seconds: float


def _faiss():
    import faiss

    return faiss


def gpu_count() -> int:
    faiss = _faiss()
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def build_index(ids: np.ndarray, vectors: np.ndarray, config: AnnConfig = AnnConfig()) -> BuiltIndex:
    """Index *vectors* (L2-normalised, ``[n, dim]`` float32) under *ids* (int64)."""
    faiss = _faiss()
    started = time.perf_counter()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    kind = config.kind
    if kind == "auto":
        kind = "autofaiss" if len(ids) > config.ann_threshold else "flat"
    if kind == "flat" or len(ids) < 1000:  # autofaiss cannot train on a handful of vectors
        base, key, params, kind = faiss.IndexFlatIP(vectors.shape[1]), "Flat", "", "flat"
    else:
        base, key, params = _autofaiss_base(vectors, config)
        base.reset()  # keep the training, re-add under the stable ids below
    index = faiss.IndexIDMap2(base)
    if len(ids):
        index.add_with_ids(vectors, ids)
    recall, queries = measure_recall(index, ids, vectors, config.recall_queries)
    return BuiltIndex(index, kind, key, params, recall, queries, time.perf_counter() - started)


def _autofaiss_base(vectors: np.ndarray, config: AnnConfig):
    from autofaiss import build_index as autofaiss_build

    use_gpu = gpu_count() > 0 if config.use_gpu is None else config.use_gpu
    # autofaiss draws its own progress bars on stderr; clipdex reports the build itself.
    with tempfile.TemporaryDirectory(prefix="clipdex-autofaiss-") as scratch, \
            contextlib.redirect_stderr(io.StringIO()):
        index, infos = autofaiss_build(
            vectors, save_on_disk=False, index_path=None, index_infos_path=os.path.join(scratch, "infos.json"),
            metric_type="ip", max_index_memory_usage=config.max_memory,
            max_index_query_time_ms=config.max_query_ms, current_memory_available="16G",
            use_gpu=use_gpu, verbose=logging.WARNING)
    if index is None:
        raise InputError(f"autofaiss found no index within {config.max_memory} and {config.max_query_ms} ms; "
                         "raise --index-memory or --max-query-ms, or use --index-type flat")
    infos = infos or {}
    return index, infos.get("index_key", ""), infos.get("index_param", "")


def measure_recall(index, ids: np.ndarray, vectors: np.ndarray, queries: int, k: int = RECALL_K,
                   seed: int = 0) -> tuple[float | None, int]:
    """recall@k of *index* against exact search, on *queries* stored vectors used as queries."""
    faiss = _faiss()
    if len(ids) == 0:
        return None, 0
    rng = np.random.default_rng(seed)
    sample = vectors[rng.choice(len(ids), size=min(queries, len(ids)), replace=False)]
    k = min(k, len(ids))
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, truth = exact.search(sample, k)
    _, found = index.search(sample, k)
    truth_ids = ids[truth]
    hits = [len(set(a) & set(b)) for a, b in zip(truth_ids.tolist(), found.tolist())]
    return float(np.sum(hits) / (len(sample) * k)), len(sample)


def save_index(index, path: Path) -> None:
    """Write atomically: a reader sees the old index or the new one, never half of one."""
    faiss = _faiss()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    faiss.write_index(index, str(temporary))
    os.replace(temporary, path)


def load_index(path: Path, params: str = "", use_gpu: bool | None = None):
    faiss = _faiss()
    index = faiss.read_index(str(path))
    if params:  # nprobe / efSearch chosen by autofaiss for the latency budget
        faiss.ParameterSpace().set_index_parameters(index, params)
    if (gpu_count() > 0 if use_gpu is None else use_gpu) and hasattr(faiss, "index_cpu_to_all_gpus"):
        try:
            return faiss.index_cpu_to_all_gpus(index)
        except RuntimeError as error:  # an index type with no GPU implementation stays on the CPU
            LOG.info("FAISS index stays on CPU: %s", error)
    return index


def search(index, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) ``[n, k]``; ids are -1 where fewer than k results exist."""
    faiss = _faiss()
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    search_params = None
    if allowed_ids is not None:
        selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed_ids, dtype=np.int64))
        search_params = faiss.SearchParameters(sel=selector)
    return index.search(queries, k, params=search_params) if search_params else index.search(queries, k)
