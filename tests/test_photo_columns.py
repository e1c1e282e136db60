"""Capture time, camera, lens and place as columns (issue 28, item 2): read from EXIF blocks shaped
as cameras and phones write them, filtered as times, sorted, returned by search and HTTP; a store
indexed before the columns gets them by a metadata-only pass, nothing embedded again."""

from __future__ import annotations

import io
import json
import shutil
from datetime import datetime, timezone

import lancedb
import pillow_heif
import pytest
from PIL import Image
from PIL.TiffImagePlugin import IFDRational

from encoder.exif import jpeg_exif, photo_columns
from tests.helpers import MODEL, run, write_dng

pillow_heif.register_heif_opener()  # the tests write HEIC files as a phone would
UTC = timezone.utc


def exif_block(stamp=None, offset=None, subsec=None, make=None, model=None, lens=None, gps=None, digitized=None):
    exif = Image.Exif()
    if make is not None:
        exif[0x010F] = make
    if model is not None:
        exif[0x0110] = model
    sub = exif.get_ifd(0x8769)
    for tag, value in ((0x9003, stamp), (0x9011, offset), (0x9291, subsec), (0xA434, lens), (0x9004, digitized)):
        if value is not None:
            sub[tag] = value
    if gps is not None:
        exif.get_ifd(0x8825).update(gps)
    return exif


def jpeg(exif: Image.Exif | None = None) -> bytes:
    out = io.BytesIO()
    image = Image.new("RGB", (48, 32), (10, 120, 200))
    image.save(out, "JPEG", **({"exif": exif.tobytes()} if exif is not None else {}))
    return out.getvalue()


def hanoi():
    return {1: "N", 2: (IFDRational(21, 1), IFDRational(1, 1), IFDRational(4830, 100)),
            3: "E", 4: (IFDRational(105, 1), IFDRational(51, 1), IFDRational(0, 1))}


def test_a_phone_s_block_gives_every_column_in_utc():
    block = exif_block("2021:07:14 18:30:05", "+07:00", "25", "Apple", "iPhone 14 Pro", "iPhone 14 Pro back camera",
                       hanoi())
    columns = photo_columns(jpeg(block), "IMG_0001.jpg")
    assert columns["taken_at"] == datetime(2021, 7, 14, 11, 30, 5, 250000, tzinfo=UTC)
    assert (columns["camera_make"], columns["camera_model"], columns["lens"]) == \
        ("Apple", "iPhone 14 Pro", "iPhone 14 Pro back camera")
    assert columns["gps_latitude"] == pytest.approx(21 + 1 / 60 + 48.3 / 3600)
    assert columns["gps_longitude"] == pytest.approx(105 + 51 / 60)


@pytest.mark.parametrize("offset, expected_hour", [("-05:30", 0), (None, 18), ("+14:00", 4), ("bogus", 18),
                                                   ("+99:00", 18)])
def test_offsets_and_their_absence(offset, expected_hour):
    taken = photo_columns(jpeg(exif_block("2021:07:14 18:30:00", offset)), "a.jpg")["taken_at"]
    assert taken.hour == expected_hour and taken.tzinfo == UTC
    if offset == "-05:30":
        assert taken == datetime(2021, 7, 15, 0, 0, tzinfo=UTC)


def test_missing_malformed_and_out_of_range_fields_are_null():
    assert photo_columns(jpeg(), "plain.jpg") == dict.fromkeys(photo_columns(jpeg(), "plain.jpg"))
    zeros = exif_block("0000:00:00 00:00:00", make="  Canon\x00\x00 ", digitized="2019:01:02 03:04:05")
    columns = photo_columns(jpeg(zeros), "a.jpg")
    assert columns["camera_make"] == "Canon" and columns["taken_at"] == datetime(2019, 1, 2, 3, 4, 5, tzinfo=UTC)
    bad_gps = {1: "S", 2: (IFDRational(1, 0), IFDRational(0, 1), IFDRational(0, 1)),
               3: "W", 4: (IFDRational(200, 1), IFDRational(0, 1), IFDRational(0, 1))}
    columns = photo_columns(jpeg(exif_block(gps=bad_gps)), "a.jpg")
    assert columns["gps_latitude"] is None and columns["gps_longitude"] is None
    south_west = {1: "S", 2: (IFDRational(33, 1), IFDRational(52, 1), IFDRational(0, 1)),
                  3: "W", 4: (IFDRational(70, 1), IFDRational(30, 1), IFDRational(0, 1))}
    columns = photo_columns(jpeg(exif_block(gps=south_west)), "a.jpg")
    assert columns["gps_latitude"] == pytest.approx(-(33 + 52 / 60)) and columns["gps_longitude"] == -70.5
    assert photo_columns(b"\xff\xd8\xff\xe1\x00\x08Exif\x00\x00garbage", "cut.jpg")["taken_at"] is None


