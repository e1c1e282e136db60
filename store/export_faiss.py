"""`clipdex export --format faiss`: a ``knn.index`` that ImageBind-LLM's released code loads as it is.

That code (LLaMA-Adapter ``imagebind_LLM``) does ``faiss.read_index("knn.index")``, then
``index.search(feats, k)`` and ``index.reconstruct(i)`` for every neighbour, and blends the
reconstructed features. So the file must answer with row numbers 0..n-1 (no id map: its ids
would be the store's stable ids, and ``reconstruct`` takes row numbers) and ``reconstruct(i)``
must return row i's stored feature exactly. Written beside it, ``NAME.rows.parquet`` says what
each row number is: id, path, caption and the metadata columns.

- ``flat`` (the default, what the authors' 13.3 GB file is: an ``IndexFlatIP``): written as the
  rows stream past, so any size exports in bounded memory. FAISS has no streamed writer; the
  header is FAISS's own (an empty ``IndexFlatIP`` serialised), with its two counts set to the
  rows', followed by the float32 features (FAISS's layout for a flat index).
- ``hnsw`` (``HNSW32,Flat``) and ``ivf`` (IVF-Flat with a direct map, ``nprobe`` tuned to the
  store's recall target and saved in the file): built in memory, so refused past
  ``--index-memory`` with one line naming ``flat``.

Recall@10 of the written file, read back (the flat one memory-mapped), is measured on sampled
rows (image queries) and on the query sets the store keeps (text prompts in its own model):
a flat index is exact, the others are what their recall says.
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from store.ann import AnnConfig, GroundTruth, _Truth, memory_bytes, recall_by_set
from store.errors import InputError
from store.export_target import checked_target, write_beside
from store.files import drop_mapped_pages, progress, writing
from store.queries import kept_query_sets
from store.store import Store
from store.tables import INTERNAL_COLUMNS, VECTOR_COLUMNS, column_vectors

INDEX_TYPES = ("flat", "hnsw", "ivf")
HNSW_LINKS = 32  # HNSW32,Flat: what the authors' tooling (autofaiss) builds when memory allows
BATCH_ROWS = 8192
ROWS_SUFFIX = ".rows.parquet"
RECALL_QUERIES = 256


@dataclass(frozen=True)
class FaissExport:
    """What an export as FAISS wrote."""
    rows: int
    out: str
    rows_out: str
    index_type: str
    bytes: int
    seconds: float
    recall: dict[str, float]  # recall@10 of the written file, per query set


def rows_path(out: Path) -> Path:
    """``knn.rows.parquet`` beside ``knn.index``."""
    return out.with_name(out.stem + ROWS_SUFFIX) if out.suffix else out.with_name(out.name + ROWS_SUFFIX)


def export_faiss(store: Store, out: Path, index_type: str = "flat", index_memory: str = "auto",
                 where: str | None = None, overwrite: bool = False, show_progress: bool = True) -> FaissExport:
    """Write the store's rows (those *where* admits) as a FAISS index at *out* and its row map beside it."""
    import faiss

    started = time.perf_counter()
    if index_type not in INDEX_TYPES:
        raise InputError(f"unknown index type {index_type!r} (one of {', '.join(INDEX_TYPES)})")
    dataset = store.tables.images.to_lance()  # one version from here on
    dim = store.manifest.dim
    try:
        total = dataset.count_rows(filter=where)
    except (ValueError, OSError, RuntimeError) as error:
        raise InputError(f"cannot apply the filter {where!r}: {error}") from error
    if not total:
        raise InputError("no rows to export" + (f" match {where!r}" if where else f": the store {store.directory} is empty"))
    needed = total * (4 * dim + (8 * HNSW_LINKS if index_type == "hnsw" else 8))
    if index_type != "flat" and needed > memory_bytes(index_memory):
        raise InputError(f"a {index_type} index of {total} x {dim} is built in memory (about {needed / 2**30:.1f} GB), "
                         f"over --index-memory {index_memory}: export --index-type flat (written as it streams, "
                         "any size), or raise --index-memory")
    out, existing = checked_target(out, Path(store.directory), "faiss", overwrite)
    rows_out, rows_existing = checked_target(rows_path(out), Path(store.directory), "parquet", overwrite)
    truth = _Truth(_Sampled(dataset, total, dim, where), RECALL_QUERIES, queries=kept_query_sets(store.directory, dim))
    columns = [c for c in dataset.schema.names if c not in (*INTERNAL_COLUMNS, *VECTOR_COLUMNS)] + ["embedding"]
    batches = dataset.scanner(columns=columns, filter=where, batch_size=BATCH_ROWS, batch_readahead=2,
                              fragment_readahead=1).to_batches()
    bar = progress(total, f"export {out.name}", unit="row") if show_progress else None
    built: list = []  # the index built in memory (None: flat, written as it streamed), its ground truth

    def write_rows(rows_sink) -> None:
        def write_index(sink) -> None:
            index = _build(index_type, dim, total, dataset, where) if index_type != "flat" else None
            if index is None:
                sink.write(_flat_header(faiss, dim, total))
            schema = _rows_schema(dataset.schema, columns)
            with pq.ParquetWriter(rows_sink, schema) as writer:
                written = 0
                for batch in batches:
                    vectors = column_vectors(pa.Table.from_batches([batch]))
                    numbers = np.arange(written, written + len(vectors), dtype=np.int64)
                    truth.add(numbers, vectors)
                    if index is None:
                        sink.write(np.ascontiguousarray(vectors, "<f4").tobytes())
                    else:
                        index.add(vectors)
                    meta = pa.Table.from_batches([batch])
                    writer.write_table(pa.table([numbers, *(meta.column(f.name) for f in schema if f.name != "row")],
                                                schema=schema))
                    written += len(vectors)
                    if bar is not None:
                        bar.update(len(vectors))
            if written != total:
                raise InputError(f"the store changed while it was exported ({written} rows read, {total} counted)")
            found = truth.finish()
            if index is not None:
                if index_type == "ivf":
                    faiss.extract_index_ivf(index).make_direct_map()  # reconstruct(i) by row number
                    _tune_nprobe(index, found)
                faiss.write_index(index, faiss.PyCallbackIOWriter(sink.write))
            built.extend([index, found])

        write_beside(out, existing, "faiss", write_index)

    try:
        with writing(out.parent):
            write_beside(rows_out, rows_existing, "parquet", write_rows)
    finally:
        if bar is not None:
            bar.close()
    recall = _recall_of(out, *built)
    return FaissExport(total, str(out), str(rows_out), index_type, out.stat().st_size,
                       round(time.perf_counter() - started, 3), recall)


