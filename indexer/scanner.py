"""Stage 1: walk the given paths and list candidate image files with their size and mtime.

Roots are resolved to real paths (``~`` expanded, symlinks followed), so ``./lib``, its absolute
path and a symlink to it are one library. What could not be listed is reported, never taken for
empty: a missing root, and every folder the walk could not read, whose rows must be kept.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from typing import Iterable

from encoder.images import is_image_path
from store.errors import InputError, first_line
from store.files import is_under
from store.remote import StorageOptions, filesystem, is_url, object_stat, object_url
from store.tables import file_identity


@dataclass(frozen=True, slots=True)  # one per file: a run of millions holds millions
class Member:
    """Where an image inside a webdataset shard lies (indexer/shards.py): the shard as the scan
    found it, and the member's data in it. The row's identity columns are the shard's."""
    shard: str  # the shard's path, as the scan found it
    key: str  # webdataset's key: the member's name up to the first dot of its file name
    offset: int  # of the member's data in the shard
    shard_bytes: int
    shard_mtime: float
    shard_images: int  # image members the shard held when listed
    caption: str | None = None  # KEY.txt, when the shard was listed
    metadata: str | None = None  # KEY.json's fields as JSON text, typed by indexer.shards.metadata_fields


@dataclass(frozen=True, slots=True)  # one per file: a run of millions holds millions
class FoundFile:
    path: str  # absolute, under a real root; symlinked files keep the link's path; a member: SHARD.tar/NAME
    bytes: int
    mtime: float
    link_target: str | None = None  # the real file a symlinked path leads to
    identity: tuple[int, int, int] | None = None  # of the real file (a member: of its shard): store.tables.file_identity
    member: Member | None = None  # set for an image inside a webdataset shard
    etag: str | None = None  # an object's version tag (store.remote.object_stat; a member: its shard's)


@dataclass(frozen=True)
class Failure:
    path: str
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class Scan:
    roots: tuple[str, ...]  # real paths that exist
    files: tuple[FoundFile, ...]
    failures: tuple[Failure, ...]
    missing: tuple[str, ...] = ()  # roots that do not exist (an unmounted drive, a typo)
    unlisted: tuple[str, ...] = ()  # folders that could not be listed: what is under them is unknown
    sidecars: frozenset[str] = frozenset()  # the .txt files seen beside images (captions: sidecar_path)
    skipped: tuple[str, ...] = ()  # mount points not entered (pseudo file systems, other mounts): rows kept
    shards: tuple[FoundFile, ...] = ()  # webdataset .tar shards, not opened yet (indexer.shards.list_shards)
    metadata_fields: tuple = ()  # pyarrow fields of the listed members' metadata (indexer.shards.typed_metadata)
    storage: StorageOptions = ()  # how object storage was reached: reading what was listed needs the same

    def covers(self, path: str) -> bool:
        """True if *path* lies under a scanned root in a folder that was listed, so its absence
        from this scan means the file is gone."""
        return (any(is_under(path, root) for root in self.roots)
                and not any(is_under(path, folder) for folder in (*self.unlisted, *self.skipped)))

    @property
    def skipped_mounts(self) -> tuple[str, ...]:
        """The mount points skipped that hold real files (not /proc and the like): worth a word."""
        return tuple(folder for folder in self.skipped if mount_type(folder) not in PSEUDO_FILE_SYSTEMS)

    def files_under(self, root: str) -> int:
        return sum(1 for f in self.files if is_under(f.path, root))


def sidecar_path(path: str) -> str:
    """Where the caption of *path* may lie: ``photo.txt`` beside ``photo.jpg``."""
    return os.path.splitext(path)[0] + ".txt"


def resolve_root(given: str | os.PathLike) -> str:
    return os.path.realpath(os.path.expanduser(os.fspath(given)))


def is_shard_path(path: str | os.PathLike) -> bool:
    """A webdataset shard, by its extension: an uncompressed tar."""
    return os.fspath(path).lower().endswith(".tar")


