"""One writer per store: an OS lock (flock, via filelock) held for a whole write, from planning to
the index build, so two runs can never hand one id to two files or add a file twice. The kernel
drops the lock when its process dies, even by SIGKILL. Readers never take it."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import filelock

from store.errors import ReadOnlyStoreError, StoreBusyError, os_error_line
from store.files import write_atomically

LOCK_NAME = ".writer.lock"
HOLDER_NAME = ".writer.json"  # who holds the lock, for the message a second writer gets


@contextmanager
def writer_lock(directory: str | os.PathLike, wait: bool = False) -> Iterator[None]:
    """Hold the store's writer lock; without *wait* a second writer fails at once, naming the holder."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(directory / LOCK_NAME, timeout=-1 if wait else 0)
        lock.acquire()
    except filelock.Timeout:
        raise StoreBusyError(f"the store {directory} is being written by {_holder(directory)}; "
                             "wait for it to finish, or pass --wait to queue behind it") from None
    except PermissionError as error:
        raise ReadOnlyStoreError(f"the store {directory} is read-only for this user ({os_error_line(error)})") from error
    except OSError as error:
        if error.errno in (30,):  # EROFS: a read-only file system
            raise ReadOnlyStoreError(f"the store {directory} is read-only ({os_error_line(error)})") from error
        raise
    try:
        write_atomically(directory / HOLDER_NAME, json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv[:4])[:200],
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        yield
    finally:
        try:
            (directory / HOLDER_NAME).unlink(missing_ok=True)
        finally:
            lock.release()


def _holder(directory: Path) -> str:
    try:
        holder = json.loads((directory / HOLDER_NAME).read_text())
        return f"process {holder['pid']} on {holder['host']} ({holder['command']}, since {holder['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"
