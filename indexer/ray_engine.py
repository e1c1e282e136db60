"""`clipdex index --engine ray`: decode and embed on a Ray cluster, with the same guarantees.

The driver does what it does locally: scan, plan, reserve ids (one plan, one id authority) and
commit. Only the decode + embed stage moves: the jobs become a Ray Dataset, and an actor pool
(``map_batches`` with a callable class, the model loaded once per actor) turns each batch into
rows. Rows of new ids are written by the actor itself as Lance fragments beside the table, so
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
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from encoder.model import load_model
from indexer.pipeline import Batch, run_pipeline
from indexer.rows import caption_vectors, file_columns
from store.errors import ImageError, InputError, first_line
from store.tables import conformed, image_rows

if TYPE_CHECKING:
    from indexer.plan import Job
    from store.store import Store

RAY_EXTRA = "the ray engine needs Ray: pip install 'clipdex[ray]'"


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None: start a local cluster for the run
    workers: int | None = None  # actors; None: as many as the cluster's CPUs (or GPUs) allow
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    batch_size: int = 256  # jobs per actor call: one fragment each


@dataclass(frozen=True)
class _Work:
    """What an actor needs: picklable, no open handles."""
    model: str
    pretrained: str | None
    device: str
    exact_decode: bool
    max_pixels: int
    threads: int
    first_new_id: int
    uri: str
    schema: pa.Schema
    dim: int
    hashing: str  # the store's content hash, for files the plan left unhashed
    weights_sha256: str = ""  # a local checkpoint's, as the store recorded it: each worker checks its copy


def ray_module():
    try:
        import ray
        import ray.data  # noqa: F401 (the Data library is the part clipdex uses)
    except ImportError as error:
        raise InputError(RAY_EXTRA) from error
    return ray


@dataclass(frozen=True)
class Cluster:
    """A Ray session as the rest of clipdex uses it: a parallel map and how wide it is."""
    shards: int

    @staticmethod
    def map(function: Callable, jobs: Sequence) -> list:
        """*function* over *jobs* as Ray tasks (a CPU each), results in order."""
        ray = ray_module()
        remote = ray.remote(num_cpus=1)(function)
        return ray.get([remote.remote(job) for job in jobs])


@contextmanager
def ray_session(config: RayConfig) -> Iterator[Cluster]:
    """Ray for the length of a run: joined at *config.address*, or a local cluster started here
    and stopped after (a session already open in this process is used as it is)."""
    ray = ray_module()
    if config.address:
        _check_reachable(config.address)
    started_here = not ray.is_initialized()
    if started_here:
        _start(ray, config.address)
    try:
        yield Cluster(shards=max(1, int(ray.cluster_resources().get("CPU", 1))))
    finally:
        if started_here:
            ray.shutdown()


def embed_on_ray(store: "Store", model_name: str, pretrained: str | None, device: str, jobs: Sequence["Job"],
                 exact_decode: bool, max_pixels: int, commit_every: int, first_new_id: int, ray_config: RayConfig,
                 progress: Callable[[int], None]) -> tuple[int, list[tuple[int, ImageError]]]:
    """Embed *jobs* on the Ray session open in this process (:func:`ray_session`) and commit them to
    *store*; returns (rows written, decode failures by position in *jobs*), as the local engine does."""
    if not jobs:
        return 0, []
    return _run(ray_module(), store, model_name, pretrained, device, jobs, exact_decode, max_pixels, commit_every,
                first_new_id, ray_config, progress)


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


def _run(ray, store, model_name, pretrained, device, jobs, exact_decode, max_pixels, commit_every, first_new_id,
         ray_config: RayConfig, progress) -> tuple[int, list[tuple[int, ImageError]]]:
    from lance.fragment import FragmentMetadata

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    for name in ("ray", "ray.data"):  # Ray's plan and progress lines would bury clipdex's own
        logging.getLogger(name).setLevel(logging.ERROR)
    work = _Work(model_name, pretrained, device, exact_decode, max_pixels, max(1, int(ray_config.cpus_per_worker)),
                 first_new_id, store.tables.images_uri, store.tables.images.schema, store.manifest.dim,
                 store.manifest.content_hash, store.manifest.weights_sha256)
    table, size = _job_table(jobs), ray_config.batch_size
    blocks = [table.slice(start, size) for start in range(0, table.num_rows, size)]  # one block per actor call
    dataset = ray.data.from_arrow(blocks).map_batches(
        _Embedder, fn_constructor_args=(work,), batch_size=size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=_actors(ray, ray_config, len(jobs))),
        num_cpus=ray_config.cpus_per_worker, num_gpus=ray_config.gpus_per_worker or None)

    fragments, replaced, pending, written, failures = [], [], 0, 0, []

    def commit() -> None:
        nonlocal fragments, replaced, pending, written
        store.tables.append_fragments([FragmentMetadata.from_json(json.dumps(f)) for f in fragments])
        if replaced:
            store.tables.upsert(pa.concat_tables(replaced))
        written += pending
        fragments, replaced, pending = [], [], 0

    for result in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in result.to_pylist():
            fragments += json.loads(row["fragments"])
            if row["replaced"]:
                replaced.append(pa.ipc.open_stream(row["replaced"]).read_all())
            pending += row["rows"]
            failed = [(position, ImageError(path, reason, detail))
                      for position, path, reason, detail in json.loads(row["failures"])]
            failures += failed
            progress(row["rows"] + len(failed))
        if pending >= commit_every:
            commit()
    commit()
    return written, failures


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


def _job_table(jobs: Sequence["Job"]) -> pa.Table:
    columns = file_columns(jobs)
    columns["path"] = [os.fsencode(path) for path in columns["path"]]  # a file name need not be valid UTF-8
    return pa.table({"position": pa.array(range(len(jobs)), pa.int64()), **columns})


class _Embedder:
    """One actor: the model loaded once, then batch after batch of jobs into rows."""

    def __init__(self, work: _Work) -> None:
        import torch

        torch.set_num_threads(work.threads)
        self.work = work
        self.model = load_model(work.model, work.pretrained, device=work.device, weights_sha256=work.weights_sha256)
        self.feed = self.model.feed("auto", work.exact_decode, work.max_pixels)

    def __call__(self, jobs: pa.Table) -> pa.Table:
        from lance.fragment import write_fragments

        work, paths = self.work, [os.fsdecode(p) for p in jobs.column("path").to_pylist()]
        positions = jobs.column("position").to_numpy()
        tables, failures = [], []

        def write(batch: Batch) -> None:
            failures.extend([int(positions[p]), e.path, e.reason, e.detail] for p, e in batch.failures)
            if batch.positions:
                taken = jobs.take(pa.array(batch.positions, pa.int64()))
                files = {name: taken.column(name) for name in taken.column_names if name not in ("position", "path")}
                files["hash"] = [batch.hashes.get(p, digest) for p, digest in zip(batch.positions,
                                                                                   files["hash"].to_pylist())]
                tables.append(image_rows(
                    work.dim, **files, path=[paths[p] for p in batch.positions],
                    width=[w for w, _ in batch.sizes], height=[h for _, h in batch.sizes], embedding=batch.vectors(),
                    caption_embedding=caption_vectors(self.model, taken.column("caption").to_pylist())))

        unhashed = {i for i, digest in enumerate(jobs.column("hash").to_pylist()) if digest is None}
        run_pipeline(paths, self.feed, write, 64, work.threads, work.threads, unhashed=unhashed,
                     hashing=work.hashing)
        fragments, replaced, count = [], b"", 0
        if tables:
            rows = pa.concat_tables(tables)
            is_new = np.asarray(rows.column("id")) >= work.first_new_id
            new, old = rows.filter(pa.array(is_new)), rows.filter(pa.array(~is_new))
            if new.num_rows:
                fragments = [f.to_json() for f in write_fragments(conformed(new, work.schema), work.uri,
                                                                  schema=work.schema)]
            if old.num_rows:
                sink = pa.BufferOutputStream()
                with pa.ipc.new_stream(sink, old.schema) as stream:
                    stream.write_table(old)
                replaced = sink.getvalue().to_pybytes()
            count = rows.num_rows
        return pa.table({"fragments": [json.dumps(fragments)], "replaced": pa.array([replaced], pa.binary()),
                         "rows": [count], "failures": [json.dumps(failures)]})
