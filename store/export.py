"""`clipdex export`: a store's rows as Parquet, CSV or clip-retrieval shards, streamed.

Rows are read from one version of the images table (a writer committing meanwhile changes
nothing that is being exported) in batches of bounded size and written as they come, so memory
does not grow with the store. The output appears under its name only when complete: it is
written under a temporary name beside it and renamed.

Export writes only where it should (:mod:`store.export_target`). ``stream`` writes CSV or
Parquet to an open binary stream instead (``--out -``). An ``s3://`` or ``gs://`` target is
written through fsspec (:mod:`store.export_remote`).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from store.errors import InputError, StoreError, first_line
from store.export_remote import Opener, write_remote
from store.export_target import checked_target, write_beside
from store.files import progress, writing
from store.remote import StorageOptions, is_url
from store.store import Store
from store.tables import INTERNAL_COLUMNS, VECTOR_COLUMNS

FORMATS = ("parquet", "csv", "clip-retrieval", "faiss")  # faiss: store/export_faiss.py
VECTORS = VECTOR_COLUMNS
# The exact bytes behind `path`, a link's target, the file's inode: for clipdex's server, not for readers.
HIDDEN = INTERNAL_COLUMNS
BATCH_BYTES = 32 << 20  # of vectors per batch read
MIN_BATCH_ROWS = 256
STDOUT = "-"  # --out - : standard output (CSV unless --format parquet)


@dataclass(frozen=True)
class ExportConfig:
    out: Path | str  # a path, or an s3:// or gs:// URL
    format: str = "parquet"
    columns: tuple[str, ...] = ()  # () = every column but HIDDEN (and vectors in CSV)
    where: str | None = None  # a condition already checked by search.filters.parse_filter
    overwrite: bool = False
    shard_rows: int = 1_000_000  # rows per clip-retrieval shard
    progress: bool = True
    storage_options: StorageOptions = ()  # for an s3:// or gs:// target (store.remote)


@dataclass(frozen=True)
class ExportSummary:
    rows: int
    out: str
    format: str
    columns: tuple[str, ...]
    bytes: int
    seconds: float
    note: str = ""


def format_for(out: str | os.PathLike, given: str | None) -> str:
    """The format asked for, else the one *out*'s extension names (CSV for standard output)."""
    if given:
        return given
    if os.fspath(out) == STDOUT:
        return "csv"
    suffix = Path(out).suffix.lower()
    if suffix in (".parquet", ".csv"):
        return suffix[1:]
    if suffix in (".index", ".faiss"):
        return "faiss"
    raise InputError(f"cannot tell the format from {out}: name a .parquet, .csv or .index file, or pass --format")


