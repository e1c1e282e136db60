"""The overlapped indexing stages (indexer/pipeline.py) and the two feeds (encoder/feed.py).

The device decoder's code runs on the CPU here (torchvision's decode_jpeg and tensor resizing),
so CI checks everything but nvJPEG itself; tests/test_gpu.py checks that where CUDA exists.
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageOps

from demo.shapes import sample
from encoder.feed import Embedded, Prepared, device_transform, make_feed, upright
from encoder.images import jpeg_orientation
from indexer.pipeline import STAGES, run_pipeline, stage_line
from indexer.run import IndexConfig, index_paths
from store.errors import InputError
from store.store import Store
from store.tables import column_vectors
from tests.helpers import run

DEMO = IndexConfig(model="clipdex-shapes", device="cpu", workers=2, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory):
    """Every kind of file the device decoder hands elsewhere or refuses, beside plain JPEGs."""
    folder = tmp_path_factory.mktemp("odd")
    for index in range(6):
        sample(3, index, short_side=(200, 500))[0].save(folder / f"plain_{index}.jpg", quality=90)
    picture = sample(3, 9, short_side=(300, 300))[0]
    picture.convert("CMYK").save(folder / "cmyk.jpg", quality=90)
    picture.convert("L").save(folder / "grey.jpg", quality=90)
    picture.convert("RGBA").save(folder / "alpha.png")
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=90)
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "garbage.jpg").write_bytes(b"this is not a picture at all" * 40)
    (folder / "empty.jpg").write_bytes(b"")
    return folder


def stored(store_dir) -> tuple[dict, dict]:
    rows = Store.open(store_dir).tables.images.search().select(["path", "embedding", "width", "height"]).to_arrow()
    paths = rows.column("path").to_pylist()
    sizes = dict(zip(paths, zip(rows.column("width").to_pylist(), rows.column("height").to_pylist())))
    return dict(zip(paths, column_vectors(rows))), sizes


def failures(store_dir) -> dict[str, str]:
    table = Store.open(store_dir).tables.failures.to_arrow()
    return dict(zip(table.column("path").to_pylist(), table.column("reason").to_pylist()))


def test_both_decoders_store_the_same_rows_and_the_same_failures(odd_files, demo_model, tmp_path):
    results = {}
    for decoder in ("pillow", "torchvision"):
        summary = index_paths([odd_files], tmp_path / decoder, replace(DEMO, decoder=decoder))
        assert (summary.embedded, summary.failed) == (9, 3)
        results[decoder] = stored(tmp_path / decoder), failures(tmp_path / decoder)
    (pillow, pillow_sizes), pillow_failed = results["pillow"]
    (device, device_sizes), device_failed = results["torchvision"]
    assert device_failed == pillow_failed
    assert sorted(reason for reason in device_failed.values()) == ["corrupt", "empty file", "not an image"]
    assert device_sizes == pillow_sizes
    own = demo_model.encode_images([ImageOps.exif_transpose(Image.open(p)).convert("RGB") for p in sorted(device)])
    cosines = np.einsum("nd,nd->n", own, np.stack([device[p] for p in sorted(device)]))
    assert cosines.min() >= 0.99, dict(zip(sorted(device), cosines.round(4)))


def test_auto_decodes_on_the_host_on_a_cpu_and_torchvision_needs_the_plain_transform(demo_model):
    assert type(make_feed(demo_model, "auto")).__name__ == "PillowFeed"
    assert type(make_feed(demo_model, "torchvision")).__name__ == "TorchvisionFeed"
    assert device_transform(lambda image: image) is None
    with pytest.raises(InputError, match="unknown decoder"):
        make_feed(demo_model, "nvjpeg")


def _jpeg(orientation: int | None = None, xmp: bytes | None = None, size=(48, 30)) -> bytes:
    """A JPEG that is not symmetric in any direction, with an EXIF and/or XMP orientation."""
    picture = Image.linear_gradient("L").resize(size).convert("RGB")
    picture.paste((255, 0, 0), (0, 0, size[0] // 3, size[1] // 4))
    options = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif
    if xmp is not None:
        options["xmp"] = xmp
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=95, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_the_device_path_turns_every_exif_orientation_as_pillow_does(orientation, demo_model):
    """nvJPEG ignores EXIF orientation, so the feed reads it from the header and turns the decoded
    image itself: the same pixels as libjpeg's own turning, the same size as Pillow's."""
    import torch
    from torchvision.io import decode_jpeg

    data = _jpeg(orientation)
    prepared = make_feed(demo_model, "torchvision").prepare(bytearray(data), "turned.jpg")
    assert prepared.orientation == orientation
    assert prepared.size == ImageOps.exif_transpose(Image.open(io.BytesIO(data))).size
    tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    turned = upright(decode_jpeg(tensor, apply_exif_orientation=False), orientation)
    assert torch.equal(turned, decode_jpeg(tensor, apply_exif_orientation=True))
    assert tuple(turned.shape[:0:-1]) == prepared.size


def test_the_header_reader_leaves_to_pillow_what_pillow_might_read_otherwise(demo_model):
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
    assert jpeg_orientation(_jpeg()) == 1
    assert jpeg_orientation(_jpeg(8)) == 8
    assert jpeg_orientation(_jpeg(xmp=xmp)) is None  # Pillow takes orientation from XMP too
    assert jpeg_orientation(_jpeg(3)[:40]) is None
    sideways = make_feed(demo_model, "torchvision").prepare(bytearray(_jpeg(xmp=xmp)), "xmp.jpg")
    assert sideways.jpeg is not None and sideways.orientation == 6 and sideways.size == (30, 48)


class _Recording:
    """A feed that checks the pipeline's promises: bounded work in flight, batches in order."""

    def __init__(self, embed_seconds: float = 0.0) -> None:
        self.prepared = self.embedded = self.most_ahead = 0
        self.embed_seconds = embed_seconds
        self.lock = threading.Lock()

    def prepare(self, data, name):
        if name.endswith("bad"):
            raise RuntimeError("a decoder bug")
        with self.lock:
            self.prepared += 1
            self.most_ahead = max(self.most_ahead, self.prepared - self.embedded)
        return Prepared((len(data), 1))

    def embed(self, items, names, timing):
        with timing("embed"):
            time.sleep(self.embed_seconds)
        with self.lock:
            self.embedded += len(items)
        return Embedded(list(range(len(items))), _vectors=np.zeros((len(items), 2), np.float32))


