"""Imported features as the store takes them: checked, unit float32 rows, and their content hash."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from store.errors import InputError
from store.files import drop_mapped_pages

IMPORT_CHUNK = 32_768  # rows read, normalised, hashed and committed at a time (128 MiB at 1024-d)


def check_features(source: str, features: np.ndarray, chunk: int = IMPORT_CHUNK) -> None:
    """Refuse NaN, infinite and all-zero rows before anything is written, *chunk* rows at a time."""
    for start in range(0, len(features), chunk):
        rows = np.asarray(features[start:start + chunk], np.float64)
        if not np.isfinite(rows).all():
            row = start + int(np.argmin(np.isfinite(rows).all(axis=1)))
            raise InputError(f"{source}: features contain NaN or infinite values (row {row})")
        zero = np.flatnonzero(np.linalg.norm(rows, axis=1) == 0)
        if len(zero):
            raise InputError(f"{source}: features are all zeros at row {start + int(zero[0])}")
        drop_mapped_pages(features)  # a streamed 12 GB file is not the importer's to keep


def normalised(features: np.ndarray) -> np.ndarray:
    """Rows of any float dtype (float16 included) as unit float32 vectors; norms in float64."""
    chunk = np.asarray(features, np.float64)
    return (chunk / np.linalg.norm(chunk, axis=1, keepdims=True)).astype(np.float32)


def caption_vectors(features: np.ndarray) -> pa.Array:
    """Caption embeddings as the images table keeps them: unit float32 rows, null where a row is
    all zeros or not finite (a row without a caption)."""
    chunk = np.asarray(features, np.float64)
    norms = np.linalg.norm(chunk, axis=1)
    empty = ~np.isfinite(norms) | (norms == 0)
    unit = (np.nan_to_num(chunk) / np.where(empty, 1, norms)[:, None]).astype(np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(unit.reshape(-1)), chunk.shape[1], mask=pa.array(empty))


def feature_hash(vector: np.ndarray) -> str:
    """A row's identity in the store: an import of the same features again is skipped."""
    return hashlib.blake2b(np.ascontiguousarray(vector, np.float32).tobytes(), digest_size=16).hexdigest()
