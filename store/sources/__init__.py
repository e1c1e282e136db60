"""The layouts `clipdex import` reads features from, one reader each (:class:`Reader`).

A path goes to the first reader in :data:`READERS` whose ``detect`` says it is in its layout; a
new layout (webdataset shards, object storage) is one module with a reader, listed here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from store.errors import InputError
from store.sources.base import Part, PartSchema, Reader
from store.sources.clip_retrieval import ClipRetrievalFolder
from store.sources.lance import LanceTable
from store.sources.npy import NpyFile, NpyFolder
from store.sources.parquet import TableFile

# Order matters where layouts overlap: a clip-retrieval folder or a Lance table is also a folder,
# which the npy-folder reader takes whatever it holds, so the specific layouts come first.
READERS: tuple[Reader, ...] = (ClipRetrievalFolder(), LanceTable(), NpyFolder(), NpyFile(), TableFile())

__all__ = ["READERS", "Part", "PartSchema", "Reader", "locate", "read_sources", "reader_for", "source_schemas"]


def reader_for(path: Path) -> Reader:
    """The reader of *path*'s layout (the first in :data:`READERS` that detects it)."""
    for reader in READERS:
        if reader.detect(path):
            return reader
    raise InputError(f"{path}: not a layout clipdex imports (use {'; '.join(r.describe for r in READERS)})")


def locate(sources: Sequence[str | os.PathLike]) -> list[tuple[Path, Reader]]:
    """Each given source, with ``~`` expanded, and its reader; a missing one is refused."""
    found = []
    for given in sources:
        path = Path(os.path.expanduser(os.fspath(given)))
        if not path.exists():
            raise InputError(f"no such features file or folder: {given}")
        found.append((path, reader_for(path)))
    return found


def source_schemas(sources: Sequence[str | os.PathLike],
                   metadata: str | None = None) -> Iterator[tuple[Path, PartSchema]]:
    """What each source holds, from headers alone: for refusing one before any row is written."""
    for path, reader in locate(sources):
        yield path, reader.schema(path, _metadata_path(metadata))


def read_sources(sources: Sequence[str | os.PathLike], metadata: str | None = None) -> Iterator[Part]:
    """Every part of *sources* in a stable order, each once (a file named twice, or within a folder
    also named, is read once). *metadata*: the row-aligned table of the one ``.npy`` source."""
    if metadata and len(sources) != 1:
        raise InputError("--metadata goes with exactly one features file")
    seen: set[str] = set()
    for path, reader in locate(sources):
        for part in reader.parts(path, _metadata_path(metadata)):
            if os.path.realpath(part.name) in seen:
                continue
            seen.add(os.path.realpath(part.name))
            if part.texts is not None and part.texts.shape != part.features.shape:
                raise InputError(f"{part.name}: {part.features.shape[0]} x {part.features.shape[1]} image features "
                                 f"but text features of shape {part.texts.shape[0]} x {part.texts.shape[1]}")
            yield part


def _metadata_path(metadata: str | None) -> Path | None:
    return Path(os.path.expanduser(metadata)) if metadata else None
