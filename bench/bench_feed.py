"""Can the host feed a GPU? The whole host side of `clipdex index` with the device's work removed.

`index_paths` runs as a user runs it (scan, plan with content hashing, reading bytes, batching,
building rows, commits, the index build), on the GPU path's feed (encoder.feed.TorchvisionFeed:
the host reads each file and its header and hands the bytes on; decoding is the device's work),
with the device replaced by a stand-in that returns random unit vectors of the model's width. The
figure is images / seconds of everything but loading the model, the median of ``--runs``; the
target is >= 5,000 img/s on 2 cores, so that the 16 cores of a GPU machine feed >= 10,000.

    python bench/bench_feed.py --images 20000 --work /tmp/clipdex-feed --json --out bench/results/feed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_indexing import make_jpegs, weights_for  # noqa: E402
from encoder.feed import Embedded, TorchvisionFeed, device_transform  # noqa: E402
from encoder.model import ClipModel, load_model  # noqa: E402
from encoder.pool import ModelPool  # noqa: E402
from indexer.run import IndexConfig, index_paths  # noqa: E402


class DeviceStandIn(TorchvisionFeed):
    """The GPU feed's host side as it is; instead of the device, random unit vectors."""

    rng = np.random.default_rng(0)

    def embed(self, items, names, timing):
        with timing("embed"):
            vectors = self.rng.standard_normal((len(items), self.model.embed_dim), dtype=np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return Embedded(list(range(len(items))), _vectors=vectors)


class HostOnlyModel(ClipModel):
    def __init__(self, real: ClipModel) -> None:
        super().__init__(real.name, real.pretrained, real.model, real.preprocess, real.tokenizer, real.device)

    def feed(self, decoder="auto", exact_decode=False, max_pixels=None):
        return DeviceStandIn(self, device_transform(self.preprocess), max_pixels or 100_000_000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/clipdex-feed"))
    parser.add_argument("--model", default="ViT-B-32", help="its width is the vectors' width (512 for ViT-B-32)")
    parser.add_argument("--batch-size", type=int, default=256, help="as on CUDA")
    parser.add_argument("--workers", type=int, help="threads per stage (default: one per core, at most 8)")
    parser.add_argument("--runs", type=int, default=3, help="runs, each into a new store; the median is reported")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    parser.add_argument("--out", type=Path, help="also write the result here")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    images = args.work / f"jpegs-{args.images}"
    paths = make_jpegs(images, args.images, processes=os.cpu_count() or 1)
    weights = weights_for(args.model, args.work)
    models = ModelPool(loader=lambda name, pretrained, device: HostOnlyModel(load_model(name, pretrained, "cpu")))
    config = IndexConfig(model=args.model, pretrained=weights, device="cpu", batch_size=args.batch_size,
                         workers=args.workers, progress=False)
    runs = sorted((one_run(images, paths, args.work / "store", config, models) for _ in range(args.runs)),
                  key=lambda run: run["host_images_per_second"])
    result = {
        **runs[len(runs) // 2],  # the median run: this machine's speed drifts by a third within an hour
        "runs": [run["host_images_per_second"] for run in runs],
        "model": args.model, "width": models.get(args.model, weights, "cpu").embed_dim,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "date": date.today().isoformat(), "command": " ".join(sys.argv),
    }
    text = json.dumps(result, indent=None if args.json else 1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


def one_run(images: Path, paths: list[str], store: Path, config: IndexConfig, models: ModelPool) -> dict:
    """One `index_paths` into a new store; its time without start-up (the model, the store's creation)."""
    shutil.rmtree(store, ignore_errors=True)
    _warm_page_cache(paths)
    started = time.perf_counter()
    summary = index_paths([images], store, config, models=models)
    host_seconds = time.perf_counter() - started - summary.stages["load"]
    return {"host_images_per_second": round(summary.embedded / host_seconds, 1), "images": summary.embedded,
            "seconds": round(host_seconds, 3), "stages": {**summary.stages, "embedding": summary.feed},
            "index": summary.index}


def _warm_page_cache(paths: list[str]) -> None:
    """Files just generated are in the page cache anyway; a rerun on a fresh boot must not measure the disk."""
    for path in paths:
        with open(path, "rb") as handle:
            while handle.read(1 << 20):
                pass


if __name__ == "__main__":
    main()
