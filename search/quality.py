"""Retrieval-quality measures over L2-normalised embeddings (free functions over arrays)."""

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


def shapes_library_quality(model, rows, min_count: int = 5, template: str = "a photo of a {}") -> dict[str, float]:
    """Quality of *model* on a generated shapes library (rows of ``labels.csv``).

    ``precision_at_5``: text->image "a {colour} {shape}" over combinations present at least
    *min_count* times; ``zero_shot_shape``: accuracy of "a photo of a {shape}" classification.
    """
    from collections import Counter

    from indexer.images import load_image
    from indexer.shapes import SHAPES

    images = model.encode_images([load_image(row["path"]) for row in rows])
    pairs = [(row["colour"], row["shape"]) for row in rows]
    combos = sorted(combo for combo, n in Counter(pairs).items() if n >= min_count)
    queries = model.encode_texts([f"a {colour} {shape}" for colour, shape in combos])
    shapes = model.encode_texts([template.format(shape) for shape in SHAPES])
    return {
        "images": len(rows),
        "queries": len(combos),
        "precision_at_5": precision_at_k(images, pairs, queries, combos, k=5),
        "zero_shot_shape": zero_shot_accuracy(images, [SHAPES.index(row["shape"]) for row in rows], shapes),
    }


def store_quality(store, rows, min_count: int = 5, template: str = "a photo of a {}") -> dict[str, float]:
    """Like :func:`shapes_library_quality`, measured through an indexed store: precision@5 of
    ``store.search("a {colour} {shape}")`` and zero-shot accuracy on the stored embeddings."""
    from collections import Counter

    from indexer.shapes import SHAPES
    from search.query import encoder_for
    from store.tables import column_vectors

    truth = {row["path"]: (row["colour"], row["shape"]) for row in rows}
    combos = sorted(combo for combo, n in Counter(truth.values()).items() if n >= min_count)
    hits = [[truth.get(hit["path"]) == combo for hit in store.search(f"a {combo[0]} {combo[1]}").limit(5).to_list()]
            for combo in combos]
    table = store.tables.images.search().select(["path", "embedding"]).to_arrow()
    known = [i for i, path in enumerate(table.column("path").to_pylist()) if path in truth]
    paths = table.column("path").to_pylist()
    shapes = encoder_for(store).encode_texts([template.format(shape) for shape in SHAPES])
    return {
        "images": len(known),
        "queries": len(combos),
        "precision_at_5": float(np.mean([np.mean(h) if h else 0.0 for h in hits])) if hits else 0.0,
        "zero_shot_shape": zero_shot_accuracy(column_vectors(table)[known],
                                              [SHAPES.index(truth[paths[i]][1]) for i in known], shapes),
    }
