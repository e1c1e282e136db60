import os
import threading

import numpy as np
import pytest
from PIL import Image

from encoder.images import is_image_path, load_image, read_bytes
from store.errors import ImageError


def save(image, path, **options):
    image.save(path, **options)
    return path


def test_rgba_transparency_is_composited_on_white(tmp_path):
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    out = load_image(save(image, tmp_path / "a.png"))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 255] + [0, 0, 0] * 255)
    image.info["transparency"] = 1
    image.putpixel((0, 0), 1)
    out = load_image(save(image, tmp_path / "p.png", transparency=1))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (0, 0, 255)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    array = np.full((8, 8), 32768, dtype=np.uint16)
    out = load_image(save(Image.fromarray(array), tmp_path / "g16.png"))
    assert abs(out.getpixel((0, 0))[0] - 127) <= 1


def test_cmyk_and_grayscale_become_rgb(tmp_path):
    cmyk = load_image(save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "c.jpg"))
    assert cmyk.mode == "RGB" and cmyk.getpixel((4, 4))[0] > 200 and cmyk.getpixel((4, 4))[1] < 60
    gray = load_image(save(Image.new("L", (8, 8), 77), tmp_path / "l.png"))
    assert gray.getpixel((0, 0)) == (77, 77, 77)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = load_image(save(image, tmp_path / "r.jpg", exif=exif))
    assert out.size == (20, 40)


def written(path, content: bytes):
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("read", [load_image, read_bytes], ids=["decoder", "embedding reader"])
@pytest.mark.parametrize("make, reason", [
    (lambda d: d / "absent.jpg", "missing"),
    (lambda d: written(d / "empty.jpg", b""), "empty file"),
    (lambda d: d, "not a file"),
])
def test_unusable_files_say_why(tmp_path, read, make, reason):
    with pytest.raises(ImageError) as caught:
        read(make(tmp_path))
    assert caught.value.reason == reason
    assert str(caught.value).startswith(str(make(tmp_path)))


def test_a_file_that_is_no_picture_says_so(tmp_path):
    with pytest.raises(ImageError) as caught:
        load_image(written(tmp_path / "text.jpg", b"hello"))
    assert caught.value.reason == "not an image"


def test_a_fifo_in_a_files_place_is_not_a_file_and_hangs_no_reader(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    reasons = []

    def attempt():
        try:
            read_bytes(tmp_path / "pipe.jpg")
        except ImageError as error:
            reasons.append(error.reason)

    reader = threading.Thread(target=attempt, daemon=True)
    reader.start()
    reader.join(10)
    assert reasons == ["not a file"]


def test_the_reader_reads_every_byte_of_a_file_that_grows_or_comes_in_parts(tmp_path, monkeypatch):
    data = os.urandom(300_000)
    path = written(tmp_path / "a.jpg", data)
    assert read_bytes(path) == data
    readv, fstat = os.readv, os.fstat
    monkeypatch.setattr(os, "readv", lambda fd, buffers: readv(fd, [memoryview(buffers[0])[:1000]]))
    assert read_bytes(path) == data  # short reads, as from a network file system
    monkeypatch.setattr(os, "readv", readv)

    def smaller(fd):
        fields = list(fstat(fd)[:10])
        fields[6] = 1000  # st_size: the file grew after fstat
        return os.stat_result(fields)

    monkeypatch.setattr(os, "fstat", smaller)
    assert read_bytes(path) == data


def test_truncated_jpeg_is_corrupt(tmp_path):
    path = save(Image.effect_noise((256, 256), 50).convert("RGB"), tmp_path / "full.jpg")
    data = path.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as caught:
        load_image(tmp_path / "cut.jpg")
    assert caught.value.reason == "corrupt"


def test_dangling_symlink_and_pixel_limit(tmp_path):
    os.symlink(tmp_path / "gone.jpg", tmp_path / "link.jpg")
    with pytest.raises(ImageError, match="dangling symlink"):
        load_image(tmp_path / "link.jpg")
    big = save(Image.new("RGB", (300, 300)), tmp_path / "big.png")
    with pytest.raises(ImageError) as caught:
        load_image(big, max_pixels=300 * 299)
    assert caught.value.reason == "too large"
    assert load_image(big, max_pixels=300 * 300).size == (300, 300)


def test_image_extensions_any_case():
    assert is_image_path("a/B.JPG") and is_image_path("x.TiFf") and is_image_path("y.webp")
    assert not is_image_path("notes.txt") and not is_image_path("jpg")
