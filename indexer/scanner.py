"""Stage 1: walk the given paths and list candidate image files with their size and mtime.

Roots are resolved to real paths (``~`` expanded, symlinks followed), so ``./lib``, its absolute
path and a symlink to it are one library. What could not be listed is reported, never taken for
empty: a missing root, and every folder the walk could not read, whose rows must be kept.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, replace
from typing import Iterable, Iterator

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
    """Every image file and webdataset shard under *paths* at once, sorted: :class:`Walk`, held
    whole (a run streams the walk instead; this is for what needs the whole list)."""
    walk = Walk(paths, exclude, cross_mounts, storage)
    files: dict[str, FoundFile] = {}
    shards: dict[str, FoundFile] = {}
    for found in walk:
        (shards if is_shard_path(found.path) else files)[found.path] = found
    return replace(walk.summary(), files=tuple(files[p] for p in sorted(files)),
                   shards=tuple(shards[p] for p in sorted(shards)))


class Walk:
    """The scan as a stream: iterating yields image files and webdataset shards (``.tar``) under
    *paths* one at a time, in path order within each root, and stats each as it is reached, so a
    library of 100M files is never held whole. Brace patterns are expanded
    (:func:`expand_patterns`); the roots are resolved on construction, so what is missing is known
    before any file is found. A root inside another root given is walked once, as part of it.

    Non-image files are skipped silently; dangling symlinks and unreadable folders become failures.
    Folder symlinks are not followed, so a link loop cannot hang a run. Folders in *exclude* (the
    store itself) are never entered. Nor are pseudo file systems (/proc, /sys, /dev...), nor,
    unless *cross_mounts*, other file systems mounted below a root (``clipdex index /`` indexes
    the root file system); what they hold is left as it is in the store. ``s3://`` and ``gs://``
    URLs are listed through fsspec with the *storage* options (store.remote) on construction.

    ``failures``, ``unlisted``, ``skipped`` and ``sidecars`` grow as the walk goes (``sidecars``:
    the ``.txt`` files seen, complete for a folder before its first file is yielded);
    :meth:`summary` is the whole walk's, once iterated, without the files.
    """

    def __init__(self, paths: Iterable[str | os.PathLike], exclude: Iterable[str | os.PathLike] = (),
                 cross_mounts: bool = False, storage: StorageOptions = ()) -> None:
        self.excluded = {resolve_root(p) for p in exclude}
        self.cross_mounts, self.storage = cross_mounts, storage
        self.roots: list[str] = []
        self.missing: list[str] = []
        self.unlisted: list[str] = []
        self.failures: list[Failure] = []
        self.sidecars: set[str] = set()
        self.skipped: list[str] = []
        self.found_under: dict[str, int] = {}  # root -> images and shards found under it so far (a nested root's too)
        self._remote: dict[str, tuple] = {}  # root URL -> (file system, path, kind: "file" or "directory")
        for given in expand_patterns(paths):
            if is_url(given):
                root, found = _remote_root(given, storage)
                if found is None:
                    self.missing.append(root)
                elif root not in self.roots:
                    self.roots.append(root)
                    self._remote[root] = found
                continue
            root = resolve_root(given)
            if not os.path.lexists(root):
                self.missing.append(root)
            elif root not in self.roots:
                self.roots.append(root)

    def __iter__(self) -> Iterator[FoundFile]:
        folders = [root for root in self.roots
                   if (self._remote[root][2] == "directory" if root in self._remote else os.path.isdir(root))]
        # A root inside another root given is not walked itself: its files come with that root's
        # (a folder may be listed by one walk only, or a file is found twice); they count for both.
        nested = [root for root in self.roots if any(other != root and is_under(root, other) for other in folders)]
        self.found_under = dict.fromkeys(self.roots, 0)
        for root in self.roots:
            if root in nested:
                continue
            for found in self._walk_root(root):
                self.found_under[root] += 1
                for inner in nested:
                    self.found_under[inner] += is_under(found.path, inner)
                yield found

    def summary(self) -> Scan:
        return Scan(tuple(self.roots), (), tuple(self.failures), tuple(self.missing), tuple(self.unlisted),
                    frozenset(self.sidecars), tuple(self.skipped), storage=self.storage)

    def empty_roots(self) -> list[str]:
        """The roots that held no image and no shard (after the walk)."""
        return [root for root, count in self.found_under.items() if count == 0]

    def _walk_root(self, root: str) -> Iterator[FoundFile]:
        if root in self._remote:
            yield from self._walk_remote(*self._remote[root])
            return
        if mount_type(root) in PSEUDO_FILE_SYSTEMS:
            self.skipped.append(root)
            return
        if os.path.isdir(root):
            yield from self._walk_folder(root)
        elif is_image_path(root) or is_shard_path(root):
            if is_image_path(root) and os.path.isfile(sidecar_path(root)):
                self.sidecars.add(sidecar_path(root))
            yield from _stat(root, self.failures)

    def _walk_remote(self, fs, path: str, kind: str) -> Iterator[FoundFile]:
        """The objects under a prefix, a "folder" listing at a time (a bucket of 100M objects is
        never listed whole), in the order of their URLs; each listing dropped from fsspec's cache
        once walked."""
        stack = [iter(self._remote_entries(fs, path, [fs.info(path)] if kind == "file" else None))]
        while stack:
            entry = next(stack[-1], None)
            if entry is None:
                stack.pop()
            elif isinstance(entry, str):
                stack.append(iter(self._remote_entries(fs, entry, None)))
            else:
                yield entry

    def _remote_entries(self, fs, folder: str, listed: list | None) -> list:
        """A prefix's images and shards (FoundFile) and sub-prefixes (their paths), sorted as
        their URLs; its captions noted."""
        if listed is None:
            try:
                listed = fs.ls(folder, detail=True)
            except FileNotFoundError:
                listed = []
            except Exception as error:  # botocore's and aiohttp's errors are not OSErrors
                raise InputError(f"cannot list {object_url(fs, folder)}: {first_line(error)}") from error
            fs.invalidate_cache(folder)  # s3fs keeps every listing: a walk of a bucket would keep the bucket
        found: list[tuple[str, object]] = []
        for info in listed:
            name = info["name"].rstrip("/")
            if info.get("type", "file") != "file":
                if name != folder.rstrip("/"):
                    found.append((name + "/", name))
            elif is_image_path(name) or is_shard_path(name):
                size, mtime, etag = object_stat(info)
                found.append((name, FoundFile(object_url(fs, name), size, mtime, etag=etag)))
            elif name.endswith(".txt"):
                self.sidecars.add(object_url(fs, name))
        found.sort(key=lambda item: item[0])
        return [entry for _, entry in found]

    def _walk_folder(self, root: str) -> Iterator[FoundFile]:
        """Depth first, each folder's entries in name order with a folder's name read as ``name/``:
        exactly the order of the paths sorted (``a.jpg`` < ``a/`` < ``a0.jpg``)."""
        root_device = os.stat(root).st_dev
        stack = [iter(self._entries(root, root_device))]
        while stack:
            entry = next(stack[-1], None)
            if entry is None:
                stack.pop()
            elif entry[0]:
                stack.append(iter(self._entries(entry[1], root_device)))
            else:
                yield from _stat(entry[1], self.failures)

    def _entries(self, folder: str, root_device: int) -> list[tuple[bool, str]]:
        """(is a folder to enter, path) of *folder*'s images, shards and sub-folders, sorted; its
        captions noted; mounts below and unreadable folders noted instead of entered."""
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError as error:
            self.unlisted.append(os.fsdecode(folder))
            self.failures.append(Failure(os.fsdecode(folder), "unreadable", error.strerror or str(error)))
            return []
        found: list[tuple[str, bool, str]] = []
        for entry in entries:
            if _is_folder(entry):
                if entry.is_symlink() or entry.path in self.excluded:  # never followed (a loop could hang the run)
                    continue
                if _device(entry.path) not in (root_device, None):
                    if not self.cross_mounts or mount_type(entry.path) in PSEUDO_FILE_SYSTEMS:
                        self.skipped.append(entry.path)
                        continue
                found.append((entry.name + "/", True, entry.path))
            elif is_image_path(entry.name) or is_shard_path(entry.name):
                found.append((entry.name, False, entry.path))
            elif entry.name.endswith(".txt"):  # listed anyway: the planner need not try to open one per image
                self.sidecars.add(entry.path)
        found.sort()
        return [(is_folder, path) for _, is_folder, path in found]


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _remote_root(url: str, storage: StorageOptions) -> tuple[str, tuple | None]:
    """The root URL of a ``s3://`` or ``gs://`` prefix or object, and (file system, path, "file" or
    "directory"), or None where nothing lies there: a prefix that holds no object is missing, as
    object storage cannot tell an empty folder from none."""
    fs, path = filesystem(url, storage)
    path = path.rstrip("/")
    root = object_url(fs, path)
    try:
        fs.invalidate_cache(path)  # a listing cached by an earlier run in this process is stale
        info = fs.info(path)
    except FileNotFoundError:
        return root, None
    except Exception as error:  # botocore's and aiohttp's errors are not OSErrors
        raise InputError(f"cannot list {root}: {first_line(error)}") from error
    return root, (fs, path, "file" if info.get("type") == "file" else "directory")


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


def _stat(path: str, failures: list[Failure]) -> Iterator[FoundFile]:
    """The file at *path* as found (none for a dangling link, which is a failure, or no regular file)."""
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
    yield FoundFile(path, info.st_size, info.st_mtime, target, file_identity(info))
