"""Stage 2: compare what is on disk with what is in the store and decide the least work, a chunk
of the walk at a time (:class:`Planner`).

A file whose size and mtime match its row is unchanged and never read. Any other file is hashed
where its hash can decide anything: the same content at a path that vanished is a move (its id
and embedding move with it), the same content as a file still present is a copy (embedding
reused, new id), anything else is embedded. Content is only comparable at equal sizes, so a file
whose size no row has is embedded without being read here: the embedding stage hashes the bytes
it reads anyway.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from indexer.scanner import Failure, FoundFile, Scan, sidecar_path
from indexer.sources import ImageReader
from indexer.stored import StoredIndex, StoredRows, TableSource
from store.errors import ImageError, InputError, first_line
from store.files import bytes_hash, is_under, stream_hash
from store.remote import StorageOptions, filesystem, is_url, read_object
from store.sharded import Workers
from store.tables import IDENTITY_COLUMNS, file_path, shard_path


def content_hash(path: str, algorithm: str) -> str:
    with open(path, "rb") as handle:
        return stream_hash(handle, algorithm)


def found_hash(file: FoundFile, algorithm: str, reader: ImageReader) -> str:
    """The content hash of a found file, an object, or an image inside a shard (its member's bytes)."""
    member = file.member
    if member is None and not is_url(file.path):
        return content_hash(file.path, algorithm)  # streamed: a large file is never held whole
    if member is None:
        return bytes_hash(reader.read(file.path), algorithm)
    return bytes_hash(reader.read(file.path, member.shard, member.offset, file.bytes), algorithm)


@dataclass(frozen=True, slots=True)  # one per file: a run of millions holds millions
class Job:
    """One file to write a row for: ``source_id`` set means reuse that row's embedding."""

    id: int
    file: FoundFile
    hash: str | None  # None: not read yet; whoever reads the file for embedding hashes it
    caption: str | None = None
    source_id: int | None = None


@dataclass
class Plan:
    unchanged: int = 0
    embed: list[Job] = field(default_factory=list)  # new or modified content
    moves: list[Job] = field(default_factory=list)  # same id, new path/mtime (also touched files)
    copies: list[Job] = field(default_factory=list)  # new id, embedding of source_id
    recaption: list[Job] = field(default_factory=list)  # unchanged file whose caption changed
    removed_ids: list[int] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    unavailable: dict[str, int] = field(default_factory=dict)  # root -> rows kept because it could not be seen
    first_new_id: int = 1  # ids from here on are new in this run; below, they are rows already stored
    next_id: int = 1

    @property
    def new_ids(self) -> int:
        return self.next_id - self.first_new_id

    def then(self, later: "Plan") -> "Plan":
        """This plan and a *later* one of the same run (ids continue from this one's) as one."""
        return Plan(self.unchanged + later.unchanged, self.embed + later.embed, self.moves + later.moves,
                    self.copies + later.copies, self.recaption + later.recaption,
                    self.removed_ids + later.removed_ids, self.failures + later.failures,
                    {**self.unavailable, **later.unavailable}, self.first_new_id, later.next_id)

    @property
    def moved(self) -> int:
        """Files found at a new path with the content of a row whose old path is gone."""
        return sum(1 for job in self.moves if job.source_id is not None)

    @property
    def reused(self) -> int:
        return len(self.copies) + self.moved


def make_plan(scan: Scan, rows: pa.Table | StoredRows, first_new_id: int, captions: Callable[[str], str | None],
              workers: int | Workers = 4, progress: Callable[[int], None] | None = None, prune: bool = False, *,
              hashing: str) -> Plan:
    """The whole plan of a scan held whole, against *rows* (id, hash, path, path_bytes, bytes,
    mtime, caption...) held whole: :class:`Planner` with the scan as one chunk."""
    table = rows.table if isinstance(rows, StoredRows) else rows
    planner = Planner(StoredIndex(TableSource(table)), first_new_id, captions, workers, progress, prune,
                      hashing=(hashing, scan.storage))
    plan = planner.chunk(scan.files, rows if isinstance(rows, StoredRows) else StoredRows(table))
    return plan.then(planner.finish(scan, [root for root in scan.roots if scan.files_under(root) == 0]))


class Planner:
    """Decides what to embed, move, copy and remove, a chunk of found files at a time, against a
    store of any size (:class:`indexer.stored.StoredIndex`).

    New files get ids from *first_new_id* on (the store's first free id); the caller reserves each
    chunk's ``plan.new_ids`` before writing any row. *captions* gives a file's caption, or None
    when no source says anything (a stored caption is then kept). *workers*: threads that hash the
    files whose hash can decide anything, or a cluster's workers (store.sharded.Workers) that do.

    :meth:`chunk` settles what a chunk's own rows tell: a file unchanged, touched, modified in place
    (keeps its id), or of a size no row has (new content: embedded now, hashed as it is read). A
    new file whose content a row may share is hashed and waits until *waiting* of them have
    gathered (or the walk ends), then all are settled in one pass over the stored hashes: a row of
    that content whose file no longer exists is a move, one whose file is there a copy. The file
    system, not the walk, says a row's file is gone, so this needs no rows from later chunks.
    :meth:`finish`, after the walk, settles the last of them and removes the rows whose files the
    walk did not find.

    A row is removed only when its folder was listed and its file is gone. A root that is missing,
    could not be listed, or lists no file while rows lie under it is *unavailable* (an unmounted
    drive looks exactly like an empty folder): its rows are kept unless *prune*. A file whose
    content matches a row whose old path no longer exists, inside the roots or not (a renamed
    library folder), is a move: same id, no new embedding.
    """

    def __init__(self, stored: StoredIndex, first_new_id: int, captions: Callable[[str], str | None],
                 workers: int | Workers = 4, progress: Callable[[int], None] | None = None, prune: bool = False, *,
                 hashing: tuple[str, StorageOptions], waiting: int = 50_000) -> None:
        self.stored, self.captions, self.workers, self.progress, self.prune = stored, captions, workers, progress, prune
        self.first_new_id = self.next_id = first_new_id
        self.hashing = hashing  # the store's content hash, and how object storage is reached
        self.waiting: list[Job] = []  # hashed new files whose content a row may have, until *most_waiting*
        self.most_waiting = max(1, waiting)
        self.moved: set[int] = set()  # rows taken by a move in this run (one file each)

    def caption_of(self, file: FoundFile, row: Mapping | None) -> str | None:
        caption = self.captions(file.path)
        if caption is None and file.member is not None:
            caption = file.member.caption  # KEY.txt in a listed shard
        return caption if caption is not None or row is None else row["caption"]

    def chunk(self, files: Sequence[FoundFile], rows: StoredRows | None = None) -> Plan:
        """The plan of *files*; *rows*: theirs where the caller has fetched them already (a
        shard's), else fetched here."""
        rows = rows if rows is not None else self.stored.rows_at(file.path for file in files)
        plan = Plan(first_new_id=self.next_id, next_id=self.next_id)
        changed: list[FoundFile] = []
        found_ids: list[int] = []
        for file in files:
            row = rows.get(file.path)
            if row is not None:
                found_ids.append(row["id"])
            if row is not None and _same_file(row, file):
                plan.unchanged += 1
                caption = self.caption_of(file, row)
                if caption != row["caption"]:
                    plan.recaption.append(Job(row["id"], file, row["hash"], caption))
            else:
                changed.append(file)
        self.stored.mark_seen(found_ids)
        worth = self._worth_hashing(changed, rows)
        digests = dict(_hash_all(worth, self.hashing, self.workers, plan.failures, self.progress))
        if self.progress:
            self.progress(len(files) - len(worth))
        failed = {failure.path for failure in plan.failures}
        for file in changed:
            if file.path in failed:
                continue
            row = rows.get(file.path)
            digest = digests.get(file.path)
            if row is None and digest is not None:  # a move, a copy or new: settled with the other waiting files
                self.waiting.append(Job(0, file, digest, self.caption_of(file, None)))
                continue
            caption = self.caption_of(file, row)
            if digest is None:  # content no row can share: hashed as it is read for embedding
                plan.embed.append(Job(row["id"] if row is not None else plan.next_id, file, None, caption))
                plan.next_id += row is None
            elif row["hash"] == digest:  # touched, not changed
                plan.moves.append(Job(row["id"], file, digest, caption))
            else:  # modified in place: keeps its id
                plan.embed.append(Job(row["id"], file, digest, caption))
        if len(self.waiting) >= self.most_waiting:
            self._settle(plan)
        self.next_id = plan.next_id
        return _defer_copies_of_new_files(plan)

    def finish(self, scan: Scan, empty_roots: Collection[str]) -> Plan:
        """After the walk (*scan*: its roots, what could not be listed; *empty_roots*: roots that
        listed no file): the files still waiting settled, and the rows whose files the walk did
        not find removed, or kept where their root could not be seen. Reads those rows a batch
        at a time."""
        plan = Plan(first_new_id=self.next_id, next_id=self.next_id)
        self._settle(plan)
        self.next_id = plan.next_id
        blind = [*scan.missing, *(root for root in scan.roots if root in scan.unlisted or root in empty_roots)]
        under_blind = dict.fromkeys(blind, 0)
        removable: list[np.ndarray] = []
        for batch in self.stored.unseen():
            ids = batch.column("id").to_numpy(zero_copy_only=False)
            paths = _paths(batch)
            in_blind = np.zeros(len(ids), bool)
            for root in blind:  # a row under such a root makes it unavailable: kept unless prune
                inside = _under(paths, root)
                under_blind[root] += int(inside.sum())
                in_blind |= inside
            covered = np.fromiter(map(scan.covers, paths), bool, len(paths))
            removable.append(ids[np.where(in_blind, self.prune, covered)])
        plan.removed_ids = sorted(int(i) for i in np.concatenate(removable)) if removable else []
        plan.unavailable = {root: count for root, count in under_blind.items() if count}
        return _defer_copies_of_new_files(plan)

    def _settle(self, plan: Plan) -> None:
        """The waiting files into *plan*: each a move of a row of its content whose file no longer
        exists (under the roots or anywhere: a renamed library folder), else a copy of a row of its
        content, else new. Rows of their hashes read in one pass over the stored hashes."""
        if not self.waiting:
            return
        by_hash: dict[str, list[dict]] = {}
        for row in self.stored.rows_with_hashes({job.hash for job in self.waiting}).to_pylist():
            by_hash.setdefault(row["hash"], []).append(row)
        sources: dict[str, int] = {}
        for job in self.waiting:
            rows = by_hash.get(job.hash, ())
            row = self._take_moved(rows)
            if row is not None:
                caption = job.caption if job.caption is not None else row["caption"]
                plan.moves.append(Job(row["id"], job.file, job.hash, caption, source_id=row["id"]))
                continue
            source = sources.get(job.hash) or next((r["id"] for r in rows), None)
            if source is not None:
                plan.copies.append(Job(plan.next_id, job.file, job.hash, job.caption, source_id=source))
            else:
                plan.embed.append(Job(plan.next_id, job.file, job.hash, job.caption))
                sources[job.hash] = plan.next_id  # a second copy in this batch waits for it: embedded
            plan.next_id += 1
        self.waiting = []

    def _take_moved(self, rows: Iterable[dict]) -> dict | None:
        """A row with this content whose old path no longer exists, under the roots or anywhere else
        (found by the walk now or not: it cannot be, where nothing lies)."""
        for row in rows:
            if row["id"] not in self.moved and not _still_there(file_path(row["path"], row["path_bytes"]), row,
                                                                  self.hashing[1]):
                self.moved.add(row["id"])
                self.stored.mark_seen([row["id"]])  # not gone: moved
                return row
        return None

    def _worth_hashing(self, changed: list[FoundFile], rows: StoredRows) -> list[FoundFile]:
        """The changed files whose hash can decide anything: a file can be a touched one, a move or
        a copy only if a row (its own, one whose file is gone, one whose file is still here) has
        its exact size. Two new files of one size are both embedded whatever their content (a copy
        of a file embedded in this very run waits for no row), so they need no hash here. The
        others (every file of a new library) are hashed by the reader that reads them for
        embedding, so they are read once, on the engine's workers."""
        shared = self.stored.has_size(np.fromiter((file.bytes for file in changed), np.int64, len(changed)))
        worth = []
        for file, size_stored in zip(changed, shared):
            row = rows.get(file.path)
            if (row["bytes"] == file.bytes) if row is not None else size_stored:
                worth.append(file)
        return worth


def _paths(batch: pa.Table) -> list[str]:
    """The file system paths of rows (id, path, path_bytes...)."""
    paths = batch.column("path").to_pylist()
    raws = batch.column("path_bytes")
    if raws.null_count == len(raws):
        return paths
    return [file_path(path, raw) for path, raw in zip(paths, raws.to_pylist())]


def _under(paths: list[str], folder: str) -> np.ndarray:
    return np.fromiter((is_under(path, folder) for path in paths), bool, len(paths))


def _still_there(path: str, row: dict, storage: StorageOptions) -> bool:
    """Whether a row's file (an object; a member's shard) still exists where it was indexed: then a
    file of its content elsewhere is a copy, not a move."""
    where = shard_path(row) if row.get("shard") is not None else path
    if not is_url(where):
        return os.path.lexists(where)
    try:
        fs, inside = filesystem(where, storage)
        return fs.exists(inside)
    except Exception:  # unreachable now: taken for gone, as a file the scan no longer finds
        return False


def _same_file(row: dict, file: FoundFile) -> bool:
    """Unchanged: the size, mtime and link of the row, and the same inode where the row recorded one
    (a file replaced by another of the same size, its mtime set back, is read again)."""
    if (row["bytes"], row["mtime"], row.get("link_target"), row.get("etag")) != (
            file.bytes, file.mtime, _raw(file.link_target), file.etag):
        return False
    member = file.member
    where = (member.offset, member.shard_bytes, member.shard_mtime, member.shard_images) if member else (None,) * 4
    if (row.get("shard_offset"), row.get("shard_bytes"), row.get("shard_mtime"), row.get("shard_images")) != where:
        return False
    recorded = tuple(row.get(name) for name in IDENTITY_COLUMNS)
    return None in recorded or file.identity is None or recorded == file.identity


def _raw(path: str | None) -> bytes | None:
    return os.fsencode(path) if path is not None else None


def _defer_copies_of_new_files(plan: Plan) -> Plan:
    """A copy whose source is embedded in this very run must wait for that row: re-plan as embed."""
    pending = {job.id for job in plan.embed}
    plan.embed += [Job(job.id, job.file, job.hash, job.caption) for job in plan.copies if job.source_id in pending]
    plan.copies = [job for job in plan.copies if job.source_id not in pending]
    return plan


HASH_TASK_FILES = 256  # files a cluster's task hashes


def _hash_all(files: list[FoundFile], hashing: tuple[str, StorageOptions], workers: int | Workers,
              failures: list[Failure], progress: Callable[[int], None] | None) -> Iterable[tuple[str, str]]:
    """Hash *files* on threads here, or on a cluster's *workers* (where the bytes are as near
    as they are to the workers that embed: a renamed folder of millions is read there, not here)."""
    if isinstance(workers, Workers):
        chunks = [files[start:start + HASH_TASK_FILES] for start in range(0, len(files), HASH_TASK_FILES)]
        step = max(1, workers.shards) * 4
        results = (result for start in range(0, len(chunks), step)
                   for done in workers.map(_hash_task, [(chunk, hashing) for chunk in chunks[start:start + step]])
                   for result in done)
    else:
        pool = ThreadPoolExecutor(max_workers=max(1, workers))  # hashlib releases the GIL
        algorithm, reader = hashing[0], ImageReader(hashing[1])
        results = pool.map(lambda file: _hash_one(file, algorithm, reader), files)
    try:
        for path, digest, failure in results:
            if progress:
                progress(1)
            if failure:
                failures.append(failure)
            else:
                yield path, digest
    finally:
        if not isinstance(workers, Workers):
            pool.shutdown(cancel_futures=True)


def _hash_task(job: tuple[list[FoundFile], tuple[str, StorageOptions]]) -> list[tuple[str, str | None, Failure | None]]:
    """A chunk of files hashed on a worker."""
    files, (algorithm, storage) = job
    reader = ImageReader(storage)  # made here: an open shard cannot travel to a worker
    return [_hash_one(file, algorithm, reader) for file in files]


def _hash_one(file: FoundFile, algorithm: str, reader: ImageReader) -> tuple[str, str | None, Failure | None]:
    try:
        return file.path, found_hash(file, algorithm, reader), None
    except FileNotFoundError:
        return file.path, None, Failure(file.path, "missing", "vanished during the run")
    except ImageError as error:
        return file.path, None, Failure(file.path, error.reason, error.detail)
    except OSError as error:
        return file.path, None, Failure(file.path, "unreadable", error.strerror or str(error))


def read_captions(sources: Iterable[str | os.PathLike]) -> dict[str, str]:
    """path -> caption from CSV or Parquet files with ``path`` and ``caption`` columns.

    Relative paths are taken relative to the captions file.
    """
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    mapping: dict[str, str] = {}
    for source in sources:
        source = os.path.expanduser(os.fspath(source))
        try:
            table = pq.read_table(source) if source.lower().endswith(".parquet") else pacsv.read_csv(source)
        except (OSError, pa.ArrowInvalid) as error:
            raise InputError(f"cannot read captions file {source}: {first_line(error)}") from error
        if not {"path", "caption"} <= set(table.column_names):
            raise InputError(f"captions file {source} needs columns 'path' and 'caption' "
                             f"(it has {', '.join(table.column_names)})")
        base = os.path.dirname(os.path.abspath(source))
        for path, caption in zip(table.column("path").to_pylist(), table.column("caption").to_pylist()):
            if path and caption is not None:
                mapping[_real_folder(os.path.join(base, os.path.expanduser(str(path))))] = str(caption)
    return mapping


def _real_folder(path: str) -> str:
    """*path* with its folder resolved like the scanner's roots (the file itself may be a link)."""
    path = os.path.normpath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def sidecar_caption(path: str, storage: StorageOptions = ()) -> str | None:
    """The text of ``photo.txt`` beside ``photo.jpg`` (an object beside an object), if there is one."""
    try:
        if is_url(path):
            return read_object(sidecar_path(path), storage).decode("utf-8").strip() or None
        with open(sidecar_path(path), encoding="utf-8") as handle:
            return handle.read().strip() or None
    except (OSError, UnicodeDecodeError):
        return None
