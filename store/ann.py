"""Build, measure and persist the store's FAISS index (free functions over arrays).

Chosen by size (``kind="auto"``), the largest index that fits the build's budget:

- up to ``ann_threshold`` vectors: exact inner-product search (IndexFlatIP);
- above, while the raw vectors fit ``max_memory``: IVF-Flat (nlist ~ sqrt(n)), whose nprobe is
  tuned to the smallest value reaching ``target_recall`` against exact search. On clustered
  embeddings this builds in seconds and answers in about a millisecond (BENCHMARKS.md), where
  a budget-driven choice spends the whole ``max_query_ms`` budget;
- while a byte per dimension fits: IVF with 8-bit scalar codes (a quarter of the size). It trains
  like IVF-Flat; autofaiss's pick at that size (OPQ + PQ codes, e.g. ``OPQ256_1280,IVF16384_HNSW32,
  PQ256x8`` for 3M x 1024) needs hours of codebook training on a small machine (BENCHMARKS.md);
- above that: the compressed index autofaiss picks for ``max_memory``.

Lossy codes (scalar or product quantized) are searched ``rerank`` x k deep and the candidates
ordered by exact cosine from the id-sorted values file (:mod:`store.values`); ``rerank`` is tuned
like nprobe, so recorded recall and returned scores are those of the exact vectors.

Builds stream (:func:`build_from`): the index is trained on a bounded sample, then one pass over
the rows assigns each batch to its IVF lists (or adds it, for other indexes), writes it to the
values file and folds it into the exact search that recall is measured against; a second pass
adds the codes to lists sized from the assignments. No step holds a second copy of the vectors.
``max_memory`` ("auto": a third of the machine) bounds the whole build: the index may take three
quarters, a batch and the training sample the rest.

FAISS ids are the store's stable ids: IVF indexes keep them in their lists, exact ones are wrapped
in IndexIDMap (not IndexIDMap2, whose id hash table costs ~60 bytes a vector: nothing here
reconstructs by id, the values file serves that).
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol

import numpy as np

from store.delta import merged
from store.errors import InputError, StoreError
from store.files import native_stdout_silenced, progress
from store.values import KeptValues, StoredValues

LOG = logging.getLogger(__name__)
RECALL_K = 10
# Exact neighbours kept per query at a build: 10 more than recall needs, so that after rows are
# removed the true top 10 of what is left is still known (store/update.py measures a delta so).
TRUTH_DEPTH = 20
ANN_KINDS = ("auto", "flat", "ivf", "ivf-sq8", "autofaiss")
RERANK_DEPTHS = (2, 4, 8, 16, 32)  # candidates per result tried for lossy codes


def default_budget() -> int:
    """A third of this machine's memory: what an index build may use unless told otherwise."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 3
    except (ValueError, OSError, AttributeError):  # no sysconf: assume a small machine
        return 4 * 1024 ** 3


def memory_bytes(text: str) -> int:
    """Sizes like 512M, 8G, 1.5g; "auto" is :func:`default_budget`."""
    if str(text).strip().lower() == "auto":
        return default_budget()
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", str(text), re.IGNORECASE)
    if not match:
        raise InputError(f"cannot read the memory size '{text}': use forms like 512M, 4G, 16G")
    return int(float(match.group(1)) * 1024 ** " KMGT".index((match.group(2) or " ").upper()))


@dataclass(frozen=True)
class AnnConfig:
    kind: str = "auto"  # auto | flat | ivf | ivf-sq8 | autofaiss
    ann_threshold: int = 200_000  # auto: exact search up to this many vectors
    max_memory: str = "auto"  # the whole build's budget ("auto": a third of the machine's memory)
    max_query_ms: float = 10.0  # autofaiss max_index_query_time_ms
    target_recall: float = 0.98  # IVF-Flat: smallest nprobe whose measured recall@10 reaches this
    recall_queries: int = 256  # stored vectors sampled as image queries (other sets: store/queries.py)
    tune_queries: tuple[str, ...] = ()  # .npy files of queries of other modalities, kept in the store
    # Changes go into a delta beside the index (store/update.py) until the rows new or changed
    # since the build outnumber (rebuild_growth - 1) x the rows it was built on; then a full build.
    rebuild_growth: float = 2.0
    # Below this many built rows a full build takes a second or two and re-tunes on every query
    # set: no delta is worth keeping beside it.
    delta_min_rows: int = 50_000
    use_gpu: bool | None = None  # None: when faiss sees a GPU
    values_dtype: str = "float16"  # the cache's copy of the vectors, written beside the index

    def __post_init__(self) -> None:
        if self.kind not in ANN_KINDS:
            raise InputError(f"unknown index type '{self.kind}': use {', '.join(ANN_KINDS)}")
        if not 0 < self.target_recall <= 1:
            raise InputError(f"target recall must be within (0, 1], got {self.target_recall}")
        memory_bytes(self.max_memory)


