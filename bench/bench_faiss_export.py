"""ImageBind-LLM's knn.index from a store at paper scale (issue 31): `clipdex export --format faiss`
of a 3M x 1024 store (time, peak RSS, file size, the recall it prints), then the released code's
cache block on that file against `clipdex cache query` on the store, a query at a time.

The released block (LLaMA-Adapter ``imagebind_LLM`` ``forward_visual``): ``faiss.read_index`` (the
whole file into memory), ``index.search``, ``index.reconstruct`` per neighbour, a torch softmax
blend. clipdex: ``CacheRetriever.open(store)`` (its own index, float16 values memory-mapped), then
``blend``. Each in its own process, its peak RSS measured; p50/p99 per query, batch 1.

    python bench/bench_faiss_export.py --rows 3000000 --dim 1024 --work /tmp/clipdex-knn --out bench/results/faiss-export.json
"""

from __future__ import annotations

import argparse
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

import store  # noqa: E402,F401  (first: sets clipdex's OpenMP wait policy, for both contenders alike)
from bench.bench_scale import CLIPDEX, measured, queries_like  # noqa: E402
from bench.synthetic import write_clustered_npy  # noqa: E402


def released(index_path: str, queries_path: str, out_path: str) -> None:
    """The released block, query by query (in a child process: its own peak memory)."""
    import faiss
    import torch

    started = time.perf_counter()
    index = faiss.read_index(index_path)
    loaded = time.perf_counter() - started
    queries = np.load(queries_path)
    seconds, outputs = [], []
    for feats in queries:
        t = time.perf_counter()
        visual = torch.from_numpy(feats[None, :])
        sims, indices = index.search(visual.numpy(), 10)
        prototypes = np.vstack([index.reconstruct(x) for x in indices.reshape(-1).tolist()]).reshape(1, 10, -1)
        sims = (torch.tensor(sims) * 20).softmax(dim=-1)
        blended = sims @ torch.tensor(prototypes)
        blended = blended / blended.norm(dim=-1, keepdim=True)
        blended = 0.5 * visual + 0.5 * blended
        outputs.append((blended / blended.norm(dim=-1, keepdim=True)).reshape(-1).numpy())
        seconds.append(time.perf_counter() - t)
    np.save(out_path, np.array(outputs))
    print(json.dumps({"load_seconds": round(loaded, 1), **_percentiles(seconds[1:])}))


def ours(store_dir: str, queries_path: str, out_path: str) -> None:
    from search.cache import CacheRetriever

    started = time.perf_counter()
    cache = CacheRetriever.open(store_dir, device="cpu")
    loaded = time.perf_counter() - started
    queries = np.load(queries_path)
    seconds, outputs = [], []
    for feats in queries:
        t = time.perf_counter()
        outputs.append(cache.blend(feats))
        seconds.append(time.perf_counter() - t)
    np.save(out_path, np.array(outputs))
    print(json.dumps({"load_seconds": round(loaded, 1), **_percentiles(seconds[1:])}))


def _percentiles(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3_000_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--work", type=Path, default=Path("/tmp/clipdex-knn"))
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "faiss-export.json")
    args = parser.parse_args()
    if args.child:
        (released if args.child[0] == "released" else ours)(*args.child[1:])
        return
    args.work.mkdir(parents=True, exist_ok=True)
    features, store_dir, knn = args.work / "features.npy", args.work / "store", args.work / "knn.index"
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                         f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GB",
              "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "rows": args.rows, "dim": args.dim}
    if not (store_dir / "manifest.json").is_file():
        write_clustered_npy(features, args.rows, args.dim, args.clusters, 0.6)
        report["import"] = measured(CLIPDEX + ["import", str(features), "--store", str(store_dir), "--json"])
        features.unlink(missing_ok=True)
    for stale in (knn, args.work / "knn.rows.parquet"):
        stale.unlink(missing_ok=True)
    report["export"] = measured(CLIPDEX + ["export", "--store", str(store_dir), "--out", str(knn), "--json"])
    report["export"]["file_gb"] = round(knn.stat().st_size / 2**30, 2)
    report["export"]["rows_map_mb"] = round((args.work / "knn.rows.parquet").stat().st_size / 2**20, 1)
    np.save(args.work / "queries.npy", queries_like(args.rows, args.dim, args.clusters, args.queries))
    me = [sys.executable, str(Path(__file__).resolve()), "--child"]
    report["released_block"] = measured(me + ["released", str(knn), str(args.work / "queries.npy"),
                                              str(args.work / "released.npy")])
    report["clipdex_cache"] = measured(me + ["ours", str(store_dir), str(args.work / "queries.npy"),
                                             str(args.work / "ours.npy")])
    difference = np.abs(np.load(args.work / "released.npy") - np.load(args.work / "ours.npy")).max(axis=1)
    report["max_difference"] = {"median": round(float(np.median(difference)), 6),
                                "max": round(float(difference.max()), 6)}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=1))
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
