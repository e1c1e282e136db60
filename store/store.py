"""A clipdex store: a folder holding the manifest, the LanceDB tables and the FAISS index."""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from store.ann import (
    AnnConfig,
    AnnIndex,
    build_from,
    lists_file,
    load_index,
    recall_by_set,
    save_index,
    substitution,
)
from store.delta import Delta, changed_since_build, forget, layered
from store.errors import ManifestDamagedError, ModelMismatchError, StoreError
from store.files import writing
from store.lock import writer_lock
from store.manifest import (
    IDENTITY_FIELDS,
    MANIFEST_NAME,
    PHOTO_VERSION,
    IndexInfo,
    Manifest,
    identity_of,
    now,
    read_manifest,
    write_manifest,
)
from store.queries import kept_query_sets, query_set_name, read_query_file, save_query_sets, unit_rows
from store.sharded import Workers, build_sharded
from store.tables import IMAGES, TABLE_DIR, Tables
from store.update import delta_update, load_truth, save_truth, truth_after
from store.values import StoredValues, ValuesWriter

LOG = logging.getLogger(__name__)
INDEX_DIR = "faiss"
# The current index at a path that never changes, for anyone reading the store without clipdex.
# clipdex's own readers open the versioned file the manifest names, which matches the table.
CURRENT_INDEX = f"{INDEX_DIR}/index.faiss"


