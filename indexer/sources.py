"""Where the bytes of an image are read from: a file, an object in object storage, or a member
of a webdataset shard (on disk, or in object storage by byte range). One reader serves the
embedding stage's readers (:class:`JobSources`) and the planner's hashing, so the reasons an
image cannot be read are the same wherever it is asked for."""

from __future__ import annotations

from typing import Sequence

from encoder.images import read_bytes, read_member
from store.errors import ImageError, first_line
from store.remote import RangeReader, StorageOptions, is_url, read_object


class ImageReader:
    """Reads one image wherever it lies; safe to share between threads (each thread keeps its own
    open shard in object storage: store.remote.RangeReader)."""

    def __init__(self, storage: StorageOptions = ()) -> None:
        self.storage = storage
        self.ranges = RangeReader(storage)

    def read(self, name: str, shard: str | None = None, offset: int = 0, size: int = 0) -> bytearray:
        """The bytes of *name*: the file or object itself, or, with *shard*, the *size* bytes at
        *offset* in it."""
        if shard is None:
            return self._object(name) if is_url(name) else read_bytes(name)
        if is_url(shard):
            return self._object(name, (shard, offset, offset + size))
        return read_member(shard, offset, size, name)

    def _object(self, name: str, within: tuple[str, int, int] | None = None) -> bytearray:
        try:
            if within is None:
                data = bytearray(read_object(name, self.storage))
            else:
                data = bytearray(self.ranges.read(*within))
        except FileNotFoundError as error:
            raise ImageError(name, "missing", "the object is gone") from error
        except OSError as error:
            raise ImageError(name, "unreadable", first_line(error)) from error
        if within is not None and len(data) < within[2] - within[1]:
            raise ImageError(name, "truncated",
                             f"its shard ends {within[2] - within[1] - len(data)} bytes before the member does")
        if not data:
            raise ImageError(name, "empty file")
        return data


class JobSources:
    """The bytes of each job, by position: what the embedding stage's readers read
    (indexer.pipeline.Sources)."""

    def __init__(self, files, storage: StorageOptions = ()) -> None:
        self.names: Sequence[str] = list(files["path"])
        self.shards, self.offsets, self.sizes = files["shard"], files["shard_offset"], files["bytes"]
        self.reader = ImageReader(storage)

    def read(self, position: int) -> bytearray:
        return self.reader.read(self.names[position], self.shards[position], self.offsets[position],
                                self.sizes[position])
