"""Indexed files -> rows of the images table: the one row builder both engines and the driver use."""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa

from encoder import ClipModel
from encoder.exif import PHOTO_FIELDS
from encoder.exif import empty as empty_photo
from indexer.pipeline import Batch
from indexer.plan import Job
from store.tables import IDENTITY_COLUMNS, image_rows

Files = Mapping[str, Sequence]  # file columns by name: file_columns, JobFiles, or a job table's columns

# Each file column, as it is read off a job.
_FIELDS = {
    "id": lambda j: j.id, "hash": lambda j: j.hash, "path": lambda j: j.file.path,
    "link_target": lambda j: os.fsencode(j.file.link_target) if j.file.link_target else None,
    "bytes": lambda j: j.file.bytes, "mtime": lambda j: j.file.mtime,
    **{name: (lambda j, i=i: j.file.identity[i] if j.file.identity else None) for i, name in enumerate(IDENTITY_COLUMNS)},
    "etag": lambda j: j.file.etag,
    "caption": lambda j: j.caption,
    # An image inside a webdataset shard (indexer.shards): the shard's path, where the member lies,
    # and KEY.json's fields as JSON text (typed into the table's metadata columns by batch_rows).
    "shard": lambda j: j.file.member.shard if j.file.member else None,
    "key": lambda j: j.file.member.key if j.file.member else None,
    "shard_offset": lambda j: j.file.member.offset if j.file.member else None,
    "shard_bytes": lambda j: j.file.member.shard_bytes if j.file.member else None,
    "shard_mtime": lambda j: j.file.member.shard_mtime if j.file.member else None,
    "shard_images": lambda j: j.file.member.shard_images if j.file.member else None,
    "metadata": lambda j: j.file.member.metadata if j.file.member else None,
}


def file_columns(jobs: Sequence[Job]) -> dict[str, list]:
    """What the plan knows of each job's file: its id, path, size, identity, hash and caption."""
    return {name: [get(j) for j in jobs] for name, get in _FIELDS.items()}


class JobFiles(Mapping):
    """The file columns of *jobs*, read off a job when a position is asked for: a run of a million
    files builds rows batch by batch without a copy of every column."""

    def __init__(self, jobs: Sequence[Job]) -> None:
        self.jobs = jobs

    def __getitem__(self, name: str) -> Sequence:
        return _Column(self.jobs, _FIELDS[name])

    def __iter__(self):
        return iter(_FIELDS)

    def __len__(self) -> int:
        return len(_FIELDS)


class _Column(Sequence):
    def __init__(self, jobs: Sequence[Job], get) -> None:
        self.jobs, self.get = jobs, get

    def __getitem__(self, position):
        if isinstance(position, slice):
            return [self.get(job) for job in self.jobs[position]]
        return self.get(self.jobs[position])

    def __len__(self) -> int:
        return len(self.jobs)


def indexed_rows(model: ClipModel, files: Files, *, partial: bool = False, extra: Sequence[pa.Field] = (),
                 **pixels) -> pa.Table:
    """Rows for indexed files: their file columns, the caption embedding of each caption, and what
    the pixels gave where they were read (``width``, ``height``, ``embedding``). ``partial``: just
    these columns, to update stored rows (moves, new captions) without their vectors. *extra*:
    the table's metadata columns, filled from each file's ``metadata`` where it has some."""
    columns = {name: values for name, values in files.items() if name != "metadata"}
    metadata = metadata_columns(files.get("metadata"), extra) if "metadata" in files else {}
    return image_rows(model.embed_dim, partial=partial, **columns, **pixels, metadata=metadata or None,
                      caption_embedding=caption_vectors(model, files["caption"]))


def batch_rows(model: ClipModel, files: Files, batch: Batch, extra: Sequence[pa.Field] = ()) -> pa.Table:
    """The rows of one embedded batch of the pipeline; *files* holds the columns of every position
    it was run over, and a file hashed while it was read gets the hash of the bytes embedded."""
    taken = {name: [values[p] for p in batch.positions] for name, values in files.items()}
    taken["hash"] = [batch.hashes.get(p, digest) for p, digest in zip(batch.positions, taken["hash"])]
    photos = batch.photos or [None] * len(batch.positions)
    photos = [photo or empty_photo() for photo in photos]
    return indexed_rows(model, taken, width=[w for w, _ in batch.sizes], height=[h for _, h in batch.sizes],
                        embedding=batch.vectors(), extra=extra,
                        **{name: [p[name] for p in photos] for name in PHOTO_FIELDS})


def metadata_columns(texts: Sequence[str | None], extra: Sequence[pa.Field]) -> dict[str, pa.Array]:
    """The metadata columns (*extra*, as the table types them) of files whose ``metadata`` is
    JSON text (a shard member's KEY.json, typed by indexer.shards.typed_metadata); a value the
    column's type cannot hold is left null rather than failing the batch."""
    objects = [json.loads(text) if text else {} for text in texts]
    names = {name for value in objects for name in value}
    return {f.name: _typed([value.get(f.name) for value in objects], f.type) for f in extra if f.name in names}


def _typed(values: list, kind: pa.DataType) -> pa.Array:
    try:
        return pa.array(values, kind)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return pa.array([_one(value, kind) for value in values], kind)


def _one(value, kind: pa.DataType):
    try:
        return pa.scalar(value, kind).as_py()
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return None


def caption_vectors(model: ClipModel, captions: Sequence[str | None]) -> pa.Array:
    """caption_embedding column: the text embedding where a caption exists, else null."""
    dim = model.embed_dim
    captioned = [i for i, caption in enumerate(captions) if caption]
    if not captioned:
        return pa.nulls(len(captions), pa.list_(pa.float32(), dim))
    values = np.zeros((len(captions), dim), np.float32)
    values[captioned] = model.encode_texts([captions[i] for i in captioned])
    mask = np.ones(len(captions), bool)
    mask[captioned] = False
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), dim, mask=pa.array(mask))
