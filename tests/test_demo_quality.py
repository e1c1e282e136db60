"""The bundled model must retrieve for real on data it never saw (the Foundation quality bar)."""

from demo.quality import shapes_library_quality


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

    from encoder import load_model

    model = load_model("clipdex-shapes", device="cpu")  # registers the config
    torch.manual_seed(0)
    random_init = open_clip.create_model("clipdex-shapes")
    checkpoint = tmp_path / "random.pt"
    torch.save(random_init.state_dict(), checkpoint)
    untrained = load_model("clipdex-shapes", str(checkpoint), device="cpu")
    assert untrained.pretrained == str(checkpoint) and model.pretrained == "bundled"
    quality = shapes_library_quality(untrained, heldout_library[1][:120])
    assert quality["zero_shot_shape"] < 0.6
