"""`clipdex import`: build or extend a store from features computed elsewhere.

Each accepted layout is read by one reader of :mod:`store.sources` (a ``.npy`` file with
``--metadata``, a folder of ``.npy`` shards, clip-retrieval's output folder, a Parquet file or a
Lance table with an embedding column), as parts of features with their metadata rows.

A row's key is its ``path`` (or ``url``/``image_path``) column, else ``<source>#<row>``; a row whose
key is already in the store is skipped, so importing the same source twice changes nothing and
every id stays what it was.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from store.ann import AnnConfig
from store.commit import Committer
from store.errors import InputError, first_line
from store.features import IMPORT_CHUNK, caption_vectors, check_features, feature_hash, normalised
from store.files import drop_mapped_pages, progress
from store.lock import writer_lock
from store.sharded import Workers
from store.sources import Part, read_sources, source_schemas
from store.sources.metadata import RowKeys, SourceRows, source_rows
from store.store import Store, expand
from store.tables import image_rows

IMPORTED = "imported"  # model and weights of features whose origin the user did not name


@dataclass(frozen=True)
class ImportConfig:
    metadata: str | None = None  # row-aligned CSV/Parquet/Lance metadata of the one .npy source
    model_name: str = IMPORTED  # the embedding space the features are in
    pretrained: str = IMPORTED
    ann: AnnConfig = field(default_factory=AnnConfig)
    # Whether clipdex can load model_name with pretrained, so the store takes text and image
    # queries: the caller knows, the store knows nothing of models.
    has_text_encoder: bool = False
    wait: bool = False  # another writer holds the store: wait for it (False: fail at once, naming it)
    # Query sets the index is also tuned on, kept in the store (store/queries.py): the text
    # prompts of the store's own text encoder, made by the caller that has the model.
    queries: Mapping[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class ImportSummary:
    read: int  # rows read from the sources (a key given twice in one part counts twice)
    imported: int  # rows new to the store
    updated: int  # rows already stored whose features changed
    skipped: int  # rows already stored with the same features
    count: int  # rows in the store now
    dim: int
    space: str
    index: str
    recall_at_10: float | None
    seconds: float
    recall: dict[str, float] = field(default_factory=dict)  # the index's recall@10 per query set (image, text, ...)
    target_met: bool | None = None  # False: tuning stopped at --max-query-ms before every set reached the target

    def to_dict(self) -> dict:
        return asdict(self)


class Known(NamedTuple):
    """What the store holds under a key: enough to skip the row, or to write it again in place."""
    id: int
    hash: str
    caption: str | None


def import_features(sources: Sequence[str | os.PathLike], store_dir: str | os.PathLike,
                    config: ImportConfig = ImportConfig(), workers: Workers | None = None) -> ImportSummary:
    """Add the features of *sources* to the store at *store_dir* (created if new).

    A row whose key is already stored keeps its id: skipped when its features are the same,
    updated (new vector) when they changed. Holds the store's writer lock (see
    :func:`writer_lock`). With *workers*, an IVF index is built in shards in parallel
    (:mod:`store.sharded`).
    """
    for given in sources:  # before the lock, so a typo creates no store folder
        if not os.path.exists(os.path.expanduser(os.fspath(given))):
            raise InputError(f"no such features file or folder: {given}")
    with writer_lock(expand(store_dir), wait=config.wait):
        return _import(sources, expand(store_dir), config, workers)


def _import(sources: Sequence[str | os.PathLike], store_dir: Path, config: ImportConfig,
            workers: Workers | None) -> ImportSummary:
    started = time.perf_counter()
    store, keys = None, None
    read = imported = updated = 0
    for part in read_sources(sources, config.metadata):
        given = source_rows(part.name, len(part.features), part.metadata)
        check_features(part.name, part.features, IMPORT_CHUNK)
        if store is None:
            store = _open_store(store_dir, part.features.shape[1], config)
            keys = StoreKeys(store)
            for path, schema in source_schemas(sources, config.metadata):  # from headers, before any row
                if schema.dim is not None:
                    _refuse_dimension(store, str(path), schema.dim)
        _refuse_dimension(store, part.name, part.features.shape[1])  # a folder's shards may differ
        if given.extra is not None:
            given = _fit_metadata(store, given, part.name)
        if not isinstance(given.keys, RowKeys):
            _refuse_indexed_keys(part.name, given.keys, keys.indexed())
        read += len(part.features)
        fresh, changed = _write_part(store, part, given, keys.of(given.keys))
        imported, updated = imported + fresh, updated + changed
    if store is None:
        raise InputError("no features to import")
    del keys  # before the build, which has the memory budget to itself
    stale = store.manifest.index.table_version != store.tables.version() or not store.manifest.index.file
    info = store.update_index(config.ann, workers, config.queries) if imported or updated or stale else store.manifest.index
    return ImportSummary(read=read, imported=imported, updated=updated, skipped=read - imported - updated,
                         count=store.manifest.count, dim=store.manifest.dim, space=store.manifest.space,
                         index=info.type, recall_at_10=info.recall_at_10,
                         seconds=round(time.perf_counter() - started, 3), recall=dict(info.recall),
                         target_met=info.target_met)


def _open_store(store_dir: Path, dim: int, config: ImportConfig) -> Store:
    """The store, created for *dim*-d features if new."""
    store = Store.create(store_dir, config.model_name, config.pretrained, dim, space=config.model_name,
                         has_text_encoder=config.has_text_encoder)
    store.tables.upgrade()
    return store


KEY_COLUMNS = ["id", "path", "hash", "caption", "bytes"]


class StoreKeys:
    """The keys the store holds, read as far as a part needs them: a part keyed by its own rows
    (``<source>#<row>``) can only meet rows imported from that source before, so only those are
    read (1,000 rows into a 3M store read no other key); a part keyed by paths reads every key,
    once. What the run writes is shared by all."""

    def __init__(self, store: Store) -> None:
        self.store, self.written, self._every = store, {}, None

    def of(self, keys) -> "KnownKeys":
        if isinstance(keys, RowKeys):
            return KnownKeys(self.store.tables.file_rows(KEY_COLUMNS, path_prefix=f"{keys.prefix}#"), self.written)
        return self.every()

    def every(self) -> "KnownKeys":
        if self._every is None:
            self._every = KnownKeys(self.store.tables.file_rows(KEY_COLUMNS), self.written)
        return self._every

    def indexed(self) -> dict[str, int]:
        """The ids of the keys `clipdex index` embedded (rows with a file size)."""
        every = self.every()
        return {every.paths[i]: int(every.ids[i]) for i in np.flatnonzero(every.sized)}


class KnownKeys:
    """What the store holds under each key (:class:`Known`), and what this run has written: a
    key's position in the table's columns, its record made only when asked for (3M keys as
    records took 10 s of an import that adds 1,000 rows)."""

    def __init__(self, rows: pa.Table, written: dict[str, Known]) -> None:
        self.paths = rows.column("path").to_pylist()
        self.ids = rows.column("id").to_numpy()
        self.hashes, self.captions = rows.column("hash"), rows.column("caption")
        self.sized = rows.column("bytes").is_valid().to_numpy(zero_copy_only=False)
        self.position = dict(zip(self.paths, range(len(self.paths))))
        self.written = written

    def __contains__(self, key: str) -> bool:
        return key in self.written or key in self.position

    def __getitem__(self, key: str) -> Known:
        if key in self.written:
            return self.written[key]
        row = self.position[key]
        return Known(int(self.ids[row]), self.hashes[row].as_py(), self.captions[row].as_py())

    def update(self, items) -> None:
        self.written.update(items)


def _write_part(store: Store, part: Part, given: SourceRows, known: KnownKeys) -> tuple[int, int]:
    """Stream *part* in chunks of IMPORT_CHUNK rows, so memory does not grow with file size.
    Returns (rows imported, rows updated)."""
    if isinstance(given.keys, RowKeys):
        positions = np.arange(len(given.keys), dtype=np.int64)
    else:
        last = {key: i for i, key in enumerate(given.keys)}  # a key given twice: its last features win
        positions = np.sort(np.fromiter(last.values(), np.int64, len(last)))
        del last
    imported = updated = 0
    bar = progress(len(positions), f"import {Path(part.name).name}")
    # Made before this part reserves ids, so the rows earlier parts of this run added are old to it:
    # one of those whose key comes again with new features is upserted, never appended twice.
    with Committer(store.tables, first_new_id=store.next_free_id(), every=1) as committer:
        for start in range(0, len(positions), IMPORT_CHUNK):
            chunk = positions[start:start + IMPORT_CHUNK]
            fresh, changed = _write_chunk(store, committer, part, given, chunk, known)
            imported, updated = imported + fresh, updated + changed
            bar.update(len(chunk))
    bar.close()
    return imported, updated


def _write_chunk(store: Store, committer: Committer, part: Part, given: SourceRows, chunk: np.ndarray,
                 known: KnownKeys) -> tuple[int, int]:
    """The rows at positions *chunk* of *part*: a key *known* lacks gets a fresh id, one whose
    features changed is written again under its own, and *known* learns both. Returns (rows
    imported, rows updated)."""
    vectors = normalised(part.features[chunk])
    drop_mapped_pages(part.features)
    hashes = [feature_hash(vector) for vector in vectors]
    keys = [given.keys[row] for row in chunk]
    fresh = [j for j, key in enumerate(keys) if key not in known]
    changed = [j for j, key in enumerate(keys) if key in known and known[key].hash != hashes[j]]
    if not fresh and not changed:
        return 0, 0
    first = store.reserve_ids(len(fresh)) if fresh else 0
    picked = fresh + changed
    ids = [*range(first, first + len(fresh)), *(known[keys[j]].id for j in changed)]
    columns = given.take(chunk[picked])
    stored = [None] * len(fresh) + [known[keys[j]].caption for j in changed]
    # A changed row whose source gives no caption keeps the one it has.
    columns["caption"] = [caption if caption is not None else old for caption, old in zip(columns["caption"], stored)]
    captions = caption_vectors(part.texts[chunk[picked]]) if part.texts is not None else None
    committer.add(imported_rows(store.manifest.dim, ids, [hashes[j] for j in picked], vectors[picked], captions,
                                columns))
    written = dict(zip(picked, columns["caption"]))  # the caption each row now has, kept or given
    if not isinstance(given.keys, RowKeys):  # a later part may name the same keys; a file's row keys are its alone
        known.update((keys[j], Known(first + n, hashes[j], written[j])) for n, j in enumerate(fresh))
    known.update((keys[j], Known(known[keys[j]].id, hashes[j], written[j])) for j in changed)
    return len(fresh), len(changed)


def imported_rows(dim: int, ids: Sequence[int], hashes: Sequence[str], vectors: np.ndarray,
                  captions: pa.Array | None, columns: dict) -> pa.Table:
    """Images-table rows of imported features: unit *vectors* with their *hashes* under *ids*,
    caption embeddings where the source has them, and the row's columns (:meth:`SourceRows.take`)."""
    return image_rows(dim, id=np.asarray(ids, np.int64), hash=list(hashes), embedding=vectors,
                      caption_embedding=captions, **columns)


def _refuse_dimension(store: Store, source: str, dim: int) -> None:
    if dim != store.manifest.dim:
        raise InputError(f"{source} has {dim}-d features; the store holds "
                         f"{store.manifest.dim}-d features of '{store.manifest.space}'")


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
