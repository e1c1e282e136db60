"""`clipdex index`: wire scan -> plan -> decode/embed -> write -> FAISS, committing as it goes.

Rows are committed in batches; every commit is atomic in Lance, and a file whose row is committed
is skipped by the next run. So a run killed at any moment loses at most one uncommitted batch of
work, and a rerun finishes the job with every image in the store exactly once.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Collection, Iterator, Sequence

import pyarrow as pa

from encoder import DEFAULT_MODEL, MODELS, ClipModel, ModelPool, pretrained_label, weights_sha256
from encoder.exported import keep_text_tower, key_for
from encoder.prompts import text_queries
from indexer.config import IndexConfig, RayConfig
from indexer.engine import Embedding, Session, Target, decode_threads
from indexer.engines import ENGINES as ENGINE_REGISTRY
from indexer.engines import engine_for
from indexer.photos import fill_photo_columns
from indexer.pipeline import StageReport, stage_line
from indexer.plan import Plan, Planner, read_captions, sidecar_caption
from indexer.rows import file_columns, indexed_rows
from indexer.scanner import Failure, FoundFile, Scan, Walk, is_shard_path, sidecar_path
from indexer.shards import list_shards
from indexer.stored import StoredIndex, StoredRows
from store.commit import Committer
from store.errors import InputError
from store.files import prune_thumbnails
from store.lock import writer_lock
from store.manifest import PHOTO_VERSION
from store.queries import has_query_set
from store.remote import StorageOptions
from store.store import Store, expand
from store.tables import FAILURE_SCHEMA, PHOTO_COLUMNS, column_vectors, split_path

__all__ = ["ENGINES", "IndexConfig", "IndexSummary", "RayConfig", "index_paths"]

LOG = logging.getLogger(__name__)
ENGINES = tuple(ENGINE_REGISTRY)  # the names --engine takes


@dataclass(frozen=True)
class IndexSummary:
    scanned: int
    embedded: int
    reused: int
    removed: int
    failed: int
    unchanged: int
    seconds: float
    count: int
    index: str
    recall_at_10: float | None
    moved: int = 0  # files recognised by content at a new path (renamed folders included)
    unavailable: dict[str, int] = field(default_factory=dict)  # root -> rows kept, not seen this run
    stages: dict[str, float] = field(default_factory=dict)  # scan, load (model, store), plan, embed, finish: s
    feed: dict | None = None  # indexer.pipeline.StageReport.to_dict() of the embedding stages
    skipped_mounts: tuple[str, ...] = ()  # file systems mounted below a root, not entered (see --cross-mounts)
    recall: dict[str, float] = field(default_factory=dict)  # the index's recall@10 per query set (image, text, ...)
    target_met: bool | None = None  # False: tuning stopped at --max-query-ms before every set reached the target

    @property
    def indexed(self) -> int:
        """Files of this run that are in the store now."""
        return self.scanned - self.failed

    def to_dict(self) -> dict:
        return asdict(self)

    def stage_line(self) -> str:
        """Where the run's time went, and what bounded the embedding: one line for ``clipdex -v index``."""
        line = "stages: " + " · ".join(f"{stage} {seconds:.2f}s" for stage, seconds in self.stages.items())
        return line + (f" | embedding: {stage_line(self.feed)}" if self.feed and self.feed["images"] else "")


def choose_model(existing: Store | None, config: IndexConfig) -> tuple[str, str | None]:
    if config.model:
        return config.model, config.pretrained
    if existing is not None:
        return existing.manifest.model, config.pretrained or existing.manifest.pretrained
    return DEFAULT_MODEL, config.pretrained


def index_paths(paths: Sequence[str | os.PathLike], store_dir: str | Path,
                config: IndexConfig = IndexConfig(), models: ModelPool = MODELS) -> IndexSummary:
    """Embed the images under *paths* into the store at *store_dir*, incrementally (see module doc).

    *models* is the pool the model comes from (a benchmark passes one with a stand-in encoder).
    Holds the store's writer lock for the whole run: a second writer fails at once (or waits with
    ``config.wait``), so two runs never hand one id to two files.
    """
    clock = _Clock()
    engine = engine_for(config)  # before anything is scanned: an option it cannot honour is one line at once
    store_dir = expand(store_dir)
    walk = Walk(paths, exclude=[store_dir], cross_mounts=config.cross_mounts, storage=config.storage_options)
    found = iter(walk)
    first = next(found, None)  # a folder with nothing to index is one line before a model loads
    if not Store.exists(store_dir):
        Store.refuse_lost_manifest(store_dir)  # before a model loads for what would be a new store
        if walk.missing:
            raise InputError(f"no such file or folder: {walk.missing[0]}")
        if first is None and not walk.failures:
            raise InputError(f"no image files found under {', '.join(map(str, paths))}")
    found = itertools.chain([first] if first is not None else [], found)
    clock.lap("scan")  # the roots, and the walk to its first file: the rest of it goes with the plan
    # The engine's session first: an unreachable cluster stops the run before the store is touched.
    with engine.session(config) as session, writer_lock(store_dir, wait=config.wait):
        run = _open(walk, store_dir, config, models, clock)
        with _long_lived_frozen():
            return _update(run, found, session)


