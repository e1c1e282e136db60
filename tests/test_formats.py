"""Photo libraries as they are (issue 28, item 1): HEIC, AVIF and camera RAW files decode upright
for every orientation their cameras record, animations by their first frame, and a library of
them indexes like one of JPEGs; broken files and formats this installation cannot open are
recorded failures with the reason, never skipped."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pillow_heif
import pytest
from PIL import Image, ImageOps

from encoder.images import decode_image, is_image_path
from tests.helpers import MODEL, run, write_dng

ORIENTATION = 0x0112
pillow_heif.register_heif_opener()  # the tests write HEIC files as a phone would; clipdex reads them itself


def picture() -> Image.Image:
    """Asymmetric: red, with a blue top-left quadrant and a green strip along the bottom."""
    image = Image.new("RGB", (160, 120), (230, 30, 30))
    image.paste((30, 30, 230), (0, 0, 80, 60))
    image.paste((30, 200, 30), (0, 100, 160, 120))
    return image


def upright(orientation: int) -> np.ndarray:
    """What a viewer shows of picture() stored with this EXIF orientation."""
    stored = picture()
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    stored.info["exif"] = exif.tobytes()
    stored.getexif()[ORIENTATION] = orientation
    return np.asarray(ImageOps.exif_transpose(stored), np.float32)


def save(path, orientation: int):
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    picture().save(path, exif=exif.tobytes(), quality=92)
    return path


def assert_shows(path, orientation: int) -> None:
    image, size = decode_image(path)
    expected = upright(orientation)
    got = np.asarray(image, np.float32)
    assert got.shape == expected.shape and size == image.size, (path, got.shape, expected.shape)
    assert np.abs(got - expected).mean() < 12, (path, orientation)  # lossy codecs, the same picture


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("extension", [".jpg", ".heic", ".avif"])
def test_phone_formats_decode_upright_for_every_orientation(tmp_path, extension, orientation):
    assert_shows(save(tmp_path / f"photo{extension}", orientation), orientation)


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_a_raw_file_is_its_preview_turned_by_the_camera_s_orientation(tmp_path, orientation):
    """The preview carries no orientation of its own; the RAW header does (libraw's flip)."""
    assert_shows(write_dng(tmp_path / "IMG_0001.DNG", picture(), orientation), orientation)


def test_animations_by_their_first_frame(tmp_path):
    frames = [Image.new("RGB", (64, 64), colour) for colour in ((220, 20, 20), (20, 20, 220))]
    for extension in (".gif", ".webp", ".avif"):
        path = tmp_path / f"moving{extension}"
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
        assert Image.open(path).n_frames == 2
        red, green, blue = np.asarray(decode_image(path)[0], np.float32).mean(axis=(0, 1))
        assert red > 150 and blue < 80, extension


def test_every_new_extension_is_picked_up_in_any_case():
    for name in ("a.heic", "b.HEIF", "c.avif", "d.DNG", "e.cr2", "f.CR3", "g.nef", "h.arw", "i.raf", "j.orf"):
        assert is_image_path(name), name
    assert not is_image_path("notes.txt")


def test_a_library_of_phone_and_camera_files_indexes_upright_and_faithfully(tmp_path, capsys, monkeypatch):
    library = tmp_path / "library"
    library.mkdir()
    save(library / "IMG_0001.HEIC", 6)
    save(library / "IMG_0002.avif", 8)
    write_dng(library / "DSC_0003.DNG", picture(), 6)
    picture().save(library / "plain.png")
    code, out, err = run(capsys, "index", library, "--store", tmp_path / "store", "--json", *MODEL)
    assert code == 0, err
    assert json.loads(out)["failed"] == 0 and json.loads(out)["embedded"] == 4
    code, out, _ = run(capsys, "search", "--image", library / "plain.png", "--store", tmp_path / "store", "-k", "4",
                       "--json")
    rows = {row["path"].rsplit("/", 1)[-1]: row for row in json.loads(out)}
    assert (rows["IMG_0001.HEIC"]["width"], rows["IMG_0001.HEIC"]["height"]) == (120, 160)
    assert (rows["IMG_0002.avif"]["width"], rows["IMG_0002.avif"]["height"]) == (120, 160)
    assert (rows["DSC_0003.DNG"]["width"], rows["DSC_0003.DNG"]["height"]) == (120, 160)

    # Each file's vector is the model's own embedding of the picture as a viewer shows it.
    from encoder import load_model

    model = load_model("clipdex-shapes", device="cpu")
    from store.store import Store

    store = Store.open(tmp_path / "store")
    vectors = store.tables.images.search().select(["path", "embedding"]).to_arrow().to_pylist()
    stored = {row["path"].rsplit("/", 1)[-1]: np.asarray(row["embedding"]) for row in vectors}
    for name, orientation in (("IMG_0001.HEIC", 6), ("IMG_0002.avif", 8), ("DSC_0003.DNG", 6)):
        reference = model.encode_images([Image.fromarray(upright(orientation).astype(np.uint8))])[0]
        assert float(stored[name] @ reference) > 0.98, name

    # The server's thumbnails, upright, for a process that never opened such a file before.
    import encoder.formats
    from server import ServeConfig, create_app
    from tests.helpers import local_client

    # As a server process that never opened a HEIC file: Pillow knows no HEIF opener yet.
    monkeypatch.setattr(encoder.formats, "_heif_registered", False)
    monkeypatch.setattr(Image, "ID", [name for name in Image.ID if name != "HEIF"])
    monkeypatch.delitem(Image.OPEN, "HEIF")
    with local_client(create_app(ServeConfig(store=tmp_path / "store"))) as client:
        upload = client.post("/search", files={"image": ("blob", (library / "IMG_0001.HEIC").read_bytes())},
                             data={"k": "1"})  # an upload has no extension: HEIC is known by its content
        assert upload.status_code == 200 and upload.json()[0]["path"].endswith("IMG_0001.HEIC"), upload.text
        for name, row in rows.items():
            response = client.get(f"/thumbnails/{row['id']}")
            assert response.status_code == 200, (name, response.text)
            assert Image.open(io.BytesIO(response.content)).size[0] < Image.open(io.BytesIO(response.content)).size[1] \
                or name == "plain.png", name


def test_broken_and_unopenable_files_are_recorded_failures(tmp_path, capsys, monkeypatch):
    library = tmp_path / "library"
    library.mkdir()
    (library / "cut.heic").write_bytes(save(tmp_path / "whole.heic", 1).read_bytes()[:200])
    (library / "noise.nef").write_bytes(b"II*\x00" + bytes(range(256)) * 8)
    save(library / "fine.heic", 1)
    write_dng(library / "big.dng", picture().resize((400, 300)), 1)  # a preview over the limit given
    code, out, _ = run(capsys, "index", library, "--store", tmp_path / "store", "--json", "--max-pixels", "50000",
                       *MODEL)
    assert code == 0 and json.loads(out)["failed"] == 3
    code, out, _ = run(capsys, "info", "--store", tmp_path / "store", "--failures", "--json")
    reasons = {f["path"].rsplit("/", 1)[-1]: f["reason"] for f in json.loads(out)["failure_list"]}
    assert reasons == {"cut.heic": "not an image", "noise.nef": "not an image", "big.dng": "too large"}

    # An installation without pillow-heif: the HEIC files are failures that name the package.
    import encoder.formats

    monkeypatch.setattr(encoder.formats, "_heif_registered", False)
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # import pillow_heif now raises ImportError
    code, out, _ = run(capsys, "index", library, "--store", tmp_path / "other", "--json", *MODEL)
    assert code == 0
    code, out, _ = run(capsys, "info", "--store", tmp_path / "other", "--failures", "--json")
    failures = {f["path"].rsplit("/", 1)[-1]: f for f in json.loads(out)["failure_list"]}
    assert failures["fine.heic"]["reason"] == "unsupported format"
    assert "pip install pillow-heif" in failures["fine.heic"]["detail"]
