"""The seam between a run and where its decoding and embedding happen (img2dataset's
distributors and httpx's transports are the model): an :class:`Engine` opens a :class:`Session`
from the run's config, whole; the session embeds the jobs the plan made into committed rows and
says what it wrote and which files failed. Implementations are registered as data in
``indexer.engines.ENGINES``; everything before (scan, plan, ids) and after (deletions, failures,
the index) is the run's, the same for every engine.

Every engine turns files into rows with :func:`embed_files` (the feed, the pipeline, the one row
builder), so an option of the config means the same on each; an option an engine cannot honour
is refused by its ``check``, in one line, before anything is scanned.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import pyarrow as pa

from encoder import ClipModel
from encoder.feed import make_feed
from indexer.config import IndexConfig
from indexer.pipeline import Batch, Hashing, StageReport, run_pipeline
from indexer.plan import Job
from indexer.rows import Files, batch_rows
from indexer.sources import JobSources
from store.errors import ImageError
from store.sharded import Workers
from store.store import Store
from store.tables import image_schema

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Target:
    """Where a session writes a run's rows, and the model they are made with."""
    store: Store
    model: ClipModel
    name: str  # the model as the run chose it, for a worker elsewhere to load it again
    pretrained: str | None
    first_new_id: int  # ids from here on are new rows (appended), older ones replace stored rows


@dataclass(frozen=True)
class Embedding:
    """What a session did with the jobs: rows committed, and files that could not be decoded (by
    position in the jobs), as data."""
    written: int
    failures: list[tuple[int, ImageError]] = field(default_factory=list)
    report: StageReport | None = None  # how busy each stage was (clipdex -v index)


class Session(Protocol):
    # Where the index build's shards may run (a cluster), or None to build in this process.
    workers: Workers | None

    def embed(self, target: Target, jobs: Sequence[Job], progress: Progress) -> Embedding: ...


class Engine(Protocol):
    name: str

    def check(self, config: IndexConfig) -> None:
        """Refuse, in one line, an option this engine cannot honour (or a missing library), before
        anything is scanned or written."""

    def session(self, config: IndexConfig) -> AbstractContextManager[Session]:
        """The engine for one run, opened before the store is touched (a cluster that cannot be
        reached stops the run with nothing written) and closed after it."""


def decode_threads(config: IndexConfig) -> int:
    """Decoding threads of an in-process pipeline: ``config.workers``, else one per core, at most 8."""
    return config.workers if config.workers is not None else min(8, os.cpu_count() or 1)


def embed_files(model: ClipModel, files: Files, config: IndexConfig, threads: int, hashing: str,
                sink: Callable[[pa.Table], None], progress: Progress | None = None, schema: pa.Schema | None = None):
    """Read, decode and embed the files of *files* (file columns of jobs, see indexer.rows) as
    *config* says, handing each batch's rows to *sink* on the pipeline's writer thread; files
    without a hash are hashed with *hashing* as they are read. *threads* decode (and, unless
    ``config.readers``, read). *schema*: the images table's, whose metadata columns the files'
    metadata fills. Returns (failures by position, StageReport)."""
    feed = make_feed(model, config.decoder, config.exact_decode, config.max_pixels)
    batch_size = config.batch_size or (256 if model.device.startswith("cuda") else 64)
    failures: list[tuple[int, ImageError]] = []
    own = set(image_schema(model.embed_dim).names)
    extra = [f for f in schema if f.name not in own] if schema is not None else []

    def write(batch: Batch) -> None:
        failures.extend(batch.failures)
        if batch.positions:
            sink(batch_rows(model, files, batch, extra))

    unhashed = {position for position, digest in enumerate(files["hash"]) if digest is None}
    report = run_pipeline(JobSources(files, config.storage_options), feed, write, batch_size, config.readers or threads, threads,
                          progress, Hashing(unhashed, hashing))
    return failures, report