@dataclass
class _Clock:
    """Where a run's time went, stage by stage (IndexSummary.stages)."""
    started: float = field(default_factory=time.perf_counter)
    stages: dict[str, float] = field(default_factory=dict)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def lap(self, stage: str) -> None:
        """The time since the last lap is *stage*'s."""
        self.stages[stage] = self.elapsed() - sum(self.stages.values())


@dataclass(frozen=True)
class _Run:
    """One run, once the store is open and its model loaded."""
    walk: Walk  # being walked: what it could not list, and its captions, grow as the run goes
    store: Store
    model: ClipModel
    name: str
    pretrained: str | None
    config: IndexConfig
    clock: _Clock


def _open(walk: Walk, store_dir: Path, config: IndexConfig, models: ModelPool, clock: _Clock) -> _Run:
    """The store (created if new) and its model, checked against each other before any row is written."""
    existing = Store.open(store_dir, writable=True) if Store.exists(store_dir) else None
    name, pretrained = choose_model(existing, config)
    label = pretrained_label(name, pretrained)
    weights = weights_sha256(label)
    if existing is not None:  # refuse a mismatch before spending time on loading a model
        existing.check_model(name, label, weights_sha256=weights)
    # The file read must be the one the store recorded (or, for a new store, the one just hashed).
    recorded = (existing.manifest.weights_sha256 if existing is not None else "") or weights
    model = models.get(name, pretrained, device=config.device, weights_sha256=recorded, precision=config.precision)
    LOG.info("model loaded at %.2fs", clock.elapsed())
    if existing is not None:
        existing.check_model(model.name, model.pretrained, model.embed_dim, weights)
        existing.record_weights(model.pretrained, weights)
        existing.tables.upgrade()
    store = existing or Store.create(store_dir, model.name, model.pretrained, model.embed_dim,
                                     preprocess=model.preprocess_cfg, weights_sha256=weights)
    clock.lap("load")  # start-up, whatever the number of files: the model, and the store with its libraries' imports
    return _Run(walk, store, model, name, pretrained, config, clock)