@pytest.fixture
def files(tmp_path):
    paths = []
    for index in range(200):
        path = tmp_path / f"f{index:03d}{'bad' if index == 7 else ''}"
        path.write_bytes(b"x" * (index + 1))
        paths.append(str(path))
    return paths


def test_batches_reach_the_writer_in_order_and_work_ahead_is_bounded(files):
    feed, seen = _Recording(embed_seconds=0.01), []
    report = run_pipeline(files + ["/nowhere/missing.jpg"], feed, seen.append, batch_size=4, readers=3, decoders=2)
    positions = [p for batch in seen for p in batch.positions]
    assert positions == [p for p in range(200) if p != 7]
    assert [batch.sizes[0][0] for batch in seen[:2]] == [1, 5]  # sizes travel with their rows
    failed = {p: e.reason for batch in seen for p, e in batch.failures}
    assert failed == {7: "corrupt", 200: "missing"}
    assert feed.most_ahead <= 4 * 4 + 4  # depth batches ahead (4 = max(4, 2 * decoders)) plus the one in hand
    assert report.images == 201 and set(report.busy) >= set(STAGES)
    assert report.bound == "embed"  # the slow stage is named


def test_a_failing_writer_stops_the_run_with_its_error(files):
    def write(batch):
        if batch.positions and batch.positions[0] >= 40:
            raise OSError(28, "No space left on device")

    started = threading.active_count()
    with pytest.raises(OSError, match="No space left"):
        run_pipeline(files, _Recording(), write, batch_size=4, readers=2, decoders=2)
    assert threading.active_count() == started  # no stage thread is left behind


def test_a_slow_writer_holds_the_other_stages_back(files):
    feed = _Recording()
    run_pipeline(files, feed, lambda batch: time.sleep(0.02), batch_size=4, readers=2, decoders=2)
    assert feed.most_ahead <= 4 * 4 + 4


def test_verbose_index_ends_with_the_stage_report(odd_files, tmp_path, capsys):
    code, out, err = run(capsys, "-v", "index", str(odd_files), "--store", str(tmp_path / "store"),
                         "--model", "clipdex-shapes", "--device", "cpu")
    assert code == 0
    last = err.strip().splitlines()[-1]
    assert last.startswith("stages: scan") and "embedding: read" in last, last
    for stage in STAGES:
        assert f"{stage} " in last.split("embedding:")[1]
    assert "img/s" in last and "bound by" in last
    code, out, err = run(capsys, "index", str(odd_files), "--store", str(tmp_path / "quiet"),
                         "--model", "clipdex-shapes", "--device", "cpu")
    assert code == 0 and "stages:" not in err


def test_the_stage_line_names_each_stage_and_the_bound():
    report = {"images": 1000, "images_per_second": 500.0, "bound": "decode",
              "stages": {"read": {"busy": 0.05, "seconds": 0.1}, "decode": {"busy": 0.97, "seconds": 3.9},
                         "embed": {"busy": 0.4, "seconds": 0.8}, "write": {"busy": 0.02, "seconds": 0.04}}}
    assert stage_line(report) == ("read 5% · decode 97% · embed 40% · write 2% busy; 500 img/s over 1,000 images, "
                                  "bound by decode")
