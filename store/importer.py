"""`clipdex import`: build or extend a store from features computed elsewhere.

Accepted layouts, each yielding (features [n, C], metadata rows):

- a ``.npy`` file ``[N, C]`` (metadata from ``--metadata`` CSV/Parquet, row-aligned, if given);
- a folder of ``.npy`` shards with matching metadata Parquet: clip-retrieval's
  ``img_emb/img_emb_N.npy`` + ``metadata/metadata_N.parquet``, matched by the number N (clip-retrieval
  pads it with zeros); a shard without metadata while others have theirs is refused;
- a Parquet file with an embedding column (a list of floats) and any metadata columns;
- a Lance table (a ``.lance`` folder) with an embedding column.

A row's key is its ``path`` (or ``url``/``image_path``) column, else ``<source>#<row>``; a row whose
key is already in the store is skipped, so importing the same source twice changes nothing and
every id stays what it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from store.ann import AnnConfig
from store.errors import InputError, first_line
from store.files import drop_mapped_pages, progress
from store.lock import writer_lock
from store.sharded import ParallelMap
from store.store import Store, expand
from store.tables import image_rows, image_schema

EMBEDDING_COLUMNS = ("embedding", "embeddings", "emb", "vector", "image_embedding", "img_emb")
PATH_COLUMNS = ("path", "image_path", "url", "filepath")
CAPTION_COLUMNS = ("caption", "text")
IMPORTED = "imported"  # model and weights of features whose origin the user did not name
IMPORT_CHUNK = 32_768  # rows read, normalised, hashed and committed at a time (128 MiB at 1024-d)


def _shard_number(path: Path) -> int:
    digits = re.findall(r"\d+", path.stem)
    return int(digits[-1]) if digits else -1


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


def _clip_retrieval_shards(folder: Path) -> Iterator[tuple[Path, Path | None, Path | None]]:
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


def _read_table(path: Path) -> pa.Table:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        if path.suffix.lower() == ".parquet":
            return pq.read_table(path)
        if path.suffix.lower() == ".csv":
            return pacsv.read_csv(path)
        if path.suffix.lower() == ".lance" or (path / "_versions").is_dir():
            import lancedb

            db = lancedb.connect(str(path.parent))
            return db.open_table(path.stem).to_arrow()
    except (OSError, pa.ArrowInvalid, ValueError) as error:
        raise InputError(f"cannot read {path}: {first_line(error)}") from error
    raise InputError(f"{path}: unsupported metadata format (use .parquet, .csv or a .lance table)")


class RowKeys(Sequence):
    """``<source>#<row>`` for every row of a features file without metadata, made on demand: unique
    by construction, so millions of rows need no list of keys and no table of duplicates."""

    def __init__(self, source: str, count: int) -> None:
        self.prefix, self.count = os.path.abspath(source), count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, row):
        if isinstance(row, slice):
            return [self[i] for i in range(*row.indices(self.count))]
        if not -self.count <= row < self.count:
            raise IndexError(row)
        return f"{self.prefix}#{row % self.count}"


def _load_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read {path} as a .npy array: {error}") from error
    if array.ndim != 2:
        raise InputError(f"{path} holds an array of shape {array.shape}; features must be [rows, dim]")
    return array


def _split_embedding(table: pa.Table, source: Path) -> tuple[np.ndarray, pa.Table]:
    column = next((c for c in EMBEDDING_COLUMNS if c in table.column_names), None)
    if column is None:
        raise InputError(f"{source} has no embedding column (looked for {', '.join(EMBEDDING_COLUMNS)})")
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


Source = tuple[str, np.ndarray, "pa.Table | None", "np.ndarray | None"]  # name, features, metadata, text features


def read_sources(sources: Sequence[str | os.PathLike], metadata: str | None = None) -> Iterator[Source]:
    """Yield (source name, features, metadata or None, caption features or None) per file/shard,
    in a stable order."""
    if metadata and len(sources) != 1:
        raise InputError("--metadata goes with exactly one features file")
    seen: set[str] = set()
    for source, features, meta, texts in _sources(sources, metadata):
        if os.path.realpath(source) not in seen:  # a file named twice (or within a folder also named) once
            seen.add(os.path.realpath(source))
            if texts is not None and texts.shape != features.shape:
                raise InputError(f"{source}: {features.shape[0]} x {features.shape[1]} image features but text "
                                 f"features of shape {texts.shape[0]} x {texts.shape[1]}")
            yield source, features, meta, texts


def _sources(sources: Sequence[str | os.PathLike], metadata: str | None) -> Iterator[Source]:
    for given in sources:
        path = Path(os.path.expanduser(os.fspath(given)))
        if not path.exists():
            raise InputError(f"no such features file or folder: {given}")
        if path.is_dir() and (path / "img_emb").is_dir():  # clip-retrieval output folder
            for shard, meta, texts in _clip_retrieval_shards(path):
                yield (str(shard), _load_npy(shard), _read_table(meta) if meta else None,
                       _load_npy(texts) if texts else None)
        elif path.is_dir() and path.suffix.lower() != ".lance" and not (path / "_versions").is_dir():
            shards = sorted(path.glob("*.npy"), key=_shard_number)
            if not shards:
                raise InputError(f"{path} holds no .npy shards, img_emb/ folder or Lance table")
            for shard in shards:
                meta = next((shard.with_suffix(s) for s in (".parquet", ".csv") if shard.with_suffix(s).exists()), None)
                yield str(shard), _load_npy(shard), _read_table(meta) if meta else None, None
        elif path.suffix.lower() == ".npy":
            yield str(path), _load_npy(path), _read_table(Path(os.path.expanduser(metadata))) if metadata else None, None
        else:
            features, meta = _split_embedding(_read_table(path), path)
            yield str(path), features, meta, None


@dataclass(frozen=True)
class SourceRows:
    """What a source says of its rows besides the features: key, caption, size, other metadata."""
    keys: Sequence[str]
    captions: Sequence[str | None]
    width: pa.Array | None = None
    height: pa.Array | None = None
    extra: pa.Table | None = None  # every other metadata column, named and typed for the store

    def take(self, positions: Sequence[int]) -> dict:
        """The image_rows columns of *positions* (extra metadata columns included)."""
        taken = pa.array(positions, pa.int64())
        columns = {"path": [self.keys[p] for p in positions], "caption": [self.captions[p] for p in positions]}
        for name, column in (("width", self.width), ("height", self.height)):
            if column is not None:
                columns[name] = column.take(taken)
        if self.extra is not None:
            columns["metadata"] = dict(zip(self.extra.column_names, self.extra.take(taken).columns))
        return columns


def source_rows(source: str, count: int, meta: pa.Table | None) -> SourceRows:
    """Each row's key (its path, url, ... column, else ``<source>#<row>``), caption, width and
    height, and every other metadata column (see :func:`extra_columns`)."""
    if meta is not None and meta.num_rows != count:
        raise InputError(f"{source}: {count} features but {meta.num_rows} metadata rows")
    if meta is None:
        return SourceRows(RowKeys(source, count), [None] * count)
    names = meta.column_names
    path_column = next((c for c in PATH_COLUMNS if c in names), None)
    caption_column = next((c for c in CAPTION_COLUMNS if c in names), None)
    keys = [str(p) for p in meta.column(path_column).to_pylist()] if path_column else RowKeys(source, count)
    captions = meta.column(caption_column).to_pylist() if caption_column else [None] * count
    sizes = {name: _integers(meta.column(name)) if name in names else None for name in ("width", "height")}
    used = {path_column, caption_column, *(name for name in sizes if sizes[name] is not None)}
    return SourceRows(keys, captions, sizes["width"], sizes["height"], extra_columns(meta, used, source))


def _integers(column: pa.ChunkedArray) -> pa.Array | None:
    try:
        return column.combine_chunks().cast(pa.int32())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None  # not sizes after all: kept as a metadata column of its own


def extra_columns(meta: pa.Table, used: set, source: str) -> pa.Table | None:
    """The metadata columns clipdex has no column of its own for (clip-retrieval's url, key,
    status, exif, ...), kept so that `where` filters can use them. Names become identifiers
    (``original width`` -> ``original_width``) and one that is a clipdex column gets the prefix
    ``source_``; nested values become JSON text."""
    reserved = set(image_schema(1).names)
    columns: dict[str, pa.Array] = {}
    for name in meta.column_names:
        if name in used:
            continue
        target = re.sub(r"\W", "_", name, flags=re.ASCII) or "column"
        target = f"c_{target}" if target[0].isdigit() else target
        target = f"source_{target}" if target in reserved else target
        if target in columns:
            raise InputError(f"{source}: metadata columns {name!r} and another both become {target!r}")
        columns[target] = _plain(meta.column(name).combine_chunks())
    return pa.table(columns) if columns else None


def _plain(column: pa.Array) -> pa.Array:
    """A column LanceDB can store and filter: nested values as JSON text, dictionaries decoded."""
    kind = column.type
    if pa.types.is_dictionary(kind):
        return _plain(column.dictionary_decode())
    if pa.types.is_null(kind):
        return column.cast(pa.string())
    if pa.types.is_large_string(kind):
        return column.cast(pa.string())
    if pa.types.is_nested(kind):
        return pa.array([None if v is None else json.dumps(v, default=str) for v in column.to_pylist()], pa.string())
    return column


def check_features(source: str, features: np.ndarray) -> None:
    """Refuse NaN, infinite and all-zero rows before anything is written, one chunk at a time."""
    for start in range(0, len(features), IMPORT_CHUNK):
        chunk = np.asarray(features[start:start + IMPORT_CHUNK], np.float64)
        if not np.isfinite(chunk).all():
            row = start + int(np.argmin(np.isfinite(chunk).all(axis=1)))
            raise InputError(f"{source}: features contain NaN or infinite values (row {row})")
        zero = np.flatnonzero(np.linalg.norm(chunk, axis=1) == 0)
        if len(zero):
            raise InputError(f"{source}: features are all zeros at row {start + int(zero[0])}")
        drop_mapped_pages(features)  # a streamed 12 GB file is not the importer's to keep


def normalised(features: np.ndarray) -> np.ndarray:
    """Rows of any float dtype (float16 included) as unit float32 vectors; norms in float64."""
    chunk = np.asarray(features, np.float64)
    return (chunk / np.linalg.norm(chunk, axis=1, keepdims=True)).astype(np.float32)


def caption_vectors(features: np.ndarray) -> pa.Array:
    """Caption embeddings as the images table keeps them: unit float32 rows, null where a row is
    all zeros or not finite (a row without a caption)."""
    chunk = np.asarray(features, np.float64)
    norms = np.linalg.norm(chunk, axis=1)
    empty = ~np.isfinite(norms) | (norms == 0)
    unit = (np.nan_to_num(chunk) / np.where(empty, 1, norms)[:, None]).astype(np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(unit.reshape(-1)), chunk.shape[1], mask=pa.array(empty))


def _fit_metadata(store: Store, given: SourceRows, source: str) -> SourceRows:
    """*given* with its metadata columns in the images table (added the first time a source brings
    them) and cast to the types they have there."""
    store.tables.add_metadata_columns(given.extra.schema)
    schema = store.tables.images.schema
    columns = []
    for name, column in zip(given.extra.column_names, given.extra.columns):
        try:
            columns.append(column.cast(schema.field(name).type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
            raise InputError(f"{source}: metadata column '{name}' holds {column.type} values but the store's "
                             f"'{name}' column holds {schema.field(name).type}: {first_line(error)}") from error
    return replace(given, extra=pa.table(dict(zip(given.extra.column_names, columns))))


def _refuse_indexed_keys(source: str, keys: Sequence[str], indexed: dict[str, int]) -> None:
    """An imported row never takes the place of a file `clipdex index` embedded: its vector, size
    and content hash would be lost, and the server would refuse the file. Checked before any of
    the source's rows is written."""
    for row, key in enumerate(keys):
        if key in indexed:
            raise InputError(f"{source}: row {row} is keyed {key!r}, a file indexed into this store (id "
                             f"{indexed[key]}); an import never replaces an indexed file's row: import into "
                             "another store, or give the row another path")