class Store:
    """Open with :meth:`open` (existing store) or :meth:`create` (new or matching store)."""

    def __init__(self, directory: Path, manifest: Manifest, writable: bool = False) -> None:
        self.directory = directory
        self._manifest = manifest
        self.tables = Tables.open(directory, manifest.dim, writable)
        self.tables.identity = identity_of(manifest)
        self._index = None
        self._index_file = ""
        self._values: tuple[tuple[str, str], StoredValues | None] = (("", ""), None)
        self._delta: tuple[str, Delta | None] = ("", None)

    @classmethod
    def open(cls, directory: str | Path, writable: bool = False) -> "Store":
        """An existing store; *writable* for a writer holding :func:`store.lock.writer_lock`."""
        directory = expand(directory)
        if not directory.is_dir():
            raise StoreError(f"no store at {directory}: create one with `clipdex index PATH --store {directory}`")
        if not (directory / MANIFEST_NAME).exists():
            cls.refuse_lost_manifest(directory)
        store = cls(directory, read_manifest(directory), writable)
        if writable:  # under the writer lock
            store._remove_index_files(keep=store._named_files())  # a killed build's leftovers: maybe gigabytes
            store._keep_identity()
        return store

    @classmethod
    def exists(cls, directory: str | Path) -> bool:
        return (expand(directory) / MANIFEST_NAME).is_file()

    @staticmethod
    def refuse_lost_manifest(directory: str | Path) -> None:
        """A folder with a store's tables but no manifest lost it (deleted, never copied): a new
        store there would take its rows for another model's."""
        directory = expand(directory)
        if (directory / TABLE_DIR / f"{IMAGES}.lance").is_dir():
            raise ManifestDamagedError(f"{directory} holds a store's rows but no {MANIFEST_NAME}: run `clipdex repair "
                                       f"--store {directory}` to rebuild it from the tables")

    @classmethod
    def create(cls, directory: str | Path, model: str, pretrained: str, dim: int,
               preprocess: dict[str, Any] | None = None, space: str | None = None,
               has_text_encoder: bool = True, weights_sha256: str = "") -> "Store":
        """Open the store at *directory*, creating it if needed; refuse one made with another model.
        A writer calls it holding :func:`store.lock.writer_lock`."""
        directory = expand(directory)
        if cls.exists(directory):
            store = cls.open(directory, writable=True)
            store.check_model(model, pretrained, dim, weights_sha256)
            return store
        if directory.exists() and not directory.is_dir():
            raise StoreError(f"{directory} is a file, not a store folder")
        cls.refuse_lost_manifest(directory)
        directory.mkdir(parents=True, exist_ok=True)
        manifest = Manifest(model=model, pretrained=pretrained, dim=dim, space=space or model,
                            has_text_encoder=has_text_encoder, weights_sha256=weights_sha256,
                            preprocess=_jsonable(preprocess or {}), photo_version=PHOTO_VERSION)
        write_manifest(directory, manifest)
        return cls(directory, manifest, writable=True)

    @classmethod
    def snapshot(cls, directory: str | Path, cache_rows: int = 0) -> "Store":
        """A read-only view of the store exactly as its current index saw it.

        The images table is checked out at the version the index was built from and the index is
        loaded, so rows and neighbours always agree while an indexer commits newer versions.
        Up to *cache_rows* rows, their metadata is kept in memory (see :meth:`Tables.pin`).
        """
        store = cls.open(directory)
        info = store.manifest.index
        if not info.file:
            raise StoreError(f"the store {store.directory} has no index yet: run `clipdex index` on it")
        store.tables.pin(info.table_version, cache_rows)
        store.ann_index()
        return store

    def check_model(self, model: str, pretrained: str, dim: int | None = None, weights_sha256: str = "") -> None:
        """Refuse vectors of another model. A checkpoint is recognised by its content: the same
        weights at a new path are accepted, and the manifest then records the new path."""
        m = self._manifest
        same_file = bool(weights_sha256) and weights_sha256 == m.weights_sha256
        if m.model != model or (m.pretrained != pretrained and not same_file) or (dim is not None and m.dim != dim):
            hashes = (f" The checkpoints differ: sha256 {m.weights_sha256[:16]} in the store, "
                      f"{weights_sha256[:16]} given." if m.weights_sha256 and weights_sha256 else "")
            given = f"{dim}-d embeddings of " if dim is not None else ""
            advice = (f"Use another --store for {dim}-d features" if m.model == model and dim is not None
                      else f"Use --model {m.model} --pretrained {m.pretrained}, or another --store")
            raise ModelMismatchError(
                f"the store {self.directory} holds {m.dim}-d embeddings of {m.model} ({m.pretrained}); "
                f"it cannot take {given}{model} ({pretrained}).{hashes} {advice}")

    def record_weights(self, pretrained: str, weights_sha256: str) -> None:
        """After :meth:`check_model` accepted them: where the weights are now, and their hash."""
        m = self._manifest
        if weights_sha256 and (m.pretrained, m.weights_sha256) != (pretrained, weights_sha256):
            self.update_manifest(pretrained=pretrained, weights_sha256=weights_sha256)

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    def refresh(self) -> Manifest:
        """Re-read the manifest, e.g. after another process indexed into this store."""
        self._manifest = read_manifest(self.directory)
        self.tables.refresh()
        return self._manifest

    def update_manifest(self, **changes: Any) -> Manifest:
        manifest = self._manifest.evolve(**changes)
        with writing(self.directory):
            write_manifest(self.directory, manifest)
        self._manifest = manifest
        if set(changes) & set(IDENTITY_FIELDS):
            self._keep_identity()
        return manifest

    def _keep_identity(self) -> None:
        """The images table's copy of the store's identity, brought up to the manifest's (a writer's
        step, before its rows are committed: the commit must not come after an index build)."""
        self.tables.identity = identity_of(self._manifest)
        if self.tables.exists(IMAGES) and self.tables.stored_identity() != self.tables.identity:
            self.tables.record_identity(self.tables.identity)

    def _named_files(self) -> set[str]:
        """The index files the manifest names (the rest of the index folder is a dead build's)."""
        info = self._manifest.index
        return {info.file, info.values, info.delta, CURRENT_INDEX}

    def next_free_id(self) -> int:
        """The first id no row has and no run has reserved."""
        return max(self._manifest.next_id, self.tables.max_id() + 1)

    def reserve_ids(self, count: int, first: int | None = None) -> int:
        """Reserve ``count`` ids from *first* (default :meth:`next_free_id`) in the manifest, before
        any row uses them, so an interrupted run never hands one id to two files. Returns *first*."""
        first = self.next_free_id() if first is None else first
        if first < self._manifest.next_id:
            raise StoreError(f"ids from {first} are already reserved in {self.directory} (next free: "
                             f"{self._manifest.next_id}); another run may be writing to this store")
        self.update_manifest(next_id=first + count)
        return first

    def rebuild_index(self, config: AnnConfig = AnnConfig(), workers: Workers | None = None,
                      queries: Mapping[str, np.ndarray] | None = None) -> IndexInfo:
        """Build the FAISS index from the rows now in the table and record it in the manifest.

        The index is tuned and measured on sampled stored vectors, the store's caption
        embeddings, every query set the store keeps, and *queries* and ``config.tune_queries``
        (kept from now on): :mod:`store.queries`. With *workers* (e.g. Ray tasks), an IVF index
        is trained here and its shards are added in parallel, then merged on disk into an ``.ivfdata`` file beside the index
        (:mod:`store.sharded`)."""
        self.tables.keep_caption_index()  # before the version the index is built from is read
        table_version = self.tables.version()
        _, covered = changed_since_build(self.directory)  # what this build makes moot, forgotten once it is published
        source = self.tables.vector_source()
        sets = self._query_sets(config, queries or {})
        self._remove_index_files(keep=self._named_files())  # a dead build's leftovers: maybe gigabytes
        relative, values = self._fresh_index_names(table_version)
        try:
            with writing(self.directory):
                writer = ValuesWriter(self.directory / values, source.all_ids(), source.dim, config.values_dtype)
                if workers is None:
                    built = build_from(source, config, writer, sets)
                else:
                    built = build_sharded(source, config, writer, workers, lists_file(self.directory / relative),
                                          sets)
                save_index(built.index, self.directory / relative)
                if source.count >= config.delta_min_rows:  # a smaller store is rebuilt, never measured with a delta
                    save_truth(self.directory / values, built.truth)
        except BaseException:
            # A build that failed (a full disk, Ctrl-C) leaves no partial files to fill the disk further.
            self._remove_index_files(keep=self._named_files())
            raise
        note = substitution(source.count, config.kind, built.kind)
        if note:
            warnings.warn(note, stacklevel=2)
        info = IndexInfo(type=built.kind, key=built.key, params=built.params, file=relative, count=source.count,
                         table_version=table_version, recall_at_10=built.recall_at_10,
                         recall_queries=built.recall_queries, build_seconds=round(built.seconds, 3), built=now(),
                         values=values, rerank=built.rerank, recall=built.recall, query_sets=built.query_sets,
                         target_met=built.target_met, built_rows=source.count)
        self.update_manifest(index=info, count=self.tables.count(), failures=self.tables.failure_count())
        with writing(self.directory):
            self._publish_index(relative)
        self._remove_index_files(keep={relative, values, CURRENT_INDEX})
        forget(covered)
        self._index, self._index_file = built.index, relative
        return info

    def update_index(self, config: AnnConfig = AnnConfig(), workers: Workers | None = None,
                     queries: Mapping[str, np.ndarray] | None = None) -> IndexInfo:
        """Bring the index up to the table: a delta beside it where that is sound, else a full
        build (:mod:`store.update`). Given *queries* are kept for the next full build either way."""
        if queries:
            save_query_sets(self.directory, {name: unit_rows(v, name) for name, v in queries.items()})
        self.tables.keep_caption_index()  # a commit of its own: before the delta reads the table's version
        if not config.tune_queries:  # new tuning queries want a build tuned on them
            info = delta_update(self.directory, self._manifest.index, self.tables, config)
            info = info and self._remeasured(info, config)
            if info is not None:
                self.update_manifest(index=info, count=self.tables.count(), failures=self.tables.failure_count())
                self._remove_index_files(keep={info.file, info.values, info.delta, CURRENT_INDEX})
                return info
        return self.rebuild_index(config, workers)

    def _remeasured(self, info: IndexInfo, config: AnnConfig) -> IndexInfo | None:
        """*info* (a delta not yet published) with recall measured on the build's queries over
        the rows there are now, or None when it falls below the target: then a full build."""
        truth = load_truth(self.directory / info.values)
        if truth is None:
            return info  # a build from before kept no truth: its recorded recall stands
        delta = Delta.open(self.directory / info.delta, info.params) if info.delta else Delta.empty(self.manifest.dim)
        now_truth = truth_after(truth, delta)
        if now_truth is None:
            return None
        values = layered(StoredValues.open(self.directory / info.values), delta) if info.rerank > 1 else None
        recall = recall_by_set(AnnIndex(self.faiss_index(), values, info.rerank, delta), now_truth)
        worst = min(recall.values())
        if worst < config.target_recall:
            LOG.info("recall %.3f after the changes is below the target: building the index again", worst)
            return None
        return replace(info, recall=recall, recall_at_10=worst, target_met=True,
                       query_sets={name: rows.stop - rows.start for name, rows in now_truth.named().items()})

    def _query_sets(self, config: AnnConfig, given: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every set the build measures besides sampled stored vectors: the given ones, checked
        and kept first, then what the store keeps, then captions drawn from the table."""
        files = {query_set_name(path): read_query_file(path, self.manifest.dim) for path in config.tune_queries}
        save_query_sets(self.directory, {**{name: unit_rows(v, name) for name, v in given.items()}, **files})
        sets = kept_query_sets(self.directory, self.manifest.dim)
        captions = self.tables.caption_sample(config.recall_queries)
        return {**sets, "captions": captions} if len(captions) else sets

    def _fresh_index_names(self, table_version: int) -> tuple[str, str]:
        """Index file and values folder names that the manifest does not name: a rebuild at the same
        table version must not write over the files that readers still use."""
        current = self._manifest.index
        attempt, stem = 1, f"v{table_version}"
        while f"{INDEX_DIR}/index-{stem}.faiss" == current.file or f"{INDEX_DIR}/values-{stem}" == current.values:
            attempt += 1
            stem = f"v{table_version}-{attempt}"
        return f"{INDEX_DIR}/index-{stem}.faiss", f"{INDEX_DIR}/values-{stem}"

    def _publish_index(self, relative: str) -> None:
        """Make CURRENT_INDEX the index just recorded: a hard link (no copy, where the file system
        has them) renamed over the previous one, so a reader of that path opens the old index or
        the new one, never a partial file."""
        current = self.directory / CURRENT_INDEX
        temporary = current.with_name(f".index.faiss.{os.getpid()}")
        temporary.unlink(missing_ok=True)
        try:
            os.link(self.directory / relative, temporary)
        except OSError:
            shutil.copyfile(self.directory / relative, temporary)
        os.replace(temporary, current)

    def _remove_index_files(self, keep: set[str]) -> None:
        """Every index file and values folder but *keep*. Only the writer (under the store's lock)
        calls this; a reader that mapped a removed file keeps it until it closes it."""
        folder = self.directory / INDEX_DIR
        keep = keep | {lists_file(Path(name)).as_posix() for name in keep if name.endswith(".faiss")}
        for path in folder.iterdir() if folder.is_dir() else ():
            if f"{INDEX_DIR}/{path.name}" not in keep:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)

    def faiss_index(self):
        """The FAISS index named by the manifest (loaded once per index file)."""
        info = self._manifest.index
        if not info.file:
            raise StoreError(f"the store {self.directory} has no index yet: run `clipdex index` on it")
        if self._index is None or self._index_file != info.file:
            path = self.directory / info.file
            if not path.is_file():
                raise StoreError(f"the index file {path} is missing: run `clipdex index` again to rebuild it")
            self._index, self._index_file = load_index(path, info.params), info.file
        return self._index

    def stored_values(self) -> StoredValues | None:
        """The id-sorted values the index build wrote, memory-mapped (None for a store built before
        they existed, or when a newer build replaced them meanwhile)."""
        info = self._manifest.index
        folder, key = info.values, (info.values, info.delta)
        if folder and self._values[0] != key:
            try:
                self._values = (key, layered(StoredValues.open(self.directory / folder), self.delta()))
            except (OSError, ValueError):
                self._values = (key, None)
        return self._values[1] if folder else None

    def delta(self) -> Delta | None:
        """The rows new or changed since the index was built (store/delta.py), or None."""
        folder = self._manifest.index.delta
        if not folder:
            return None
        if self._delta[0] != folder:
            try:
                self._delta = (folder, Delta.open(self.directory / folder, self._manifest.index.params))
            except (OSError, ValueError) as error:
                raise StoreError(f"the index's delta {self.directory / folder} is damaged or missing: "
                                 "run `clipdex reindex`") from error
        return self._delta[1]

    def ann_index(self) -> AnnIndex:
        """The index as searches use it: lossy codes reranked by exact cosine from the stored values."""
        index = self.faiss_index()
        rerank = self._manifest.index.rerank
        values = self.stored_values() if rerank > 1 else None
        if rerank > 1 and values is None:
            raise StoreError(f"the exact values of {self.directory}'s index are missing: run `clipdex reindex`")
        return AnnIndex(index, values, rerank, self.delta())


def reindex(directory: str | Path, config: AnnConfig = AnnConfig(), wait: bool = False,
            workers: Workers | None = None, queries: Mapping[str, np.ndarray] | None = None) -> IndexInfo:
    """Build the store's index again from its rows (after a build that died, or to change its kind)."""
    with writer_lock(expand(directory), wait=wait):
        store = Store.open(directory, writable=True)
        if not store.tables.exists("images") or store.tables.count() == 0:
            raise StoreError(f"the store {store.directory} has no rows to index yet")
        return store.rebuild_index(config, workers, queries)


def expand(directory: str | Path) -> Path:
    """A store folder as given, with ``~`` expanded."""
    return Path(os.path.expanduser(os.fspath(directory)))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
