"""Rows that came or changed since the index was trained, searched beside it.

Adding a few rows to a large store must not cost a full build (3M x 1024: retrain, refill and a
6 GB values file for 1,000 rows). So the trained index and its values file stay as they were built,
and an update writes a *delta* (``faiss/delta-vN/``): the vectors of rows new or changed since the
build (``ids.npy``, ``vectors.npy``; beside an IVF index also ``index.faiss``, an IVF-Flat on the
build's own coarse quantizer, else searched exactly) and the ids of the index's rows that were
removed or changed since (``hidden.npy``, excluded from its searches). A search asks both and
keeps the best k; the values the cache and reranking read are the build's, with the delta's rows
over them (:class:`LayeredRows`). The delta is made anew from the build at each update and
published by the manifest, like a build: a reader sees the old state or the new, never half.

Vectors that change under an id already indexed (a modified file, an import with new features)
are not visible in the ids alone, so the committer records those ids as it writes them
(:func:`record_changed`, before the commit: an id recorded for a write that never happened is
merely re-read); a full build forgets the records it covered.
"""

from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from store.values import StoredValues

IDS_FILE, VECTORS_FILE, HIDDEN_FILE, INDEX_FILE = "ids.npy", "vectors.npy", "hidden.npy", "index.faiss"
CHANGES_DIR = "changes"  # ids written again since the last build, one file per commit


@dataclass(frozen=True)
class Delta:
    ids: np.ndarray  # sorted int64
    vectors: np.ndarray  # [len(ids), dim] float32, memory-mapped
    hidden: np.ndarray  # sorted int64: rows of the trained index removed or changed since it was built
    # Beside an IVF index: the delta's rows in an IVF-Flat with the build's own coarse quantizer,
    # searched with its nprobe (an exact search over 100k x 1024 rows costs ~20 ms a query; this,
    # about what the index costs). None: searched exactly (beside an exact or compressed index).
    index: Any = None

    @classmethod
    def empty(cls, dim: int) -> "Delta":
        return cls(np.zeros(0, np.int64), np.zeros((0, dim), np.float32), np.zeros(0, np.int64))

    @classmethod
    def open(cls, folder: Path, params: str = "") -> "Delta":
        """Raises OSError / ValueError when the files are gone or cut short. *params*: the built
        index's search parameters, for the delta's IVF."""
        import faiss

        ids, hidden = np.load(folder / IDS_FILE), np.load(folder / HIDDEN_FILE)
        vectors = np.load(folder / VECTORS_FILE, mmap_mode="r").view(np.ndarray)
        if vectors.ndim != 2 or len(vectors) != len(ids):
            raise ValueError(f"{folder} holds {len(ids)} ids for {len(vectors)} vectors")
        index = None
        if (folder / INDEX_FILE).is_file():
            try:
                index = faiss.read_index(str(folder / INDEX_FILE))
            except RuntimeError as error:
                raise ValueError(f"{folder / INDEX_FILE}: {error}") from error
            if params:
                faiss.ParameterSpace().set_index_parameters(index, params)
        return cls(ids, vectors, hidden, index)

    @classmethod
    def beside(cls, empty_ivf, ids: np.ndarray, vectors: np.ndarray, hidden: np.ndarray) -> "Delta":
        """The delta of *ids* / *vectors*, filled into *empty_ivf* (an IVF-Flat on the build's own
        coarse quantizer, see store/update.py) when there is one."""
        if empty_ivf is not None and len(ids):
            empty_ivf.add_with_ids(np.ascontiguousarray(vectors, np.float32), np.ascontiguousarray(ids, np.int64))
        return cls(ids, vectors, hidden, empty_ivf)

    def write(self, folder: Path) -> None:
        """Into *folder* whole or not at all: written beside it, then renamed."""
        temporary = folder.with_name(f".{folder.name}.{secrets.token_hex(4)}")
        temporary.mkdir(parents=True)
        try:
            for name, array in ((IDS_FILE, self.ids), (VECTORS_FILE, self.vectors), (HIDDEN_FILE, self.hidden)):
                with open(temporary / name, "wb") as out:
                    np.save(out, np.ascontiguousarray(array), allow_pickle=False)
                    out.flush()
                    os.fsync(out.fileno())
            if self.index is not None:
                import faiss

                faiss.write_index(self.index, str(temporary / INDEX_FILE))
            os.rename(temporary, folder)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise

    def search(self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None):
        """(scores, ids) ``[n, k]`` over the delta's rows (of *allowed_ids* only, if given): through
        its IVF where it has one, else exactly. Scores are exact inner products either way."""
        if self.index is None:
            return self.exact(queries, k, allowed_ids)
        import faiss

        queries = np.ascontiguousarray(queries, np.float32)
        if allowed_ids is None:
            return self.index.search(queries, k)
        selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed_ids, np.int64))
        return self.index.search(queries, k, params=faiss.SearchParametersIVF(sel=selector, nprobe=self.index.nprobe))

    def exact(self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None):
        """Exact (scores, ids) ``[n, k]`` over the delta's rows (of *allowed_ids* only, if given)."""
        import faiss

        if allowed_ids is None:  # the mapped rows as they are: a copy per query would cost more than the search
            vectors, ids_of = self.vectors, self.ids
        else:
            rows = np.flatnonzero(np.isin(self.ids, allowed_ids))
            vectors, ids_of = self.vectors[rows], self.ids[rows]
        scores = np.full((len(queries), k), -np.inf, np.float32)
        ids = np.full((len(queries), k), -1, np.int64)
        if len(ids_of):
            found_scores, found = faiss.knn(np.ascontiguousarray(queries, np.float32), vectors,
                                            min(k, len(ids_of)), metric=faiss.METRIC_INNER_PRODUCT)
            scores[:, :found.shape[1]] = np.where(found >= 0, found_scores, -np.inf)
            ids[:, :found.shape[1]] = np.where(found >= 0, ids_of[np.maximum(found, 0)], -1)
        return scores, ids


