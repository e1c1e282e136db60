"""Where `clipdex export` may write, and how it puts its output there.

Never into the store it reads (nor over a folder holding it), never through a link or onto a
device, FIFO or socket, and it replaces only a regular file (a folder for clip-retrieval) that
holds nothing but a previous export. The output is written under a random name created
exclusively beside its target, then renamed onto nothing, or onto the very entry --overwrite
agreed to replace: never onto anything that appeared meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import stat
from pathlib import Path

from store.errors import InputError, StoreError
from store.files import is_under
from store.nofollow import rename_no_replace

# What a clip-retrieval folder holds: the only folder contents --overwrite may remove.
CLIP_RETRIEVAL_PARTS = {"img_emb": re.compile(r"img_emb_\d+\.npy"), "text_emb": re.compile(r"text_emb_\d+\.npy"),
                        "metadata": re.compile(r"metadata_\d+\.parquet")}


def checked_target(out: Path, store_dir: Path, kind: str, overwrite: bool) -> tuple[Path, os.stat_result | None]:
    """Where *out* is, its folder's links resolved, and what is there now that --overwrite agreed to
    replace (None: nothing); an InputError unless export may write there."""
    given = out
    if out.name in ("", ".."):  # "/", "x/..": the folder it names
        out = Path(os.path.realpath(out))
    if not out.parent.is_dir():
        raise InputError(f"the folder {given.parent} does not exist")
    target = Path(os.path.realpath(out.parent), out.name)
    store = os.path.realpath(store_dir)
    for place in (str(target), os.path.realpath(target)):  # the name itself, and where a link there leads
        if is_under(place, store):
            raise InputError(f"--out {given} is {'the store' if place == store else 'inside the store'} {store_dir}: "
                             "export never writes into the store it reads")
    if is_under(store, str(target)):
        raise InputError(f"--out {given} holds the store {store_dir}: export never replaces the store it reads")
    try:
        info = os.lstat(target)
    except FileNotFoundError:
        return target, None
    refusal = _refusal(target, info, kind)
    if refusal:
        raise InputError(f"{given} {refusal}")
    if not overwrite:
        raise InputError(f"{given} already exists: pass --overwrite to replace it")
    return target, info


def _refusal(path: Path, info: os.stat_result, kind: str) -> str | None:
    """Why export must not replace what is at *path* (described by *info*, not following a link)."""
    mode, folder = info.st_mode, kind == "clip-retrieval"
    if stat.S_ISLNK(mode):
        return (f"is a symbolic link (to {os.readlink(path)}): export never writes through a link nor replaces "
                "one; name the file itself (--out - writes to standard output)")
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        what = ("a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        return f"is {what}: export replaces only a regular file (--out - writes to standard output)"
    if stat.S_ISDIR(mode) and not folder:
        return f"is a folder: a {kind} export is a file"
    if stat.S_ISREG(mode) and folder:
        return "is a file: a clip-retrieval export is a folder"
    if folder and not _is_clip_retrieval(path):
        return ("is a folder that holds more than a clip-retrieval export (img_emb/, text_emb/ and metadata/ "
                "shards): export replaces only a previous export")
    return None


def _is_clip_retrieval(folder: Path) -> bool:
    """*folder* holds nothing but clip-retrieval shards (or nothing at all)."""
    with os.scandir(folder) as parts:
        for part in parts:
            pattern = CLIP_RETRIEVAL_PARTS.get(part.name)
            if pattern is None or not part.is_dir(follow_symlinks=False):
                return False
            with os.scandir(part.path) as files:
                if not all(pattern.fullmatch(f.name) and f.is_file(follow_symlinks=False) for f in files):
                    return False
    return True


def write_beside(out: Path, existing: os.stat_result | None, kind: str, write) -> int:
    """``write(temporary)`` a new file (a folder for clip-retrieval) under a random name beside *out*,
    created exclusively, then rename it to *out*; its size in bytes. It is removed if anything fails."""
    folder = kind == "clip-retrieval"
    temporary, handle = _create_temporary(out, folder)
    placed = False
    try:
        if folder:
            write(temporary)
            size = sum(p.stat().st_size for p in temporary.rglob("*") if p.is_file())
        else:
            with os.fdopen(handle, "wb") as sink:
                write(sink)
                sink.flush()
                size = os.fstat(sink.fileno()).st_size
        _place(temporary, out, existing, kind)
        placed = True
    finally:
        if not placed:
            _remove(temporary)
    return size


def _create_temporary(out: Path, folder: bool) -> tuple[Path, int | None]:
    """A new entry under a random name beside *out*: a folder, or a file open for writing. Made with
    O_EXCL (mkdir for a folder), so an existing name, or a link planted there, is never used."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        path = out.with_name(f".{out.name[:200]}.partial-{secrets.token_hex(8)}")
        try:
            if folder:
                os.mkdir(path)
                return path, None
            return path, os.open(path, flags, 0o666)
        except FileExistsError:
            continue
    raise StoreError(f"could not find a free temporary name beside {out}")


def _place(temporary: Path, out: Path, existing: os.stat_result | None, kind: str) -> None:
    """Rename *temporary* to *out*: onto nothing, or onto the very entry *existing* describes (what
    --overwrite agreed to replace), never onto anything that appeared there meanwhile."""
    aside = None
    if existing is not None:
        aside = out.with_name(f".{out.name[:200]}.old-{secrets.token_hex(8)}")
        try:
            rename_no_replace(out, aside)  # a rename moves a name: it never follows a link nor opens a device
        except FileNotFoundError:
            aside = None  # gone meanwhile: nothing left to replace
        else:
            moved = os.lstat(aside)
            if (moved.st_dev, moved.st_ino) != (existing.st_dev, existing.st_ino) or _refusal(aside, moved, kind):
                rename_no_replace(aside, out)
                raise InputError(f"{out} was replaced while the export ran: left as it is, nothing exported")
    try:
        rename_no_replace(temporary, out)
    except FileExistsError:
        kept = f"; what it replaced is at {aside}" if aside is not None else ""
        raise InputError(f"{out} appeared while the export ran: left as it is, nothing exported{kept}") from None
    if aside is not None:
        _remove(aside)


def _remove(path: Path) -> None:
    """Remove our own temporary file or folder (never following a link put in its place)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
