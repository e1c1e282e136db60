"""The user's cache folder, where a model's exported encoders are kept (built once per model on
this machine, never downloaded): ``$CLIPDEX_CACHE_DIR``, else ``$XDG_CACHE_HOME/clipdex``, else
``~/.cache/clipdex``.

Another user who can write there could swap an encoder for one that answers wrongly, so a folder
is used only when this user owns it and nobody else may write to it (the rule ssh applies to
``~/.ssh``); anything else is refused with the reason, and clipdex carries on without the cache.
A model's folder appears whole or not at all: it is written beside its place and renamed into it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import stat
from pathlib import Path
from typing import Iterator

from store.errors import StoreError
from store.nofollow import rename_no_replace

ENV = "CLIPDEX_CACHE_DIR"


class CacheRefused(StoreError):
    """The cache folder is not safe to read (another owner, or writable by others)."""


def cache_root() -> Path:
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "clipdex"


def _check_private(folder: Path) -> None:
    info = folder.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise CacheRefused(f"the cache {folder} is not a folder (a link or a file): remove it, or set {ENV}")
    if info.st_uid != os.geteuid():
        raise CacheRefused(f"the cache {folder} belongs to another user: set {ENV} to a folder of your own")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise CacheRefused(f"others may write to the cache {folder}: run `chmod go-w {folder}` or set {ENV}")


def kind_folder(kind: str, create: bool) -> Path | None:
    """The private folder ``ROOT/KIND`` (None when it does not exist and *create* is false); the
    root and it are checked (:class:`CacheRefused`)."""
    folder = cache_root()
    for path in (folder, folder / kind):
        if not path.exists():
            if not create:
                return None
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        _check_private(path)
    return folder / kind


def entry(folder: Path) -> Path | None:
    """*folder* when a whole entry was published there (checked), else None."""
    if not folder.exists():
        return None
    _check_private(folder)
    return folder


def safe_key(*parts: str) -> str:
    """A folder name for a model: readable start, hashed whole (names may hold '/' or ':')."""
    text = "\0".join(parts)
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", parts[0])[:40].strip("-.") or "model"
    return f"{readable}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


@contextlib.contextmanager
def publishing(folder: Path) -> Iterator[Path]:
    """A fresh folder to write a model's files in; on success it becomes *folder* (another process
    that published first wins, and this one's copy is dropped), on failure it is removed."""
    work = folder.with_name(f".{folder.name}.{secrets.token_hex(6)}.tmp")
    work.mkdir(mode=0o700)
    try:
        yield work
        with contextlib.suppress(FileExistsError):
            rename_no_replace(work, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
