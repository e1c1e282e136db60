"""The store as the server sees it: an immutable snapshot, swapped for a newer one when the indexer
publishes a new index, so a request never mixes two versions and never sees a half-written one.

The manifest is the publication point: the indexer commits rows, builds the index, then atomically
replaces the manifest. A snapshot pins the images table at the version the index was built from.
Each request takes one snapshot reference and uses only it; the watcher thread loads the next
snapshot completely before swapping it in.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from search.cache import CacheRetriever
from store.errors import StoreError, first_line
from store.manifest import MANIFEST_NAME, read_manifest
from store.store import Store

LOG = logging.getLogger(__name__)
LOAD_ATTEMPTS = 5  # the indexer may replace the manifest (and delete the index it named) mid-load


class Snapshot:
    """One published version of the store: pinned rows, their index, and a cache built on demand."""

    def __init__(self, store: Store, stamp: tuple[int, int, int], device: str = "auto") -> None:
        self.store = store
        self.stamp = stamp
        self.device = device
        self._cache: CacheRetriever | None = None
        self._cache_lock = threading.Lock()

    @property
    def version(self) -> int:
        return self.store.manifest.index.table_version

    @property
    def has_cache(self) -> bool:
        return self._cache is not None

    def cache(self) -> CacheRetriever:
        with self._cache_lock:
            if self._cache is None:
                self._cache = CacheRetriever.open(self.store, device=self.device)
            return self._cache


class LiveStore:
    """The current :class:`Snapshot` of a store folder, kept up to date by :meth:`poll`."""

    def __init__(self, directory: str | Path, refresh_seconds: float = 0.5, device: str = "auto",
                 cache_rows: int = 0) -> None:
        self.directory = Path(directory)
        self.refresh_seconds = refresh_seconds
        self.device = device
        self.cache_rows = cache_rows
        self._snapshot = self._load()
        self._last_problem: str | None = None
        self._poll_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def current(self) -> Snapshot:
        return self._snapshot

    def poll(self) -> bool:
        """Swap in a newer published version if there is one; True when it did."""
        with self._poll_lock:
            old = self._snapshot.store.manifest.index
            try:
                stamp = _stamp(self.directory)
                if self._last_problem is not None:
                    LOG.warning("store %s is readable again", self.directory)
                    self._last_problem = None
                if stamp == self._snapshot.stamp:
                    return False
                new = read_manifest(self.directory).index
                if (new.file, new.table_version) == (old.file, old.table_version):
                    self._snapshot.stamp = stamp  # manifest touched (ids reserved), same index
                    return False
                snapshot = self._load()
            except StoreError as error:  # keep serving the last good version; say so once, not twice a second
                if first_line(error) != self._last_problem:
                    self._last_problem = first_line(error)
                    LOG.warning("store %s cannot be read (%s): still serving version %d", self.directory,
                                self._last_problem, self._snapshot.version)
                return False
            if self._snapshot.has_cache:
                snapshot.cache()  # build it before the swap: blend requests never wait for it
            self._snapshot = snapshot
            LOG.info("now serving version %d of %s (%d images)", snapshot.version, self.directory,
                     snapshot.store.manifest.index.count)
            return True

    def start(self) -> None:
        """Poll in a daemon thread every ``refresh_seconds`` until :meth:`stop`."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._watch, name="clipdex-store-watch", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _watch(self) -> None:
        while not self._stop.wait(self.refresh_seconds):
            try:
                self.poll()
            except Exception:  # the watcher must outlive any one bad read
                LOG.exception("checking %s for a new version failed", self.directory)

    def _load(self) -> Snapshot:
        attempt = 1
        while True:
            stamp = _stamp(self.directory)
            try:
                return Snapshot(Store.snapshot(self.directory, self.cache_rows), stamp, self.device)
            except StoreError:
                if attempt == LOAD_ATTEMPTS or _stamp(self.directory) == stamp:
                    raise  # not a race with the indexer: a real problem
                attempt += 1
                time.sleep(0.05)


def _stamp(directory: Path) -> tuple[int, int, int]:
    try:
        stat = os.stat(directory / MANIFEST_NAME)
    except OSError as error:
        raise StoreError(f"no store at {directory}: {error.strerror}") from error
    return stat.st_ino, stat.st_mtime_ns, stat.st_size

