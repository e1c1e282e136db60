"""clip-retrieval's output folder: ``img_emb/img_emb_N.npy`` with ``metadata/metadata_N.parquet``
and, when it embedded captions, ``text_emb/text_emb_N.npy``, matched by the shard number N."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from store.errors import InputError
from store.sources.base import Part, PartSchema, load_npy, read_table, table_schema


class ClipRetrievalFolder:
    name = "clip-retrieval"
    describe = "a clip-retrieval output folder (img_emb/, metadata/, text_emb/)"

    def detect(self, path: Path) -> bool:
        return path.is_dir() and (path / "img_emb").is_dir()

    def schema(self, path: Path, metadata: Path | None = None) -> PartSchema:
        image, meta, _ = next(_shards(path))
        return PartSchema(load_npy(image).shape[1], tuple(table_schema(meta).names) if meta else ())

    def parts(self, path: Path, metadata: Path | None = None) -> Iterator[Part]:
        for image, meta, texts in _shards(path):
            yield Part(str(image), load_npy(image), read_table(meta) if meta else None,
                       load_npy(texts) if texts else None)


def _numbered(folder: Path, prefix: str, suffix: str) -> dict[int, Path]:
    """``prefix_N.suffix`` files of *folder* by N, read as a number: clip-retrieval pads it with
    zeros (``img_emb_00.npy``) and other writers do not, so ``07`` and ``7`` are the same shard."""
    found: dict[int, Path] = {}
    for path in sorted(folder.glob(f"{prefix}_*{suffix}")) if folder.is_dir() else ():
        match = re.fullmatch(rf"{re.escape(prefix)}_(\d+)", path.name[:-len(suffix)])
        if match:
            if int(match.group(1)) in found:
                raise InputError(f"{folder} holds two shards numbered {int(match.group(1))}: "
                                 f"{found[int(match.group(1))].name} and {path.name}")
            found[int(match.group(1))] = path
    return found


def _shards(folder: Path) -> Iterator[tuple[Path, Path | None, Path | None]]:
    """Each ``img_emb`` shard with its ``metadata`` Parquet and ``text_emb`` shard, matched by
    shard number. A shard without metadata while others have theirs is refused: its rows would
    lose their paths and captions without a word."""
    shards = _numbered(folder / "img_emb", "img_emb", ".npy")
    if not shards:
        raise InputError(f"{folder}/img_emb holds no img_emb_N.npy shards")
    metadata = _numbered(folder / "metadata", "metadata", ".parquet")
    missing = [shards[n].name for n in sorted(shards) if n not in metadata]
    if metadata and missing:
        raise InputError(f"{folder}/metadata has no metadata_N.parquet for {', '.join(missing[:5])}"
                         f"{' …' if len(missing) > 5 else ''} while the other shards have theirs")
    texts = _numbered(folder / "text_emb", "text_emb", ".npy")
    for number in sorted(shards):
        yield shards[number], metadata.get(number), texts.get(number)
