"""Changes to a large store without a full build (issue 25, item 2): +1,000, -1,000 and +100,000
rows against the full build, each a separate process whose wall time and peak RSS are measured.

The store is imported from clustered unit features (bench/synthetic.py) with 256 "other modality"
tuning queries (stored rows pushed along one fixed direction and renormalised, cosine ~0.4 to
where they came from: a stand-in for text or audio features searched against image keys, which
a synthetic store has no encoder for). After each change, recall@10 is measured against exact
search over every row, for 256 held-out stored rows and 256 held-out shifted queries, and a
reader process searching throughout (re-opening the store when the manifest changes, as the
server does) gives search p50 before and while the change is published.

    python bench/bench_incremental.py --rows 1000000 --dim 256 --work /tmp/incr --out bench/results/incremental-1m.json
    python bench/bench_incremental.py --rows 3000000 --dim 1024 --work /tmp/incr --out bench/results/incremental-3m.json
"""

from __future__ import annotations

import argparse
import json
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
from bench.bench_scale import CLIPDEX, measured  # noqa: E402
from bench.synthetic import clustered, write_clustered_npy  # noqa: E402

CLUSTERS, SPREAD = 1000, 0.6
READER = """
import json, os, sys, time
import numpy as np
import store
from store.store import Store
directory, queries, stop, out = sys.argv[1], np.load(sys.argv[2]), sys.argv[3], sys.argv[4]
opened, seen, latencies = Store.open(directory), None, []
while not os.path.exists(stop):
    started = time.time()
    manifest = (opened.directory / "manifest.json").stat().st_mtime_ns
    if manifest != seen:  # a newer index was published: search it, as the server's snapshots do
        opened, seen = Store.open(directory), manifest
    opened.ann_index().search(queries[len(latencies) % len(queries)][None, :], 10)
    latencies.append((started, time.time() - started))
json.dump(latencies, open(out, "w"))
"""
DELETE = """
import json, sys
import numpy as np
import store
from store.lock import writer_lock
from store.store import Store
directory, count = sys.argv[1], int(sys.argv[2])
with writer_lock(directory):
    opened = Store.open(directory, writable=True)
    ids = np.random.default_rng(5).choice(opened.tables.vector_source().all_ids(), count, replace=False)
    opened.tables.delete_ids(ids.tolist())
    info = opened.update_index()
print(json.dumps({"deleted": ids.tolist(), "delta_rows": info.delta_rows, "hidden_rows": info.hidden_rows}))
"""


def shifted(vectors: np.ndarray, seed: int) -> np.ndarray:
    """*vectors* moved along one fixed direction (the same for every call) and renormalised."""
    direction = np.random.default_rng(99).normal(size=vectors.shape[1]).astype(np.float32)
    direction /= np.linalg.norm(direction)
    noise = np.random.default_rng(seed).normal(scale=0.3 / np.sqrt(vectors.shape[1]), size=vectors.shape)
    moved = vectors + 2.0 * direction + noise.astype(np.float32)
    return (moved / np.linalg.norm(moved, axis=1, keepdims=True)).astype(np.float32)


def recall(store_dir: Path, queries: dict[str, np.ndarray]) -> dict[str, float]:
    """recall@10 of the store's index, as searches use it, against exact search over every row."""
    import faiss

    from store.store import Store

    opened = Store.open(store_dir)
    everything = np.concatenate(list(queries.values()))
    heap = faiss.ResultHeap(len(everything), 10, keep_max=True)
    for ids, vectors in opened.tables.vector_source().batches():
        scores, rows = faiss.knn(everything, vectors, 10, metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, np.where(rows >= 0, ids[np.maximum(rows, 0)], -1))
    heap.finalize()
    _, found = opened.ann_index().search(everything, 10)
    hits = np.array([len(set(a) & set(b)) / 10 for a, b in zip(heap.I.tolist(), found.tolist())])
    out, start = {}, 0
    for name, rows in queries.items():
        out[name] = round(float(hits[start:start + len(rows)].mean()), 4)
        start += len(rows)
    return out


def with_reader(store_dir: Path, work: Path, step: list[str], seconds_before: float = 5.0) -> dict:
    """*step* measured while a reader process searches the store; its latencies by start time."""
    stop = work / "stop"
    stop.unlink(missing_ok=True)
    reader = subprocess.Popen([sys.executable, "-c", READER, str(store_dir), str(work / "reader-queries.npy"),
                               str(stop), str(work / "latencies.json")], cwd=ROOT)
    time.sleep(seconds_before + 5)  # its start-up, then a few seconds of searches before the change
    started = time.time()
    result = measured(step)
    ended = time.time()
    time.sleep(1)
    stop.touch()
    reader.wait()
    return result | {"started": started, "ended": ended}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--work", type=Path, default=Path("/tmp/clipdex-incremental"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    work, rows, dim = args.work, args.rows, args.dim
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    store_dir = work / "store"
    result = {"machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
              "rows": rows, "dim": dim, "steps": {}}

    write_clustered_npy(work / "features.npy", rows, dim, CLUSTERS, SPREAD, seed=0)
    sample = np.load(work / "features.npy", mmap_mode="r")[np.sort(np.random.default_rng(2).choice(rows, 768, replace=False))]
    np.save(work / "shifted.npy", shifted(np.asarray(sample[:256]), 1))  # the tuning set, kept in the store
    held_out = {"image": np.asarray(sample[256:512]), "shifted": shifted(np.asarray(sample[512:]), 2)}
    np.save(work / "reader-queries.npy", held_out["image"][:64])

    def step(name: str, command: list[str], reader: bool = True) -> dict:
        outcome = with_reader(store_dir, work, command) if reader else measured(command)
        from store.store import Store

        info = Store.open(store_dir).manifest.index
        outcome.update(recall=recall(store_dir, held_out), index={
            "key": info.key, "params": info.params, "rerank": info.rerank, "built_rows": info.built_rows,
            "delta_rows": info.delta_rows, "hidden_rows": info.hidden_rows, "recorded": info.recall})
        outcome.pop("output", None)
        if reader:
            latencies = json.load(open(work / "latencies.json")) if (work / "latencies.json").exists() else []
            before = [s for t, s in latencies if t < outcome["started"]]
            during = [s for t, s in latencies if outcome["started"] <= t <= outcome["ended"]]
            outcome["search_p50_ms"] = {"before": round(float(np.median(before)) * 1000, 2) if before else None,
                                        "during": round(float(np.median(during)) * 1000, 2) if during else None,
                                        "searches_during": len(during)}
        result["steps"][name] = outcome
        print(name, json.dumps(outcome), flush=True)
        return outcome

    step("import (full build)", [*CLIPDEX, "import", str(work / "features.npy"), "--store", str(store_dir),
                                 "--tune-queries", str(work / "shifted.npy"), "--json"], reader=False)
    (work / "features.npy").unlink()  # the store holds them now; the disk is needed for the builds
    step("start-up: clipdex info on the store", [*CLIPDEX, "info", "--store", str(store_dir), "--json"], reader=False)
    for name, count, seed in (("+1,000 rows", 1000, 11), ("+100,000 rows", 100_000, 12)):
        if name == "+100,000 rows":
            step("-1,000 rows", [sys.executable, "-c", DELETE, str(store_dir), "1000"])
        np.save(work / f"more-{count}.npy", clustered(count, dim, CLUSTERS, SPREAD, seed=seed))
        step(name, [*CLIPDEX, "import", str(work / f"more-{count}.npy"), "--store", str(store_dir), "--json"])
    step("reindex (full build, same rows)", [*CLIPDEX, "reindex", "--store", str(store_dir), "--json"])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
