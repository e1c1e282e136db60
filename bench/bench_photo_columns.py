"""What reading the photo columns (capture time, camera, lens, place) costs per file.

- in the pipeline: ``encoder.exif.photo_columns`` on the bytes already read for embedding, per
  format (JPEG, HEIC, AVIF, DNG), each file a 12-megapixel photo with a phone's EXIF block;
- the metadata-only pass a store indexed before the columns gets (``indexer.photos``): read each
  file whole and parse it, over a library of N JPEGs, with 4 reading threads.

    python bench/bench_photo_columns.py --files 2000 --out bench/results/photo-columns.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def phone_exif():
    from PIL import Image
    from PIL.TiffImagePlugin import IFDRational

    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "Apple", "iPhone 14 Pro"
    sub = exif.get_ifd(0x8769)
    sub[0x9003], sub[0x9011], sub[0x9291], sub[0xA434] = "2021:07:14 18:30:05", "+07:00", "25", "back camera"
    exif.get_ifd(0x8825).update({1: "N", 2: (IFDRational(21, 1), IFDRational(1, 1), IFDRational(4830, 100)),
                                 3: "E", 4: (IFDRational(105, 1), IFDRational(51, 1), IFDRational(0, 1))})
    return exif


def photo(width: int = 4000, height: int = 3000):
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1).astype(np.uint8)
    return Image.fromarray(pixels)


def per_format(repeat: int) -> dict:
    import pillow_heif

    from encoder.exif import photo_columns
    from tests.helpers import write_dng

    pillow_heif.register_heif_opener()
    image, exif = photo(), phone_exif()
    report = {}
    for kind, name in (("JPEG", "a.jpg"), ("HEIF", "a.heic"), ("AVIF", "a.avif")):
        out = io.BytesIO()
        image.save(out, kind, exif=exif.tobytes(), quality=85)
        report[name] = _timed(lambda data=out.getvalue(), name=name: photo_columns(data, name), repeat)
    dng = write_dng(Path("/tmp/clipdex-bench-photo.dng"), image)
    report["a.dng"] = _timed(lambda data=dng.read_bytes(): photo_columns(data, "a.dng"), repeat)
    return report


def _timed(call, repeat: int) -> dict:
    call()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - started)
    assert result["camera_make"] is not None
    return {"median_us": round(float(np.median(times)) * 1e6, 1)}


def metadata_pass(files: int, work: Path) -> dict:
    from encoder.exif import photo_columns
    from encoder.images import read_bytes

    folder = work / "photo-pass"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    out = io.BytesIO()
    photo(2000, 1500).save(out, "JPEG", exif=phone_exif().tobytes(), quality=85)
    for i in range(files):
        (folder / f"IMG_{i:05d}.jpg").write_bytes(out.getvalue())
    paths = [str(p) for p in sorted(folder.iterdir())]
    os.system("sync")
    from concurrent.futures import ThreadPoolExecutor

    started = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda p: photo_columns(read_bytes(p), p), paths))
    seconds = time.perf_counter() - started
    return {"files": files, "file_bytes": len(out.getvalue()), "seconds": round(seconds, 3),
            "per_file_us": round(seconds / files * 1e6, 1), "note": "files in the page cache (just written)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--work", type=Path, default=Path("/tmp/clipdex-bench"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "photo-columns.json")
    args = parser.parse_args()
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "command": " ".join(sys.argv),
              "in_the_pipeline": per_format(args.repeat), "metadata_pass": metadata_pass(args.files, args.work)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
