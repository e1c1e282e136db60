import time

import numpy as np
import pytest

from encoder import BUNDLED_TAG, list_models, load_model, resolve_pretrained
from encoder import model as models
from store.errors import ClipdexError, ModelLoadError


def test_list_models_has_bundled_first_and_open_clip_tags():
    infos = list_models()
    assert infos[0].name == "clipdex-shapes" and infos[0].bundled and infos[0].tags == (BUNDLED_TAG,)
    by_name = {info.name: info for info in infos}
    assert "laion2b_s34b_b79k" in by_name["ViT-B-32"].tags
    assert "openai" in by_name["RN50"].tags


def test_resolve_pretrained_defaults_and_files(tmp_path):
    assert resolve_pretrained("clipdex-shapes", None).endswith("clipdex-shapes.pt")
    assert resolve_pretrained("clipdex-shapes", BUNDLED_TAG).endswith("clipdex-shapes.pt")
    assert resolve_pretrained("ViT-B-32", None) == "laion2b_s34b_b79k"
    assert resolve_pretrained("RN50", "openai") == "openai"
    checkpoint = tmp_path / "weights.pt"
    checkpoint.write_bytes(b"x")
    assert resolve_pretrained("ViT-B-32", str(checkpoint)) == str(checkpoint)


@pytest.mark.parametrize("name, pretrained, message", [
    ("no-such-model", None, "unknown model 'no-such-model'"),
    ("RN50", "/missing/weights.pt", "checkpoint file not found"),
    ("RN50", "made-up-tag", "unknown pretrained tag 'made-up-tag'"),
])
def test_resolve_pretrained_errors_are_actionable(name, pretrained, message):
    with pytest.raises(ModelLoadError, match=message):
        resolve_pretrained(name, pretrained)


def test_bundled_model_embeddings_are_normalised(demo_model):
    assert demo_model.embed_dim == 64 and demo_model.image_size == (64, 64)
    texts = demo_model.encode_texts(["a red circle", "a blue star"])
    assert texts.shape == (2, 64) and texts.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, rtol=1e-5)
    assert demo_model.encode_texts([]).shape == (0, 64)


def test_preprocess_is_the_models_own_transform(demo_model):
    from PIL import Image

    pixels = demo_model.preprocess(Image.new("RGB", (300, 200), (255, 0, 0)))
    assert tuple(pixels.shape) == (3, 64, 64)
    # CLIP normalisation: pure red maps to (1 - mean) / std in the red channel
    assert pixels[0].mean().item() == pytest.approx((1 - 0.48145466) / 0.26862954, rel=1e-3)


def test_corrupt_checkpoint_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="could not load 'clipdex-shapes'"):
        load_model("clipdex-shapes", str(bad), device="cpu")


def test_unreachable_hub_fails_fast_with_advice(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(models, "_reachable", lambda host, timeout=3.0: False)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as caught:
        load_model("RN50", "openai", device="cpu")
    assert time.perf_counter() - started < 60  # no minute of hub retries
    message = str(caught.value)
    assert "unreachable" in message and "--pretrained" in message and "clipdex-shapes" in message
    assert isinstance(caught.value, ClipdexError) and isinstance(caught.value, RuntimeError)


def test_the_imagebind_preset_is_open_clip_vit_h_14_with_laion2b(monkeypatch, tmp_path, capsys):
    """--model imagebind-huge-vision: ImageBind-Huge's frozen image encoder as open_clip builds it
    (BENCHMARKS: its embeddings agree with ImageBind's code to cosine 0.9999993)."""
    import huggingface_hub.constants as hub
    import open_clip

    from tests.helpers import run

    assert resolve_pretrained("imagebind-huge-vision", None) == "laion2b_s32b_b79k"
    assert any(info.name == "imagebind-huge-vision" for info in list_models())
    asked = []
    real = open_clip.create_model_and_transforms

    def recording(name, *args, **kwargs):
        asked.append((name, kwargs.get("pretrained")))
        return real("clipdex-shapes", pretrained=None, device="cpu")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", recording)
    monkeypatch.setattr(models, "_reachable", lambda host, timeout=3.0: True)
    model = load_model("imagebind-huge-vision", device="cpu")
    assert asked == [("ViT-H-14", "laion2b_s32b_b79k")] and model.name == "imagebind-huge-vision"
    monkeypatch.setattr(open_clip, "create_model_and_transforms", real)
    monkeypatch.setattr(models, "_reachable", lambda host, timeout=3.0: False)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match="laion2b_s32b_b79k.*imagebind-huge-vision"):
        load_model("imagebind-huge-vision", device="cpu")
    code, out, _ = run(capsys, "models")
    assert code == 0 and "imagebind-huge-vision" in out
