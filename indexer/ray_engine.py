"""`clipdex index --engine ray`: decode and embed on a Ray cluster, with the same guarantees.

The driver does what it does locally: scan, plan, reserve ids (one plan, one id authority) and
commit. Only the decode + embed stage moves: a pool of actors (the model loaded once per actor,
kept for the whole run) turns each block of a chunk's jobs into rows. Rows of new ids are written by the actor itself as Lance fragments beside the table, so
vectors never travel through the driver; the driver commits the fragments it has been told of
in one atomic ``Append`` per checkpoint. A driver killed at any moment leaves committed rows
(skipped by the rerun) and unreferenced fragment files (never rows), so a rerun still ends with
every image exactly once. Rows of modified files keep their ids: those come back to the driver
and are upserted, as locally. Files that cannot be decoded come back as data.

The store must be on a path every worker reaches (a shared file system).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa

from encoder.model import load_model
from indexer.config import IndexConfig, RayConfig
from indexer.engine import Embedding, Progress, Target, embed_files
from indexer.pipeline import StageReport
from indexer.plan import Job
from indexer.rows import file_columns
from store.commit import Committer
from store.errors import ImageError, InputError, first_line
from store.sharded import Workers
from store.tables import conformed

RAY_EXTRA = "the ray engine needs Ray: pip install 'clipdex[ray]'"

__all__ = ["RayConfig", "RayEngine", "ray_module", "ray_session"]


class RayEngine:
    name = "ray"

    def check(self, config: IndexConfig) -> None:
        ray_module()  # a missing extra is one line before anything is scanned

    @contextmanager
    def session(self, config: IndexConfig) -> Iterator["RaySession"]:
        with ray_session(config.ray) as workers:
            session = RaySession(config, workers)
            try:
                yield session
            finally:
                session.close()


@dataclass(frozen=True)
class _Work:
    """What an actor needs: picklable, no open handles. The run's config travels whole, so every
    option means on an actor what it means in the local engine."""
    config: IndexConfig  # with the model and weights the run chose
    first_new_id: int
    uri: str
    schema: pa.Schema
    hashing: str  # the store's content hash, for files the plan left unhashed
    weights_sha256: str = ""  # a local checkpoint's, as the store recorded it: each worker checks its copy

    @property
    def threads(self) -> int:
        """Each actor's torch, reading and decoding threads: the CPUs it reserved."""
        return max(1, int(self.config.ray.cpus_per_worker))


def ray_module():
    try:
        import ray
    except ImportError as error:
        raise InputError(RAY_EXTRA) from error
    return ray


def ray_map(function, jobs: Sequence) -> list:
    """*function* over *jobs* as Ray tasks (a CPU each), results in order."""
    ray = ray_module()
    remote = ray.remote(num_cpus=1)(function)
    return ray.get([remote.remote(job) for job in jobs])


@contextmanager
def ray_session(config: RayConfig) -> Iterator[Workers]:
    """Ray for the length of a run, as the index build's workers: joined at *config.address*, or a
    local cluster started here and stopped after (a session already open in this process is used
    as it is)."""
    ray = ray_module()
    if config.address:
        _check_reachable(config.address)
    started_here = not ray.is_initialized()
    if started_here:
        _start(ray, config.address)
    try:
        yield Workers(ray_map, shards=max(1, int(ray.cluster_resources().get("CPU", 1))))
    finally:
        if started_here:
            ray.shutdown()


def _start(ray, address: str | None) -> None:
    options = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        with warnings.catch_warnings():
            # lancedb warns about fork in any process that forks after loading it; Ray's own
            # processes never touch the tables.
            warnings.filterwarnings("ignore", message="lancedb fork support", category=RuntimeWarning)
            if address:
                ray.init(address=address, **options)
            else:
                ray.init(num_cpus=os.cpu_count() or 1, **options)
    except ConnectionError as error:
        raise InputError(f"cannot reach the Ray cluster at {address}: {first_line(error)}") from error


def _check_reachable(address: str) -> None:
    """Ray retries an address that answers nothing for minutes, printing as it goes; a head that
    is down or misspelt is one line at once instead."""
    match = re.fullmatch(r"(?:ray://)?\[?([^\]]+?)\]?:(\d+)", address.strip())
    if match is None:
        return  # "auto", "local": Ray's own way to find a cluster
    try:
        socket.create_connection((match.group(1), int(match.group(2))), timeout=5).close()
    except OSError as error:
        raise InputError(f"cannot reach the Ray cluster at {address}: {error.strerror or first_line(error)}") from error