def merged(first: tuple[np.ndarray, np.ndarray], second: tuple[np.ndarray, np.ndarray], k: int):
    """The best *k* of two (scores, ids) results of the same queries; -1 ids never win."""
    scores = np.concatenate([np.where(first[1] >= 0, first[0], -np.inf), np.where(second[1] >= 0, second[0], -np.inf)],
                            axis=1)
    ids = np.concatenate([first[1], second[1]], axis=1)
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, best, 1).astype(np.float32), np.take_along_axis(ids, best, 1)


class LayeredRows:
    """The build's values with the delta's rows over them, as one id-sorted array to index by
    position (what StoredValues.values is to the cache and to reranking)."""

    ndim = 2

    def __init__(self, main: StoredValues, delta: Delta) -> None:
        self.main, self.delta = main, delta
        self.ids = np.union1d(main.ids, delta.ids)
        self.from_delta = np.isin(self.ids, delta.ids, assume_unique=True)
        self.row = np.where(self.from_delta, np.searchsorted(delta.ids, self.ids),
                            np.searchsorted(main.ids, self.ids))
        self.dtype = main.values.dtype
        self.shape = (len(self.ids), main.values.shape[1])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        positions = np.arange(len(self))[key] if isinstance(key, slice) else np.asarray(key)
        flat = positions.ravel()
        out = np.empty((flat.size, self.shape[1]), self.dtype)
        mask = self.from_delta[flat]
        if mask.any():
            out[mask] = self.delta.vectors[self.row[flat[mask]]]
        if (~mask).any():
            out[~mask] = self.main.values[self.row[flat[~mask]]]
        return out.reshape(*positions.shape, self.shape[1])

    def __array__(self, dtype=None, copy=None):
        whole = self[slice(None)]
        return whole if dtype is None else whole.astype(dtype)


def layered(main: StoredValues, delta: Delta | None) -> StoredValues:
    if delta is None:
        return main
    rows = LayeredRows(main, delta)
    return StoredValues(rows.ids, rows)


def record_changed(directory: Path, ids: np.ndarray) -> None:
    """Note that the rows of *ids* are being written again (new vectors under old ids)."""
    folder = directory / CHANGES_DIR
    folder.mkdir(exist_ok=True)
    with open(folder / f"changed-{secrets.token_hex(8)}.npy", "wb") as out:
        np.save(out, np.unique(np.asarray(ids, np.int64)), allow_pickle=False)
        out.flush()
        os.fsync(out.fileno())


def changed_since_build(directory: Path) -> tuple[np.ndarray, list[Path]]:
    """Every id recorded since the last full build, and the records (for the build to forget)."""
    folder = directory / CHANGES_DIR
    files = sorted(folder.glob("changed-*.npy")) if folder.is_dir() else []
    arrays = []
    for path in files:
        try:
            arrays.append(np.load(path, allow_pickle=False))
        except (OSError, ValueError):  # a record cut short by a crash: its write never committed
            continue
    return (np.unique(np.concatenate(arrays)) if arrays else np.zeros(0, np.int64)), files


def forget(records: list[Path]) -> None:
    for path in records:
        path.unlink(missing_ok=True)