def expand_patterns(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Brace patterns (``shards/{00000..00099}.tar``, ``{a,b}``) expanded as webdataset and
    clip-retrieval expand them; a name that exists as written is taken as it is."""
    from braceexpand import braceexpand

    expanded: list[str] = []
    for given in paths:
        text = os.fspath(given)
        if "{" in text and not os.path.lexists(os.path.expanduser(text)):
            expanded.extend(braceexpand(text))
        else:
            expanded.append(text)
    return expanded


def scan(paths: Iterable[str | os.PathLike], exclude: Iterable[str | os.PathLike] = (),
         cross_mounts: bool = False, storage: StorageOptions = ()) -> Scan:
    """Recursively list image files (by extension, any case) and webdataset shards (``.tar``)
    under *paths*, sorted; brace patterns are expanded (:func:`expand_patterns`).

    Non-image files are skipped silently; dangling symlinks and unreadable folders become failures.
    Folder symlinks are not followed, so a link loop cannot hang a run. Folders in *exclude* (the
    store itself) are never entered. Nor are pseudo file systems (/proc, /sys, /dev...), nor,
    unless *cross_mounts*, other file systems mounted below a root (``clipdex index /`` indexes
    the root file system); what they hold is left as it is in the store. ``s3://`` and ``gs://``
    URLs are listed through fsspec with the *storage* options (store.remote).
    """
    excluded = {resolve_root(p) for p in exclude}
    roots, missing, unlisted, files, failures, sidecars, skipped = [], [], [], {}, [], set(), []
    shards: dict[str, FoundFile] = {}
    for given in expand_patterns(paths):
        if is_url(given):
            _scan_remote(given, storage, (roots, missing), (files, shards, sidecars))
            continue
        root = resolve_root(given)
        if not os.path.lexists(root):
            missing.append(root)
            continue
        roots.append(root)
        if mount_type(root) in PSEUDO_FILE_SYSTEMS:
            skipped.append(root)
            continue
        if os.path.isdir(root):
            walk_errors: list[OSError] = []
            root_device = os.stat(root).st_dev
            for folder, dirs, names in os.walk(root, onerror=walk_errors.append):
                dirs[:] = sorted(d for d in dirs if os.path.join(folder, d) not in excluded)
                mounts = [d for d in dirs if _device(os.path.join(folder, d)) not in (root_device, None)]
                for d in mounts:
                    mount = os.path.join(folder, d)
                    if not cross_mounts or mount_type(mount) in PSEUDO_FILE_SYSTEMS:
                        skipped.append(mount)
                        dirs.remove(d)
                for name in names:
                    if is_image_path(name):
                        _stat(os.path.join(folder, name), files, failures)
                    elif is_shard_path(name):
                        _stat(os.path.join(folder, name), shards, failures)
                    elif name.endswith(".txt"):  # listed anyway: the planner need not try to open one per image
                        sidecars.add(os.path.join(folder, name))
            for error in walk_errors:
                folder = error.filename or root
                unlisted.append(os.fsdecode(folder))
                failures.append(Failure(os.fsdecode(folder), "unreadable", error.strerror or str(error)))
        elif is_image_path(root):
            _stat(root, files, failures)
            if os.path.isfile(sidecar_path(root)):
                sidecars.add(sidecar_path(root))
        elif is_shard_path(root):
            _stat(root, shards, failures)
    return Scan(tuple(roots), tuple(files[p] for p in sorted(files)), tuple(failures), tuple(missing), tuple(unlisted),
                frozenset(sidecars), tuple(skipped), tuple(shards[p] for p in sorted(shards)), storage=storage)


def _scan_remote(url: str, storage: StorageOptions, found_roots: tuple[list, list], found: tuple[dict, dict, set]) -> None:
    """The objects under a ``s3://`` or ``gs://`` prefix (or the one object it names): images,
    shards and captions. A prefix that lists nothing is missing: object storage cannot tell an
    empty folder from none."""
    roots, missing = found_roots
    files, shards, sidecars = found
    fs, path = filesystem(url, storage)
    root = object_url(fs, path.rstrip("/"))
    try:
        fs.invalidate_cache(path.rstrip("/"))  # a listing cached by an earlier run in this process is stale
        listed = fs.find(path.rstrip("/"), detail=True)
    except FileNotFoundError:
        listed = {}
    except Exception as error:  # botocore's and aiohttp's errors are not OSErrors
        raise InputError(f"cannot list {root}: {first_line(error)}") from error
    if not listed:
        missing.append(root)
        return
    roots.append(root)
    for name, info in listed.items():
        if info.get("type", "file") != "file":
            continue
        found_url = object_url(fs, name)
        size, mtime, etag = object_stat(info)
        if is_image_path(name):
            files[found_url] = FoundFile(found_url, size, mtime, etag=etag)
        elif is_shard_path(name):
            shards[found_url] = FoundFile(found_url, size, mtime, etag=etag)
        elif name.endswith(".txt"):
            sidecars.add(found_url)


# Kernel interfaces that look like folders: never photos, and some files block or never end.
PSEUDO_FILE_SYSTEMS = frozenset({
    "proc", "sysfs", "devtmpfs", "devpts", "devfs", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs",
    "pstore", "bpf", "mqueue", "configfs", "fusectl", "hugetlbfs", "binfmt_misc", "efivarfs", "autofs",
    "rpc_pipefs", "nsfs", "selinuxfs"})
MOUNT_TABLE = "/proc/self/mountinfo"


def mount_type(path: str) -> str | None:
    """The type of the file system *path* lies on (``proc``, ``ext4``...), None where unknown."""
    best, kind = "", None
    for point, fs_type in _mounts():
        if is_under(path, point) and len(point) >= len(best):
            best, kind = point, fs_type
    return kind


def _mounts() -> list[tuple[str, str]]:
    """(mount point, type) of every mount this process sees (Linux); [] elsewhere."""
    try:
        with open(MOUNT_TABLE, encoding="utf-8", errors="surrogateescape") as table:
            lines = table.read().splitlines()
    except OSError:
        return []
    mounts = []
    for line in lines:
        fields, _, rest = line.partition(" - ")
        parts = fields.split()
        if len(parts) >= 5 and rest:
            mounts.append((_unescape(parts[4]), rest.split()[0]))
    return mounts


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in names as octal escapes (\\040)."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def _device(path: str) -> int | None:
    try:
        return os.lstat(path).st_dev
    except OSError:
        return None


def _stat(path: str, files: dict[str, FoundFile], failures: list[Failure]) -> None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        failures.append(Failure(path, "missing", "dangling symlink"))
        return
    except OSError as error:
        failures.append(Failure(path, "unreadable", error.strerror or str(error)))
        return
    if not stat.S_ISREG(info.st_mode):
        return
    target = os.path.realpath(path) if os.path.islink(path) else None
    files[path] = FoundFile(path, info.st_size, info.st_mtime, target, file_identity(info))
