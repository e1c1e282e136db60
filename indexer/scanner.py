"""Stage 1: walk the given paths and list candidate image files with their size and mtime."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from encoder.images import is_image_path
from store.errors import InputError


@dataclass(frozen=True)
class FoundFile:
    path: str  # absolute; symlinked files keep the link's path
    bytes: int
    mtime: float


@dataclass(frozen=True)
class Failure:
    path: str
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class Scan:
    roots: tuple[str, ...]
    files: tuple[FoundFile, ...]
    failures: tuple[Failure, ...]

    def covers(self, path: str) -> bool:
        """True if *path* lies under one of the scanned roots (so its absence means it is gone)."""
        return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in self.roots)


def scan(paths: Iterable[str | os.PathLike]) -> Scan:
    """Recursively list image files (by extension, any case) under *paths*, sorted.

    Non-image files are skipped silently; dangling symlinks and unreadable folders become failures.
    Folder symlinks are not followed, so a link loop cannot hang a run.
    """
    roots, files, failures = [], {}, []
    for given in paths:
        root = os.path.abspath(os.fspath(given))
        if not os.path.lexists(root):
            raise InputError(f"no such file or folder: {given}")
        roots.append(root)
        if os.path.isdir(root):
            walk_errors: list[OSError] = []
            for folder, dirs, names in os.walk(root, onerror=walk_errors.append):
                dirs.sort()
                for name in names:
                    if is_image_path(name):
                        _stat(os.path.join(folder, name), files, failures)
            failures += [Failure(e.filename or root, "unreadable", e.strerror or str(e)) for e in walk_errors]
        elif is_image_path(root):
            _stat(root, files, failures)
    return Scan(tuple(roots), tuple(files[p] for p in sorted(files)), tuple(failures))


def _stat(path: str, files: dict[str, FoundFile], failures: list[Failure]) -> None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        failures.append(Failure(path, "missing", "dangling symlink"))
        return
    except OSError as error:
        failures.append(Failure(path, "unreadable", error.strerror or str(error)))
        return
    if not Path(path).is_file():
        return
    files[path] = FoundFile(path, info.st_size, info.st_mtime)
