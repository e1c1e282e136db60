"""Generic retrieval metrics, checked on hand-made arrays whose answers are known."""

import numpy as np
import pytest

from search.metrics import precision_at_k, zero_shot_accuracy


def test_precision_at_k_counts_matching_labels():
    images = np.eye(4, dtype=np.float32)
    labels = ["a", "a", "b", "b"]
    queries = np.array([[1, 0.9, 0.1, 0], [1, 0, 0.9, 0]], dtype=np.float32)
    assert precision_at_k(images, labels, queries, ["a", "a"], k=2) == pytest.approx((1.0 + 0.5) / 2)


def test_zero_shot_accuracy_uses_argmax():
    images = np.array([[1, 0], [0, 1], [1, 0]], dtype=np.float32)
    classes = np.array([[1, 0], [0, 1]], dtype=np.float32)
    assert zero_shot_accuracy(images, [0, 1, 1], classes) == pytest.approx(2 / 3)
