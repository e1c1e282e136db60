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
from store.files import is_under
from store.tables import file_identity


@dataclass(frozen=True)
class FoundFile:
    path: str  # absolute, under a real root; symlinked files keep the link's path
    bytes: int
    mtime: float
    link_target: str | None = None  # the real file a symlinked path leads to
    identity: tuple[int, int, int] | None = None  # of the real file: store.tables.file_identity


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


def scan(paths: Iterable[str | os.PathLike], exclude: Iterable[str | os.PathLike] = (),
         cross_mounts: bool = False) -> Scan:
    """Recursively list image files (by extension, any case) under *paths*, sorted.

    Non-image files are skipped silently; dangling symlinks and unreadable folders become failures.
    Folder symlinks are not followed, so a link loop cannot hang a run. Folders in *exclude* (the
    store itself) are never entered. Nor are pseudo file systems (/proc, /sys, /dev...), nor,
    unless *cross_mounts*, other file systems mounted below a root (``clipdex index /`` indexes
    the root file system); what they hold is left as it is in the store.
    """
    excluded = {resolve_root(p) for p in exclude}
    roots, missing, unlisted, files, failures, sidecars, skipped = [], [], [], {}, [], set(), []
    for given in paths:
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
    return Scan(tuple(roots), tuple(files[p] for p in sorted(files)), tuple(failures), tuple(missing), tuple(unlisted),
                frozenset(sidecars), tuple(skipped))


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
