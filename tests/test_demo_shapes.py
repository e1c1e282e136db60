import csv

from PIL import Image

from demo.shapes import BACKGROUNDS, COLOURS, LABEL_FIELDS, POSITIONS, SHAPES, sample


def test_vocabulary_is_at_least_what_was_asked():
    assert len(COLOURS) >= 8 and len(SHAPES) >= 4 and len(POSITIONS) >= 5 and len(BACKGROUNDS) >= 3


def test_samples_are_deterministic_per_seed_and_index():
    a, label_a = sample(5, 11)
    b, label_b = sample(5, 11)
    c, _ = sample(6, 11)
    assert label_a == label_b and a.tobytes() == b.tobytes()
    assert a.size != c.size or a.tobytes() != c.tobytes()


def test_library_files_and_labels(small_library):
    directory, rows = small_library
    with open(directory / "labels.csv", newline="") as handle:
        assert tuple(csv.DictReader(handle).fieldnames) == LABEL_FIELDS
    formats, sizes = set(), set()
    for row in rows:
        with Image.open(row["path"]) as image:
            formats.add(image.format)
            sizes.add(image.size)
        assert row["colour"] in COLOURS and row["shape"] in SHAPES
        assert row["colour"] in row["caption"] and row["shape"] in row["caption"]
    assert formats == {"JPEG", "PNG"}
    assert len(sizes) == len(rows)  # random pixel sizes


def test_shape_is_drawn_in_its_colour_at_its_position(tmp_path):
    image, label = sample(1, 0, short_side=(200, 200))
    side = min(image.size)
    fx, fy = POSITIONS[label.position]
    left, top = (image.width - side) / 2, (image.height - side) / 2
    centre = image.getpixel((int(left + fx * side), int(top + fy * side)))
    expected = COLOURS[label.colour]
    assert max(abs(a - b) for a, b in zip(centre, expected)) <= 40