def export_store(store: Store, config: ExportConfig, stream: BinaryIO | None = None) -> ExportSummary:
    """Write the rows *config* asks for to ``config.out``, or to *stream* (CSV or Parquet) when given."""
    started = time.perf_counter()
    dataset = store.tables.images.to_lance()  # one version from here on
    columns = _columns(dataset.schema, config)
    remote = stream is None and is_url(str(config.out))
    if stream is None and not remote:
        out, existing = checked_target(Path(config.out), Path(store.directory), config.format, config.overwrite)
    elif stream is not None and config.format == "clip-retrieval":
        raise InputError("a clip-retrieval export is a folder of shards: name one with --out")
    try:
        total = dataset.count_rows(filter=config.where)
    except (ValueError, OSError, RuntimeError) as error:
        raise InputError(f"cannot apply the filter {config.where!r}: {first_line(error)}") from error
    dim = store.manifest.dim
    missing = (dataset.count_rows(filter=_both(config.where, "caption_embedding IS NULL"))
               if "caption_embedding" in columns else 0)
    schema = _output_schema(dataset.schema, columns, dim,
                            ragged=("caption_embedding",) if missing and config.format == "parquet" else ())
    with_text, note = False, ""
    if config.format == "clip-retrieval" and "caption_embedding" in columns:
        with_text = missing == 0
        note = "" if with_text else f"text_emb/ not written: {missing} of {total} rows have no caption embedding"
    rows_per_batch = max(MIN_BATCH_ROWS, BATCH_BYTES // (4 * dim * max(1, sum(c in VECTORS for c in columns))))
    batches = dataset.scanner(columns=list(columns), filter=config.where, batch_size=rows_per_batch,
                              batch_readahead=2, fragment_readahead=1).to_batches()
    bar = progress(total, f"export {Path(config.out).name}", unit="row") if config.progress else None

    def write(target) -> None:  # a new folder (or an opener of parts) for clip-retrieval, else an open binary stream
        if config.format == "clip-retrieval":
            opener = _folder_opener(target) if isinstance(target, Path) else target
            _clip_retrieval(batches, opener, total, schema, (config.shard_rows, with_text), bar)
        else:
            _table_file(batches, target, config.format, schema, bar)

    try:
        if stream is not None:
            sink = _Counted(stream)
            write(sink)
            stream.flush()
            size = sink.written
        elif remote:
            size = write_remote(str(config.out), config.storage_options, config.format, config.overwrite,
                                lambda target: write(target if config.format == "clip-retrieval" else _Counted(target)))
        else:
            with writing(out.parent):
                size = write_beside(out, existing, config.format, write)
    finally:
        if bar is not None:
            bar.close()
    return ExportSummary(total, STDOUT if stream is not None else str(config.out), config.format, columns, size,
                         round(time.perf_counter() - started, 3), note)


class _Counted:
    """A binary stream that counts the bytes written to it and tells that count as its position:
    a pipe cannot tell its own, and Parquet needs one."""

    closed = False

    def __init__(self, stream: BinaryIO) -> None:
        self.stream, self.written = stream, 0

    def write(self, data) -> int:
        self.stream.write(data)
        size = memoryview(data).nbytes
        self.written += size
        return size

    def tell(self) -> int:
        return self.written

    def flush(self) -> None:
        self.stream.flush()

    def writable(self) -> bool:
        return True


def _both(where: str | None, condition: str) -> str:
    return condition if where is None else f"({where}) AND {condition}"


def _columns(schema: pa.Schema, config: ExportConfig) -> tuple[str, ...]:
    names = schema.names
    if config.format not in FORMATS:
        raise InputError(f"unknown export format '{config.format}' (one of {', '.join(FORMATS)})")
    if config.columns:
        unknown = [c for c in config.columns if c not in names]
        if unknown:
            raise InputError(f"the store has no column {', '.join(unknown)} (columns: {', '.join(names)})")
        chosen = list(dict.fromkeys(config.columns))
    else:
        chosen = [c for c in names if c not in HIDDEN and not (config.format == "csv" and c in VECTORS)]
    if config.format == "csv" and any(c in VECTORS for c in chosen):
        raise InputError("a CSV file holds no vectors: leave embedding and caption_embedding out of --columns, "
                         "or export to .parquet")
    if config.format == "clip-retrieval":
        chosen = ["embedding", *(c for c in chosen if c != "embedding")]
        if "path" not in chosen:
            chosen.insert(1, "path")
    return tuple(chosen)


def _output_schema(schema: pa.Schema, columns: tuple[str, ...], dim: int, ragged: tuple[str, ...] = ()) -> pa.Schema:
    """*columns* of *schema*, vectors as fixed-size lists of *dim* floats whatever list type the store
    keeps them in; those in *ragged* (a vector column with null rows, for Parquet) as plain lists,
    each row still *dim* floats: pyarrow up to 25 cannot read a null fixed-size list back from a
    Parquet file (apache/arrow#35692), though it writes one."""
    def vector(name: str) -> pa.DataType:
        return pa.list_(pa.float32()) if name in ragged else pa.list_(pa.float32(), dim)

    return pa.schema([pa.field(c, vector(c)) if c in VECTORS else schema.field(c) for c in columns])


def _conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([_conformed(column, field.type) for column, field in zip(batch.columns, schema)],
                                      schema=schema)


def _conformed(column: pa.Array, kind: pa.DataType) -> pa.Array:
    """*column* as *kind*. Vectors are rebuilt, never cast: pyarrow crashes (SIGSEGV) casting the
    all-null caption_embedding batches Lance reads from a store without captions (their values
    buffer is an empty, dangling one) to a fixed-size list. A null row of a fixed-size list gets
    zeros under its null bit (``pa.nulls`` of one has no values, which Parquet readers reject)."""
    if column.type == kind and (column.null_count < len(column) or not pa.types.is_fixed_size_list(kind)):
        return column
    if not (pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind)):
        return column.cast(kind)
    rows, dim = len(column), kind.list_size if pa.types.is_fixed_size_list(kind) else _width(column)
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    if not valid.any() and pa.types.is_list(kind):
        return pa.nulls(rows, kind)  # all offsets 0: a valid empty list column
    values = np.zeros(0, kind.value_type.to_pandas_dtype())
    if valid.any():  # never flatten an all-null batch
        values = column.flatten().cast(kind.value_type).to_numpy(zero_copy_only=False)  # valid rows' only
        if len(values) != int(valid.sum()) * dim:
            raise StoreError(f"a vector column holds rows of other than {dim} values")
    mask = None if valid.all() else pa.array(~valid)
    if pa.types.is_list(kind):
        offsets = np.concatenate([[0], np.cumsum(np.where(valid, dim, 0))]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values), type=kind, mask=mask)
    full = np.zeros((rows, dim), values.dtype)
    full[valid] = values.reshape(-1, dim)
    return pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1)), type=kind, mask=mask)


