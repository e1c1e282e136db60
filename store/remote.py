"""Object storage through fsspec: ``s3://`` and ``gs://`` URLs as index inputs and export targets.

Credentials and endpoints come the standard way of each library (for S3, botocore's: the AWS
environment variables, ``~/.aws/config`` and ``credentials``, ``AWS_ENDPOINT_URL`` for MinIO and
other S3-compatible servers), plus the options given with ``--storage-option KEY=VALUE``, passed to
the file system as they are (s3fs: ``endpoint_url``, ``anon``, ``key``, ``secret``...; a value is
read as JSON where it is JSON, so ``anon=true`` is a boolean and ``client_kwargs={...}`` a dict).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from datetime import datetime
from typing import Any, Iterable, Mapping

from store.errors import InputError, first_line

# The protocols clipdex takes, and the library each needs.
PROTOCOLS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}
CLOUD_EXTRA = "pip install 'clipdex[cloud]'"
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

StorageOptions = tuple[tuple[str, Any], ...]  # hashable, so configs holding it stay frozen and picklable


def is_url(path: str | os.PathLike) -> bool:
    return isinstance(path, str) and _URL.match(path) is not None


def parse_options(pairs: Iterable[str]) -> StorageOptions:
    """``KEY=VALUE`` pairs as storage options; a VALUE that is JSON (true, 3, {...}) is taken as such."""
    options = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key.strip():
            raise InputError(f"--storage-option takes KEY=VALUE, not {pair!r}")
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value
    return tuple(options.items())


def filesystem(url: str, options: StorageOptions | Mapping = ()):
    """(file system, path within it) for *url*, or one line saying why not."""
    protocol = _URL.match(url).group(1).lower()
    if protocol not in PROTOCOLS:
        raise InputError(f"{url}: clipdex reads s3:// and gs:// URLs, not {protocol}://")
    try:
        import fsspec

        return fsspec.core.url_to_fs(url, **dict(options))
    except ImportError as error:
        raise InputError(f"{protocol}:// URLs need {PROTOCOLS[protocol]}: {CLOUD_EXTRA}") from error
    except (TypeError, ValueError) as error:
        raise InputError(f"{url}: the storage options were refused: {first_line(error)}") from error


def object_url(fs, path: str) -> str:
    """The URL of an object as its file system lists it (``s3://bucket/key``)."""
    return fs.unstrip_protocol(path)


def object_stat(info: Mapping) -> tuple[int, float, str | None]:
    """(size, modification time, version tag) of an object as fsspec describes it: the ETag for
    S3 (what changes when the content does), the generation or md5 for GCS."""
    size = int(info.get("size") or 0)
    when = info.get("LastModified") or info.get("mtime") or info.get("updated")
    if isinstance(when, str):
        when = datetime.fromisoformat(when.replace("Z", "+00:00"))
    mtime = when.timestamp() if isinstance(when, datetime) else float(when or 0.0)
    tag = info.get("ETag") or info.get("etag") or info.get("generation") or info.get("md5Hash")
    return size, mtime, None if tag is None else str(tag).strip('"')


def read_object(url: str, options: StorageOptions) -> bytes:
    """The bytes of an object."""
    fs, path = filesystem(url, options)
    try:
        return fs.cat_file(path)
    except OSError:
        raise
    except Exception as error:  # botocore's and aiohttp's errors are not OSErrors: the callers' reasons are
        raise OSError(f"{url}: {first_line(error)}") from error


class RangeReader:
    """Byte ranges of objects, read through one open file per thread with a read-ahead block: the
    members of a shard, read in order by a reader thread, cost one request per block instead of
    one each."""

    def __init__(self, options: StorageOptions, block: int = 8 << 20) -> None:
        self.options, self.block = options, block
        self._local = threading.local()

    def read(self, url: str, start: int, end: int) -> bytes:
        local = self._local
        if getattr(local, "url", None) != url:
            self._drop()
            fs, path = filesystem(url, self.options)
            local.handle = fs.open(path, "rb", block_size=self.block, cache_type="readahead")
            local.url = url
        try:
            local.handle.seek(start)
            return local.handle.read(end - start)
        except OSError:
            self._drop()
            raise
        except Exception as error:  # botocore's and aiohttp's errors are not OSErrors
            self._drop()
            raise OSError(f"{url}: {first_line(error)}") from error

    def _drop(self) -> None:
        handle = getattr(self._local, "handle", None)
        self._local.handle = self._local.url = None
        if handle is not None:
            with contextlib.suppress(Exception):
                handle.close()
