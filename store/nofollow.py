"""Opening a file by a path none of whose components may be a symbolic link; writing and renaming
without following one or replacing what another process put in place.

``open(path, O_NOFOLLOW)`` guards only the last component: a parent folder swapped for a link
between a check and the open leads to another file. Here no component is ever followed: on Linux
5.6+ one ``openat2`` call with ``RESOLVE_NO_SYMLINKS`` (the kernel resolves the whole path
atomically), elsewhere a walk that opens each folder from the one before with ``O_NOFOLLOW``, so
what is opened is the chain of folders that existed, whatever is renamed meanwhile. A link on the
way fails with ``ELOOP`` (or ``ENOTDIR``), never resolves.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import secrets
import shutil
import stat
import sys
from typing import Sequence

_RESOLVE_NO_MAGICLINKS = 0x02  # linux/openat2.h
_RESOLVE_NO_SYMLINKS = 0x04
_SYS_OPENAT2 = 437  # the same number on every Linux architecture (added after the syscall table unification)
_AT_FDCWD = -100
_SEARCH = getattr(os, "O_PATH", os.O_RDONLY)  # a folder opened only to open what lies in it


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    except OSError:
        return None


_LIBC = _libc()
_openat2_works: bool | None = None if _LIBC is not None else False


def open_no_symlinks(path: str, flags: int = os.O_RDONLY, dir_fd: int | None = None) -> int:
    """A descriptor of *path* (absolute, or relative to the folder *dir_fd*) opened with *flags*,
    following no symbolic link in any component; OSError otherwise (ELOOP or ENOTDIR for a link on
    the way, ENOENT, EACCES...)."""
    if (dir_fd is None) != os.path.isabs(path):
        raise ValueError(f"an absolute path, or a relative one with dir_fd: {path!r}")
    flags |= os.O_CLOEXEC | os.O_NOFOLLOW
    global _openat2_works
    if _openat2_works is not False:
        fd = _openat2(path, flags, _AT_FDCWD if dir_fd is None else dir_fd)
        if fd is not None:
            _openat2_works = True
            return fd
        _openat2_works = False
    return walk_open(path, flags, dir_fd)


def _openat2(path: str, flags: int, dir_fd: int) -> int | None:
    """openat2's descriptor; None when the kernel (or a sandbox's filter) has no openat2."""
    how = _OpenHow(flags, 0, _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)
    fd = _LIBC.syscall(_SYS_OPENAT2, dir_fd, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how))
    if fd >= 0:
        return fd
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EPERM) and _openat2_works is None:  # EPERM: seccomp's answer to unknown calls
        return None
    raise OSError(code, os.strerror(code), path)


def walk_open(path: str, flags: int, dir_fd: int | None = None) -> int:
    """The portable way: each folder opened from its parent's descriptor with O_NOFOLLOW."""
    parts = [part for part in path.split(os.sep) if part]
    if any(part in (".", "..") for part in parts):
        raise OSError(errno.EINVAL, "a path with . or .. components", path)
    fd = os.open(os.sep if dir_fd is None else ".", _SEARCH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        for index, part in enumerate(parts[:-1]):
            child = os.open(part, _SEARCH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = child
            # With O_PATH, O_NOFOLLOW opens a link itself instead of failing: refuse it here.
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                raise OSError(errno.ELOOP, "a symbolic link on the way", os.sep + os.sep.join(parts[:index + 1]))
        return os.open(parts[-1] if parts else ".", flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    finally:
        os.close(fd)


def folder_beneath(dir_fd: int, parts: Sequence[str]) -> int:
    """A descriptor of the folder *parts* below *dir_fd*, each made where missing. Whatever stands
    in the way (a link, a file) is removed first, never followed: what is below is clipdex's own."""
    fd = os.dup(dir_fd)
    try:
        for part in parts:
            try:
                child = open_no_symlinks(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            except FileNotFoundError:
                child = _made(part, fd)
            except OSError as error:
                if error.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                os.unlink(part, dir_fd=fd)  # a link or a file, not a folder: unlink never follows
                child = _made(part, fd)
            os.close(fd)
            fd = child
        return fd
    except BaseException:
        os.close(fd)
        raise


def _made(name: str, dir_fd: int) -> int:
    try:
        os.mkdir(name, dir_fd=dir_fd)
    except FileExistsError:  # made meanwhile by a concurrent request
        pass
    return open_no_symlinks(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=dir_fd)


def replace_beneath(dir_fd: int, name: str, data: bytes, mode: int) -> None:
    """Write *data* as *name* in the folder *dir_fd* so readers see the old file or the new: a new
    file (O_EXCL, O_NOFOLLOW: never an existing one, never through a link) renamed over *name*
    (which replaces a link itself, not what it points at)."""
    temporary = f".{name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        try:
            os.replace(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except IsADirectoryError:  # a folder planted under the name
            shutil.rmtree(name, dir_fd=dir_fd)
            os.replace(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary, dir_fd=dir_fd)
        raise


def rename_no_replace(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename *source* to *target* only if nothing is there (FileExistsError otherwise)."""
    if _rename_noreplace(source, target):
        return
    if stat.S_ISDIR(os.lstat(source).st_mode):
        try:
            os.rename(source, target)  # onto a file, a link or a folder with contents it fails
        except OSError as error:
            if error.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target)) from error
            raise
        return
    try:
        os.link(source, target, follow_symlinks=False)  # fails on any existing name
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: check, then rename
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target)) from None
        os.rename(source, target)
        return
    os.unlink(source)


def _rename_noreplace(source: str | os.PathLike, target: str | os.PathLike) -> bool:
    """Linux's renameat2(RENAME_NOREPLACE); False where this system or file system has none."""
    function = _renameat2()
    if function is None:
        return False
    if function(-100, os.fsencode(source), -100, os.fsencode(target), 1) == 0:  # AT_FDCWD, RENAME_NOREPLACE
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(target))  # EEXIST makes a FileExistsError


@functools.lru_cache(maxsize=1)
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library older than glibc 2.28
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function
