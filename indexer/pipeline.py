"""Stage 3: read → decode → embed → write, each stage on its own threads, overlapped.

    reader threads ─bytes─▶ decode threads ─prepared─▶ embed (this thread, owns the device) ─vectors─▶ writer thread

A batch is read by one reader, prepared by one decoder (``Feed.prepare``: a full decode on the
host, or only the header when the device decodes), embedded, then handed to the writer, which
builds rows and commits while the device works on the next batches. At most ``depth`` batches are
read or decoded ahead and at most two wait for the writer, so memory stays bounded however many
files there are and a slow stage holds the others back instead of piling work up.

Every stage times the work it does; :class:`StageReport` says how busy each was, so a run shows
what bounds it (``clipdex -v index`` prints it as one line).

Batches reach the writer in file order. Files that cannot be read or decoded become failures
(data, never exceptions), so one bad file costs one row in the failures table and nothing else.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterator, Protocol, Sequence

from encoder.feed import Embedded, Prepared, Timing
from encoder.images import read_bytes
from store.errors import ImageError
from store.files import bytes_hash

STAGES = ("read", "decode", "embed", "write")


class Sources(Protocol):
    """What the readers read: a name per position (what failures and the decoder are told) and
    its bytes (a file, or an image inside a shard: indexer.sources.JobSources)."""
    names: Sequence[str]

    def read(self, position: int) -> bytearray: ...


@dataclass(frozen=True)
class FileSources:
    """Plain files by path."""
    names: Sequence[str]

    def read(self, position: int) -> bytearray:
        return read_bytes(self.names[position])


class Feed(Protocol):
    def prepare(self, data: bytes | bytearray, name: str) -> Prepared: ...

    def embed(self, items: Sequence[Prepared], names: Sequence[str], timing: Timing) -> Embedded: ...


@dataclass
class Batch:
    """What the writer receives: rows for ``positions`` (indexes into the path list)."""

    positions: list[int]
    sizes: list[tuple[int, int]]
    embedded: Embedded | None
    failures: list[tuple[int, ImageError]] = field(default_factory=list)
    hashes: dict[int, str] = field(default_factory=dict)  # position -> content hash, where asked for
    photos: list[dict | None] = field(default_factory=list)  # per position: capture time, camera, place

    def vectors(self):
        return self.embedded.vectors()


@dataclass(frozen=True)
class StageReport:
    seconds: float
    images: int
    busy: dict[str, float]  # stage -> seconds of work, summed over its threads
    threads: dict[str, int]
    batches: int = 0  # forward passes: images / batches is the batch size the model saw

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def utilisation(self, stage: str) -> float:
        """The share of the run's wall time the stage's threads were working (1.0: always)."""
        threads = self.threads.get(stage, 1)
        return min(1.0, self.busy.get(stage, 0.0) / (self.seconds * threads)) if self.seconds else 0.0

    @property
    def bound(self) -> str:
        return max(STAGES, key=self.utilisation)

    @classmethod
    def combined(cls, reports: Sequence["StageReport"], seconds: float, copies: int) -> "StageReport":
        """*reports* of pipelines that ran *copies* at a time (Ray actors) as one, over *seconds* of wall time."""
        busy: dict[str, float] = {}
        for report in reports:
            for stage, spent in report.busy.items():
                busy[stage] = busy.get(stage, 0.0) + spent
        threads = {stage: count * copies for stage, count in (reports[0].threads if reports else {}).items()}
        return cls(seconds, sum(r.images for r in reports), busy, threads, sum(r.batches for r in reports))

    @classmethod
    def from_dict(cls, report: dict) -> "StageReport":
        stages = report["stages"]
        return cls(report["seconds"], report["images"], {stage: v["seconds"] for stage, v in stages.items()},
                   {stage: v["threads"] for stage, v in stages.items()}, report.get("batches", 0))

    def to_dict(self) -> dict:
        return {"seconds": round(self.seconds, 3), "images": self.images, "batches": self.batches,
                "images_per_second": round(self.images_per_second, 1), "bound": self.bound,
                "stages": {stage: {"busy": round(self.utilisation(stage), 3), "seconds": round(busy, 3),
                                   "threads": self.threads.get(stage, 1)} for stage, busy in self.busy.items()}}


def stage_line(report: dict) -> str:
    """One line from :meth:`StageReport.to_dict`: how busy each stage was and which one bounds the run."""
    stages = report["stages"]
    busy = " · ".join(f"{stage} {stages[stage]['busy']:.0%}" for stage in STAGES if stage in stages)
    extra = "".join(f", {stage} {stages[stage]['seconds']:.1f}s" for stage in stages if stage not in STAGES)
    return (f"{busy} busy{extra}; {report['images_per_second']:,.0f} img/s over {report['images']:,} images, "
            f"bound by {report['bound']}")


class _Clock:
    def __init__(self) -> None:
        self.busy = dict.fromkeys(STAGES, 0.0)
        self._lock = threading.Lock()

    @contextmanager
    def timing(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self.busy[stage] = self.busy.get(stage, 0.0) + time.perf_counter() - started


@dataclass(frozen=True)
class Hashing:
    """Which files the readers hash as they read them (positions into the path list), and with
    which of store.files.CONTENT_HASHES: the files the plan left unhashed get the hash of exactly
    the bytes that were embedded, with no second read."""
    positions: Collection[int]
    algorithm: str


def run_pipeline(sources: Sources | Sequence[str], feed: Feed, write: Callable[[Batch], None], batch_size: int,
                 readers: int, decoders: int, progress: Callable[[int], None] | None = None,
                 hashing: Hashing | None = None) -> StageReport:
    """Embed *sources* (or files by path) through *feed* and hand every batch to *write* (on the
    writer thread), in order."""
    if not hasattr(sources, "read"):
        sources = FileSources(sources)
    return _Pipeline(sources, feed, batch_size, hashing or Hashing((), "")).run(write, readers, decoders, progress)


class _Pipeline:
    def __init__(self, sources: Sources, feed: Feed, batch_size: int, hashing: Hashing) -> None:
        self.sources, self.paths = sources, sources.names
        self.feed, self.batch_size, self.hashing = feed, batch_size, hashing
        self.clock = _Clock()

    def read(self, start: int) -> tuple[list[tuple[int, bytearray | None, ImageError | None]], dict[int, str]]:
        with self.clock.timing("read"):
            out, hashes = [], {}
            for position in range(start, min(start + self.batch_size, len(self.paths))):
                try:
                    data = self.sources.read(position)
                except ImageError as error:
                    out.append((position, None, error))
                    continue
                if position in self.hashing.positions:
                    hashes[position] = bytes_hash(data, self.hashing.algorithm)
                out.append((position, data, None))
            return out, hashes

    def decode(self, read_batch):
        loaded, hashes = read_batch
        with self.clock.timing("decode"):
            positions, prepared, failures = [], [], []
            for position, data, error in loaded:
                if data is not None:
                    try:
                        prepared.append(self.feed.prepare(data, self.paths[position]))
                        positions.append(position)
                        continue
                    except ImageError as raised:
                        error = raised
                    except Exception as bug:  # a decoder bug on one file must not end the run
                        error = ImageError(self.paths[position], "corrupt", repr(bug)[:200])
                failures.append((position, error))
            return positions, prepared, failures, hashes

    def staged(self, start: int, read_pool: ThreadPoolExecutor, decode_pool: ThreadPoolExecutor) -> Future:
        """A future for batch *start*, read then decoded, without holding a thread while it waits."""
        done: Future = Future()

        def on_decoded(future: Future) -> None:
            # A run that stopped (a full disk, Ctrl-C) cancels the decodes still queued: asking a
            # cancelled future for its exception raises inside this callback, which
            # concurrent.futures would print as a second traceback under the run's one line.
            if future.cancelled():
                done.cancel()
            elif future.exception() is not None:
                done.set_exception(future.exception())
            else:
                done.set_result(future.result())

        def on_read(future: Future) -> None:
            try:
                decode_pool.submit(self.decode, future.result()).add_done_callback(on_decoded)
            except BaseException as error:  # read failed, or the pools are closing
                done.set_exception(error)

        read_pool.submit(self.read, start).add_done_callback(on_read)
        return done

    def embed(self, decoded) -> Batch:
        positions, prepared, failures, hashes = decoded
        embedded = None
        if prepared:
            embedded = self.feed.embed(prepared, [self.paths[p] for p in positions], self.clock.timing)
            failures += [(positions[i], error) for i, error in embedded.failures]
            positions = [positions[i] for i in embedded.kept]
            prepared = [prepared[i] for i in embedded.kept]
        return Batch(positions, [p.size for p in prepared], embedded, sorted(failures, key=lambda f: f[0]), hashes,
                     [p.photo for p in prepared])

    def run(self, write: Callable[[Batch], None], readers: int, decoders: int,
            progress: Callable[[int], None] | None) -> StageReport:
        started = time.perf_counter()
        readers, decoders = max(1, readers), max(1, decoders)
        depth = max(4, 2 * decoders)

        def written(batch: Batch) -> None:
            with self.clock.timing("write"):
                write(batch)

        read_pool = ThreadPoolExecutor(readers, thread_name_prefix="clipdex-read")
        decode_pool = ThreadPoolExecutor(decoders, thread_name_prefix="clipdex-decode")
        write_pool = ThreadPoolExecutor(1, thread_name_prefix="clipdex-write")
        images = batches = 0
        starts = iter(range(0, len(self.paths), self.batch_size))
        ahead: deque[Future] = deque(self.staged(start, read_pool, decode_pool) for _, start in zip(range(depth), starts))
        writes: deque[Future] = deque()
        try:
            while ahead:
                decoded = ahead.popleft().result()
                for start in starts:
                    ahead.append(self.staged(start, read_pool, decode_pool))
                    break
                batch = self.embed(decoded)
                writes.append(write_pool.submit(written, batch))
                while len(writes) > 2 or (writes and writes[0].done()):
                    writes.popleft().result()  # a failed write (a full disk) stops the run here
                images += len(batch.positions) + len(batch.failures)
                batches += batch.embedded is not None
                if progress:
                    progress(len(batch.positions) + len(batch.failures))
            while writes:
                writes.popleft().result()
        finally:
            for pool in (read_pool, decode_pool, write_pool):
                pool.shutdown(wait=True, cancel_futures=True)
        return StageReport(time.perf_counter() - started, images, dict(self.clock.busy),
                           {"read": readers, "decode": decoders, "embed": 1, "write": 1}, batches)