@contextlib.contextmanager
def _long_lived_frozen():
    """Keeps the garbage collector off what start-up made (the model, the libraries: ~0.5M objects).

    The run makes objects by the thousand per batch, so full collections come every few seconds,
    and each one walked everything: 0.1-0.2 s apiece, a fifth of the host's time at 5,000 img/s.
    Unfrozen at the end, so a long-lived process still collects them.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _update(run: _Run, found: Iterator[FoundFile], session: Session) -> IndexSummary:
    """Plan, embed (on the session's engine) and finish (index, manifest) the run's store, a
    chunk of the walk at a time: what a chunk needs is planned, embedded and committed before the
    next is walked, so the run holds one chunk of files, never the library (see Planner)."""
    store, config, clock, walk = run.store, run.config, run.clock, run.walk
    unknown = [root for root in walk.missing if not store.tables.holds_under(root)]
    if unknown:  # before anything is written
        raise InputError(f"no such file or folder: {unknown[0]} (and the store holds nothing from there)")
    captions = _caption_lookup(config.captions, walk.sidecars, config.storage_options)
    stored = StoredIndex(store.tables)
    clock.lap("rows")  # the stored rows' paths read (StoredIndex): seconds at 100M rows
    planner = Planner(stored, store.next_free_id(), captions, session.workers or max(4, decode_threads(config)),
                      prune=config.prune, hashing=(store.manifest.content_hash, config.storage_options),
                      waiting=config.chunk_files)
    done = _Done(first_new_id=planner.first_new_id)
    photo_paths: set[str] | None = set() if store.manifest.photo_version < PHOTO_VERSION else None
    with _bar(config, None, "indexing") as bar:
        for files, rows in _chunks(found, run, stored, session, done):
            done.found += len(files)
            if photo_paths is not None:
                photo_paths.update(f.path for f in files)
            done.write(run, session, planner.chunk(files, rows), bar.update)
        summary = walk.summary()
        done.write(run, session, planner.finish(summary, walk.empty_roots()), bar.update)
    clock.lap("plan")  # the walk, the plan and the embedding, chunk after chunk: told apart here
    clock.stages["plan"] -= done.embed_seconds
    clock.stages["embed"] = done.embed_seconds
    LOG.info("indexed at %.2fs: %d embedded, %d moves, %d copies, %d removed", clock.elapsed(), done.embedded,
             done.moves, done.copies, len(done.removed))
    if done.embedded and run.model.precision not in store.manifest.precisions:
        store.update_manifest(precisions=(*store.manifest.precisions, run.model.precision))
    store.tables.delete_ids(done.removed + done.failed_modified)
    failures = list(summary.failures) + done.failures
    store.tables.replace_failures(_failure_rows(failures), forget=summary.covers)

    if photo_paths is not None:  # a store from before the photo columns: read, not embedded
        with _bar(config, len(photo_paths), "photo metadata") as bar:
            photos = fill_photo_columns(store, photo_paths, max(1, config.readers or 4), bar.update)
    else:
        photos = 0
    changed = done.changed or done.removed or done.failed_modified or photos
    if changed:
        store.tables.compact()
    if done.removed or done.failed_modified or done.replaced_content:
        prune_thumbnails(store.directory, lambda hashes: store.tables.rows_by_hash(hashes, ["hash"])
                         .column("hash").to_pylist())
        LOG.info("compacted at %.2fs", clock.elapsed())
    roots = set(store.manifest.roots) | set(summary.roots)
    if config.prune:
        roots -= set(done.unavailable)
    if roots != set(store.manifest.roots):
        store.update_manifest(roots=tuple(sorted(roots)))
    info = store.manifest.index
    if changed or not info.file or info.table_version != store.tables.version():
        info = store.update_index(config.ann, session.workers, _missing_text_queries(run))
    else:
        store.update_manifest(count=store.tables.count(), failures=store.tables.failure_count())
    if done.embedded:
        keep_text_tower(run.model, key_for(store.manifest.model, store.manifest.pretrained,
                                           store.manifest.weights_sha256))
    clock.lap("finish")
    return IndexSummary(
        scanned=done.found + len(summary.failures), embedded=done.embedded, reused=done.copies + done.moved,
        removed=len(done.removed) + len(done.failed_modified), failed=len(failures), unchanged=done.unchanged,
        seconds=round(clock.elapsed(), 3), count=store.manifest.count, index=info.type,
        recall_at_10=info.recall_at_10, recall=dict(info.recall), target_met=info.target_met,
        moved=done.moved,
        unavailable={} if config.prune else dict(done.unavailable),
        stages={stage: round(seconds, 3) for stage, seconds in clock.stages.items()},
        feed=done.report().to_dict() if done.reports else None, skipped_mounts=summary.skipped_mounts)


CHUNK_SHARD_BYTES = 64 << 10  # shard bytes a chunk's file stands for: a group of shards is listed at a time


def _chunks(found: Iterator[FoundFile], run: _Run, stored: StoredIndex, session: Session,
            done: "_Done") -> Iterator[tuple[list[FoundFile], StoredRows | None]]:
    """The walk as chunks of up to ``config.chunk_files`` files (their rows fetched by the
    planner), and groups of shards listed together, as their members with their rows."""
    size = max(1, run.config.chunk_files)
    files: list[FoundFile] = []
    shards: list[FoundFile] = []
    failed: list[list[str]] = []  # the store's failure paths, read once, when the first shard comes

    def group() -> tuple[list[FoundFile], StoredRows]:
        if not failed:
            failed.append(run.store.tables.failure_paths())
        return _listed(shards, run, stored, session, failed[0], done)

    for item in found:
        if not is_shard_path(item.path):
            files.append(item)
            if len(files) >= size:
                yield files, None
                files = []
            continue
        shards.append(item)
        if sum(shard.bytes for shard in shards) >= size * CHUNK_SHARD_BYTES:
            yield group()
            shards = []
    if files:
        yield files, None
    if shards:
        yield group()


def _listed(shards: list[FoundFile], run: _Run, stored: StoredIndex, session: Session, failed: list[str],
            done: "_Done") -> tuple[list[FoundFile], StoredRows]:
    """The members of a group of shards (indexer.shards.list_shards), with the rows of those shards;
    their KEY.json fields become columns before any row carries them."""
    rows = stored.rows_in_shards(split_path(shard.path)[0] for shard in shards)
    group = Scan((), (), (), shards=tuple(shards), storage=run.config.storage_options)
    listed = list_shards(group, rows, failed, None, session.workers)
    run.store.tables.add_metadata_columns(listed.metadata_fields)
    done.failures += listed.failures
    done.found += len(listed.failures)
    return list(listed.files), rows


@dataclass
class _Done:
    """What a run has written so far, chunk by chunk."""
    first_new_id: int  # the run's: ids below it were rows before the run
    found: int = 0
    unchanged: int = 0
    embedded: int = 0
    moves: int = 0
    moved: int = 0
    copies: int = 0
    changed: bool = False
    replaced_content: bool = False  # a row's content embedded again: its thumbnail may be stale
    removed: list[int] = field(default_factory=list)
    failed_modified: list[int] = field(default_factory=list)  # stored rows whose new content failed: removed
    failures: list[Failure] = field(default_factory=list)
    unavailable: dict[str, int] = field(default_factory=dict)
    reports: list = field(default_factory=list)
    embed_seconds: float = 0.0

    def write(self, run: _Run, session: Session, plan: Plan, progress: Callable[[int], None]) -> None:
        """Reserve a plan's new ids, write its moves and copies, embed the rest."""
        store = run.store
        if plan.new_ids:
            store.reserve_ids(plan.new_ids, first=plan.first_new_id)
        _write_moves(run, plan)
        _write_copies(run, plan)
        progress(plan.unchanged + len(plan.moves) + len(plan.copies) + len(plan.failures))
        started = time.perf_counter()
        embedding = session.embed(Target(store, run.model, run.name, run.pretrained, plan.first_new_id),
                                  plan.embed, progress) if plan.embed else Embedding(0)
        self.embed_seconds += time.perf_counter() - started
        if embedding.report:
            self.reports.append(embedding.report)
        self.unchanged += plan.unchanged
        self.embedded += embedding.written
        self.moves += len(plan.moves)
        self.moved += plan.moved
        self.copies += len(plan.copies)
        self.changed |= bool(embedding.written or plan.moves or plan.copies or plan.recaption)
        self.replaced_content |= any(job.id < self.first_new_id for job in plan.embed)
        self.removed += plan.removed_ids
        self.failed_modified += [plan.embed[position].id for position, _ in embedding.failures
                                 if plan.embed[position].id < self.first_new_id]
        self.failures += plan.failures + [Failure(e.path, e.reason, e.detail) for _, e in embedding.failures]
        self.unavailable.update(plan.unavailable)

    def report(self) -> StageReport:
        return StageReport.combined(self.reports, self.embed_seconds, 1)


def _missing_text_queries(run: _Run) -> dict:
    """The tuning prompts in the store's model, for a store that does not keep them yet (made
    once: the prompts and the model never change for a store)."""
    return {} if has_query_set(run.store.directory, "text") else {"text": text_queries(run.model)}


def _caption_lookup(sources: Sequence[str], sidecars: Collection[str], storage: StorageOptions):
    """A file's caption: from the captions files, else from its sidecar among *sidecars* (the scan's)."""
    mapping = read_captions(sources) if sources else {}

    def caption(path: str) -> str | None:
        return mapping.get(path) or (sidecar_caption(path, storage) if sidecar_path(path) in sidecars else None)

    return caption


def _bar(config: IndexConfig, total: int | None, desc: str, unit: str = "img"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not config.progress or None,
                dynamic_ncols=True, leave=False)


def _write_moves(run: _Run, plan: Plan) -> None:
    """Moved, touched and re-captioned files: new metadata under the same id, no re-embedding."""
    jobs = plan.moves + plan.recaption
    if jobs:
        run.store.tables.update_files(indexed_rows(run.model, file_columns(jobs), partial=True))


def _write_copies(run: _Run, plan: Plan) -> None:
    """Copies of stored files: new rows with the source row's size and vector, no re-embedding."""
    if not plan.copies:
        return
    source_ids = sorted({j.source_id for j in plan.copies})
    sources = run.store.tables.rows_by_id(source_ids, ["id", "width", "height", *PHOTO_COLUMNS, "embedding"])
    by_id = {row_id: i for i, row_id in enumerate(sources.column("id").to_pylist())}
    jobs = [job for job in plan.copies if job.source_id in by_id]  # a source deleted meanwhile: next run embeds
    take = pa.array([by_id[job.source_id] for job in jobs])
    same = {name: sources.column(name).take(take) for name in ("width", "height", *PHOTO_COLUMNS)}  # the same bytes
    with Committer(run.store.tables, plan.first_new_id) as committer:
        committer.add(indexed_rows(run.model, file_columns(jobs), **same,
                                   embedding=column_vectors(sources)[take.to_numpy()]))


def _failure_rows(failures: Sequence[Failure]) -> pa.Table:
    when = datetime.now(timezone.utc).replace(microsecond=0)
    return pa.table({
        "path": [split_path(f.path)[0] for f in failures], "reason": [f.reason for f in failures],
        "detail": [f.detail for f in failures], "time": pa.array([when] * len(failures), FAILURE_SCHEMA.field("time").type),
    }, schema=FAILURE_SCHEMA)
