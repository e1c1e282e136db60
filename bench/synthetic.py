"""Synthetic embeddings for benchmarks: a mixture of Gaussian clusters on the unit sphere.

Structureless random vectors make every ANN index look bad; real image features cluster.
``spread`` is the norm of the noise added to a unit centre (0.6: cosine to the centre ~0.86).
"""

from __future__ import annotations

import numpy as np


def clustered(rows: int, dim: int, clusters: int, spread: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((rows, dim), np.float32)
    for start in range(0, rows, 50_000):
        n = min(50_000, rows - start)
        block = centres[rng.integers(0, clusters, n)] + rng.normal(scale=spread / np.sqrt(dim), size=(n, dim)).astype(np.float32)
        out[start:start + n] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out
