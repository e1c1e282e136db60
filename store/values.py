"""The index's companion file: every stored vector sorted by id (``ids.npy`` + ``values.npy``).

Written during the index build's one pass over the rows, read memory-mapped by the cache (which
gathers its k neighbours' exact values per query) and by any search over a lossy index (scalar
or product quantized), which fetches ``rerank`` x k candidates and orders them by exact cosine
from this file. No reader holds every vector; the page cache shares the file between processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from store.errors import InputError, StoreError

VALUES_DTYPES = ("float16", "float32")
IDS_FILE, VALUES_FILE = "ids.npy", "values.npy"


@dataclass(frozen=True)
class StoredValues:
    """Vectors ``values[i]`` of ``ids[i]`` (sorted int64); *values* is usually a read-only memory map."""

    ids: np.ndarray
    values: np.ndarray

    @classmethod
    def open(cls, folder: Path, mapped: bool = True) -> "StoredValues":
        """Raises OSError / ValueError when the files are gone or cut short (a rebuild replaced them).
        *mapped* False reads rows with positioned reads (:class:`FileRows`)."""
        ids = np.load(folder / IDS_FILE)
        # a plain ndarray over the map (its base keeps it alive): np.memmap's indexing costs ~10 us a call
        values = np.load(folder / VALUES_FILE, mmap_mode="r").view(np.ndarray) if mapped else FileRows(folder / VALUES_FILE)
        if values.ndim != 2 or len(values) != len(ids):
            raise ValueError(f"{folder} holds {len(ids)} ids for {len(values)} vectors")
        return cls(ids, values)

    @classmethod
    def from_arrays(cls, ids: np.ndarray, vectors: np.ndarray) -> "StoredValues":
        order = np.argsort(np.asarray(ids, np.int64), kind="stable")
        return cls(np.asarray(ids, np.int64)[order], np.asarray(vectors)[order])

    def positions(self, ids: np.ndarray) -> np.ndarray:
        return id_positions(self.ids, ids)

    def rerank(self, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The best *k* of each query's *candidates* ``[B, k']`` (ids, -1 for none) by exact cosine:
        (scores, ids) ``[B, k]``."""
        found = candidates >= 0
        rows = self.values[self.positions(np.where(found, candidates, self.ids[0] if len(self.ids) else 0))]
        scores = np.einsum("bc,bkc->bk", np.asarray(queries, np.float32), rows.astype(np.float32, copy=False))
        scores[~found] = -np.inf
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        ids = np.take_along_axis(candidates, best, 1)
        scores = np.take_along_axis(scores, best, 1)
        return np.where(ids >= 0, scores, -np.inf).astype(np.float32), ids


class FileRows:
    """The rows of a 2-d ``.npy`` file, read by position with one ``preadv`` each, for a process
    whose memory is bounded (the index build's recall measurements). What a memory map reads counts
    in the process's resident memory, and by whole page-cache folios: 5,120 random rows of the
    3M x 1024 values file counted 3.6 GB, a 1 GB file was counted whole after 960 rows."""

    ndim = 2

    def __init__(self, path: Path) -> None:
        header = np.load(path, mmap_mode="r")  # reads the header; maps but never touches the data
        self.shape, self.dtype, self.offset = header.shape, header.dtype, header.offset
        del header
        self.row_bytes = self.shape[1] * self.dtype.itemsize
        self.fd = os.open(path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions)
        rows = np.empty((positions.size, self.shape[1]), self.dtype)
        for row, position in zip(rows, positions.ravel().tolist()):
            if os.preadv(self.fd, [row], self.offset + position * self.row_bytes) != self.row_bytes:
                raise StoreError("the values file was cut short while the index was built: run `clipdex reindex`")
        return rows.reshape(*positions.shape, self.shape[1])

    def __del__(self) -> None:
        if hasattr(self, "fd"):
            os.close(self.fd)


def id_positions(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Rows of *ids* (any shape, all present) in *sorted_ids*. Ids numbered first..first+n-1, as an
    import numbers them, are offsets: no search."""
    last = max(len(sorted_ids) - 1, 0)
    if len(sorted_ids) and int(sorted_ids[-1]) - int(sorted_ids[0]) == last:
        positions = np.minimum(ids - sorted_ids[0], last)  # out of range: caught just below
    else:
        positions = np.minimum(np.searchsorted(sorted_ids, ids), last)
    if not len(sorted_ids) or not np.array_equal(sorted_ids[positions], ids):
        raise StoreError("the FAISS index and its stored values disagree: rebuild it with `clipdex reindex`")
    return positions


class ValuesWriter:
    """Writes the build's batches, in any order, to their id-sorted rows with positioned writes
    (a writable memory map would keep every page it dirtied in the builder's resident memory)."""

    def __init__(self, folder: Path, ids: np.ndarray, dim: int, dtype: str = "float16") -> None:
        if dtype not in VALUES_DTYPES:
            raise InputError(f"the cache's values are float16 or float32, not {dtype}")
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.dtype = folder, np.dtype(dtype)
        self.ids = np.sort(np.asarray(ids, np.int64))
        # Creates the file at its full size (sparse) with a valid header; no data page is touched.
        header = np.lib.format.open_memmap(folder / VALUES_FILE, mode="w+", dtype=self.dtype, shape=(len(self.ids), dim))
        self.offset, self.row_bytes = header.offset, dim * self.dtype.itemsize
        del header
        self.file = open(folder / VALUES_FILE, "r+b")
        self.written = 0

    def write(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        positions = id_positions(self.ids, np.asarray(ids, np.int64))
        order = np.argsort(positions, kind="stable")
        positions, data = positions[order], np.ascontiguousarray(vectors[order], self.dtype)
        breaks = np.flatnonzero(np.diff(positions) != 1) + 1  # runs of consecutive rows: one write each
        for rows, block in zip(np.split(positions, breaks), np.split(data, breaks)):
            os.pwrite(self.file.fileno(), block.tobytes(), self.offset + int(rows[0]) * self.row_bytes)
        self.written += len(ids)

    def finish(self) -> StoredValues:
        """Flush to disk and open the file for reading."""
        if self.written != len(self.ids):
            raise StoreError(f"the index build wrote {self.written} of {len(self.ids)} values: the table changed "
                             "during the build; run `clipdex reindex`")
        os.fsync(self.file.fileno())
        self.file.close()
        np.save(self.folder / IDS_FILE, self.ids)
        return StoredValues.open(self.folder, mapped=False)  # the builder's memory stays bounded


class KeptValues:
    """The writer's interface over vectors already in memory (tests, benchmarks): nothing to write."""

    def __init__(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.stored = StoredValues.from_arrays(ids, vectors)

    def write(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        pass

    def finish(self) -> StoredValues:
        return self.stored
