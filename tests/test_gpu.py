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


def test_the_gpu_feed_stores_what_the_cpu_path_stores(tmp_path):
    """nvJPEG decoding, resizing on the device, fp16: cosine >= 0.99 to the CPU path for every image,
    and the same failures for the files the device decoder hands to Pillow or refuses."""
    import io
    from dataclasses import replace

    from PIL import Image

    from demo.shapes import sample
    from indexer.run import IndexConfig, index_paths
    from store.store import Store
    from store.tables import column_vectors

    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(40):
        sample(5, index, short_side=(300, 1200))[0].save(folder / f"shape_{index}.jpg", quality=90)
    picture = sample(5, 99, short_side=(300, 300))[0]
    picture.convert("CMYK").save(folder / "cmyk.jpg")
    picture.convert("L").save(folder / "grey.jpg")
    picture.save(folder / "plain.png")
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    for orientation in range(2, 9):  # nvJPEG ignores EXIF orientation: the feed turns them itself
        exif = Image.Exif()
        exif[0x0112] = orientation
        sample(5, 200 + orientation, short_side=(300, 600))[0].save(folder / f"turned_{orientation}.jpg", exif=exif)

    cpu = IndexConfig(model="clipdex-shapes", device="cpu", exact_decode=True, progress=False)
    index_paths([folder], tmp_path / "cpu", cpu)
    summary = index_paths([folder], tmp_path / "gpu", replace(cpu, device="cuda", exact_decode=False))
    assert summary.feed["stages"]["device decode"]["seconds"] > 0  # auto chose the device decoder

    def rows(store):
        table = Store.open(store).tables.images.search().select(["path", "embedding", "width", "height"]).to_arrow()
        return {p: (v, w, h) for p, v, w, h in zip(table.column("path").to_pylist(), column_vectors(table),
                                                   table.column("width").to_pylist(),
                                                   table.column("height").to_pylist())}

    def failed(store):
        table = Store.open(store).tables.failures.to_arrow()
        return dict(zip(table.column("path").to_pylist(), table.column("reason").to_pylist()))

    on_cpu, on_gpu = rows(tmp_path / "cpu"), rows(tmp_path / "gpu")
    assert on_cpu.keys() == on_gpu.keys() and len(on_cpu) == 50
    assert failed(tmp_path / "gpu") == failed(tmp_path / "cpu")
    for path, (vector, width, height) in on_gpu.items():
        assert (width, height) == on_cpu[path][1:]
        assert float(np.dot(vector, on_cpu[path][0])) >= 0.99, path


def test_nvjpeg_images_are_turned_upright_as_the_cpu_decoder_turns_them():
    """decode_jpeg on CUDA ignores apply_exif_orientation; encoder.feed.upright does the turning."""
    import io

    from PIL import Image
    from torchvision.io import decode_jpeg

    from encoder.feed import upright

    picture = Image.linear_gradient("L").resize((96, 60)).convert("RGB")
    picture.paste((255, 0, 0), (0, 0, 32, 15))
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        buffer = io.BytesIO()
        picture.save(buffer, "JPEG", quality=95, exif=exif)
        data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
        on_cpu = decode_jpeg(data, apply_exif_orientation=True)
        on_gpu = upright(decode_jpeg([data], device="cuda")[0], orientation).cpu()
        assert on_gpu.shape == on_cpu.shape, orientation
        assert (on_gpu.float() - on_cpu.float()).abs().mean() < 4, orientation
