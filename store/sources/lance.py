"""Features in an embedding column of a Lance table (a ``.lance`` folder), the other columns being
the metadata."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from store.sources.base import Part, PartSchema, is_lance, read_table, table_schema
from store.sources.parquet import split_embedding, table_part_schema


class LanceTable:
    name = "lance"
    describe = "a Lance table (a .lance folder) with an embedding column"

    def detect(self, path: Path) -> bool:
        return is_lance(path)

    def schema(self, path: Path, metadata: Path | None = None) -> PartSchema:
        return table_part_schema(table_schema(path), path, lambda column: _first_value(path, column))

    def parts(self, path: Path, metadata: Path | None = None) -> Iterator[Part]:
        features, meta = split_embedding(read_table(path), path)
        yield Part(str(path), features, meta)


def _first_value(path: Path, column: str):
    import lancedb

    first = lancedb.connect(str(path.parent)).open_table(path.stem).head(1).column(column)
    return first[0] if len(first) else None
