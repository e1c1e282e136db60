"""Features in a column of a table file (Parquet, or CSV), the other columns being the metadata;
also where any table's embedding column is found and split off (:mod:`store.sources.lance`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from store.errors import InputError, first_line
from store.sources.base import Part, PartSchema, read_table, table_schema

EMBEDDING_COLUMNS = ("embedding", "embeddings", "emb", "vector", "image_embedding", "img_emb")


class TableFile:
    name = "parquet"
    describe = "a Parquet (or CSV) file with an embedding column (a list of floats)"

    def detect(self, path: Path) -> bool:
        return path.suffix.lower() in (".parquet", ".csv") and not path.is_dir()

    def schema(self, path: Path, metadata: Path | None = None) -> PartSchema:
        return table_part_schema(table_schema(path), path, lambda column: _first_value(path, column))

    def parts(self, path: Path, metadata: Path | None = None) -> Iterator[Part]:
        features, meta = split_embedding(read_table(path), path)
        yield Part(str(path), features, meta)


def embedding_column(names: list[str], source: Path) -> str:
    column = next((c for c in EMBEDDING_COLUMNS if c in names), None)
    if column is None:
        raise InputError(f"{source} has no embedding column (looked for {', '.join(EMBEDDING_COLUMNS)})")
    return column


def split_embedding(table: pa.Table, source: Path) -> tuple[np.ndarray, pa.Table]:
    """The embedding column as ``[n, dim]`` features, and the table without it."""
    column = embedding_column(table.column_names, source)
    values = table.column(column).combine_chunks()
    if values.null_count:
        raise InputError(f"{source}: column '{column}' has {values.null_count} empty rows")
    if pa.types.is_fixed_size_list(values.type):
        features = values.values.to_numpy(zero_copy_only=False).reshape(len(values), values.type.list_size)
    else:
        lengths = set(pa.compute.list_value_length(values).to_pylist())
        if len(lengths) != 1:
            raise InputError(f"{source}: embeddings in '{column}' have different lengths {sorted(lengths)[:5]}")
        features = values.flatten().to_numpy(zero_copy_only=False).reshape(len(values), lengths.pop())
    return features, table.drop_columns([column])


def table_part_schema(schema: pa.Schema, source: Path, first_value) -> PartSchema:
    """*schema*'s embedding dimension and its other columns. The dimension is the type's for a
    fixed-size list, else the length of the first row, which ``first_value(column)`` reads; None
    where neither tells (an empty table, a column of another type), for the full read to refuse."""
    column = embedding_column(schema.names, source)
    kind = schema.field(column).type
    dim = None
    if pa.types.is_fixed_size_list(kind):
        dim = kind.list_size
    elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
        first = first_value(column)
        dim = len(first) if first is not None and first.is_valid else None
    return PartSchema(dim, tuple(name for name in schema.names if name != column))


def _first_value(path: Path, column: str) -> pa.Scalar | None:
    import pyarrow.parquet as pq

    try:
        batch = next(pq.ParquetFile(path).iter_batches(batch_size=1, columns=[column]), None)
    except (OSError, pa.ArrowInvalid, ValueError) as error:
        raise InputError(f"cannot read {path}: {first_line(error)}") from error
    return batch.column(0)[0] if batch is not None and batch.num_rows else None
