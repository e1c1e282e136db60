"""The local engine: decode and embed in this process (indexer/pipeline.py), committing as it goes."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

from indexer.config import IndexConfig, RayConfig
from indexer.engine import Embedding, Progress, Target, decode_threads, embed_files
from indexer.plan import Job
from indexer.rows import JobFiles
from store.commit import Committer
from store.errors import InputError


class LocalEngine:
    name = "local"

    def check(self, config: IndexConfig) -> None:
        if config.ray != RayConfig():  # a cluster's options with no cluster: say so, never drop them
            raise InputError("--ray-address, --cpus-per-worker and --gpus-per-worker go with --engine ray")

    @contextmanager
    def session(self, config: IndexConfig) -> Iterator["LocalSession"]:
        yield LocalSession(config)


@dataclass(frozen=True)
class LocalSession:
    config: IndexConfig
    workers: None = None  # the index is built in this process

    def embed(self, target: Target, jobs: Sequence[Job], progress: Progress) -> Embedding:
        """The writer thread builds rows and the committer commits every ``commit_every`` of them."""
        store = target.store
        with Committer(store.tables, target.first_new_id, self.config.commit_every) as committer:
            failures, report = embed_files(target.model, JobFiles(jobs), self.config, decode_threads(self.config),
                                           store.manifest.content_hash, committer.add, progress,
                                           store.tables.images.schema)
        return Embedding(committer.written, failures, report)
