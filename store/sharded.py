"""An IVF build that scales out: FAISS's recipe for billion-scale indexes.

The coarse quantizer (and the scalar quantizer) are trained once, on a sample, where the build
runs. Shards of the table are then added to copies of the trained index by any parallel map
(Ray tasks on a cluster, see indexer/ray_engine.py), each written to a shard file, and the
shards' inverted lists are merged on disk (``faiss.contrib.ondisk.merge_ondisk``) into one
``.ivfdata`` file beside the index, which readers map. The driver never holds the codes; it
streams the rows once more for the values file and the recall measurement, as the local build
does.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from store.ann import (
    TRUTH_DEPTH,
    AnnConfig,
    BuiltIndex,
    ValuesSink,
    _faiss,
    _Truth,
    build_from,
    choose_kind,
    finished,
    trained_index,
)
from store.errors import StoreError
from store.files import native_stdout_silenced, progress
from store.tables import LanceVectorSource, ids_and_vectors

SCALABLE_KINDS = ("ivf", "ivf-sq8")
ParallelMap = Callable[[Callable[[Any], Any], Sequence[Any]], list]


@dataclass(frozen=True)
class Workers:
    """Where a build's shards run: a parallel map (Ray tasks, or any map that keeps order) and how
    many shards to cut the table into. One object, so the two never travel apart."""
    map: ParallelMap
    shards: int


@dataclass(frozen=True)
class ShardJob:
    """Rows [offset, offset + count) of one version of the table, into one shard file."""
    trained: str
    uri: str
    version: int
    offset: int
    count: int
    out: str
    batch_rows: int = 65_536


def add_shard(job: ShardJob) -> int:
    """Runs wherever the map puts it (it reads the table and writes the shard on the shared
    store); returns the rows it added."""
    import lance

    faiss = _faiss()
    index = faiss.read_index(job.trained)
    scanner = lance.dataset(job.uri, version=job.version).scanner(
        columns=["id", "embedding"], offset=job.offset, limit=job.count, batch_size=job.batch_rows)
    for batch in scanner.to_batches():
        if batch.num_rows:
            ids, vectors = ids_and_vectors(batch)
            index.add_with_ids(vectors, ids)
    faiss.write_index(index, job.out)
    return int(index.ntotal)


def build_sharded(source: LanceVectorSource, config: AnnConfig, values: ValuesSink, workers: Workers,
                  ivfdata: Path, queries: Mapping[str, np.ndarray] | None = None) -> BuiltIndex:
    """An IVF index over *source* with its lists in *ivfdata*; other kinds (exact search for a
    small table, autofaiss's compressed ones) are built where this runs, as locally."""
    faiss = _faiss()
    started = time.perf_counter()
    kind = choose_kind(source.count, source.dim, config)
    if kind not in SCALABLE_KINDS:
        return build_from(source, config, values, queries)
    index, key = trained_index(source, config, kind)
    work = ivfdata.with_name(f".{ivfdata.stem}.shards")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        faiss.write_index(index, str(work / "trained.faiss"))
        bounds = np.linspace(0, source.count, max(1, workers.shards) + 1).astype(np.int64)
        jobs = [ShardJob(str(work / "trained.faiss"), source.uri, source.version, int(start), int(stop - start),
                         str(work / f"shard-{number:04d}.faiss"))
                for number, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])) if stop > start]
        added = sum(workers.map(add_shard, jobs))
        if added != source.count:
            raise StoreError("the table changed during the index build: run `clipdex reindex`")
        truth = _Truth(source, config.recall_queries, TRUTH_DEPTH, queries=queries)
        with progress(source.count, f"values and recall for {key}") as bar:
            for ids, vectors in source.batches():
                values.write(ids, vectors)
                truth.add(ids, vectors)
                bar.update(len(ids))
        stored, found = values.finish(), truth.finish()
        from faiss.contrib.ondisk import merge_ondisk

        with native_stdout_silenced():
            merge_ondisk(index, [job.out for job in jobs], str(ivfdata))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return finished(index, kind, key, stored, found, config, started)
