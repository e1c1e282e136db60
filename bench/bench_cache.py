"""Cache retrieval latency: clipdex `blend` vs the ImageBind-LLM reference pattern, same indexes.

The reference pattern, as in the authors' released code: FAISS search on the CPU, then a Python
loop calling ``index.reconstruct(id)`` for every neighbour of every query, then torch for the
softmax blend. clipdex: the same search, then one vectorised gather from a contiguous float16
matrix and the blend in torch. Both run on the same FAISS index: exact IndexFlatIP, the index
clipdex chooses by default for a cache this size (IVF-Flat, recall-tuned), and a forced
autofaiss index; the outputs are checked equal before timing.

    python bench/bench_cache.py --rows 1000000 --dim 1024 --indexes exact,default --out bench/results/cache.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import store  # noqa: E402,F401  (first: sets clipdex's OpenMP wait policy, for both contenders alike)
from bench.synthetic import clustered  # noqa: E402


def reference_blend(index, queries: np.ndarray, k: int, alpha: float = 0.5, temperature: float = 20.0):
    """The authors' pattern: search, reconstruct neighbour by neighbour, blend in torch."""
    import torch

    scores, ids = index.search(queries, k)
    neighbours = []
    for row in ids:
        neighbours.append([index.reconstruct(int(i)) for i in row])
    values = torch.tensor(np.array(neighbours))
    q = torch.from_numpy(queries)
    norm = q.norm(dim=-1, keepdim=True)
    q = q / norm
    weights = torch.softmax(temperature * torch.from_numpy(scores), dim=-1)
    aggregate = torch.nn.functional.normalize((weights.unsqueeze(-1) * values).sum(1), dim=-1)
    return (torch.nn.functional.normalize(alpha * aggregate + (1 - alpha) * q, dim=-1) * norm).numpy()


def percentiles(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def timed(function, batches: list[np.ndarray]) -> dict:
    function(batches[0])  # warm-up
    seconds = []
    for batch in batches:
        started = time.perf_counter()
        function(batch)
        seconds.append(time.perf_counter() - started)
    return percentiles(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per batch size")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--indexes", default="exact,default,autofaiss",
                        help="exact: IndexFlatIP; default: what clipdex chooses for this size; autofaiss: forced")
    parser.add_argument("--index-memory", default="16G")
    parser.add_argument("--max-query-ms", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cache.json")
    args = parser.parse_args()

    import faiss
    import torch

    from search.cache import CacheRetriever
    from store.ann import AnnConfig, build_index

    started = time.perf_counter()
    data = clustered(args.rows, args.dim, args.clusters, spread=0.6)
    ids = np.arange(args.rows, dtype=np.int64) + 1
    print(f"data {time.perf_counter() - started:.0f}s", flush=True)
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
              "torch_threads": torch.get_num_threads(), "faiss_threads": faiss.omp_get_max_threads(),
              "rows": args.rows, "dim": args.dim, "clusters": args.clusters, "k": args.k, "storage": "float16",
              "command": " ".join(sys.argv), "indexes": {}}

    values = torch.from_numpy(data).half()  # the cache's float16 storage
    rng = np.random.default_rng(1)
    batches = {b: [data[rng.integers(0, args.rows, b)] + 0.02 * rng.normal(size=(b, args.dim)).astype(np.float32)
                   for _ in range(args.repeats)] for b in map(int, args.batches.split(","))}
    tuned = None
    kinds = {"exact": "flat", "default": "auto", "autofaiss": "autofaiss"}
    for name in args.indexes.split(","):  # one index in memory at a time: 4 GB each at 1M x 1024
        built = build_index(ids, data, AnnConfig(kind=kinds[name], max_memory=args.index_memory,
                                                 max_query_ms=args.max_query_ms, recall_queries=256))
        if name != "exact":
            tuned = built
            ivf = faiss.try_extract_index_ivf(built.index)
            if ivf is not None:
                ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # the reference pattern needs reconstruct() on this index too
        print(f"{name} index ({built.kind}) {built.key} {built.params} built in {built.seconds:.0f}s, recall@10 "
              f"{built.recall_at_10:.3f}", flush=True)
        cache = CacheRetriever(ids, values, built.index, "cpu")
        row = {"kind": built.kind, "key": built.key, "params": built.params, "recall_at_10": built.recall_at_10,
               "build_seconds": round(built.seconds, 1), "batches": {}}
        for batch, queries in batches.items():
            ours = cache.blend(queries[0], k=args.k, weighting="reference", restore_norm=True)
            theirs = reference_blend(built.index, queries[0], args.k)
            error = float(np.abs(ours - theirs).max())  # float16 storage vs float32 reconstruct
            clipdex = timed(lambda q, cache=cache: cache.blend(q, k=args.k, weighting="reference", restore_norm=True), queries)
            reference = timed(lambda q, index=built.index: reference_blend(index, q, args.k),
                              queries[: max(3, args.repeats // 4)])
            row["batches"][str(batch)] = {"clipdex": clipdex, "reference": reference, "max_abs_difference": error,
                                          "speedup_p50": round(reference["p50_ms"] / clipdex["p50_ms"], 2)}
            print(json.dumps({name: {batch: row["batches"][str(batch)]}}), flush=True)
        report["indexes"][name] = row
        del cache, built
    exact_ref = report["indexes"]["exact"]["batches"]
    default = report["indexes"]["default" if "default" in report["indexes"] else "autofaiss"]["batches"]
    report["default_vs_reference_on_exact"] = {
        b: round(exact_ref[b]["reference"]["p50_ms"] / default[b]["clipdex"]["p50_ms"], 1) for b in exact_ref}
    report["default_recall_at_10"] = tuned.recall_at_10
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"default_vs_reference_on_exact": report["default_vs_reference_on_exact"],
                      "recall_at_10": tuned.recall_at_10}), flush=True)


if __name__ == "__main__":
    main()
