"""Features in ``.npy`` files: one file (metadata from ``--metadata``), or a folder of shards each
with its own ``.parquet``/``.csv`` beside it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from store.errors import InputError
from store.sources.base import Part, PartSchema, load_npy, read_table, table_schema


class NpyFile:
    name = "npy"
    describe = "a .npy file [N, C] (row-aligned metadata from --metadata)"

    def detect(self, path: Path) -> bool:
        return path.suffix.lower() == ".npy" and not path.is_dir()

    def schema(self, path: Path, metadata: Path | None = None) -> PartSchema:
        columns = tuple(table_schema(metadata).names) if metadata else ()
        return PartSchema(load_npy(path).shape[1], columns)

    def parts(self, path: Path, metadata: Path | None = None) -> Iterator[Part]:
        yield Part(str(path), load_npy(path), read_table(metadata) if metadata else None)


class NpyFolder:
    """Any folder no other reader claims, so it goes after the folder layouts in the registry."""
    name = "npy-folder"
    describe = "a folder of .npy shards, each with its metadata in a .parquet or .csv of the same name"

    def detect(self, path: Path) -> bool:
        return path.is_dir()

    def schema(self, path: Path, metadata: Path | None = None) -> PartSchema:
        first = _shards(path)[0]
        sidecar = _sidecar(first)
        return PartSchema(load_npy(first).shape[1], tuple(table_schema(sidecar).names) if sidecar else ())

    def parts(self, path: Path, metadata: Path | None = None) -> Iterator[Part]:
        for shard in _shards(path):
            sidecar = _sidecar(shard)
            yield Part(str(shard), load_npy(shard), read_table(sidecar) if sidecar else None)


def _shards(folder: Path) -> list[Path]:
    shards = sorted(folder.glob("*.npy"), key=_shard_number)
    if not shards:
        raise InputError(f"{folder} holds no .npy shards, img_emb/ folder or Lance table")
    return shards


def _sidecar(shard: Path) -> Path | None:
    return next((shard.with_suffix(s) for s in (".parquet", ".csv") if shard.with_suffix(s).exists()), None)


def _shard_number(path: Path) -> int:
    digits = re.findall(r"\d+", path.stem)
    return int(digits[-1]) if digits else -1
