"""`clipdex index`: wire scan -> plan -> decode/embed -> write -> FAISS, committing as it goes.

Rows are committed in batches; every commit is atomic in Lance, and a file whose row is committed
is skipped by the next run. So a run killed at any moment loses at most one uncommitted batch of
work, and a rerun finishes the job with every image in the store exactly once.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Collection, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from encoder import DEFAULT_MAX_PIXELS, DEFAULT_MODEL, MODELS, ClipModel, ModelPool, pretrained_label, weights_sha256
from indexer.pipeline import Batch, run_pipeline, stage_line
from indexer.plan import Job, Plan, make_plan, read_captions, sidecar_caption
from indexer.ray_engine import Cluster, RayConfig, embed_on_ray, ray_module, ray_session
from indexer.rows import caption_vectors, file_columns
from indexer.scanner import Failure, Scan, scan, sidecar_path
from store.ann import AnnConfig
from store.errors import InputError
from store.files import prune_thumbnails
from store.lock import writer_lock
from store.store import Store, expand
from store.tables import FAILURE_SCHEMA, column_vectors, image_rows, split_path

LOG = logging.getLogger(__name__)
ENGINES = ("local", "ray")


@dataclass(frozen=True)
class IndexConfig:
    model: str | None = None  # None: the store's model, or ViT-B-32 for a new store
    pretrained: str | None = None
    device: str = "auto"
    batch_size: int | None = None  # None: 64 on CPU, 256 on CUDA
    workers: int | None = None  # decoding threads; None: one per core, at most 8
    readers: int | None = None  # threads reading files; None: as many as decoding threads
    decoder: str = "auto"  # pillow | torchvision | auto (torchvision on CUDA): encoder.feed.make_feed
    captions: tuple[str, ...] = ()
    max_pixels: int = DEFAULT_MAX_PIXELS
    exact_decode: bool = False  # False: large JPEGs decoded reduced, as far as encoder.reduction allows
    commit_every: int = 1024
    ann: AnnConfig = field(default_factory=AnnConfig)
    progress: bool = True
    wait: bool = False  # another writer holds the store: wait for it (False: fail at once, naming it)
    prune: bool = False  # remove the rows of roots that are missing, unreadable or empty
    cross_mounts: bool = False  # also enter file systems mounted below a root (never /proc, /sys and the like)
    engine: str = "local"  # local | ray (decode and embed on a Ray cluster: indexer/ray_engine.py)
    ray: RayConfig = field(default_factory=RayConfig)


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
    started = time.perf_counter()
    if config.engine not in ENGINES:
        raise InputError(f"unknown engine '{config.engine}' (one of {', '.join(ENGINES)})")
    if config.engine == "ray":
        ray_module()  # before anything is scanned: a missing extra is one line at once
    store_dir = expand(store_dir)
    found = scan(paths, exclude=[store_dir], cross_mounts=config.cross_mounts)
    scanned = time.perf_counter()
    LOG.info("scanned %d files in %.2fs", len(found.files), time.perf_counter() - started)
    if not Store.exists(store_dir):
        if found.missing:
            raise InputError(f"no such file or folder: {found.missing[0]}")
        if not found.files and not found.failures:
            raise InputError(f"no image files found under {', '.join(map(str, paths))}")
    # The cluster first: an unreachable one stops the run before the store is touched.
    cluster = ray_session(config.ray) if config.engine == "ray" else contextlib.nullcontext()
    with cluster as joined, writer_lock(store_dir, wait=config.wait):
        return _index(found, store_dir, config, started, scanned, models, joined)


def _index(found: Scan, store_dir: Path, config: IndexConfig, started: float, scanned: float, models: ModelPool,
           cluster: Cluster | None = None) -> IndexSummary:
    existing = Store.open(store_dir, writable=True) if Store.exists(store_dir) else None
    name, pretrained = choose_model(existing, config)
    label = pretrained_label(name, pretrained)
    weights = weights_sha256(label)
    if existing is not None:  # refuse a mismatch before spending time on loading a model
        existing.check_model(name, label, weights_sha256=weights)
    # The file read must be the one the store recorded (or, for a new store, the one just hashed).
    recorded = (existing.manifest.weights_sha256 if existing is not None else "") or weights
    model = models.get(name, pretrained, device=config.device, weights_sha256=recorded)
    LOG.info("model loaded at %.2fs", time.perf_counter() - started)
    if existing is not None:
        existing.check_model(model.name, model.pretrained, model.embed_dim, weights)
        existing.record_weights(model.pretrained, weights)
        existing.tables.upgrade()
    store = existing or Store.create(store_dir, model.name, model.pretrained, model.embed_dim,
                                     preprocess=model.preprocess_cfg, weights_sha256=weights)
    # Start-up, whatever the number of files: the model, and the store with its libraries' imports.
    timings = {"scan": scanned - started, "load": time.perf_counter() - scanned}
    with _long_lived_frozen():
        return _update(found, store, model, name, pretrained, config, started, timings, cluster)


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


def _update(found: Scan, store: Store, model: ClipModel, name: str, pretrained: str | None, config: IndexConfig,
            started: float, timings: dict[str, float], cluster: Cluster | None) -> IndexSummary:
    """Plan, embed and finish (index, manifest) a store already open with its model loaded."""
    captions = _caption_lookup(config.captions, found.sidecars)
    workers = config.workers if config.workers is not None else min(8, os.cpu_count() or 1)

    with _bar(config, len(found.files), "checking") as bar:
        plan = make_plan(found, store.tables.file_rows(), store.next_free_id(), captions, max(4, workers),
                         bar.update, prune=config.prune, hashing=store.manifest.content_hash)
    unknown = [root for root in found.missing if root not in plan.unavailable]
    if unknown:
        raise InputError(f"no such file or folder: {unknown[0]} (and the store holds nothing from there)")
    store.reserve_ids(plan.new_ids, first=plan.first_new_id)
    timings["plan"] = time.perf_counter() - started - sum(timings.values())
    LOG.info("planned at %.2fs: %d to embed, %d moves, %d copies, %d removed", time.perf_counter() - started,
             len(plan.embed), len(plan.moves), len(plan.copies), len(plan.removed_ids))

    _write_moves(store, model, plan)
    _write_copies(store, model, plan)
    if config.engine == "ray":
        with _bar(config, len(plan.embed), "embedding") as bar:
            embedded, decode_failures = embed_on_ray(
                store, name, pretrained, config.device, plan.embed, config.exact_decode, config.max_pixels,
                config.commit_every, plan.first_new_id, config.ray, bar.update)
        feed = None
    else:
        embedded, decode_failures, feed = _embed(store, model, plan.embed, config, workers, plan.first_new_id)
    timings["embed"] = time.perf_counter() - started - sum(timings.values())
    LOG.info("embedded %d at %.2fs", embedded, time.perf_counter() - started)
    failed_modified = [plan.embed[pos].id for pos, _ in decode_failures if plan.embed[pos].id < plan.first_new_id]
    store.tables.delete_ids(plan.removed_ids + failed_modified)

    failures = list(found.failures) + plan.failures + [Failure(e.path, e.reason, e.detail) for _, e in decode_failures]
    store.tables.replace_failures(_failure_rows(failures), forget=found.covers)

    changed = embedded or plan.moves or plan.copies or plan.recaption or plan.removed_ids or failed_modified
    if changed:
        store.tables.compact()
    if plan.removed_ids or failed_modified or any(job.id < plan.first_new_id for job in plan.embed):
        prune_thumbnails(store.directory, set(store.tables.file_rows().column("hash").to_pylist()))
        LOG.info("compacted at %.2fs", time.perf_counter() - started)
    roots = set(store.manifest.roots) | set(found.roots)
    if config.prune:
        roots -= set(plan.unavailable)
    if roots != set(store.manifest.roots):
        store.update_manifest(roots=tuple(sorted(roots)))
    info = store.manifest.index
    if changed or not info.file or info.table_version != store.tables.version():
        info = store.rebuild_index(config.ann, *((cluster.map, cluster.shards) if cluster else ()))
    else:
        store.update_manifest(count=store.tables.count(), failures=store.tables.failure_count())
    timings["finish"] = time.perf_counter() - started - sum(timings.values())
    return IndexSummary(
        scanned=len(found.files) + len(found.failures), embedded=embedded, reused=plan.reused,
        removed=len(plan.removed_ids) + len(failed_modified), failed=len(failures), unchanged=plan.unchanged,
        seconds=round(time.perf_counter() - started, 3), count=store.manifest.count, index=info.type,
        recall_at_10=info.recall_at_10, moved=plan.moved,
        unavailable={} if config.prune else dict(plan.unavailable),
        stages={stage: round(seconds, 3) for stage, seconds in timings.items()},
        feed=feed.to_dict() if feed else None, skipped_mounts=found.skipped_mounts)


def _caption_lookup(sources: Sequence[str], sidecars: Collection[str]):
    """A file's caption: from the captions files, else from its sidecar among *sidecars* (the scan's)."""
    mapping = read_captions(sources) if sources else {}

    def caption(path: str) -> str | None:
        return mapping.get(path) or (sidecar_caption(path) if sidecar_path(path) in sidecars else None)

    return caption


def _bar(config: IndexConfig, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=not config.progress or None,
                dynamic_ncols=True, leave=False)


def _write_moves(store: Store, model: ClipModel, plan: Plan) -> None:
    """Moved, touched and re-captioned files: new metadata under the same id, no re-embedding."""
    jobs = plan.moves + plan.recaption
    if jobs:
        store.tables.update_files(image_rows(model.embed_dim, partial=True, **file_columns(jobs),
                                             caption_embedding=caption_vectors(model, [j.caption for j in jobs])))


def _write_copies(store: Store, model: ClipModel, plan: Plan) -> None:
    if not plan.copies:
        return
    source_ids = sorted({j.source_id for j in plan.copies})
    sources = store.tables.rows_by_id(source_ids, ["id", "width", "height", "embedding"])
    by_id = {row_id: i for i, row_id in enumerate(sources.column("id").to_pylist())}
    jobs = [job for job in plan.copies if job.source_id in by_id]  # a source deleted meanwhile: next run embeds
    take = pa.array([by_id[job.source_id] for job in jobs])
    store.tables.add(image_rows(
        model.embed_dim, **file_columns(jobs),
        width=sources.column("width").take(take), height=sources.column("height").take(take),
        embedding=column_vectors(sources)[take.to_numpy()], caption_embedding=caption_vectors(model, [j.caption for j in jobs])))


def _embed(store: Store, model: ClipModel, jobs: list[Job], config: IndexConfig, workers: int, first_new_id: int):
    """Read, decode and embed in overlapped stages (indexer/pipeline.py); the writer thread builds
    rows and commits every ``commit_every`` of them.

    New ids are appended; rows of modified files (older ids) are upserted, which costs a join.
    """
    pending: list[pa.Table] = []
    pending_rows, embedded, failures = 0, 0, []

    def commit() -> None:
        nonlocal pending, pending_rows, embedded
        if pending:
            rows = pa.concat_tables(pending)
            is_new = pc.greater_equal(rows.column("id"), first_new_id)
            store.tables.add(rows.filter(is_new))
            if not pc.all(is_new).as_py():
                store.tables.upsert(rows.filter(pc.invert(is_new)))
            embedded += pending_rows
            pending, pending_rows = [], 0

    def write(batch: Batch) -> None:
        nonlocal pending_rows
        failures.extend(batch.failures)
        if batch.positions:
            batch_jobs = [_hashed(jobs[p], batch.hashes.get(p)) for p in batch.positions]
            pending.append(image_rows(
                model.embed_dim, **file_columns(batch_jobs),
                width=[w for w, _ in batch.sizes], height=[h for _, h in batch.sizes], embedding=batch.vectors(),
                caption_embedding=caption_vectors(model, [j.caption for j in batch_jobs])))
            pending_rows += len(batch_jobs)
        if pending_rows >= config.commit_every:
            commit()

    feed = model.feed(config.decoder, config.exact_decode, config.max_pixels)
    batch_size = config.batch_size or (256 if model.device.startswith("cuda") else 64)
    with _bar(config, len(jobs), "embedding") as bar:
        report = run_pipeline([job.file.path for job in jobs], feed, write, batch_size,
                              config.readers or workers, workers, bar.update,
                              unhashed={position for position, job in enumerate(jobs) if job.hash is None},
                              hashing=store.manifest.content_hash)
    commit()
    return embedded, failures, report


def _hashed(job: Job, digest: str | None) -> Job:
    return job if digest is None else replace(job, hash=digest)


def _failure_rows(failures: Sequence[Failure]) -> pa.Table:
    when = datetime.now(timezone.utc).replace(microsecond=0)
    return pa.table({
        "path": [split_path(f.path)[0] for f in failures], "reason": [f.reason for f in failures],
        "detail": [f.detail for f in failures], "time": pa.array([when] * len(failures), FAILURE_SCHEMA.field("time").type),
    }, schema=FAILURE_SCHEMA)