def feature_hash(vector: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(vector, np.float32).tobytes(), digest_size=16).hexdigest()


def import_features(sources: Sequence[str | os.PathLike], store_dir: str | os.PathLike, metadata: str | None = None,
                    model_name: str = IMPORTED, pretrained: str = IMPORTED, ann: AnnConfig | None = None,
                    has_text_encoder: bool = False, wait: bool = False, parallel_map: ParallelMap | None = None,
                    shards: int = 0) -> dict:
    """Add the features of *sources* to the store at *store_dir* (created if new); returns a summary.

    A row whose key is already stored keeps its id: skipped when its features are the same,
    updated (new vector) when they changed. *has_text_encoder*: whether clipdex can load
    *model_name* with *pretrained*, so the store takes text and image queries; the caller knows
    (the store knows nothing of models). Holds the store's writer lock (see :func:`writer_lock`).
    With *parallel_map*, an IVF index is built in *shards* in parallel (:mod:`store.sharded`).
    """
    for given in sources:  # before the lock, so a typo creates no store folder
        if not os.path.exists(os.path.expanduser(os.fspath(given))):
            raise InputError(f"no such features file or folder: {given}")
    with writer_lock(expand(store_dir), wait=wait):
        return _import(sources, expand(store_dir), metadata, model_name, pretrained, ann, has_text_encoder,
                       parallel_map, shards)


