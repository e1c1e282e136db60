"""Search latency of a real store at 10k / 100k / 1M rows: text encode + FAISS + Lance metadata join.

Rows are synthetic (vectors from a mixture of Gaussian clusters on the sphere, spread 0.6, so an ANN index
faces realistic structure; metadata like a photo library's), written through the store's own
tables and indexed by the store's own rebuild (exact up to 200k, autofaiss above). Queries are
real text through the ViT-B-32 text tower (random-init weights: speed does not need training).

    python bench/bench_search.py --sizes 10000,100000,1000000 --out bench/results/search.json

--hybrid-quality N instead measures hybrid search on a captioned demo library of N images whose
captions also name a lot number no image shows (a data team's product photos): recall@10 of the
lot numbers by vector, hybrid and full-text search, precision@10 of meaning queries by vector and
hybrid search, and each mode's latency:

    python bench/bench_search.py --hybrid-quality 2000 --out bench/results/hybrid.json
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

from bench.bench_indexing import weights_for  # noqa: E402
from bench.synthetic import clustered  # noqa: E402

WORDS = ["dog", "cat", "beach", "sunset", "car", "mountain", "city", "forest", "red", "blue", "child", "food"]


def build_store(directory: Path, count: int, model: str, weights: str, dim: int):
    from store.ann import AnnConfig
    from store.store import Store
    from store.tables import image_rows

    shutil.rmtree(directory, ignore_errors=True)
    store = Store.create(directory, model, os.path.abspath(weights), dim)
    data = clustered(count, dim, clusters=max(10, count // 1000), spread=0.6, seed=count)
    rng = np.random.default_rng(1)
    started = time.perf_counter()
    for start in range(0, count, 100_000):
        n = min(100_000, count - start)
        ids = np.arange(start + 1, start + n + 1)
        store.tables.add(image_rows(
            dim, id=ids, hash=[f"{i:032x}" for i in ids],
            path=[f"/photos/{2015 + i % 10}/img_{i:07d}.jpg" for i in ids],
            bytes=rng.integers(50_000, 5_000_000, n), mtime=np.full(n, 1.7e9),
            width=rng.integers(300, 4000, n), height=rng.integers(300, 4000, n), embedding=data[start:start + n]))
    write_seconds = time.perf_counter() - started
    store.reserve_ids(count, first=1)
    info = store.rebuild_index(AnnConfig())
    return store, write_seconds, info


def latency(store, queries: list[str], k: int, where: str | None = None) -> dict:
    from encoder import MODELS
    from search import Query
    from store.ann import search

    model = MODELS.for_manifest(store.manifest, device="cpu")
    index = store.faiss_index()
    parts = {"total": [], "encode": [], "ann": [], "join": []}
    for i, text in enumerate(queries):
        started = time.perf_counter()
        query = Query.create(store, text).limit(k)
        query = query.where(where) if where else query
        rows = query.to_arrow()
        parts["total"].append(time.perf_counter() - started)
        assert rows.num_rows == k
        if where is None:  # the same work, stage by stage
            t0 = time.perf_counter()
            vector = model.encode_texts([text])
            t1 = time.perf_counter()
            _, ids = search(index, vector, k)
            t2 = time.perf_counter()
            store.tables.rows_by_id(ids[0].tolist(), ["id", "path", "width", "height", "caption"])
            t3 = time.perf_counter()
            parts["encode"].append(t1 - t0), parts["ann"].append(t2 - t1), parts["join"].append(t3 - t2)
    summary = {}
    for name, values in parts.items():
        if values:
            ms = np.array(values[3:]) * 1000  # first queries warm caches
            summary[name] = {"p50_ms": round(float(np.percentile(ms, 50)), 2),
                             "p99_ms": round(float(np.percentile(ms, 99)), 2)}
    return summary


# Widths are uniform in [300, 4000): these admit 1 %, 10 % and 54 % of the rows.
FILTERS = {"1%": "width > 3963", "10%": "width > 3630", "54%": "width > 2000"}


def filters(store, queries: list[str], k: int) -> dict:
    """Latency with each of FILTERS, the plan search.filtered chose, and recall@k against an exact
    search over the admitted rows (on 20 of the queries)."""
    from encoder import MODELS
    from search import Query
    from search.filtered import FilteredIndex

    model = MODELS.for_manifest(store.manifest, device="cpu")
    report = {}
    for name, sql in FILTERS.items():
        plan = FilteredIndex(store.ann_index(), store.tables, sql, store.stored_values())
        admitted = np.sort(store.tables.ids_where(sql))
        recall = []
        for text in queries[:20]:
            vector = model.encode_texts([text])[0]
            found = [row["id"] for row in Query.create(store, vector=vector).where(sql).limit(k).to_list()]
            rows = store.tables.rows_by_id(admitted.tolist(), ["id", "embedding"]) if len(admitted) <= 20_000 else None
            if rows is not None:
                vectors = np.asarray(rows.column("embedding").to_pylist(), np.float32)
                truth = rows.column("id").to_numpy()[np.argsort(-(vectors @ vector))[:k]]
                recall.append(len(set(found) & set(truth.tolist())) / k)
        report[name] = {"where": sql, "admitted": int(len(admitted)), "plan": plan.plan,
                        **latency(store, queries, k, where=sql)["total"],
                        "recall_at_10": round(float(np.mean(recall)), 3) if recall else None}
    return report


def serve_memory(store_dir: Path, queries: list[str], k: int) -> dict:
    """`clipdex serve` on the store: its memory (VmRSS, and RssAnon: what is not file pages the
    kernel may drop) after start and after *queries*, half of them filtered."""
    import subprocess
    import urllib.request

    port = 8765
    server = subprocess.Popen([sys.executable, "-c", "import cli; cli.main()", "serve", "--store", str(store_dir),
                               "--port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError(f"the server did not start: {server.stderr.read().decode()[-500:]}")
                time.sleep(0.5)
        started = _memory(server.pid)
        for i, text in enumerate(queries):
            body = {"text": text, "k": k, **({"where": FILTERS["10%"]} if i % 2 else {})}
            request = urllib.request.Request(f"http://127.0.0.1:{port}/search", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            urllib.request.urlopen(request, timeout=60).read()
        return {"after_start": started, f"after_{len(queries)}_queries": _memory(server.pid)}
    finally:
        server.terminate()
        server.wait(timeout=60)


def _memory(pid: int) -> dict:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            fields[name + "_mb"] = round(int(value.split()[0]) / 1024)
    return fields


def hybrid_quality(count: int, work: Path, out: Path) -> dict:
    """The --hybrid-quality report (see the module doc), on clipdex-shapes."""
    from demo.shapes import write_library, write_lot_captions
    from indexer.run import IndexConfig, index_paths
    from search import Query
    from store.store import Store

    root = work / f"hybrid-{count}"
    shutil.rmtree(root, ignore_errors=True)
    labels = write_library(root / "library", count, 41)
    captions = root / "captions.csv"
    truth = write_lot_captions(labels, captions)
    index_paths([root / "library"], root / "store", IndexConfig(model="clipdex-shapes", device="cpu",
                                                                captions=(str(captions),), progress=False))
    store = Store.open(root / "store")
    rng = np.random.default_rng(0)
    sampled = [list(truth.items())[i] for i in rng.choice(len(truth), size=min(200, len(truth)), replace=False)]
    modes = {"vector": lambda q: q, "hybrid": lambda q: q.hybrid(), "fts": lambda q: q.full_text()}
    report = {"images": count, "model": "clipdex-shapes", "command": " ".join(sys.argv),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "lot_recall_at_10": {},
              "meaning_precision_at_10": {}, "latency_p50_ms": {}}
    for name, mode in modes.items():
        for form in ("lot {}", "{}"):
            found, times = 0, []
            for path, (_, _, code) in sampled:
                started = time.perf_counter()
                rows = mode(Query.create(store, form.format(code))).limit(10).to_list()
                times.append(time.perf_counter() - started)
                found += path in [row["path"] for row in rows]
            report["lot_recall_at_10"][f"{name}: {form.format('N')!r}"] = round(found / len(sampled), 3)
        report["latency_p50_ms"][name] = round(float(np.percentile(np.array(times[3:]) * 1000, 50)), 2)
    pairs = sorted({(colour, shape) for colour, shape, _ in truth.values()})
    for name in ("vector", "hybrid"):
        precision = [sum(truth[row["path"]][:2] == pair for row in modes[name](
            Query.create(store, f"a {pair[0]} {pair[1]}")).limit(10).to_list()) / 10 for pair in pairs]
        report["meaning_precision_at_10"][name] = round(float(np.mean(precision)), 3)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--work", type=Path, default=Path("/tmp/clipdex-bench"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "search.json")
    parser.add_argument("--serve-rss", action="store_true", help="Also measure `clipdex serve`'s memory per size.")
    parser.add_argument("--hybrid-quality", type=int, metavar="N",
                        help="Measure hybrid search on a captioned demo library of N images instead (module doc).")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    if args.hybrid_quality:
        hybrid_quality(args.hybrid_quality, args.work, args.out)
        return
    weights = weights_for(args.model, args.work)
    from encoder.model import load_model

    dim = load_model(args.model, weights, device="cpu").embed_dim
    rng = np.random.default_rng(0)
    queries = [f"a photo of a {' '.join(rng.choice(WORDS, 2))}" for _ in range(args.queries)]
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
              "model": args.model, "dim": dim, "k": args.k, "queries": args.queries,
              "command": " ".join(sys.argv), "sizes": {}}
    for size in map(int, args.sizes.split(",")):
        store, write_seconds, info = build_store(args.work / f"search-{size}", size, args.model, weights, dim)
        row = {"write_seconds": round(write_seconds, 2), "index": info.type, "index_key": info.key,
               "index_params": info.params, "build_seconds": info.build_seconds, "recall_at_10": info.recall_at_10,
               "latency": latency(store, queries, args.k), "filters": filters(store, queries[:60], args.k)}
        if args.serve_rss:
            row["serve"] = serve_memory(args.work / f"search-{size}", queries[:100], args.k)
        report["sizes"][str(size)] = row
        print(json.dumps({size: row}), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