@dataclass(frozen=True)
class BuiltIndex:
    index: object  # faiss.Index
    kind: str
    key: str
    params: str
    recall_at_10: float | None  # the lowest of the query sets' recall: what the worst-served queries get
    recall_queries: int
    seconds: float
    rerank: int = 1  # candidates fetched per result and ordered by exact cosine (1: the index's own order)
    recall: dict[str, float] = field(default_factory=dict)  # query set -> recall@10 (image, text, ...)
    query_sets: dict[str, int] = field(default_factory=dict)  # query set -> queries measured
    target_met: bool | None = None  # every set reached target_recall (False: the query time limit came first)
    truth: GroundTruth | None = None  # what recall was measured against, TRUTH_DEPTH deep


def _faiss():
    import faiss

    return faiss


def gpu_count() -> int:
    faiss = _faiss()
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


class VectorSource(Protocol):
    """Where an index build reads its vectors: in bounded batches, and a random sample."""

    count: int
    dim: int

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids ``[b]`` int64, unit vectors ``[b, dim]`` float32), a bounded *b* at a time."""
        ...

    def all_ids(self) -> np.ndarray:
        """Every id (int64), without the vectors."""
        ...

    def sample(self, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """*count* rows drawn at random, as (ids, vectors)."""
        ...


@dataclass(frozen=True)
class ArraySource:
    """Vectors already in memory (tests, benchmarks, small callers)."""

    ids: np.ndarray
    vectors: np.ndarray
    batch_rows: int = 65_536

    @property
    def count(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def all_ids(self) -> np.ndarray:
        return np.asarray(self.ids, np.int64)

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, self.count, self.batch_rows):
            yield (np.ascontiguousarray(self.ids[start:start + self.batch_rows], np.int64),
                   np.ascontiguousarray(self.vectors[start:start + self.batch_rows], np.float32))

    def sample(self, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        rows = np.sort(np.random.default_rng(seed).choice(self.count, size=min(count, self.count), replace=False))
        return np.asarray(self.ids[rows], np.int64), np.ascontiguousarray(self.vectors[rows], np.float32)


@dataclass(frozen=True)
class GroundTruth:
    """Queries (stored vectors sampled as image queries, then each other set) and their exact
    top-k ids."""

    queries: np.ndarray
    ids: np.ndarray
    sets: dict[str, slice] = field(default_factory=dict)  # set name -> its rows; empty: all are "image"
    scores: np.ndarray | None = None  # the exact inner products of ids

    def named(self) -> dict[str, slice]:
        return self.sets or {"image": slice(0, len(self.queries))}


def build_index(ids: np.ndarray, vectors: np.ndarray, config: AnnConfig = AnnConfig()) -> BuiltIndex:
    """Index *vectors* (L2-normalised, ``[n, dim]``) under *ids* (int64)."""
    return build_from(ArraySource(np.asarray(ids), np.asarray(vectors)), config, KeptValues(ids, vectors))


class ValuesSink(Protocol):
    """Where the build's pass leaves every vector for exact reranking (:mod:`store.values`)."""

    def write(self, ids: np.ndarray, vectors: np.ndarray) -> None: ...

    def finish(self) -> StoredValues: ...


