"""Capture time, camera, lens and place of a photo, from the header bytes already read for it.

The columns (:data:`PHOTO_FIELDS`) come from the file's EXIF block:

- ``taken_at`` is DateTimeOriginal, shifted to UTC by OffsetTimeOriginal, with SubSecTimeOriginal.
  Where that is missing, DateTimeDigitized (CreateDate) with OffsetTimeDigitized. Without an
  offset, the camera's clock time is kept as it reads (as UTC): most cameras record no zone.
- ``camera_make``, ``camera_model`` and ``lens`` are Make, Model and LensModel.
- ``gps_latitude`` and ``gps_longitude`` are the GPS IFD's degrees/minutes/seconds rationals, in
  decimal degrees, negative for S and W.

How the block is found, without decoding pixels:

- JPEG: a walk of the header segments to the Exif APP1 segment, then of its IFDs for the eight
  tags used (:func:`tiff_tags`).
- TIFF and the TIFF-based camera RAW files (DNG, CR2, NEF, ARW, ORF, PEF, SRW, RW2...): their IFD0
  is the block, walked the same way.
- Anything else (HEIC, AVIF, PNG, WebP): Pillow opens the header lazily.

Fields that are absent, malformed or out of range are null. Nothing here raises for a bad block.
"""

from __future__ import annotations

import io
import math
import struct
from datetime import datetime, timedelta, timezone
from typing import Any, Mapping

from encoder.formats import open_image
from store.tables import PHOTO_COLUMNS

PHOTO_FIELDS = PHOTO_COLUMNS  # the store's columns, in its order
EXIF_IFD, GPS_IFD = 0x8769, 0x8825
MAKE, MODEL = 0x010F, 0x0110
DATE_ORIGINAL, DATE_DIGITIZED = 0x9003, 0x9004
OFFSET_ORIGINAL, OFFSET_DIGITIZED = 0x9011, 0x9012
SUBSEC_ORIGINAL, SUBSEC_DIGITIZED = 0x9291, 0x9292
LENS_MODEL = 0xA434
GPS_LATITUDE_REF, GPS_LATITUDE, GPS_LONGITUDE_REF, GPS_LONGITUDE = 1, 2, 3, 4
TIFF_HEADERS = (b"II*\x00", b"MM\x00*", b"IIRO", b"IIU\x00")  # TIFF, and ORF's and RW2's variants of it
MAX_TEXT = 128


def empty() -> dict[str, Any]:
    return dict.fromkeys(PHOTO_FIELDS)


def photo_columns(data: bytes | bytearray, name: str) -> dict[str, Any]:
    """The :data:`PHOTO_FIELDS` of a file's content (all None where it records none)."""
    try:
        found = _tags(data, name)
    except Exception:  # noqa: BLE001 - a header that cannot be made sense of records nothing
        return empty()
    return _fields(*found) if found is not None else empty()


def _fields(first: Mapping, sub: Mapping, gps: Mapping) -> dict[str, Any]:
    taken = (_time(sub.get(DATE_ORIGINAL), sub.get(OFFSET_ORIGINAL), sub.get(SUBSEC_ORIGINAL))
             or _time(sub.get(DATE_DIGITIZED), sub.get(OFFSET_DIGITIZED), sub.get(SUBSEC_DIGITIZED)))
    return {"taken_at": taken, "camera_make": _text(first.get(MAKE)), "camera_model": _text(first.get(MODEL)),
            "lens": _text(sub.get(LENS_MODEL)),
            "gps_latitude": _degrees(gps.get(GPS_LATITUDE), gps.get(GPS_LATITUDE_REF), 90),
            "gps_longitude": _degrees(gps.get(GPS_LONGITUDE), gps.get(GPS_LONGITUDE_REF), 180)}


def _tags(data: bytes | bytearray, name: str) -> tuple[Mapping, Mapping, Mapping] | None:
    """(IFD0, the Exif IFD, the GPS IFD) of the file, each the tags it holds."""
    if data[:2] == b"\xff\xd8":
        block = jpeg_exif(data)
        return tiff_tags(block) if block is not None else None
    if bytes(data[:4]) in TIFF_HEADERS:
        return tiff_tags(data)
    image, _ = open_image(io.BytesIO(data), name, max_pixels=1 << 62)  # the header only: no pixels decoded
    exif = image.getexif()
    try:
        return exif, exif.get_ifd(EXIF_IFD), exif.get_ifd(GPS_IFD)
    except Exception:  # noqa: BLE001 - a sub-IFD pointing nowhere
        return exif, {}, {}


# The tags read from each IFD: a JPEG's Exif block is walked for these alone. Pillow's parse of a
# phone's whole block (every tag, the maker note) cost 93 us a file; the GPU feed's host has ~285.
WANTED = ({MAKE, MODEL, EXIF_IFD, GPS_IFD},
          {DATE_ORIGINAL, DATE_DIGITIZED, OFFSET_ORIGINAL, OFFSET_DIGITIZED, SUBSEC_ORIGINAL, SUBSEC_DIGITIZED,
           LENS_MODEL},
          {GPS_LATITUDE_REF, GPS_LATITUDE, GPS_LONGITUDE_REF, GPS_LONGITUDE})
TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 7: 1, 9: 4, 10: 8}
MAX_ENTRIES = 1000


def tiff_tags(block: bytes | bytearray) -> tuple[dict, dict, dict] | None:
    """The WANTED tags of a TIFF structure (an Exif block, or a TIFF-based file itself)."""
    endian = {b"II": "<", b"MM": ">"}.get(bytes(block[:2]))
    if endian is None or len(block) < 8:
        return None
    first = _ifd(block, struct.unpack_from(endian + "I", block, 4)[0], endian, WANTED[0])
    sub = _ifd(block, first.get(EXIF_IFD), endian, WANTED[1])
    gps = _ifd(block, first.get(GPS_IFD), endian, WANTED[2])
    return first, sub, gps


def _ifd(block: bytes | bytearray, at: Any, endian: str, wanted: set[int]) -> dict[int, Any]:
    if not isinstance(at, int) or at <= 0 or at + 2 > len(block):
        return {}
    count = min(struct.unpack_from(endian + "H", block, at)[0], MAX_ENTRIES)
    found = {}
    for entry in range(at + 2, min(at + 2 + 12 * count, len(block) - 11), 12):
        tag, kind, number = struct.unpack_from(endian + "HHI", block, entry)
        if tag not in wanted or kind not in TYPE_SIZES:
            continue
        size = TYPE_SIZES[kind] * number
        start = entry + 8 if size <= 4 else struct.unpack_from(endian + "I", block, entry + 8)[0]
        if size > 4096 or start + size > len(block):
            continue
        found[tag] = _value(bytes(block[start:start + size]), kind, number, endian)
    return found


def _value(raw: bytes, kind: int, number: int, endian: str) -> Any:
    if kind == 2:  # ASCII
        return raw.split(b"\x00", 1)[0].decode("latin-1")
    if kind in (5, 10):  # (signed) rationals
        pairs = struct.unpack(f"{endian}{2 * number}{'I' if kind == 5 else 'i'}", raw)
        values = tuple(num / den if den else math.nan for num, den in zip(pairs[::2], pairs[1::2]))
        return values if number > 1 else values[0]
    if kind in (3, 4, 9):
        code = {3: "H", 4: "I", 9: "i"}[kind]
        values = struct.unpack(f"{endian}{number}{code}", raw)
        return values if number > 1 else values[0]
    return raw


def jpeg_exif(data: bytes | bytearray) -> bytes | None:
    """The Exif block of a JPEG (what follows ``Exif\\0\\0`` in its APP1 segment), or None."""
    at, end = 2, len(data)
    while at + 4 <= end and data[at] == 0xFF:
        marker = data[at + 1]
        if marker == 0xDA:  # start of scan: the header is over
            return None
        if marker in (0x01, 0xD8, 0xFF) or 0xD0 <= marker <= 0xD7:
            at += 1 if marker == 0xFF else 2
            continue
        length = (data[at + 2] << 8) | data[at + 3]
        if length < 2:
            return None
        if marker == 0xE1 and data.startswith(b"Exif\x00\x00", at + 4):
            return bytes(data[at + 10:at + 2 + length])
        at += 2 + length
    return None


def _time(stamp: Any, offset: Any, subsec: Any) -> datetime | None:
    text = _text(stamp)
    if not text:
        return None
    try:
        taken = datetime.strptime(text[:19], "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return None  # "0000:00:00 00:00:00", blanks, another layout
    fraction = _text(subsec)
    if fraction and fraction.isdigit():
        taken += timedelta(seconds=float(f"0.{fraction}"))
    shift = _offset(_text(offset))
    return (taken - shift).replace(tzinfo=timezone.utc)


def _offset(text: str | None) -> timedelta:
    if not text or len(text) < 6 or text[0] not in "+-" or text[3] != ":":
        return timedelta(0)
    try:
        hours, minutes = int(text[1:3]), int(text[4:6])
    except ValueError:
        return timedelta(0)
    if hours > 14 or minutes >= 60:
        return timedelta(0)
    sign = -1 if text[0] == "-" else 1
    return sign * timedelta(hours=hours, minutes=minutes)


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not isinstance(value, str):
        return None
    value = value.replace("\x00", " ").strip()
    return value[:MAX_TEXT] or None


def _degrees(value: Any, ref: Any, limit: float) -> float | None:
    try:
        parts = [float(part) for part in value]
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if len(parts) != 3 or not all(math.isfinite(part) and part >= 0 for part in parts):
        return None
    degrees = parts[0] + parts[1] / 60 + parts[2] / 3600
    if degrees > limit:
        return None
    return -degrees if _text(ref) in ("S", "W") else degrees

