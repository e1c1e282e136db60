"""How well `clipdex dupes` groups near-duplicates, per threshold, on the demo model.

A demo library of N images holds many distinct look-alikes: the same shape and colour at another
position, size or background. For every fourth image, five near-duplicates are planted, as a photo
library gets them: re-encoded as JPEG quality 40, resized to 60 %, cropped by 4 % on each side,
brightened by 8 %, and turned by its EXIF orientation only (the pixels stored rotated, the tag
turning them back). Each image with its planted copies is one true group.

Pairs are scored: a pair of photos in one found group is right when both belong to one true group.
Precision and recall of those pairs are given per threshold. The default threshold is the one with
the best recall at a precision of at least 0.9.

    python bench/bench_dupes.py --images 600 --out bench/results/dupes.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

THRESHOLDS = (0.90, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.985, 0.99, 0.995)
PRECISION_FLOOR = 0.9


def plant(library: Path, every: int = 4) -> dict[str, str]:
    """Near-duplicates of every *every*-th image beside it: {copy path: original path}."""
    from PIL import Image, ImageEnhance

    originals = sorted(p for p in library.rglob("*") if p.suffix in (".jpg", ".png"))[::every]
    planted = {}
    for original in originals:
        image = Image.open(original).convert("RGB")
        width, height = image.size
        stem = original.with_suffix("")
        variants = {
            "q40.jpg": (image, {"quality": 40}),
            "small.jpg": (image.resize((int(width * 0.6), int(height * 0.6))), {"quality": 90}),
            "crop.jpg": (image.crop((int(width * 0.04), int(height * 0.04), int(width * 0.96), int(height * 0.96))),
                         {"quality": 90}),
            "bright.jpg": (ImageEnhance.Brightness(image).enhance(1.08), {"quality": 90}),
        }
        for suffix, (picture, options) in variants.items():
            picture.save(f"{stem}_{suffix}", **options)
            planted[f"{stem}_{suffix}"] = str(original)
        exif = Image.Exif()
        exif[0x0112] = 6  # stored turned left, shown upright
        image.transpose(Image.Transpose.ROTATE_90).save(f"{stem}_rotated.jpg", quality=90, exif=exif.tobytes())
        planted[f"{stem}_rotated.jpg"] = str(original)
    return planted


def true_pairs(planted: dict[str, str]) -> set[frozenset]:
    groups: dict[str, list[str]] = {}
    for copy, original in planted.items():
        groups.setdefault(original, [original]).append(copy)
    return {frozenset(pair) for members in groups.values() for pair in itertools.combinations(members, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--work", type=Path, default=Path("/tmp/clipdex-bench/dupes"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dupes.json")
    args = parser.parse_args()

    from demo.shapes import write_library
    from indexer.run import IndexConfig, index_paths
    from search.dupes import find_duplicates
    from store.store import Store

    shutil.rmtree(args.work, ignore_errors=True)
    write_library(args.work / "library", args.images, 61)
    planted = plant(args.work / "library")
    truth = true_pairs(planted)
    index_paths([args.work / "library"], args.work / "store",
                IndexConfig(model="clipdex-shapes", device="cpu", progress=False))
    store = Store.snapshot(args.work / "store")
    rows = {}
    for threshold in THRESHOLDS:
        started = time.perf_counter()
        groups = find_duplicates(store, threshold)
        seconds = time.perf_counter() - started
        found = {frozenset(pair) for g in groups for pair in itertools.combinations(g.paths, 2)}
        right = len(found & truth)
        rows[str(threshold)] = {"groups": len(groups), "pairs": len(found),
                                "precision": round(right / len(found), 3) if found else 1.0,
                                "recall": round(right / len(truth), 3), "seconds": round(seconds, 2)}
        print(threshold, rows[str(threshold)], flush=True)
    eligible = [t for t in THRESHOLDS if rows[str(t)]["precision"] >= PRECISION_FLOOR]
    best = max(eligible, key=lambda t: (rows[str(t)]["recall"], -t)) if eligible else None
    by_variant = {}
    if best is not None:  # which kinds of near-duplicate the chosen threshold finds with their original
        together = {frozenset(pair) for g in find_duplicates(store, best) for pair in itertools.combinations(g.paths, 2)}
        for kind in ("q40", "small", "crop", "bright", "rotated"):
            copies = [(c, o) for c, o in planted.items() if c.rsplit("_", 1)[-1].startswith(kind)]
            by_variant[kind] = round(sum(frozenset(p) in together for p in copies) / len(copies), 3)
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "command": " ".join(sys.argv),
              "model": "clipdex-shapes", "images": args.images + len(planted), "planted": len(planted),
              "true_pairs": len(truth), "thresholds": rows, "chosen": best, "found_with_original": by_variant}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"chosen": best, **(rows[str(best)] if best else {}), "found_with_original": by_variant}))


if __name__ == "__main__":
    main()