def build_from(source: VectorSource, config: AnnConfig, values: ValuesSink,
               queries: Mapping[str, np.ndarray] | None = None) -> BuiltIndex:
    """Build an index over *source* without holding its vectors: train on a bounded sample, then in
    one pass assign (IVF) or add each batch, hand it to *values* and fold it into the exact search
    recall is measured against; IVF codes go into their presized lists in a second pass. Memory:
    the index itself, one batch, the training sample and 4 bytes a vector of list assignments.
    *queries*: sets of queries of other kinds (text, ...) besides sampled stored vectors; the
    index is tuned until every set reaches the target (store/queries.py)."""
    faiss = _faiss()
    started = time.perf_counter()
    kind = choose_kind(source.count, source.dim, config)
    base, key = trained_index(source, config, kind)
    index = faiss.IndexIDMap(base) if kind == "flat" else base
    truth = _Truth(source, config.recall_queries, TRUTH_DEPTH, queries=queries)
    lists = _ListAssignment(index, source.count) if isinstance(index, faiss.IndexIVF) else None
    budget = f"{memory_bytes(config.max_memory) / 2**30:.1f}G"
    with progress(source.count * (2 if lists else 1), f"index {key} (budget {budget})") as bar:
        for ids, vectors in source.batches():
            if lists is None:
                index.add_with_ids(vectors, ids)
            else:
                lists.assign(ids, vectors)
            values.write(ids, vectors)
            truth.add(ids, vectors)
            bar.update(len(ids))
        if lists is not None:
            lists.add_all(source, bar.update)
    return finished(index, kind, key, values.finish(), truth.finish(), config, started)


def trained_index(source: VectorSource, config: AnnConfig, kind: str) -> tuple[object, str]:
    """The empty index of *kind* for *source*, trained on a bounded sample, and its factory key."""
    faiss = _faiss()
    if kind == "flat":
        return faiss.IndexFlatIP(source.dim), "Flat"
    key = _key(kind, source.count, source.dim, config)
    index = faiss.index_factory(source.dim, key, faiss.METRIC_INNER_PRODUCT)
    _, training = source.sample(_training_rows(index, source, config), seed=0)
    index.train(training)
    return index, key


def finished(index, kind: str, key: str, stored: StoredValues, found: GroundTruth | None, config: AnnConfig,
             started: float) -> BuiltIndex:
    """A filled index with its search parameters tuned and its recall measured."""
    params, rerank = _tune(index, stored, found, config, lossy=_lossy(key)) if kind != "flat" else ("", 1)
    recall = recall_by_set(AnnIndex(index, stored, rerank), found)
    worst = min(recall.values()) if recall else None
    return BuiltIndex(index, kind, key, params, worst, len(found.queries) if found else 0,
                      time.perf_counter() - started, rerank, recall,
                      {name: rows.stop - rows.start for name, rows in found.named().items()} if found else {},
                      None if worst is None else worst >= config.target_recall, found)


def lists_file(index_file: Path) -> Path:
    """Where an index built on disk (store/sharded.py) keeps its inverted lists: beside it."""
    return index_file.with_suffix(".ivfdata")