def _import(sources, store_dir: Path, metadata, model_name, pretrained, ann, has_text_encoder, parallel_map,
            shards) -> dict:
    """Stream every source in chunks of IMPORT_CHUNK rows: memory does not grow with file size."""
    started = time.perf_counter()
    store, known, indexed = None, {}, {}
    read = imported = updated = 0
    for source, raw, meta, texts in read_sources(sources, metadata):
        given = source_rows(source, len(raw), meta)
        keys = given.keys
        check_features(source, raw)
        if store is None:
            store = Store.create(store_dir, model_name, pretrained, raw.shape[1], space=model_name,
                                 has_text_encoder=has_text_encoder)
            store.tables.upgrade()
            rows = store.tables.file_rows()
            known = dict(zip(rows.column("path").to_pylist(), zip(rows.column("id").to_pylist(),
                                                                  rows.column("hash").to_pylist(),
                                                                  rows.column("caption").to_pylist())))
            indexed = {path: image_id for path, image_id, size in zip(
                rows.column("path").to_pylist(), rows.column("id").to_pylist(), rows.column("bytes").to_pylist())
                if size is not None}
        if raw.shape[1] != store.manifest.dim:
            raise InputError(f"{source} has {raw.shape[1]}-d features; the store holds "
                             f"{store.manifest.dim}-d features of '{store.manifest.space}'")
        if given.extra is not None:
            given = _fit_metadata(store, given, source)
        unique = isinstance(keys, RowKeys)
        if not unique:
            _refuse_indexed_keys(source, keys, indexed)
        read += len(raw)
        if unique:
            positions = np.arange(len(keys), dtype=np.int64)
        else:
            last = {key: i for i, key in enumerate(keys)}  # a key given twice: its last features win
            positions = np.sort(np.fromiter(last.values(), np.int64, len(last)))
            del last
        bar = progress(len(positions), f"import {Path(source).name}")
        for start in range(0, len(positions), IMPORT_CHUNK):
            chunk = positions[start:start + IMPORT_CHUNK]
            vectors = normalised(raw[chunk])
            drop_mapped_pages(raw)
            captions = caption_vectors(texts[chunk]) if texts is not None else None
            hashes = [feature_hash(vector) for vector in vectors]
            fresh = [j for j, row in enumerate(chunk) if keys[row] not in known]
            changed = [j for j, row in enumerate(chunk) if keys[row] in known and known[keys[row]][1] != hashes[j]]
            if fresh:
                first = store.reserve_ids(len(fresh))
                store.tables.add(image_rows(
                    store.manifest.dim, id=np.arange(first, first + len(fresh), dtype=np.int64),
                    hash=[hashes[j] for j in fresh], embedding=vectors[fresh],
                    caption_embedding=None if captions is None else captions.take(fresh),
                    **given.take(chunk[fresh])))
                if not unique:  # a later source may name the same paths; a file's own row keys are its alone
                    known.update((keys[chunk[j]], (first + n, hashes[j], given.captions[chunk[j]]))
                                 for n, j in enumerate(fresh))
                imported += len(fresh)
            if changed:
                columns = given.take(chunk[changed])
                columns["caption"] = [caption if caption is not None else known[keys[chunk[j]]][2]
                                      for caption, j in zip(columns["caption"], changed)]
                store.tables.upsert(image_rows(  # same id, new vector: one atomic commit
                    store.manifest.dim, id=[known[keys[chunk[j]]][0] for j in changed],
                    hash=[hashes[j] for j in changed], embedding=vectors[changed],
                    caption_embedding=None if captions is None else captions.take(changed), **columns))
                known.update((keys[chunk[j]], (known[keys[chunk[j]]][0], hashes[j], given.captions[chunk[j]]))
                             for j in changed)
                updated += len(changed)
            bar.update(len(chunk))
        bar.close()
    if store is None:
        raise InputError("no features to import")
    del known  # before the build, which has the memory budget to itself
    stale = store.manifest.index.table_version != store.tables.version() or not store.manifest.index.file
    changed = imported or updated or stale
    info = store.rebuild_index(ann or AnnConfig(), parallel_map, shards) if changed else store.manifest.index
    return {"read": read, "imported": imported, "updated": updated, "skipped": read - imported - updated,
            "count": store.manifest.count, "dim": store.manifest.dim, "space": store.manifest.space,
            "index": info.type, "recall_at_10": info.recall_at_10,
            "seconds": round(time.perf_counter() - started, 3)}
