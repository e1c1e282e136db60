"""The bundled model must retrieve for real on data it never saw (the Foundation quality bar)."""

import numpy as np
import pytest

from search.quality import precision_at_k, shapes_library_quality, zero_shot_accuracy


def test_precision_at_k_counts_matching_labels():
    images = np.eye(4, dtype=np.float32)
    labels = ["a", "a", "b", "b"]
    queries = np.array([[1, 0.9, 0.1, 0], [1, 0, 0.9, 0]], dtype=np.float32)
    assert precision_at_k(images, labels, queries, ["a", "a"], k=2) == pytest.approx((1.0 + 0.5) / 2)


def test_zero_shot_accuracy_uses_argmax():
    images = np.array([[1, 0], [0, 1], [1, 0]], dtype=np.float32)
    classes = np.array([[1, 0], [0, 1]], dtype=np.float32)
    assert zero_shot_accuracy(images, [0, 1, 1], classes) == pytest.approx(2 / 3)


def test_bundled_model_meets_quality_bar(demo_model, heldout_library):
    _, rows = heldout_library
    quality = shapes_library_quality(demo_model, rows)
    print(quality)
    assert quality["images"] >= 300
    assert quality["queries"] >= 20  # most of the 32 colour x shape combinations are measured
    assert quality["precision_at_5"] >= 0.9
    assert quality["zero_shot_shape"] >= 0.9


def test_random_weights_fail_the_bar(tmp_path, heldout_library):
    """The bar is not trivially met: the same architecture untrained is far below it."""
    import open_clip
    import torch

    from indexer.models import load_model

    model = load_model("clipdex-shapes", device="cpu")  # registers the config
    torch.manual_seed(0)
    random_init = open_clip.create_model("clipdex-shapes")
    checkpoint = tmp_path / "random.pt"
    torch.save(random_init.state_dict(), checkpoint)
    untrained = load_model("clipdex-shapes", str(checkpoint), device="cpu")
    assert untrained.pretrained == str(checkpoint) and model.pretrained == "bundled"
    quality = shapes_library_quality(untrained, heldout_library[1][:120])
    assert quality["zero_shot_shape"] < 0.6
