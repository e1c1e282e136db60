"""The photo columns (capture time, camera, lens, place) of rows embedded before clipdex read them:
a metadata-only pass over the files a run sees, without embedding anything again.

A store whose manifest's ``photo_version`` is below :data:`store.manifest.PHOTO_VERSION` gets it on
its next `index` run: every row whose photo columns are all null, and whose file this run found,
has its file read (the whole file: a HEIC file's EXIF may lie anywhere in it) and its columns
filled by one update per chunk. Once a run has seen the file of every row, the manifest records the
version, and later runs skip the pass.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Collection

import numpy as np
import pyarrow.compute as pc

from encoder.exif import PHOTO_FIELDS, photo_columns
from encoder.images import read_bytes
from store.errors import ImageError
from store.manifest import PHOTO_VERSION
from store.store import Store
from store.tables import file_path, image_rows

LOG = logging.getLogger(__name__)
CHUNK = 4096  # files read, then their rows updated in one commit


def fill_photo_columns(store: Store, seen: Collection[str], readers: int,
                       progress: Callable[[int], None] | None = None) -> int:
    """Fill the photo columns of the rows whose file is in *seen* (paths found by this run) and
    that have none; returns the rows updated. Records PHOTO_VERSION once no row is left unseen."""
    if store.manifest.photo_version >= PHOTO_VERSION or not store.tables.exists("images"):
        return 0
    rows = store.tables.file_rows(["id", "path", "path_bytes", *PHOTO_FIELDS])
    blank = np.all([pc.is_null(rows.column(name)).to_numpy(zero_copy_only=False) for name in PHOTO_FIELDS], axis=0)
    paths = [file_path(p, b) for p, b in zip(rows.column("path").to_pylist(), rows.column("path_bytes").to_pylist())]
    seen = set(seen)
    wanted = [(row_id, path) for row_id, path, empty in zip(rows.column("id").to_pylist(), paths, blank.tolist())
              if empty and path in seen]
    updated = 0
    with ThreadPoolExecutor(max(1, readers), thread_name_prefix="clipdex-photo") as pool:
        for start in range(0, len(wanted), CHUNK):
            chunk = wanted[start:start + CHUNK]
            found = [(row_id, columns) for row_id, columns in zip((i for i, _ in chunk), pool.map(_read, chunk))
                     if columns is not None and any(value is not None for value in columns.values())]
            if found:
                store.tables.update_files(image_rows(store.manifest.dim, partial=True, id=[i for i, _ in found],
                                                     **{name: [c[name] for _, c in found] for name in PHOTO_FIELDS}))
                updated += len(found)
            if progress:
                progress(len(chunk))
    if all(path in seen for path in paths):
        store.update_manifest(photo_version=PHOTO_VERSION)
    LOG.info("photo columns read for %d of %d rows without them", updated, len(wanted))
    return updated


def _read(job: tuple[int, str]) -> dict | None:
    try:
        return photo_columns(read_bytes(job[1]), job[1])
    except ImageError:  # gone or unreadable since the scan: the next run tries again
        return None