def _width(column: pa.Array) -> int:
    """How many values each valid row of a list column holds (0 if none is valid)."""
    if pa.types.is_fixed_size_list(column.type):
        return column.type.list_size
    lengths = pc.unique(pc.drop_null(pc.list_value_length(column))).to_pylist()
    if len(lengths) > 1:
        raise StoreError(f"a vector column holds rows of different lengths {sorted(lengths)[:5]}")
    return lengths[0] if lengths else 0


def _table_file(batches, sink, kind: str, schema: pa.Schema, bar) -> None:
    """*batches* as one Parquet or CSV file written to *sink*, an open binary stream (left open)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    writer = pq.ParquetWriter(sink, schema) if kind == "parquet" else pacsv.CSVWriter(sink, schema)
    with writer:
        for batch in batches:
            writer.write_batch(_conform(batch, schema))
            if bar is not None:
                bar.update(batch.num_rows)


def _folder_opener(folder: Path) -> Opener:
    """Parts of a clip-retrieval export as new files in *folder* (a fresh temporary one)."""
    def opener(name: str) -> BinaryIO:
        path = folder / name
        path.parent.mkdir(exist_ok=True)
        return open(path, "xb")

    return opener


def _clip_retrieval(batches, opener: Opener, total: int, schema: pa.Schema, shards_as: tuple[int, bool],
                    bar) -> None:
    """img_emb/img_emb_N.npy (float32) with metadata/metadata_N.parquet, N zero-padded as
    clip-retrieval pads it, and text_emb/text_emb_N.npy when *with_text*, each opened by *opener*
    (files in a folder, objects under a prefix). Each shard is written as rows arrive, so none is
    ever held whole. *shards_as*: (rows per shard, with_text)."""
    import pyarrow.parquet as pq

    shard_rows, with_text = shards_as
    dim = schema.field("embedding").type.list_size
    meta_schema = pa.schema([pa.field("image_path" if f.name == "path" else f.name, f.type)
                             for f in schema if f.name not in VECTORS])
    shards = max(1, math.ceil(total / shard_rows))
    digits = int(math.log10(shards)) + 1
    pending = _Rows(batches, schema)
    for number in range(shards):
        name, rows = str(number).zfill(digits), min(shard_rows, total - number * shard_rows)
        with contextlib.ExitStack() as files:
            images = files.enter_context(_NpyWriter(opener(f"img_emb/img_emb_{name}.npy"), rows, dim))
            texts = (files.enter_context(_NpyWriter(opener(f"text_emb/text_emb_{name}.npy"), rows, dim))
                     if with_text else None)
            meta_file = files.enter_context(opener(f"metadata/metadata_{name}.parquet"))
            meta = files.enter_context(pq.ParquetWriter(meta_file, meta_schema))
            filled = 0
            while filled < rows:
                part = pending.take(rows - filled)
                images.write(_matrix(part.column("embedding"), dim))
                if texts is not None:
                    texts.write(_matrix(part.column("caption_embedding"), dim))
                meta.write_batch(pa.RecordBatch.from_arrays(
                    [part.column(f.name if f.name != "image_path" else "path") for f in meta_schema],
                    schema=meta_schema))
                filled += part.num_rows
                if bar is not None:
                    bar.update(part.num_rows)


class _NpyWriter:
    """A float32 ``.npy`` file of known shape written row block by row block: written, not mapped,
    because a mapping's dirty pages count in the exporter's memory until the kernel writes them
    back (a 3M x 1024 export peaked at 5.3 GB mapped)."""

    def __init__(self, handle: BinaryIO, rows: int, dim: int) -> None:
        self.handle, self.rows, self.dim, self.written = handle, rows, dim, 0
        self.path = getattr(handle, "name", getattr(handle, "path", "a shard"))

    def __enter__(self) -> "_NpyWriter":
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                  "shape": (self.rows, self.dim)}
        np.lib.format.write_array_header_1_0(self.handle, header)
        return self

    def write(self, block: np.ndarray) -> None:
        self.handle.write(np.ascontiguousarray(block, np.float32).tobytes())
        self.written += len(block)

    def __exit__(self, *error) -> None:
        self.handle.close()
        if error[0] is None and self.written != self.rows:
            raise StoreError(f"{self.path}: wrote {self.written} of {self.rows} rows")


def _matrix(column: pa.Array, dim: int) -> np.ndarray:
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)  # flatten, not .values: slices


class _Rows:
    """Conformed batches, handed out *count* rows at a time across batch boundaries."""

    def __init__(self, batches, schema: pa.Schema) -> None:
        self.batches, self.schema, self.batch, self.at = iter(batches), schema, None, 0

    def take(self, count: int) -> pa.RecordBatch:
        while self.batch is None or self.at == self.batch.num_rows:
            batch = next(self.batches, None)
            if batch is None:
                raise StoreError("the images table changed while it was being exported")
            self.batch, self.at = _conform(batch, self.schema), 0
        part = self.batch.slice(self.at, count)
        self.at += part.num_rows
        return part
