"""What every features reader yields, the interface it implements, and the readers they share."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa

from store.errors import InputError, first_line


@dataclass(frozen=True)
class Part:
    """One file or shard of a source: the unit the importer checks, streams and commits."""
    name: str  # what errors and the progress bar call it; also its key prefix without metadata
    features: np.ndarray  # [n, dim], any float dtype, usually memory-mapped
    metadata: pa.Table | None = None  # row-aligned with *features*
    texts: np.ndarray | None = None  # caption features, [n, dim] like *features*


@dataclass(frozen=True)
class PartSchema:
    """What a source holds, told without reading its rows: enough to refuse it before writing."""
    dim: int | None  # None: not told without reading the rows (the parts then check each one)
    columns: tuple[str, ...] = ()  # metadata column names (of the first part, for a folder)


class Reader(Protocol):
    """One layout `clipdex import` accepts. A new layout is one module with one of these, listed
    in :data:`store.sources.READERS`."""
    name: str
    describe: str  # one phrase naming the layout, for --help and the error for an unknown one

    def detect(self, path: Path) -> bool:
        """Whether *path* (which exists) is in this layout; cheap, reads no rows."""
        ...

    def schema(self, path: Path, metadata: Path | None = None) -> PartSchema:
        ...

    def parts(self, path: Path, metadata: Path | None = None) -> Iterator[Part]:
        """The parts of *path* in a stable order, each read (mapped) only when reached."""
        ...


def is_lance(path: Path) -> bool:
    return path.suffix.lower() == ".lance" or (path / "_versions").is_dir()


def read_table(path: Path) -> pa.Table:
    """A metadata (or features) table: Parquet, CSV or a Lance table folder."""
    return _table(path, whole=True)


def table_schema(path: Path) -> pa.Schema:
    """The schema of what :func:`read_table` reads, from the file's header alone."""
    return _table(path, whole=False)


def _table(path: Path, whole: bool):
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        if path.suffix.lower() == ".parquet":
            return pq.read_table(path) if whole else pq.read_schema(path)
        if path.suffix.lower() == ".csv":
            return pacsv.read_csv(path) if whole else pacsv.open_csv(path).schema
        if is_lance(path):
            import lancedb

            table = lancedb.connect(str(path.parent)).open_table(path.stem)
            return table.to_arrow() if whole else table.schema
    except (OSError, pa.ArrowInvalid, ValueError) as error:
        raise InputError(f"cannot read {path}: {first_line(error)}") from error
    raise InputError(f"{path}: unsupported metadata format (use .parquet, .csv or a .lance table)")


def load_npy(path: Path) -> np.ndarray:
    """A ``[rows, dim]`` array, memory-mapped: only its header is read here."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read {path} as a .npy array: {error}") from error
    if array.ndim != 2:
        raise InputError(f"{path} holds an array of shape {array.shape}; features must be [rows, dim]")
    return array
