"""Fidelity and speed of each --precision against fp32, per model: the cosine between each
precision's vector and fp32's for the same image (and text), the forward rate of the image tower,
one text query's latency, and the time to build the int8 export.

Models without weights here run with random-init weights saved to a file once (speed and the
mapping of the arithmetic do not need trained weights; how well int8 holds on *trained* weights is
to be confirmed per model: pass --pretrained NAME=FILE for a model whose weights you have). The
trained demo model also gets precision@5 and zero-shot accuracy on a held-out library.

    python bench/bench_precision.py --models clipdex-shapes,ViT-B-32,ViT-L-14 --out bench/results/precision.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PRECISIONS = ("fp32", "int8", "bf16")
TEXTS = [f"a photo of a {c} {s}" for c in ("red", "green", "blue", "pink", "yellow", "black", "white", "grey")
         for s in ("dog", "cat", "car", "house", "tree", "circle", "star", "bicycle")]


def weights(model: str, given: dict[str, str], folder: Path) -> str | None:
    if model in given:
        return given[model]
    if model == "clipdex-shapes":
        return None
    path = folder / f"{model}-random.pt"
    if not path.is_file():
        import open_clip
        import torch

        torch.save(open_clip.create_model(model).state_dict(), path)
    return str(path)


def rate(encode, pixels, runs: int = 3) -> float:
    encode(pixels[:2])
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        encode(pixels)
        seconds.append(time.perf_counter() - started)
    return len(pixels) / float(np.median(seconds))


def text_ms(model, runs: int = 30) -> float:
    model.encode_texts(TEXTS[:1])
    seconds = []
    for i in range(runs):
        started = time.perf_counter()
        model.encode_texts([TEXTS[i % len(TEXTS)]])
        seconds.append(time.perf_counter() - started)
    return 1000 * float(np.median(seconds))


def cosines(a: np.ndarray, b: np.ndarray) -> dict:
    c = np.sum(a * b, axis=1)
    return {"min": round(float(c.min()), 5), "median": round(float(np.median(c)), 5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="clipdex-shapes,ViT-B-32,ViT-L-14")
    parser.add_argument("--pretrained", action="append", default=[], metavar="MODEL=FILE")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--work", type=Path, default=Path("/tmp/clipdex-bench"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "precision.json")
    args = parser.parse_args()
    os.environ["CLIPDEX_CACHE_DIR"] = tempfile.mkdtemp(prefix="precision-cache-")  # int8's load includes its build
    import torch

    from demo.quality import shapes_library_quality
    from demo.shapes import read_labels, write_library
    from encoder import load_image, load_model

    args.work.mkdir(parents=True, exist_ok=True)
    given = dict(item.split("=", 1) for item in args.pretrained)
    library = Path(tempfile.mkdtemp(prefix="precision-"))
    rows = read_labels(write_library(library, max(args.images, 320), 7))  # a seed the demo model never saw
    pictures = [load_image(row["path"]) for row in rows]
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
              "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "models": {}}
    for name in args.models.split(","):
        checkpoint = weights(name, given, args.work)
        result: dict = {"weights": "trained" if name == "clipdex-shapes" or name in given else "random-init"}
        models, built = {}, {}
        for precision in PRECISIONS:
            started = time.perf_counter()
            models[precision] = load_model(name, checkpoint, device="cpu", precision=precision)
            built[precision] = round(time.perf_counter() - started, 1)
        sample = pictures if name == "clipdex-shapes" else pictures[:args.images]
        pixels = torch.stack([models["fp32"].preprocess(p) for p in sample[:32]])
        vectors = {p: m.encode_images(sample) for p, m in models.items()}
        texts = {p: m.encode_texts(TEXTS) for p, m in models.items()}
        for precision, model in models.items():
            row = {"load_seconds": built[precision], "image_img_s": round(rate(model.encode_pixels, pixels), 1),
                   "text_ms": round(text_ms(model), 2)}
            if precision != "fp32":
                row["image_cosine"] = cosines(vectors["fp32"], vectors[precision])
                row["text_cosine"] = cosines(texts["fp32"], texts[precision])
            if name == "clipdex-shapes":
                row["quality"] = shapes_library_quality(model, rows)
            result[precision] = row
            print(name, precision, json.dumps(row), flush=True)
        report["models"][name] = result
        del models
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
