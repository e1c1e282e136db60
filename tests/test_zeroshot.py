"""Zero-shot tools against numbers computed independently of the implementation: a stand-in
encoder with known unit vectors, and softmax(100 * cosine) written out by hand in float64."""

import math

import numpy as np
import pytest

from search.labelsets import get_label_set
from search.zeroshot import check_template, classify, clean_labels, similarity
from store.errors import InputError


class KnownEncoder:
    """Texts and images map to fixed unit vectors, so every cosine is known in advance."""

    TEXTS = {"a photo of a cat": [1.0, 0.0, 0.0], "a photo of a dog": [0.0, 1.0, 0.0],
             "a photo of a car": [0.0, 0.0, 1.0], "cat": [1.0, 0.0, 0.0], "dog": [0.0, 1.0, 0.0]}

    def encode_texts(self, texts):
        return np.array([self.TEXTS[t] for t in texts], np.float32)

    def encode_images(self, images):
        rows = np.array(images, np.float64)
        return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


# Each "image" is the vector the stand-in encoder normalises.
IMAGES = [[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]]


def test_similarity_is_the_text_by_image_cosine_matrix():
    sims = similarity(KnownEncoder(), IMAGES, ["cat", "dog"])
    np.testing.assert_allclose(sims, [[0.6, 0.0], [0.8, 0.0]], atol=1e-6)


def test_classify_is_softmax_of_100_cosines_over_the_template():
    results = classify(KnownEncoder(), IMAGES, ["cat", "dog", "car"], k=3)
    # Image 0 has cosines cat 0.6, dog 0.8, car 0.0: softmax(100 * cos) by hand.
    logits = {"cat": 60.0, "dog": 80.0, "car": 0.0}
    total = sum(math.exp(v - 80.0) for v in logits.values())
    expected = sorted(((label, math.exp(v - 80.0) / total) for label, v in logits.items()), key=lambda x: -x[1])
    assert [s.label for s in results[0]] == [label for label, _ in expected]
    for score, (_, prob) in zip(results[0], expected):
        assert score.prob == pytest.approx(prob, rel=1e-5, abs=1e-12)
    assert results[1][0].label == "car" and results[1][0].prob == pytest.approx(1 / (1 + 2 * math.exp(-100)))


def test_classify_clamps_k_to_the_labels_and_uses_the_template():
    results = classify(KnownEncoder(), IMAGES[:1], ["cat", "dog"], template="a photo of a {}", k=10)
    assert [s.label for s in results[0]] == ["dog", "cat"]
    with pytest.raises(KeyError):  # the template really is applied: "a drawing of a cat" is unknown here
        classify(KnownEncoder(), IMAGES[:1], ["cat"], template="a drawing of a {}")


def test_the_bundled_model_classifies_shapes(demo_model, small_library):
    from encoder.images import load_image

    _, rows = small_library
    results = classify(demo_model, [load_image(r["path"]) for r in rows[:4]], ["circle", "square", "triangle", "star"])
    assert [top[0].label for top in results] == [r["shape"] for r in rows[:4]]


def test_label_template_and_k_validation():
    assert clean_labels([" cat", "dog ", "cat", ""]) == ["cat", "dog"]
    with pytest.raises(InputError, match="empty"):
        clean_labels([" ", ""])
    with pytest.raises(InputError, match="must contain"):
        check_template("a photo of a")
    with pytest.raises(InputError, match="k must be at least 1"):
        classify(KnownEncoder(), IMAGES, ["cat"], k=0)
    with pytest.raises(InputError, match="a text to compare is empty"):
        similarity(KnownEncoder(), IMAGES, ["cat", "  "])
    assert len(get_label_set("cifar100")) == 100 and "lawn mower" in get_label_set("CIFAR100")
