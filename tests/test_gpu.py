"""CUDA paths: skipped cleanly where no GPU is present (CI never has one)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_cuda_embeddings_match_cpu(small_library):
    from encoder.images import load_image
    from encoder.model import load_model

    images = [load_image(row["path"]) for row in small_library[1][:8]]
    cpu = load_model("clipdex-shapes", device="cpu").encode_images(images)
    gpu = load_model("clipdex-shapes", device="cuda").encode_images(images)  # fp16 autocast
    assert np.min(np.sum(cpu * gpu, axis=1)) > 0.99


def test_index_on_cuda(small_library, tmp_path):
    from indexer.run import IndexConfig, index_paths

    summary = index_paths([small_library[0]], tmp_path / "store",
                          IndexConfig(model="clipdex-shapes", device="cuda", progress=False))
    assert summary.embedded == 12 and summary.failed == 0
