"""Paper scale on one machine: a CC3M-sized cache (3M x 1024) imported, indexed and queried with
default settings, each step a separate process whose peak RSS is measured (``os.wait4``).

Steps: write the clustered unit features as one .npy (block by block); ``clipdex import`` (rows +
index build); ``clipdex reindex`` (the build alone); ``clipdex cache query`` on 64 queries; then,
in this process, ``CacheRetriever.open`` time and blend p50/p99 at batch 1/8/64 against the
reference pattern (FAISS search, ``reconstruct`` per neighbour, torch blend) on the same index.

    python bench/bench_scale.py --rows 3000000 --dim 1024 --work /tmp/scale --out bench/results/scale-3m.json
    python bench/bench_scale.py --rows 10000000 --dim 512 --work /tmp/scale --out bench/results/scale-10m.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import store  # noqa: E402,F401  (first: sets clipdex's OpenMP wait policy)
from bench.bench_cache import percentiles, reference_blend  # noqa: E402
from bench.synthetic import clustered_blocks, write_clustered_npy  # noqa: E402

CLIPDEX = [sys.executable, "-m", "cli"]


def measured(command: list[str]) -> dict:
    """Run *command*; its wall time, peak RSS and last output line (the JSON summary)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    out, err = process.stdout.read(), process.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{err[-3000:]}")
    lines = out.strip().splitlines()
    print(f"{command[3]}: {time.perf_counter() - started:.0f}s, peak RSS {usage.ru_maxrss / 2**20:.2f} GB", flush=True)
    return {"seconds": round(time.perf_counter() - started, 1), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2),
            "output": json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None}


def queries_like(rows: int, dim: int, clusters: int, count: int) -> np.ndarray:
    """Stored-like features with a little noise (the first block of the same generator)."""
    block = next(clustered_blocks(min(rows, 50_000), dim, clusters, 0.6, seed=0))
    rng = np.random.default_rng(1)
    picked = block[rng.integers(0, len(block), count)]
    return (picked + 0.02 * rng.normal(size=picked.shape)).astype(np.float32)


def blend_latency(store_dir: Path, dim: int, queries: np.ndarray, repeats: int) -> dict:
    import faiss
    import torch

    from search.cache import CacheRetriever
    from store.store import Store

    started = time.perf_counter()
    cache = CacheRetriever.open(store_dir, device="cpu")
    opened = time.perf_counter() - started
    info = Store.open(store_dir).manifest.index
    # The reference pattern needs reconstruct(): the same index read into memory with a direct map.
    reference_index = faiss.read_index(str(store_dir / info.file))
    faiss.ParameterSpace().set_index_parameters(reference_index, info.params)
    faiss.extract_index_ivf(reference_index).set_direct_map_type(faiss.DirectMap.Hashtable)
    out = {"open_seconds": round(opened, 2), "index": {"type": info.type, "key": info.key, "params": info.params,
                                                        "rerank": info.rerank, "recall_at_10": info.recall_at_10},
           "torch_threads": torch.get_num_threads(), "batches": {}}
    # Steady state for both: every query once first, so the mapped index lists and values rows the
    # queries touch are in the page cache as the reference's in-memory index is (a cold first pass
    # reads them from disk: several ms a query).
    started = time.perf_counter()
    for start in range(0, len(queries), 64):
        cache.blend(queries[start:start + 64], weighting="reference", restore_norm=True)
        reference_blend(reference_index, queries[start:start + 64], 10)
    out["warm_up_seconds"] = round(time.perf_counter() - started, 1)
    rng = np.random.default_rng(2)
    for batch in (1, 8, 64):
        sets = [queries[rng.integers(0, len(queries), batch)] for _ in range(repeats)]
        ours, theirs = [], []
        cache.blend(sets[0], weighting="reference", restore_norm=True)
        reference_blend(reference_index, sets[0], 10)
        for q in sets:  # interleaved, so both see the same machine state
            t = time.perf_counter()
            cache.blend(q, weighting="reference", restore_norm=True)
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            reference_blend(reference_index, q, 10)
            theirs.append(time.perf_counter() - t)
        clipdex, reference = percentiles(ours), percentiles(theirs)
        out["batches"][str(batch)] = {"clipdex": clipdex, "reference": reference,
                                      "speedup_p50": round(reference["p50_ms"] / clipdex["p50_ms"], 2)}
        print(json.dumps({batch: out["batches"][str(batch)]}), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3_000_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/clipdex-scale"))
    parser.add_argument("--repeats", type=int, default=200, help="timed blend calls per batch size")
    parser.add_argument("--skip-reindex", action="store_true", help="measure the build only inside the import")
    parser.add_argument("--keep", action="store_true", help="keep the features and the store afterwards")
    parser.add_argument("--latency-only", action="store_true",
                        help="a kept store: measure the cache query process and blend latency again, update --out")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.json")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    features, store_dir = args.work / f"features-{args.rows}x{args.dim}.npy", args.work / "store"
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                         f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GB",
              "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "rows": args.rows, "dim": args.dim,
              "raw_gb": round(args.rows * args.dim * 4 / 2**30, 2)}
    if args.latency_only:
        report = json.loads(args.out.read_text()) | {"latency_command": " ".join(sys.argv),
                                                     "latency_date": time.strftime("%Y-%m-%d")}
    else:
        if not features.is_file():
            started = time.perf_counter()
            write_clustered_npy(features, args.rows, args.dim, args.clusters, 0.6)
            print(f"features written in {time.perf_counter() - started:.0f}s", flush=True)
        shutil.rmtree(store_dir, ignore_errors=True)
        report["import"] = measured(CLIPDEX + ["import", str(features), "--store", str(store_dir), "--json"])
        if not args.skip_reindex:
            report["reindex"] = measured(CLIPDEX + ["reindex", "--store", str(store_dir), "--json"])
    queries = queries_like(args.rows, args.dim, args.clusters, 4096)
    np.save(args.work / "queries.npy", queries[:64])
    report["cache_query"] = measured(CLIPDEX + ["cache", "query", "--store", str(store_dir), "--queries",
                                                str(args.work / "queries.npy"), "--out", str(args.work / "out.npy"),
                                                "--device", "cpu"])
    report["cache"] = blend_latency(store_dir, args.dim, queries, args.repeats)
    report["disk_gb"] = {name: round(sum(f.stat().st_size for f in (store_dir / name).rglob("*") if f.is_file())
                                     / 2**30, 2) for name in ("lance", "faiss")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("import", "cache_query")} | {"cache": report["cache"]["index"]}))
    if not args.keep and not args.latency_only:
        shutil.rmtree(store_dir, ignore_errors=True)
        features.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