class _ListAssignment:
    """An IVF index filled in two passes: the first assigns every vector to its list, the second
    adds each batch's codes to lists already sized to hold them. Lists grown add by add double
    their capacity (measured: 1.28x the codes for 4M x 128 SQ8, which at 10M x 512 is 1.4 GB more
    than the codes themselves); the assignments cost 4 bytes a vector and the coarse quantizer
    runs once, as in a single pass."""

    def __init__(self, index, count: int) -> None:
        self.index, self.lists, self.filled, self.batches = index, np.empty(count, np.int32), 0, []

    def assign(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        end = self.filled + len(ids)
        if end > len(self.lists):
            raise StoreError("the table grew during the index build: run `clipdex reindex`")
        self.lists[self.filled:end] = self.index.quantizer.assign(vectors, 1).ravel()
        self.batches.append((len(ids), int(ids[0]), int(ids[-1])))
        self.filled = end

    def add_all(self, source: VectorSource, done: Callable[[int], object] = lambda rows: None) -> None:
        faiss = _faiss()
        lists = faiss.downcast_InvertedLists(self.index.invlists)
        for number, size in enumerate(np.bincount(self.lists[:self.filled], minlength=self.index.nlist).tolist()):
            lists.resize(number, size)  # a vector shrunk keeps its capacity: this reserves the list
            lists.resize(number, 0)
        start, seen = 0, 0
        for (ids, vectors), expected in zip(source.batches(), self.batches):
            if (len(ids), int(ids[0]), int(ids[-1])) != expected:
                raise StoreError("the table changed during the index build: run `clipdex reindex`")
            assigned = self.lists[start:start + len(ids)].astype(np.int64)
            vectors, ids = np.ascontiguousarray(vectors, np.float32), np.ascontiguousarray(ids, np.int64)
            self.index.add_core(len(ids), faiss.swig_ptr(vectors), faiss.swig_ptr(ids), faiss.swig_ptr(assigned))
            start, seen = start + len(ids), seen + 1
            done(len(ids))
        if seen != len(self.batches):
            raise StoreError("the table changed during the index build: run `clipdex reindex`")


MIN_TRAINED_ROWS = 1000  # below, nothing to train an ANN index on; exact search is instant anyway


def choose_kind(count: int, dim: int, config: AnnConfig) -> str:
    if count < MIN_TRAINED_ROWS:
        return "flat"
    if config.kind != "auto":
        return config.kind
    if count <= config.ann_threshold:
        return "flat"
    if count * dim * 4 <= _index_share(config):
        return "ivf"
    return "ivf-sq8" if count * dim <= _index_share(config) else "autofaiss"


def substitution(count: int, asked: str, built: str) -> str | None:
    """Why the kind asked for (``--index-type``) is not the kind built, in words, or None."""
    if asked in ("auto", built):
        return None
    reason = (f"it needs at least {MIN_TRAINED_ROWS:,} rows to train, and the store has {count:,}"
              if count < MIN_TRAINED_ROWS else "it cannot be built here")
    return f"--index-type {asked} was not built: {reason}; built a {built} index instead (exact, as fast at this size)"


def _key(kind: str, count: int, dim: int, config: AnnConfig) -> str:
    lists = f"IVF{2 ** int(round(np.log2(np.sqrt(count))))}"
    return {"ivf": f"{lists},Flat", "ivf-sq8": f"{lists},SQ8"}.get(kind) or _compressed_key(count, dim, config)


def _lossy(key: str) -> bool:
    """Codes that only approximate the vectors: their ranking is refined with the exact values."""
    return bool(re.search(r"(^|,)(SQ\d|PQ|OPQ|LSH|RQ)", key))


def _index_share(config: AnnConfig) -> int:
    """What the index itself may use of the budget: the rest holds a batch and the training sample."""
    return int(memory_bytes(config.max_memory) * 0.75)


def _compressed_key(count: int, dim: int, config: AnnConfig) -> str:
    """The index autofaiss picks for this many vectors within the budget (memory-mappable)."""
    from autofaiss.external.optimize import get_optimal_index_keys_v2

    budget = f"{_index_share(config) // 2**20}M"
    keys = get_optimal_index_keys_v2(count, dim, budget, should_be_memory_mappable=True)
    if not keys:
        raise InputError(f"no index of {count:,} x {dim} vectors fits in {config.max_memory}: "
                         "raise --index-memory")
    return keys[0]


def _training_rows(base, source: VectorSource, config: AnnConfig) -> int:
    """64 per IVF list (FAISS warns under 39), at least 65,536 for PQ codebooks, at most a quarter
    of the budget."""
    ivf = _faiss().try_extract_index_ivf(base)
    wanted = max(64 * ivf.nlist if ivf is not None else 0, 65_536)
    return int(min(source.count, wanted, max(1000, memory_bytes(config.max_memory) // 4 // (source.dim * 4))))


class _Truth:
    """Exact top-k of sampled stored vectors and of each set of *queries*, folded over batches as
    they stream past (faiss.contrib.exhaustive_search's pattern, keeping the stable ids)."""

    def __init__(self, source: VectorSource, count: int, k: int = RECALL_K, seed: int = 1,
                 queries: Mapping[str, np.ndarray] | None = None) -> None:
        _, sampled = source.sample(count, seed) if source.count else (None, np.zeros((0, source.dim), np.float32))
        parts, self.sets, start = [], {}, 0
        for name, rows in {"image": sampled, **(queries or {})}.items():
            if len(rows):
                parts.append(np.ascontiguousarray(rows, np.float32))
                self.sets[name] = slice(start, start + len(rows))
                start += len(rows)
        self.queries = np.concatenate(parts) if parts else np.zeros((0, source.dim), np.float32)
        self.k = min(k, source.count) if len(self.queries) else 0
        self.heap = _faiss().ResultHeap(len(self.queries), self.k, keep_max=True) if self.k else None

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if self.heap is not None and len(vectors):
            faiss = _faiss()
            scores, rows = faiss.knn(self.queries, vectors, min(self.k, len(vectors)), metric=faiss.METRIC_INNER_PRODUCT)
            self.heap.add_result(scores, np.where(rows >= 0, ids[np.maximum(rows, 0)], -1))

    def finish(self) -> GroundTruth | None:
        if self.heap is None:
            return None
        self.heap.finalize()
        return GroundTruth(self.queries, self.heap.I, self.sets, self.heap.D)


def ground_truth(source: VectorSource, queries: int, k: int = RECALL_K, seed: int = 1) -> GroundTruth | None:
    """Exact top-*k* of *queries* stored vectors, in one pass over the source's batches."""
    truth = _Truth(source, queries, k, seed)
    for ids, vectors in source.batches():
        truth.add(ids, vectors)
    return truth.finish()


def recall_by_set(index, truth: GroundTruth | None) -> dict[str, float]:
    """recall@k of each query set of *truth* (one search over all of them)."""
    if truth is None:
        return {}
    k = min(RECALL_K, truth.ids.shape[1])
    _, found = index.search(truth.queries, k)
    hits = np.array([len(set(a) & set(b)) for a, b in zip(truth.ids[:, :k].tolist(), found.tolist())], np.float64)
    return {name: float(hits[rows].sum() / (k * (rows.stop - rows.start)))
            for name, rows in truth.named().items() if rows.stop > rows.start}


def recall_at_k(index, truth: GroundTruth | None) -> float | None:
    """The lowest recall@k of *truth*'s query sets: what the worst-served kind of query gets."""
    recall = recall_by_set(index, truth)
    return min(recall.values()) if recall else None


def _tune(index, values: StoredValues, truth: GroundTruth | None, config: AnnConfig, lossy: bool) -> tuple[str, int]:
    """The smallest power-of-two nprobe whose measured recall reaches the target on every query
    set (an HNSW coarse quantizer searches twice as wide), then for lossy codes the smallest
    rerank depth that does.
    nprobe is judged on candidates reranked 8 deep, so it answers for what probing misses, not
    for what the codes blur (measured: PQ64 codes of 300k x 128 cap recall at 0.62 from nprobe
    16 to 2048)."""
    faiss = _faiss()
    ivf = faiss.extract_index_ivf(index)
    hnsw = isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW)
    space = faiss.ParameterSpace()

    def measure(params: str, depth: int) -> tuple[float | None, float]:
        space.set_index_parameters(index, params)
        started = time.perf_counter()
        recall = recall_at_k(AnnIndex(index, values, depth), truth)
        return recall, (time.perf_counter() - started) * 1000 / max(1, len(truth.queries) if truth else 1)

    probes = [f"nprobe={2 ** i}" + (f",quantizer_efSearch={max(16, 2 ** (i + 1))}" if hnsw else "")
              for i in range(int(np.log2(ivf.nlist)) + 1)]
    params = _smallest(probes, lambda p: measure(p, RERANK_DEPTHS[2] if lossy else 1), config)
    space.set_index_parameters(index, params)
    if not lossy:
        return params, 1
    return params, _smallest((1, *RERANK_DEPTHS), lambda depth: measure(params, depth), config)


def _smallest(settings, measure, config: AnnConfig):
    """The first setting (cheapest first) whose recall reaches the target, unless a query would take
    longer than ``max_query_ms`` or recall stops rising: then the last setting worth its time."""
    chosen, best = None, -1.0
    for setting in settings:
        recall, per_query_ms = measure(setting)
        if chosen is not None and (per_query_ms > config.max_query_ms or (recall is not None and recall <= best)):
            return chosen
        chosen, best = setting, recall if recall is not None else best
        if recall is None or recall >= config.target_recall:
            return chosen
    return chosen


def save_index(index, path: Path) -> None:
    """Write atomically: a reader sees the old index or the new one, never half of one."""
    faiss = _faiss()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    faiss.write_index(index, str(temporary))
    os.replace(temporary, path)


def load_index(path: Path, params: str = "", use_gpu: bool | None = None):
    """Open an index with its IVF inverted lists (the bulk of an ANN index) memory-mapped from the
    file: opening takes milliseconds, pages load as searches touch them, and processes share them.
    A file replaced by a rebuild stays valid for whoever still maps it."""
    faiss = _faiss()
    if lists_file(path).is_file():
        # A scaled-out build's lists are in an .ivfdata file beside it, which FAISS maps itself
        # (IO_FLAG_MMAP on such an index crashes FAISS 1.13); ONDISK_SAME_DIR finds that file
        # beside the index wherever the store has moved since.
        with native_stdout_silenced():
            index = faiss.read_index(str(path), faiss.IO_FLAG_READ_ONLY | faiss.IO_FLAG_ONDISK_SAME_DIR)
    else:
        try:
            index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError:  # an index type FAISS cannot map is read into memory
            index = faiss.read_index(str(path))
    if params:  # nprobe / efSearch chosen by autofaiss for the latency budget
        faiss.ParameterSpace().set_index_parameters(index, params)
    if (gpu_count() > 0 if use_gpu is None else use_gpu) and hasattr(faiss, "index_cpu_to_all_gpus"):
        try:
            return faiss.index_cpu_to_all_gpus(index)
        except RuntimeError as error:  # an index type with no GPU implementation stays on the CPU
            LOG.info("FAISS index stays on CPU: %s", error)
    return index


@dataclass(frozen=True)
class AnnIndex:
    """A FAISS index and the exact values its lossy codes are reranked from."""

    index: object
    values: StoredValues | None = None
    rerank: int = 1
    delta: Any = None  # store.delta.Delta: rows new or changed since the build, searched beside it

    def search(self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None):
        """(scores, ids) ``[n, k]``, ids -1 where fewer than k results exist; exact scores when reranked."""
        depth = self.rerank if self.values is not None else 1
        hidden = self.delta.hidden if self.delta is not None else None
        scores, ids = search(self.index, queries, k * depth, allowed_ids, hidden)
        found = self.values.rerank(queries, ids, k) if depth > 1 else (scores, ids)
        if self.delta is None or not len(self.delta.ids):
            return found
        return merged(found, self.delta.search(queries, k, allowed_ids), k)


def search(index, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None,
           hidden_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) ``[n, k]`` among *allowed_ids* (all, if None) but never *hidden_ids*; ids are
    -1 where fewer than k results exist."""
    faiss = _faiss()
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    hidden = hidden_ids is not None and len(hidden_ids) > 0
    if allowed_ids is None and not hidden:
        return index.search(queries, k)
    if allowed_ids is not None:
        allowed = np.setdiff1d(allowed_ids, hidden_ids) if hidden else allowed_ids
        selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
        # An IVF search scores only the admitted vectors of the lists it probes: as many more lists
        # as the filter is narrow keep it finding what the tuned nprobe finds unfiltered.
        breadth = index.ntotal / max(len(allowed), 1)
        return index.search(queries, k, params=_restricted(index, selector, breadth))
    excluded = faiss.IDSelectorBatch(np.ascontiguousarray(hidden_ids, dtype=np.int64))
    selector = faiss.IDSelectorNot(excluded)
    found = index.search(queries, k, params=_restricted(index, selector))
    del excluded  # the negation points into it: alive until the search is done
    return found


def _restricted(index, selector, breadth: float = 1.0):
    """Search parameters of the index's own type (IVF and HNSW reject the base class), keeping its
    tuned nprobe / efSearch (an IVF's nprobe times *breadth*, up to every list), restricted to
    *selector*."""
    faiss = _faiss()
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        nprobe = min(ivf.nlist, max(ivf.nprobe, int(np.ceil(ivf.nprobe * breadth))))
        return faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    if isinstance(inner, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=selector, efSearch=inner.hnsw.efSearch)
    return faiss.SearchParameters(sel=selector)
