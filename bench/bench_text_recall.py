"""Text-query recall on IVF indexes (issue 25, item 1): tuned on stored image vectors alone, as
every build was before, against tuned on every query set (store/queries.py).

A demo library (the bundled clipdex-shapes model, trained on it) is indexed, then its index
rebuilt as IVF-Flat and IVF-SQ8 twice: without the text prompt set (image vectors only) and with
it. Each index is measured on what an app sends, 68 text queries such as "a red square" (none of
them a tuning prompt), through Query, against exact search over the same vectors.

    python bench/bench_text_recall.py --count 8000 --out bench/results/text_recall.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def user_texts() -> list[str]:
    from demo.shapes import COLOURS, SHAPES

    return [template.format(f"{colour} {shape}") for colour in COLOURS for shape in SHAPES
            for template in ("a {}", "a photo of a {}")] + [f"a photo of a {shape}" for shape in SHAPES]


def measure(store_dir: Path, model) -> dict:
    import faiss

    from store.store import Store

    store = Store.open(store_dir)
    ids, vectors = store.tables.vectors()
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    queries = model.encode_texts(user_texts())
    truth = ids[exact.search(queries, 10)[1]]
    _, found = store.ann_index().search(queries, 10)
    hits = np.array([len(set(a) & set(b)) / 10 for a, b in zip(truth.tolist(), found.tolist())])
    info = store.manifest.index
    return {"key": info.key, "params": info.params, "rerank": info.rerank, "recorded": info.recall,
            "text_queries_recall_mean": round(float(hits.mean()), 4), "text_queries_recall_min": float(hits.min()),
            "build_seconds": info.build_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=8000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/clipdex-text-recall"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from demo.shapes import write_library
    from encoder import MODELS
    from indexer.run import IndexConfig, index_paths
    from store.ann import AnnConfig
    from store.queries import QUERIES_DIR
    from store.store import reindex

    library, store_dir = args.work / f"library-{args.count}", args.work / "store"
    if not (library / "labels.csv").is_file():
        write_library(library, args.count, 11)
    shutil.rmtree(store_dir, ignore_errors=True)
    index_paths([library], store_dir, IndexConfig(model="clipdex-shapes", device="cpu", progress=False))
    kept = (store_dir / QUERIES_DIR / "text.npy").read_bytes()  # what the index run made
    model = MODELS.get("clipdex-shapes", None, device="cpu")
    rows = []
    for kind in ("ivf", "ivf-sq8"):
        for tuned_on in ("image vectors only", "every query set"):
            (store_dir / QUERIES_DIR / "text.npy").unlink(missing_ok=True)
            if tuned_on == "every query set":
                (store_dir / QUERIES_DIR / "text.npy").write_bytes(kept)
            started = time.perf_counter()
            reindex(store_dir, AnnConfig(kind=kind))
            row = {"kind": kind, "tuned_on": tuned_on, **measure(store_dir, model),
                   "reindex_seconds": round(time.perf_counter() - started, 2)}
            rows.append(row)
            print(json.dumps(row))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                        "date": time.strftime("%Y-%m-%d"), "count": args.count, "rows": rows},
                                       indent=2))


if __name__ == "__main__":
    main()
