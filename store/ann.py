"""Build, measure and persist the store's FAISS index (free functions over arrays).

Chosen by size (``kind="auto"``):

- up to ``ann_threshold`` vectors: exact inner-product search (IndexFlatIP);
- above, while the raw vectors fit ``max_memory``: IVF-Flat (nlist ~ sqrt(n)), whose nprobe is
  tuned to the smallest value reaching ``target_recall`` against exact search. On clustered
  embeddings this builds in seconds and answers in about a millisecond (BENCHMARKS.md), where
  a budget-driven choice spends the whole ``max_query_ms`` budget;
- above that memory: autofaiss, which picks a compressed index for ``max_memory`` and tunes it
  for ``max_query_ms``. That is where it pays.

Every index is wrapped in IndexIDMap2, so FAISS ids are the store's stable ids.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from store.errors import InputError

LOG = logging.getLogger(__name__)
RECALL_K = 10
ANN_KINDS = ("auto", "flat", "ivf", "autofaiss")


def memory_bytes(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", str(text), re.IGNORECASE)
    if not match:
        raise InputError(f"cannot read the memory size '{text}': use forms like 512M, 4G, 16G")
    return int(float(match.group(1)) * 1024 ** " KMGT".index((match.group(2) or " ").upper()))


@dataclass(frozen=True)
class AnnConfig:
    kind: str = "auto"  # auto | flat | ivf | autofaiss
    ann_threshold: int = 200_000  # auto: exact search up to this many vectors
    max_memory: str = "16G"  # auto: IVF-Flat while the raw vectors fit; autofaiss's memory budget
    max_query_ms: float = 10.0  # autofaiss max_index_query_time_ms
    target_recall: float = 0.98  # IVF-Flat: smallest nprobe whose measured recall@10 reaches this
    recall_queries: int = 256
    use_gpu: bool | None = None  # None: when faiss sees a GPU

    def __post_init__(self) -> None:
        if self.kind not in ANN_KINDS:
            raise InputError(f"unknown index type '{self.kind}': use auto, flat, ivf or autofaiss")
        if not 0 < self.target_recall <= 1:
            raise InputError(f"target recall must be within (0, 1], got {self.target_recall}")
        memory_bytes(self.max_memory)


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
    kind = choose_kind(len(ids), vectors.shape[1], config)
    params = ""
    if kind == "flat":
        base, key = faiss.IndexFlatIP(vectors.shape[1]), "Flat"
    elif kind == "ivf":
        base, key = _ivf_base(vectors)
    else:
        base, key, params = _autofaiss_base(vectors, config)
        base.reset()  # keep the training, re-add under the stable ids below
    index = faiss.IndexIDMap2(base)
    if len(ids):
        index.add_with_ids(vectors, ids)
    if kind == "ivf":
        params = _tune_nprobe(index, ids, vectors, config)
    recall, queries = measure_recall(index, ids, vectors, config.recall_queries)
    return BuiltIndex(index, kind, key, params, recall, queries, time.perf_counter() - started)


def choose_kind(count: int, dim: int, config: AnnConfig) -> str:
    if count < 1000:  # nothing to train an ANN index on; exact is instant anyway
        return "flat"
    if config.kind != "auto":
        return config.kind
    if count <= config.ann_threshold:
        return "flat"
    return "ivf" if count * dim * 4 <= memory_bytes(config.max_memory) else "autofaiss"


def _ivf_base(vectors: np.ndarray):
    faiss = _faiss()
    nlist = 2 ** int(round(np.log2(np.sqrt(len(vectors)))))
    key = f"IVF{nlist},Flat"
    base = faiss.index_factory(vectors.shape[1], key, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(0)
    sample = vectors[rng.choice(len(vectors), size=min(len(vectors), 64 * nlist), replace=False)]
    base.train(sample)
    return base, key


def _tune_nprobe(index, ids: np.ndarray, vectors: np.ndarray, config: AnnConfig) -> str:
    """The smallest power-of-two nprobe whose recall@10 reaches the target (measured, not guessed)."""
    faiss = _faiss()
    ivf = faiss.extract_index_ivf(index)
    nprobe = 1
    while True:
        ivf.nprobe = nprobe
        recall, _ = measure_recall(index, ids, vectors, config.recall_queries, seed=1)
        if recall >= config.target_recall or nprobe >= ivf.nlist:
            return f"nprobe={nprobe}"
        nprobe *= 2


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
    if allowed_ids is None:
        return index.search(queries, k)
    selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed_ids, dtype=np.int64))
    return index.search(queries, k, params=_restricted(index, selector))


def _restricted(index, selector):
    """Search parameters of the index's own type (IVF and HNSW reject the base class), keeping its
    tuned nprobe / efSearch, restricted to *selector*."""
    faiss = _faiss()
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return faiss.SearchParametersIVF(sel=selector, nprobe=ivf.nprobe)
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    if isinstance(inner, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=selector, efSearch=inner.hnsw.efSearch)
    return faiss.SearchParameters(sel=selector)
