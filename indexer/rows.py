"""Columns of the images table that the indexer derives from jobs, for either engine."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import pyarrow as pa

from encoder import ClipModel
from indexer.plan import Job
from store.tables import IDENTITY_COLUMNS


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


def file_columns(jobs: Sequence[Job]) -> dict[str, list]:
    return {
        "id": [j.id for j in jobs], "hash": [j.hash for j in jobs], "path": [j.file.path for j in jobs],
        "link_target": [os.fsencode(j.file.link_target) if j.file.link_target else None for j in jobs],
        "bytes": [j.file.bytes for j in jobs], "mtime": [j.file.mtime for j in jobs],
        **{name: [j.file.identity[i] if j.file.identity else None for j in jobs]
           for i, name in enumerate(IDENTITY_COLUMNS)},
        "caption": [j.caption for j in jobs],
    }
