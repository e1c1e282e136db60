"""Retrieval-quality measures over L2-normalised embeddings (free functions over arrays), for any
labelled collection."""

from __future__ import annotations

from typing import Hashable, Sequence

import numpy as np


def precision_at_k(
    image_embeddings: np.ndarray,
    image_labels: Sequence[Hashable],
    query_embeddings: np.ndarray,
    query_labels: Sequence[Hashable],
    k: int = 5,
) -> float:
    """Mean fraction of each query's top-*k* images (by cosine) whose label equals the query's."""
    labels = np.asarray(image_labels, dtype=object)
    scores = np.asarray(query_embeddings) @ np.asarray(image_embeddings).T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    hits = [np.mean(labels[row] == np.array([want], dtype=object)) for row, want in zip(top, query_labels)]
    return float(np.mean(hits))


def zero_shot_accuracy(
    image_embeddings: np.ndarray, true_class: Sequence[int], class_embeddings: np.ndarray
) -> float:
    """Fraction of images whose highest-cosine class embedding is their true class."""
    predicted = np.argmax(np.asarray(image_embeddings) @ np.asarray(class_embeddings).T, axis=1)
    return float(np.mean(predicted == np.asarray(true_class)))