class RaySession:
    """The run's actor pool: started on the first chunk the run embeds, kept for every chunk after
    (a run of 100M images embeds 2,000 chunks; loading the model on every actor again per chunk
    cost about 10 s each), killed when the session closes."""

    def __init__(self, config: IndexConfig, workers: Workers) -> None:
        self.config, self.workers = config, workers
        self.actors: list = []

    def close(self) -> None:
        ray = ray_module()
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def embed(self, target: Target, jobs: Sequence[Job], progress: Progress) -> Embedding:
        """Embed *jobs* on the actor pool and commit what the actors wrote, every ``commit_every`` rows."""
        if not jobs:
            return Embedding(0)
        from lance.fragment import FragmentMetadata  # lance is only needed once there is work

        started, ray, store = time.perf_counter(), ray_module(), target.store
        chosen = replace(self.config, model=target.name, pretrained=target.pretrained)
        work = _Work(chosen, target.first_new_id, store.tables.images_uri, store.tables.images.schema,
                     store.manifest.content_hash, store.manifest.weights_sha256)
        table, size = _job_table(jobs), self.config.ray.batch_size
        blocks = [table.slice(start, size) for start in range(0, table.num_rows, size)]  # one block per actor call
        self._grow(ray, work, _actors(ray, self.config.ray, len(jobs)))

        failures, reports = [], []
        with Committer(store.tables, target.first_new_id, self.config.commit_every) as committer:
            for result in _on_pool(ray, self.actors, blocks, work):
                for row in result.to_pylist():
                    failed = [(position, ImageError(path, reason, detail))
                              for position, path, reason, detail in json.loads(row["failures"])]
                    failures += failed
                    reports.append(StageReport.from_dict(json.loads(row["report"])))
                    if row["replaced"]:
                        committer.add(pa.ipc.open_stream(row["replaced"]).read_all())
                    fragments = [FragmentMetadata.from_json(json.dumps(f)) for f in json.loads(row["fragments"])]
                    committer.add_fragments(fragments, row["new"])
                    progress(row["new"] + row["old"] + len(failed))
        return Embedding(committer.written, failures,
                         StageReport.combined(reports, time.perf_counter() - started, len(self.actors)))

    def _grow(self, ray, work: "_Work", wanted: int) -> None:
        """At least *wanted* actors, each with the model loaded (a later chunk with more work than
        the first gets more)."""
        if len(self.actors) >= wanted:
            return
        ray_config = self.config.ray
        actor = ray.remote(num_cpus=ray_config.cpus_per_worker, num_gpus=ray_config.gpus_per_worker or None)(_Embedder)
        self.actors += [actor.remote(work) for _ in range(wanted - len(self.actors))]


IN_FLIGHT = 2  # calls queued on each actor: the next block is there when one finishes


def _on_pool(ray, actors: list, blocks: list[pa.Table], work: "_Work") -> Iterator[pa.Table]:
    """Each block through some actor (IN_FLIGHT at a time on each), results as they come."""
    queue = iter(blocks)
    pending: dict = {}

    def submit(actor) -> None:
        block = next(queue, None)
        if block is not None:
            pending[actor.embed.remote(block, work)] = actor

    for actor in actors:
        for _ in range(IN_FLIGHT):
            submit(actor)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        actor = pending.pop(ready[0])
        result = ray.get(ready[0])
        submit(actor)
        yield result


def _actors(ray, config: RayConfig, jobs: int) -> int:
    if config.workers:
        return config.workers
    resources = ray.cluster_resources()
    if config.gpus_per_worker:
        fit = int(resources.get("GPU", 0) // config.gpus_per_worker)
    else:
        fit = int(resources.get("CPU", 1) // max(config.cpus_per_worker, 1e-9))
    batches = -(-jobs // config.batch_size)
    return max(1, min(fit, batches))


def _job_table(jobs: Sequence[Job]) -> pa.Table:
    columns = file_columns(jobs)
    columns["path"] = [os.fsencode(path) for path in columns["path"]]  # a file name need not be valid UTF-8
    columns["shard"] = pa.array([None if shard is None else os.fsencode(shard) for shard in columns["shard"]], pa.binary())
    return pa.table({"position": pa.array(range(len(jobs)), pa.int64()), **columns})


class _Embedder:
    """One actor: the model loaded once, then batch after batch of jobs into rows, through the
    same feed, pipeline and row builder as the local engine (indexer.engine.embed_files)."""

    def __init__(self, work: _Work) -> None:
        import torch

        torch.set_num_threads(work.threads)
        config = work.config
        self.model = load_model(config.model, config.pretrained, device=config.device,
                                weights_sha256=work.weights_sha256, precision=config.precision)

    def embed(self, jobs: pa.Table, work: _Work) -> pa.Table:
        """*jobs* into rows: new ones written as fragments, the rest sent back; *work*: the chunk's
        (its first new id, the table's schema now)."""
        from lance.fragment import write_fragments  # in the actor's process only

        files = {name: jobs.column(name).to_pylist() for name in jobs.column_names if name != "position"}
        files["path"] = [os.fsdecode(path) for path in files["path"]]
        files["shard"] = [None if shard is None else os.fsdecode(shard) for shard in files["shard"]]
        positions = jobs.column("position").to_numpy()
        tables: list[pa.Table] = []
        failed, report = embed_files(self.model, files, work.config, work.threads, work.hashing, tables.append,
                                     schema=work.schema)
        failures = [[int(positions[p]), e.path, e.reason, e.detail] for p, e in failed]
        fragments, replaced, new, old = [], b"", 0, 0
        if tables:
            rows = pa.concat_tables(tables)
            is_new = np.asarray(rows.column("id")) >= work.first_new_id
            fresh, stored = rows.filter(pa.array(is_new)), rows.filter(pa.array(~is_new))
            new, old = fresh.num_rows, stored.num_rows
            if new:  # written here, beside the table: the driver commits them by reference
                fragments = [f.to_json() for f in write_fragments(conformed(fresh, work.schema), work.uri,
                                                                  schema=work.schema)]
            if old:  # rows of modified files keep their ids: the driver's committer upserts them
                sink = pa.BufferOutputStream()
                with pa.ipc.new_stream(sink, stored.schema) as stream:
                    stream.write_table(stored)
                replaced = sink.getvalue().to_pybytes()
        return pa.table({"fragments": [json.dumps(fragments)], "replaced": pa.array([replaced], pa.binary()),
                         "new": [new], "old": [old], "failures": [json.dumps(failures)],
                         "report": [json.dumps(report.to_dict())]})