def _flat_header(faiss, dim: int, rows: int) -> bytes:
    """FAISS's own header of an IndexFlatIP of *dim* with *rows* rows: an empty one serialised,
    its row count (after the fourcc and d) and its count of float32 codes (the last 8 bytes) set."""
    empty = bytearray(faiss.serialize_index(faiss.IndexFlatIP(dim)).tobytes())
    if struct.unpack_from("<q", empty, 8)[0] != 0 or struct.unpack_from("<Q", empty, len(empty) - 8)[0] != 0:
        raise RuntimeError("this FAISS writes IndexFlatIP another way: clipdex's flat export needs updating")
    struct.pack_into("<q", empty, 8, rows)
    struct.pack_into("<Q", empty, len(empty) - 8, rows * dim)
    return bytes(empty)


def _build(index_type: str, dim: int, total: int, dataset, where: str | None):
    """An empty HNSW32,Flat, or an IVF-Flat trained on sampled rows, over inner products."""
    import faiss

    if index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_LINKS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = 64
        return index
    nlist = int(max(1, min(4 * np.sqrt(total), total // 39)))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    _, sample = _Sampled(dataset, total, dim, where).sample(min(total, 64 * nlist), seed=3)
    index.train(sample)
    index.own_fields = True
    quantizer.this.disown()
    return index


def _tune_nprobe(index, truth: GroundTruth | None) -> None:
    """The smallest power-of-two nprobe whose recall@10 reaches clipdex's target on every query set,
    kept in the file (the released code searches with what the file says)."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    for power in range(int(np.log2(ivf.nlist)) + 2):
        ivf.nprobe = min(2 ** power, ivf.nlist)
        recall = recall_by_set(index, truth)
        if not recall or min(recall.values()) >= AnnConfig.target_recall:
            return


def _recall_of(out: Path, index, truth: GroundTruth | None) -> dict[str, float]:
    """recall@10 per query set of the file as written. A flat one is searched from its bytes on
    disk a block at a time, each block's pages let go once searched (FAISS reading it
    memory-mapped would count all 12 GB of a 3M x 1024 file in this process's memory)."""
    if index is not None:
        return recall_by_set(index, truth)
    import faiss

    if truth is None:
        return {}
    header = faiss.read_index(str(out), faiss.IO_FLAG_MMAP_IFC)  # FAISS reads the header: counts and width
    rows, dim = header.ntotal, header.d
    del header
    body = np.memmap(out, np.float32, "r", offset=out.stat().st_size - 4 * rows * dim, shape=(rows, dim))
    k = truth.ids.shape[1]
    heap = faiss.ResultHeap(len(truth.queries), k, keep_max=True)
    step = max(1, (64 << 20) // (4 * dim))
    for start in range(0, rows, step):
        block = body[start:start + step]
        scores, found = faiss.knn(truth.queries, np.ascontiguousarray(block), min(k, len(block)),
                                  metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, np.where(found >= 0, found + start, -1))
        drop_mapped_pages(block)
    heap.finalize()
    return recall_by_set(_Searched(heap.D, heap.I), truth)


class _Searched:
    """Neighbours already found, as recall_by_set asks an index for them."""

    def __init__(self, scores: np.ndarray, ids: np.ndarray) -> None:
        self.scores, self.ids = scores, ids

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.scores[:, :k], self.ids[:, :k]


def _rows_schema(schema: pa.Schema, columns: list[str]) -> pa.Schema:
    return pa.schema([pa.field("row", pa.int64(), nullable=False),
                      *(schema.field(name) for name in columns if name != "embedding")])


class _Sampled:
    """Rows of one table version drawn at random, as :class:`store.ann._Truth` samples its image queries."""

    def __init__(self, dataset, count: int, dim: int, where: str | None) -> None:
        self.dataset, self.count, self.dim, self.where = dataset, count, dim, where

    def sample(self, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        picks = np.sort(np.random.default_rng(seed).choice(self.count, min(count, self.count), replace=False))
        if self.where is None:
            vectors = column_vectors(self.dataset.take(picks.tolist(), columns=["embedding"]))
        else:  # the admitted rows are not the table's positions: their ids (8 bytes a row), then those rows
            ids = self.dataset.to_table(columns=["id"], filter=self.where).column("id").to_numpy()[picks]
            vectors = column_vectors(self.dataset.to_table(columns=["embedding"],
                                                           filter=f"id IN ({','.join(map(str, ids))})"))
        return picks, np.ascontiguousarray(vectors, np.float32)


def faiss_summary_line(summary: FaissExport) -> str:
    recall = ", ".join(f"{name} {value:.4f}" for name, value in sorted(summary.recall.items()))
    return (f"exported {summary.rows} rows to {summary.out} ({summary.index_type}, {summary.bytes / 1e6:.1f} MB) "
            f"and their row map to {os.path.basename(summary.rows_out)} in {summary.seconds:.1f}s; "
            f"recall@10 {recall or 'not measured'}.")
