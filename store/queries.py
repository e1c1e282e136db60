"""The query sets an index is tuned and measured on, besides stored image vectors.

An index tuned on image vectors alone can fail every other kind of query (the modality gap: text
embeddings, or an LLM pipeline's audio features, lie in other regions of the space). So each
build measures recall@10, and tunes nprobe and rerank, on every set the store keeps in
``queries/NAME.npy``: ``text`` (the tuning prompts embedded by the store's own text encoder, made
by the writer that has the model: indexer/run.py, `clipdex import` and `reindex` for a store with
a text encoder), and whatever a user gives with ``--tune-queries NAME.npy`` (kept, so later
builds keep meeting it). Two sets come from the table itself at each build: ``image`` (sampled
stored vectors) and ``captions`` (sampled caption embeddings, where rows have them).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

import numpy as np

from store.errors import InputError
from store.files import write_atomically

QUERIES_DIR = "queries"
FROM_TABLE = ("image", "captions")  # sets drawn from the rows at each build, never kept as files
MAX_QUERIES = 4096  # per set: the build's exact search costs queries x rows x dim


def query_set_name(path: str | os.PathLike) -> str:
    """A set's name from its file: the stem, as an identifier (``audio-clips.npy`` -> ``audio-clips``)."""
    name = re.sub(r"[^a-z0-9_-]", "_", Path(path).stem.lower()) or "given"
    return f"given_{name}" if name in FROM_TABLE else name


def read_query_file(path: str | os.PathLike, dim: int) -> np.ndarray:
    """Queries from a ``.npy`` file ``[n, dim]``: checked (finite, not all zeros, at most
    MAX_QUERIES) and L2-normalised, in one line of error otherwise."""
    try:
        array = np.load(os.path.expanduser(os.fspath(path)), allow_pickle=False)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read the tuning queries {path}: {str(error).splitlines()[0]}") from error
    if array.ndim != 2 or array.shape[1] != dim or not len(array):
        raise InputError(f"the tuning queries {path} hold an array of shape {array.shape}; the store's vectors "
                         f"are {dim}-d, so give [queries, {dim}]")
    if len(array) > MAX_QUERIES:
        raise InputError(f"the tuning queries {path} hold {len(array):,} rows; give at most {MAX_QUERIES:,}")
    return unit_rows(array, str(path))


def unit_rows(array: np.ndarray, source: str) -> np.ndarray:
    values = np.asarray(array, np.float64)
    norms = np.linalg.norm(values, axis=1)
    if not np.isfinite(values).all() or not norms.all():
        raise InputError(f"{source}: every query must be finite and not all zeros")
    return (values / norms[:, None]).astype(np.float32)


def save_query_sets(directory: Path, sets: Mapping[str, np.ndarray]) -> None:
    """Keep *sets* in the store, each replacing a set of its name (atomically: a build reading
    the folder sees the old file or the new)."""
    folder = directory / QUERIES_DIR
    for name, vectors in sets.items():
        folder.mkdir(exist_ok=True)
        data = _npy_bytes(np.ascontiguousarray(vectors, np.float32))
        write_atomically(folder / f"{name}.npy", data)


def kept_query_sets(directory: Path, dim: int) -> dict[str, np.ndarray]:
    """The sets the store keeps, by name; a file that is damaged or of another size is left out
    (it is made again by the next writer that can make it)."""
    folder = directory / QUERIES_DIR
    sets = {}
    for path in sorted(folder.glob("*.npy")) if folder.is_dir() else ():
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            continue
        if array.ndim == 2 and array.shape[1] == dim and len(array) and np.isfinite(array).all():
            sets[path.stem] = np.ascontiguousarray(array[:MAX_QUERIES], np.float32)
    return sets


def has_query_set(directory: Path, name: str) -> bool:
    return (directory / QUERIES_DIR / f"{name}.npy").is_file()


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
