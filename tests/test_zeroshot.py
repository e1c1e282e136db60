import numpy as np
import pytest

from search.labelsets import get_label_set
from search.zeroshot import check_template, classify, clean_labels, similarity
from store.errors import InputError


def test_similarity_is_text_by_image_cosine(demo_model, small_library):
    from indexer.images import load_image

    _, rows = small_library
    images = [load_image(r["path"]) for r in rows[:3]]
    sims = similarity(demo_model, images, ["a red circle", "a blue star"])
    expected = demo_model.encode_texts(["a red circle", "a blue star"]) @ demo_model.encode_images(images).T
    assert sims.shape == (2, 3)
    np.testing.assert_allclose(sims, expected, atol=1e-5)


def test_classify_probabilities_sorted_and_clamped(demo_model, small_library):
    from indexer.images import load_image

    _, rows = small_library
    images = [load_image(r["path"]) for r in rows[:4]]
    results = classify(demo_model, images, ["circle", "square", "triangle", "star"], k=10)
    for row, top in zip(rows, results):
        probs = [s.prob for s in top]
        assert len(top) == 4 and probs == sorted(probs, reverse=True)
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert top[0].label == row["shape"]


def test_label_and_template_validation():
    assert clean_labels([" cat", "dog ", "cat", ""]) == ["cat", "dog"]
    with pytest.raises(InputError, match="empty"):
        clean_labels([" ", ""])
    with pytest.raises(InputError, match="must contain"):
        check_template("a photo of a")
    assert len(get_label_set("cifar100")) == 100 and "lawn mower" in get_label_set("CIFAR100")
