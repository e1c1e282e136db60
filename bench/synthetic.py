"""Synthetic embeddings for benchmarks: a mixture of Gaussian clusters on the unit sphere.

Structureless random vectors make every ANN index look bad; real image features cluster.
``spread`` is the norm of the noise added to a unit centre (0.6: cosine to the centre ~0.86).
"""

from __future__ import annotations

import numpy as np


def clustered(rows: int, dim: int, clusters: int, spread: float, seed: int = 0) -> np.ndarray:
    out = np.empty((rows, dim), np.float32)
    start = 0
    for block in clustered_blocks(rows, dim, clusters, spread, seed):
        out[start:start + len(block)] = block
        start += len(block)
    return out


def clustered_blocks(rows: int, dim: int, clusters: int, spread: float, seed: int = 0, block_rows: int = 50_000):
    """:func:`clustered`, a block of rows at a time (the same rows, for any size in bounded memory)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    for start in range(0, rows, block_rows):
        n = min(block_rows, rows - start)
        block = centres[rng.integers(0, clusters, n)] + rng.normal(scale=spread / np.sqrt(dim), size=(n, dim)).astype(np.float32)
        yield block / np.linalg.norm(block, axis=1, keepdims=True)


def write_clustered_npy(path, rows: int, dim: int, clusters: int, spread: float, seed: int = 0) -> None:
    """A ``[rows, dim]`` float32 .npy of :func:`clustered` rows, written block by block."""
    with open(path, "wb") as out:
        np.lib.format.write_array_header_2_0(out, {"descr": "<f4", "fortran_order": False, "shape": (rows, dim)})
        for block in clustered_blocks(rows, dim, clusters, spread, seed):
            out.write(block.tobytes())
