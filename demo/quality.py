"""Quality of a model, or of an indexed store, on a generated shapes library: the demo's numbers
and the bundled model's quality bar."""

from __future__ import annotations

from collections import Counter

import numpy as np

from demo.shapes import SHAPES
from encoder import MODELS, load_image
from search.metrics import precision_at_k, zero_shot_accuracy
from search.query import Query
from store.tables import column_vectors


def shapes_library_quality(model, rows, min_count: int = 5, template: str = "a photo of a {}") -> dict[str, float]:
    """Quality of *model* on a generated shapes library (rows of ``labels.csv``).

    ``precision_at_5``: text->image "a {colour} {shape}" over combinations present at least
    *min_count* times; ``zero_shot_shape``: accuracy of "a photo of a {shape}" classification.
    """
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
    ``Query.create(store, "a {colour} {shape}")`` and zero-shot accuracy on the stored embeddings."""
    truth = {row["path"]: (row["colour"], row["shape"]) for row in rows}
    combos = sorted(combo for combo, n in Counter(truth.values()).items() if n >= min_count)
    hits = [[truth.get(hit["path"]) == combo for hit in Query.create(store, f"a {combo[0]} {combo[1]}").limit(5).to_list()]
            for combo in combos]
    table = store.tables.images.search().select(["path", "embedding"]).to_arrow()
    known = [i for i, path in enumerate(table.column("path").to_pylist()) if path in truth]
    paths = table.column("path").to_pylist()
    shapes = MODELS.for_manifest(store.manifest).encode_texts([template.format(shape) for shape in SHAPES])
    return {
        "images": len(known),
        "queries": len(combos),
        "precision_at_5": float(np.mean([np.mean(h) if h else 0.0 for h in hits])) if hits else 0.0,
        "zero_shot_shape": zero_shot_accuracy(column_vectors(table)[known],
                                              [SHAPES.index(truth[paths[i]][1]) for i in known], shapes),
    }
