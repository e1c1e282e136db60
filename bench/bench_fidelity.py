"""Decode fidelity: how close what `clipdex index` stores is to the model's own preprocessing.

The reference for each file is open_clip's path, written out here: PIL open, EXIF transpose,
RGB, the model's transform, the model. clipdex's side is what `clipdex index` actually stored,
read back from the store by path, once with the default decoding and once with --exact-decode.

Images: generated JPEGs (demo shapes, short side 300-1200 px, quality 90) and the photographs in
--photos, each as a JPEG at its own size and resampled to a long side of 1600 and 3000 px.

    python bench/bench_fidelity.py --photos /tmp/photos --generated 200 --out bench/results/fidelity.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LONG_SIDES = (1600, 3000)


def generated(directory: Path, count: int, seed: int = 7) -> list[str]:
    from demo.shapes import sample

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = directory / f"shape_{index:04d}.jpg"
        if not path.exists():
            sample(seed, index, short_side=(300, 1200))[0].save(path, quality=90)
        paths.append(str(path))
    return paths


def photographs(source: Path, directory: Path) -> list[str]:
    from PIL import Image, ImageOps

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for original in sorted(p for p in source.iterdir() if p.is_file()):
        image = ImageOps.exif_transpose(Image.open(original)).convert("RGB")
        versions = [(f"{original.stem}.jpg", image.size)]
        versions += [(f"{original.stem}_{side}.jpg", (round(image.width * side / max(image.size)),
                                                      round(image.height * side / max(image.size))))
                     for side in LONG_SIDES]
        for name, size in versions:
            path = directory / name
            if not path.exists():
                resized = image if size == image.size else image.resize(size, Image.Resampling.LANCZOS)
                resized.save(path, quality=92)
            paths.append(str(path))
    return paths


def stored_vectors(store_dir: Path) -> dict[str, np.ndarray]:
    from store.store import Store
    from store.tables import column_vectors

    rows = Store.open(store_dir).tables.images.search().select(["path", "embedding"]).to_arrow()
    return dict(zip(rows.column("path").to_pylist(), column_vectors(rows)))


def reference_vectors(clip, paths: list[str], batch: int = 32) -> np.ndarray:
    from PIL import Image, ImageOps

    out = []
    for start in range(0, len(paths), batch):
        images = [ImageOps.exif_transpose(Image.open(p)).convert("RGB") for p in paths[start:start + batch]]
        out.append(clip.encode_images(images))
    return np.concatenate(out)


def summary(cosines: np.ndarray, paths: list[str]) -> dict:
    worst = int(np.argmin(cosines))
    return {"images": len(paths), "min": float(cosines.min()), "median": float(np.median(cosines)),
            "below_0.99": int((cosines < 0.99).sum()), "below_0.999": int((cosines < 0.999).sum()),
            "worst": Path(paths[worst]).name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, required=True, help="a folder of photographs (any format)")
    parser.add_argument("--generated", type=int, default=200)
    parser.add_argument("--models", default="clipdex-shapes,ViT-B-32")
    parser.add_argument("--work", type=Path, default=Path("/tmp/clipdex-fidelity"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fidelity.json")
    args = parser.parse_args()

    from bench.bench_indexing import weights_for, write_report
    from encoder.model import load_model
    from indexer.run import IndexConfig, index_paths

    sets = {"generated": generated(args.work / "generated", args.generated),
            "photographs": photographs(args.photos, args.work / "photographs")}
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
              "command": " ".join(sys.argv), "models": {}}
    for model in args.models.split(","):
        weights = weights_for(model, args.work)
        clip = load_model(model, weights, device="cpu")
        row = {"weights": "bundled" if "random" not in weights else "random init"}
        for mode, exact in (("default", False), ("exact_decode", True)):
            store_dir = args.work / f"store-{model}-{mode}"
            shutil.rmtree(store_dir, ignore_errors=True)
            config = IndexConfig(model=model, pretrained=weights, device="cpu", exact_decode=exact, progress=False)
            index_paths([str(args.work / name) for name in sets], store_dir, config)
            stored = stored_vectors(store_dir)
            row[mode] = {}
            for name, paths in sets.items():
                cosines = np.einsum("nd,nd->n", reference_vectors(clip, paths), np.stack([stored[p] for p in paths]))
                row[mode][name] = summary(cosines, paths)
        report["models"][model] = row
        print(json.dumps({model: row}, indent=1), flush=True)
    write_report(args.out, report)


if __name__ == "__main__":
    main()