def test_the_block_is_found_behind_other_segments():
    """XMP in its own APP1 before the Exif one, an ICC profile, a comment: as Lightroom writes."""
    data = jpeg(exif_block("2020:02:29 12:00:00", make="Nikon"))
    extra = (b"\xff\xe1" + (2 + 29 + 4).to_bytes(2, "big") + b"http://ns.adobe.com/xap/1.0/\x00abcd"
             + b"\xff\xe2\x00\x08ICC_\x00\x00" + b"\xff\xfe\x00\x07hello")
    shuffled = data[:2] + extra + data[2:]
    assert jpeg_exif(shuffled) is not None
    assert photo_columns(shuffled, "a.jpg")["camera_make"] == "Nikon"


def test_heic_avif_and_raw_headers(tmp_path):
    block = exif_block("2022:03:04 05:06:07", "+01:00", make="Samsung", model="SM-S918B", gps=hanoi())
    for kind in ("HEIF", "AVIF", "PNG", "WEBP"):
        out = io.BytesIO()
        Image.new("RGB", (40, 30)).save(out, kind, exif=block.tobytes())
        columns = photo_columns(out.getvalue(), f"photo.{kind.lower()}")
        assert columns["taken_at"] == datetime(2022, 3, 4, 4, 6, 7, tzinfo=UTC), kind
        assert columns["camera_model"] == "SM-S918B" and columns["gps_latitude"] is not None, kind
    raw = write_dng(tmp_path / "IMG.DNG", Image.new("RGB", (40, 30)))
    columns = photo_columns(raw.read_bytes(), str(raw))
    assert (columns["camera_make"], columns["camera_model"]) == ("Canon", "EOS R5")


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    lib = root / "library"
    lib.mkdir()
    shots = [("2019:05:01 10:00:00", "+02:00", "Canon"), ("2021:07:14 18:30:05", "+07:00", "Apple"),
             ("2023:12:31 23:59:59", None, "Canon")]
    for index, (stamp, offset, make) in enumerate(shots):
        (lib / f"shot{index}.jpg").write_bytes(jpeg(exif_block(stamp, offset, make=make, model=f"{make} {index}",
                                                                gps=hanoi())))
    Image.new("RGB", (48, 32), (200, 10, 10)).save(lib / "scan.png")
    return lib


def test_the_columns_filter_as_times_sort_and_come_back_from_search_and_http(capsys, library, tmp_path):
    store = tmp_path / "store"
    assert run(capsys, "index", library, "--store", store, *MODEL)[0] == 0
    code, out, err = run(capsys, "search", "a shape", "--store", store, "--where", "taken_at >= '2021-01-01'",
                         "--sort=-taken_at", "--json")
    assert code == 0, err
    found = json.loads(out)
    assert [row["path"].rsplit("/", 1)[-1] for row in found] == ["shot2.jpg", "shot1.jpg"]
    assert found[1]["taken_at"] == "2021-07-14T11:30:05+00:00" and found[1]["camera_make"] == "Apple"
    code, out, _ = run(capsys, "search", "a shape", "--store", store, "--where",
                       "camera_make = 'Canon' AND gps_latitude BETWEEN 20 AND 22", "--json")
    assert sorted(row["path"].rsplit("/", 1)[-1] for row in json.loads(out)) == ["shot0.jpg", "shot2.jpg"]
    code, _, err = run(capsys, "search", "a shape", "--store", store, "--where", "taken_at > 'last summer'")
    assert code == 1 and "is not a date or time" in err

    from server import ServeConfig, create_app
    from tests.helpers import local_client

    with local_client(create_app(ServeConfig(store=store))) as client:
        hits = client.post("/search", json={"text": "a shape", "k": 4, "sort": "taken_at",
                                            "where": "taken_at IS NOT NULL"}).json()
        assert [hit["taken_at"][:10] for hit in hits] == ["2019-05-01", "2021-07-14", "2023-12-31"]
        assert hits[0]["camera_model"] == "Canon 0" and hits[0]["gps_longitude"] == pytest.approx(105.85)


