"""Stage 2: compare what is on disk with what is in the store and decide the least work.

A file whose size and mtime match its row is unchanged and never read. Any other file is hashed:
the same content at a path that vanished is a move (its id and embedding move with it), the same
content as a file still present is a copy (embedding reused, new id), anything else is embedded.
Content is only comparable at equal sizes, so a file whose size no other file or row has is
embedded without being read here: the embedding stage hashes the bytes it reads anyway.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from indexer.scanner import Failure, FoundFile, Scan, sidecar_path
from indexer.sources import ImageReader
from indexer.stored import StoredRows
from store.errors import ImageError, InputError, first_line
from store.files import bytes_hash, is_under, stream_hash
from store.remote import StorageOptions, filesystem, is_url, read_object
from store.sharded import Workers
from store.tables import IDENTITY_COLUMNS, shard_path


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
    """Decide what to embed, move, copy and remove. *rows* has id, hash, path, path_bytes, bytes,
    mtime, caption. *workers*: threads that hash the files whose hash can decide anything, or a
    cluster's workers (store.sharded.Workers) that do.

    New files get ids from *first_new_id* on (the store's first free id); the caller reserves
    ``plan.new_ids`` of them before writing any row. *captions* gives a file's caption, or None
    when no source says anything (a stored caption is then kept).

    A row is removed only when its folder was listed and its file is gone. A root that is missing,
    could not be listed, or lists no file while rows lie under it is *unavailable* (an unmounted
    drive looks exactly like an empty folder): its rows are kept unless *prune*. A file whose
    content matches a row whose old path no longer exists, inside the roots or not (a renamed
    library folder), is a move: same id, no new embedding.
    """
    existing = rows if isinstance(rows, StoredRows) else StoredRows(rows)
    found = {f.path for f in scan.files}
    plan = Plan(first_new_id=first_new_id, next_id=first_new_id)
    blind = _unavailable_roots(scan, existing)
    plan.unavailable = {root: sum(1 for path in existing if is_under(path, root)) for root in blind}

    def caption_of(file: FoundFile, row: dict | None) -> str | None:
        caption = captions(file.path)
        if caption is None and file.member is not None:
            caption = file.member.caption  # KEY.txt in a listed shard
        return caption if caption is not None or row is None else row["caption"]

    def removable(path: str) -> bool:
        return prune if _in_any(path, blind) else scan.covers(path)

    changed: list[FoundFile] = []
    present: list[int] = []  # positions of the rows whose file was found
    for file in scan.files:
        row = existing.get(file.path)
        if row is not None:
            present.append(row.position)
        if row is not None and _same_file(row, file):
            plan.unchanged += 1
            caption = caption_of(file, row)
            if caption != row["caption"]:
                plan.recaption.append(Job(row["id"], file, row["hash"], caption))
        else:
            changed.append(file)

    absent = {path: existing[path] for path in existing if path not in found}
    absent_by_hash: dict[str, list[str]] = {}
    for path, row in absent.items():
        absent_by_hash.setdefault(row["hash"], []).append(path)
    positions = np.asarray(present, np.int64)

    def take_moved(digest: str) -> dict | None:
        """A row with this content whose old path no longer exists, under the roots or anywhere else."""
        for path in absent_by_hash.get(digest, ()):
            if path in absent and not _still_there(path, absent[path], scan.storage):
                return absent.pop(path)
        return None

    stored_sizes = set(existing.column("bytes", positions))
    digests = dict(_hash_all(_worth_hashing(changed, existing, stored_sizes, absent), (hashing, scan.storage),
                             workers, plan.failures, progress))
    present_by_hash = _ids_by_hash(existing, positions, set(digests.values()))
    if progress:
        progress(len(scan.files) - plan.unchanged - len(digests))
    failed = {failure.path for failure in plan.failures}
    for file in changed:
        if file.path in failed:
            continue
        row = existing.get(file.path)
        caption = caption_of(file, row)
        digest = digests.get(file.path)
        if digest is None:  # content no other file or row can share: hashed as it is read for embedding
            plan.embed.append(Job(row["id"] if row is not None else plan.next_id, file, None, caption))
            plan.next_id += row is None
        elif row is not None and row["hash"] == digest:  # touched, not changed
            plan.moves.append(Job(row["id"], file, digest, caption))
        elif row is not None:  # modified in place: keeps its id
            plan.embed.append(Job(row["id"], file, digest, caption))
        elif (moved := take_moved(digest)) is not None:
            plan.moves.append(Job(moved["id"], file, digest, caption_of(file, moved), source_id=moved["id"]))
        elif digest in present_by_hash:
            plan.copies.append(Job(plan.next_id, file, digest, caption, source_id=present_by_hash[digest]))
            plan.next_id += 1
        else:
            plan.embed.append(Job(plan.next_id, file, digest, caption))
            present_by_hash[digest] = plan.next_id  # a second copy in this run is embedded once
            plan.next_id += 1
    plan.removed_ids = sorted(row["id"] for path, row in absent.items() if removable(path))
    return _defer_copies_of_new_files(plan)


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


def _unavailable_roots(scan: Scan, existing: Mapping) -> list[str]:
    """Roots that hold rows but could not be seen: missing, not listable, or listing no file."""
    candidates = list(scan.missing) + [root for root in scan.roots
                                       if root in scan.unlisted or scan.files_under(root) == 0]
    return [root for root in candidates if any(is_under(path, root) for path in existing)]


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


def _in_any(path: str, folders: list[str]) -> bool:
    return any(is_under(path, folder) for folder in folders)


def _defer_copies_of_new_files(plan: Plan) -> Plan:
    """A copy whose source is embedded in this very run must wait for that row: re-plan as embed."""
    pending = {job.id for job in plan.embed}
    plan.embed += [Job(job.id, job.file, job.hash, job.caption) for job in plan.copies if job.source_id in pending]
    plan.copies = [job for job in plan.copies if job.source_id not in pending]
    return plan


def _ids_by_hash(existing: StoredRows, positions: np.ndarray, digests: set[str]) -> dict[str, int]:
    """hash -> id of the rows at *positions* (whose files were found) that have one of *digests*:
    the sources a copy can take its vector from."""
    if not digests or not len(positions) or "hash" not in existing.texts:
        return {}
    hashes = existing.texts["hash"].take(pa.array(positions))
    matches = np.flatnonzero(pc.is_in(hashes, value_set=pa.array(sorted(digests))).to_numpy(zero_copy_only=False))
    return {hashes[int(i)].as_py(): existing.value("id", int(positions[i])) for i in matches}


def _worth_hashing(changed: list[FoundFile], existing: StoredRows, stored_sizes: set[int],
                   absent: dict[str, Mapping]) -> list[FoundFile]:
    """The changed files whose hash can decide anything: a file can be a touched one, a move or a
    copy only if a row (its own, one whose file is gone, one whose file is still here) has its
    exact size. Two new files of one size are both embedded whatever their content (a copy of a
    file embedded in this very run waits for no row), so they need no hash here. The others
    (every file of a new library) are hashed by the reader that reads them for embedding, so
    they are read once, on the engine's workers."""
    absent_sizes = {row["bytes"] for row in absent.values()}

    def worth(file: FoundFile) -> bool:
        row = existing.get(file.path)
        if row is not None:  # modified in place keeps its id; equal size might be a touch
            return row["bytes"] == file.bytes
        return file.bytes in stored_sizes or file.bytes in absent_sizes

    return [file for file in changed if worth(file)]


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
