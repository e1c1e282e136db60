"""Small file helpers every writer of the store shares: atomic replacement with the permissions a
normally created file would get (the process umask, not mkstemp's 0600)."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import re
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Collection, Iterator

import blake3
import numpy as np

from store.errors import ReadOnlyStoreError, StoreError


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it; restored at once
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()


def write_atomically(path: str | os.PathLike, data: bytes, sync: bool = False) -> None:
    """Write *data* to *path* so that a reader sees the old content or the new, never half."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            if sync:
                out.flush()
                os.fsync(out.fileno())
        os.chmod(temporary, FILE_MODE)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# Lance (Rust) and FAISS (C++) report OS failures as RuntimeError text: "... (os error 28) ...".
_OS_ERROR = re.compile(r"os error (\d+)")
_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)


@contextmanager
def writing(directory: str | os.PathLike) -> Iterator[None]:
    """Turn an OS failure while writing the store (a full disk, a read-only file) into one line;
    every commit is atomic, so the store keeps its last commit."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        code = error.errno if isinstance(error, OSError) else _os_error(str(error))
        if code is None:
            raise
        if code in _READ_ONLY:
            raise ReadOnlyStoreError(f"the store {directory} is read-only: {os.strerror(code)}") from error
        raise StoreError(f"could not write to the store {directory}: {os.strerror(code)}. It keeps its last "
                         "commit; fix that and rerun to finish") from error


def _os_error(text: str) -> int | None:
    match = _OS_ERROR.search(text)
    if match:
        return int(match.group(1))
    return errno.ENOSPC if "No space left on device" in text else None


HASH_CHUNK = 1 << 20


class _Blake3_128:
    def __init__(self) -> None:
        self._digest = blake3.blake3()

    def update(self, data: bytes | bytearray) -> None:
        self._digest.update(data)

    def hexdigest(self) -> str:
        return self._digest.hexdigest(length=16)


# The content hash of an image row, by the name a store's manifest records (Manifest.content_hash).
# BLAKE3 hashes 4x faster than blake2b here (41 vs 167 us for a 150 KB JPEG, BENCHMARKS.md "GPU
# feed"), which is most of what the host spends per image; stores made before keep blake2b.
CONTENT_HASHES: dict[str, Callable[[], Any]] = {
    "blake3-128": _Blake3_128,
    "blake2b-128": lambda: hashlib.blake2b(digest_size=16),
}
DEFAULT_CONTENT_HASH = "blake3-128"


def stream_hash(handle: BinaryIO, algorithm: str) -> str:
    """The content hash of an image row (*algorithm*: a key of CONTENT_HASHES), read in 1 MiB
    chunks: the indexer records it, the server checks a file against it."""
    digest = CONTENT_HASHES[algorithm]()
    while chunk := handle.read(HASH_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def bytes_hash(data: bytes | bytearray, algorithm: str) -> str:
    """:func:`stream_hash` of content already in memory (both hashes release the GIL while they work)."""
    digest = CONTENT_HASHES[algorithm]()
    digest.update(data)
    return digest.hexdigest()


def is_under(path: str, folder: str) -> bool:
    """*path* is *folder* or lies inside it (textually: both already absolute and resolved)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


THUMBNAIL_DIR = "thumbnails"


def thumbnail_file(store_dir: str | os.PathLike, content_hash: str, size: int) -> Path:
    """Where the thumbnail of some content lives: keyed by the content, never by a path."""
    return Path(store_dir) / THUMBNAIL_DIR / content_hash[:2] / f"{content_hash}-{size}.jpg"


def prune_thumbnails(store_dir: str | os.PathLike, held: Callable[[list[str]], Collection[str]]) -> int:
    """Delete the thumbnails of content no row has any more (*held*: those of some content hashes
    that a row still has, asked of the thumbnails kept, never of every row); returns how many went."""
    top = Path(store_dir) / THUMBNAIL_DIR
    if top.is_symlink():  # planted: what it points at is not the store's to delete
        return 0
    thumbs = [thumb for folder in top.glob("??") if not folder.is_symlink() and folder.is_dir()
              for thumb in folder.glob("*.jpg")]
    kept: set[str] = set()
    names = sorted({thumb.name.rsplit("-", 1)[0] for thumb in thumbs})
    for start in range(0, len(names), 2_000):
        kept.update(held(names[start:start + 2_000]))
    removed = 0
    for thumb in thumbs:  # unlink removes a planted link itself, never its target
        if thumb.name.rsplit("-", 1)[0] not in kept:
            thumb.unlink(missing_ok=True)
            removed += 1
    return removed


def drop_mapped_pages(array: np.ndarray) -> None:
    """Unmap the pages of a memory-mapped file (an np.memmap or a view of one) that this process
    has read; they stay in the page cache. Read pages otherwise count in the process's resident
    memory, by whole page-cache folios around each row touched (see store.values.FileRows)."""
    for owner in (array, array.base):
        mapping = getattr(owner, "_mmap", None)  # np.memmap's own mmap.mmap
        if mapping is not None:
            mapping.madvise(mmap.MADV_DONTNEED)
            return


def progress(total: int, desc: str, unit: str = "vec"):
    """A progress bar on stderr for long store work (import, index build); shown on a terminal only."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr, disable=None,
                dynamic_ncols=True, leave=False)


@contextmanager
def native_stdout_silenced() -> Iterator[None]:
    """Drop what native code prints on file descriptor 1 meanwhile: FAISS's on-disk lists print
    progress with printf, which would land in the middle of `--json` output."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