def test_a_store_indexed_before_the_columns_gets_them_without_embedding(capsys, library, tmp_path, monkeypatch):
    store = tmp_path / "store"
    assert run(capsys, "index", library, "--store", store, *MODEL)[0] == 0
    # As an older clipdex left it: the columns empty, the manifest at version 6.
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["version"] = 6
    del manifest["photo_version"]
    (store / "manifest.json").write_text(json.dumps(manifest))
    table = lancedb.connect(str(store / "lance")).open_table("images")
    table.update(values_sql={name: "NULL" for name in ("taken_at", "camera_make", "camera_model", "gps_latitude",
                                                        "gps_longitude")})
    code, out, _ = run(capsys, "index", library, "--store", store, "--json", *MODEL)
    assert code == 0 and json.loads(out)["embedded"] == 0
    table = lancedb.connect(str(store / "lance")).open_table("images")  # as the run left it
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in table.search().select(["path", "taken_at", "camera_make"])
            .to_arrow().to_pylist()}
    assert rows["shot1.jpg"]["camera_make"] == "Apple" and rows["shot1.jpg"]["taken_at"].year == 2021
    assert rows["scan.png"]["taken_at"] is None
    assert json.loads((store / "manifest.json").read_text())["photo_version"] == 1

    import indexer.photos

    read = []
    monkeypatch.setattr(indexer.photos, "_read", lambda job: read.append(job) or None)
    assert run(capsys, "index", library, "--store", store, *MODEL)[0] == 0
    assert read == []  # recorded once: later runs read nothing more


def test_a_copy_keeps_its_source_s_columns(capsys, library, tmp_path):
    lib = tmp_path / "lib"
    shutil.copytree(library, lib)
    store = tmp_path / "store"
    assert run(capsys, "index", lib, "--store", store, *MODEL)[0] == 0
    shutil.copy(lib / "shot1.jpg", lib / "shot1 copy.jpg")
    code, out, _ = run(capsys, "index", lib, "--store", store, "--json", *MODEL)
    assert json.loads(out)["reused"] == 1
    rows = lancedb.connect(str(store / "lance")).open_table("images").search().select(
        ["path", "taken_at", "camera_make"]).to_arrow().to_pylist()
    copy = next(r for r in rows if r["path"].endswith("shot1 copy.jpg"))
    assert copy["camera_make"] == "Apple" and copy["taken_at"].year == 2021


def test_a_big_endian_block_as_nikon_and_canon_write_them():
    """Pillow writes little-endian blocks only: this one is made by hand, in the order a camera
    lays it out (IFD0, the Exif IFD, the GPS IFD, then the values too long for an entry)."""
    import struct

    def entries(items, values_at):  # (tag, type, count, payload) -> IFD bytes and the values after it
        head, tail = struct.pack(">H", len(items)), b""
        for tag, kind, count, payload in items:
            if len(payload) <= 4:
                head += struct.pack(">HHI", tag, kind, count) + payload.ljust(4, b"\0")
            else:
                head += struct.pack(">HHII", tag, kind, count, values_at + len(tail))
                tail += payload
        return head + struct.pack(">I", 0), tail

    def size(n):
        return 2 + 12 * n + 4

    rational = b"".join(struct.pack(">II", *pair) for pair in ((48, 1), (51, 1), (2400, 100)))
    ifd0_at = 8
    exif_at = ifd0_at + size(3) + 20  # after IFD0 and its one long value, "NIKON CORPORATION\0" (18 bytes)
    gps_at = exif_at + size(2) + 40
    first, first_tail = entries([(0x010F, 2, 18, b"NIKON CORPORATION\0"), (0x8769, 4, 1, struct.pack(">I", exif_at)),
                                 (0x8825, 4, 1, struct.pack(">I", gps_at))], ifd0_at + size(3))
    sub, sub_tail = entries([(0x9003, 2, 20, b"2018:08:09 10:11:12\0"), (0x9011, 2, 7, b"-03:00\0")],
                            exif_at + size(2))
    gps, gps_tail = entries([(1, 2, 2, b"N\0"), (2, 5, 3, rational)], gps_at + size(2))
    block = b"MM\x00*" + struct.pack(">I", ifd0_at) + first + first_tail
    block = block.ljust(exif_at, b"\0") + sub + sub_tail
    block = block.ljust(gps_at, b"\0") + gps + gps_tail
    data = b"\xff\xd8" + b"\xff\xe1" + (2 + 6 + len(block)).to_bytes(2, "big") + b"Exif\x00\x00" + block + b"\xff\xd9"
    columns = photo_columns(data, "DSC_0001.JPG")
    assert columns["camera_make"] == "NIKON CORPORATION"
    assert columns["taken_at"] == datetime(2018, 8, 9, 13, 11, 12, tzinfo=UTC)
    assert columns["gps_latitude"] == pytest.approx(48 + 51 / 60 + 24 / 3600) and columns["gps_longitude"] is None
