"""What `clipdex index` stores equals the model's own preprocessing of the file (issue 13, item 1).

The reference is open_clip's path written out: PIL open, EXIF transpose, RGB, the model's own
transform. clipdex may decode a large JPEG reduced, for speed, but only as far as that keeps
every image at cosine >= 0.99 and the median at >= 0.999.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from matplotlib import cbook
from PIL import Image, ImageOps
from torchvision import transforms

from demo.shapes import sample
from encoder.reduction import reduction_for
from indexer.run import IndexConfig, index_paths
from store.store import Store
from store.tables import column_vectors

DEMO = IndexConfig(model="clipdex-shapes", device="cpu", workers=0, progress=False)
# Samples of seed 7 that lost most at a plain 1/2-1/8 reduction (cosine 0.94-0.99 before the fix).
HARD_SAMPLES = (32, 91, 98, 111)


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> list[str]:
    """Generated JPEGs with short sides 300-1200 px, a photograph at three sizes up to 3000 px,
    and a large one stored sideways with an EXIF orientation."""
    folder = tmp_path_factory.mktemp("fidelity")
    paths = []
    for index in HARD_SAMPLES + tuple(range(12)):
        path = folder / f"shape_{index:03d}.jpg"
        sample(7, index, short_side=(300, 1200))[0].save(path, quality=90)
        paths.append(str(path))
    with cbook.get_sample_data("grace_hopper.jpg") as handle:
        photo = Image.open(handle).convert("RGB")
    for side in (None, 1600, 3000):
        size = photo.size if side is None else (side * photo.width // photo.height, side)
        path = folder / f"photo_{side}.jpg"
        photo.resize(size, Image.Resampling.LANCZOS).save(path, quality=92)
        paths.append(str(path))
    sideways = photo.resize((1500, 1800), Image.Resampling.LANCZOS).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to show upright
    sideways.save(folder / "sideways.jpg", quality=92, exif=exif)
    paths.append(str(folder / "sideways.jpg"))
    return paths


def model_own(model, paths: list[str]) -> np.ndarray:
    return model.encode_images([ImageOps.exif_transpose(Image.open(p)).convert("RGB") for p in paths])


def stored(store_dir, paths: list[str]) -> np.ndarray:
    rows = Store.open(store_dir).tables.images.search().select(["path", "embedding"]).to_arrow()
    by_path = dict(zip(rows.column("path").to_pylist(), column_vectors(rows)))
    return np.stack([by_path[p] for p in paths])


def test_what_index_stores_matches_the_models_own_preprocessing(jpegs, demo_model, tmp_path):
    index_paths([Path(jpegs[0]).parent], tmp_path / "store", DEMO)
    cosines = np.einsum("nd,nd->n", model_own(demo_model, jpegs), stored(tmp_path / "store", jpegs))
    worst = jpegs[int(cosines.argmin())]
    assert cosines.min() >= 0.99, f"{worst}: cosine {cosines.min():.4f}"
    assert np.median(cosines) >= 0.999


def test_exact_decode_stores_the_models_own_preprocessing(jpegs, demo_model, tmp_path):
    index_paths([Path(jpegs[0]).parent], tmp_path / "store", replace(DEMO, exact_decode=True))
    cosines = np.einsum("nd,nd->n", model_own(demo_model, jpegs), stored(tmp_path / "store", jpegs))
    assert cosines.min() >= 0.99999


def test_the_device_decoder_stores_the_models_own_preprocessing(jpegs, demo_model, tmp_path):
    """--decoder torchvision (the GPU path: decode_jpeg, then the model's transform as tensor
    operations) run on the CPU, where CI can check it."""
    index_paths([Path(jpegs[0]).parent], tmp_path / "store", replace(DEMO, decoder="torchvision"))
    cosines = np.einsum("nd,nd->n", model_own(demo_model, jpegs), stored(tmp_path / "store", jpegs))
    worst = jpegs[int(cosines.argmin())]
    assert cosines.min() >= 0.99, f"{worst}: cosine {cosines.min():.4f}"
    assert np.median(cosines) >= 0.999


def test_a_reduced_image_is_resized_to_the_size_the_model_makes_of_the_full_one(demo_model):
    reduction = reduction_for(demo_model.preprocess)
    resize = demo_model.preprocess.transforms[0]
    rng = np.random.default_rng(0)
    for width, height in rng.integers(65, 1400, size=(60, 2)):
        made = resize(Image.new("L", (int(width), int(height)))).size
        assert reduction.target((int(width), int(height))) == made
    assert reduction.min_side == 3 * 64 and reduction.draft == (192, 192)


def test_a_transform_clipdex_cannot_reproduce_gets_exact_decoding():
    normalise = transforms.ToTensor()
    assert reduction_for(transforms.Compose([transforms.Resize(224, max_size=300), normalise])) is None
    assert reduction_for(transforms.Compose([transforms.CenterCrop(224), normalise])) is None
    assert reduction_for(lambda image: image) is None
    squash = reduction_for(transforms.Compose([transforms.Resize((224, 200)), normalise]))
    assert squash.target((4000, 3000)) == (200, 224) and squash.min_side == 672
