"""Text-query latency of `clipdex serve` on a ViT-B-32 store, one client: POST /search {"text"}
one request at a time (so the figure is the server's own time for a query, the text tower most of
it), at each --precision, and for an earlier checkout (--before DIR: its `cli` run by the same
Python) in alternation.

The store holds 40 demo images embedded by ViT-B-32 with random-init weights (speed does not need
trained ones), built by the --before checkout when one is given (its manifest is the older one).

    git worktree add /tmp/clipdex-before dff5448
    python bench/bench_serve_text.py --before /tmp/clipdex-before --precisions fp32,int8,bf16 --rounds 2 \\
        --out bench/results/serve-text.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [f"a {c} {s} on a {b} background" for c in ("red", "green", "blue", "pink", "yellow")
         for s in ("circle", "square", "star", "triangle") for b in ("white", "grey", "dark")]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def clipdex(source: Path, *args: str, **kwargs) -> list[str]:
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(source)!r}); import cli; cli.main()", *args]


def build_store(source: Path, work: Path, weights: str) -> Path:
    store = work / "store"
    if not (store / "manifest.json").is_file():
        subprocess.run(clipdex(source, "demo-data", str(work / "library"), "--count", "40", "--seed", "3"),
                       check=True, capture_output=True, cwd=source)
        subprocess.run(clipdex(source, "index", str(work / "library"), "--store", str(store), "--model", "ViT-B-32",
                               "--pretrained", weights, "--device", "cpu"), check=True, capture_output=True, cwd=source)
    return store


def latencies(source: Path, store: Path, precision: str | None, queries: int) -> list[float]:
    port = free_port()
    args = ["serve", "--store", str(store), "--port", str(port)] + (["--precision", precision] if precision else [])
    env = {**os.environ, "PYTHONPATH": str(source)}
    server = subprocess.Popen(clipdex(source, *args), cwd=source, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server ({source}, {precision}) did not start")
                time.sleep(0.5)
        seconds = []
        for i in range(queries + 5):
            body = json.dumps({"text": TEXTS[i % len(TEXTS)], "k": 10}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{port}/search", body,
                                             {"Content-Type": "application/json"})
            started = time.perf_counter()
            urllib.request.urlopen(request, timeout=30).read()
            seconds.append(time.perf_counter() - started)
        return seconds[5:]  # the first ones load the model and warm the caches
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="an earlier checkout, measured alongside")
    parser.add_argument("--precisions", default="fp32,int8")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--weights", default="/tmp/clipdex-bench/ViT-B-32-random.pt")
    parser.add_argument("--work", type=Path, default=Path("/tmp/clipdex-bench/serve-text"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve-text.json")
    args = parser.parse_args()
    if not Path(args.weights).is_file():
        import open_clip
        import torch

        torch.save(open_clip.create_model("ViT-B-32").state_dict(), args.weights)
    store = build_store(args.before or ROOT, args.work, args.weights)
    contenders = ([("before", args.before, None)] if args.before else []) + \
        [(p, ROOT, p) for p in args.precisions.split(",")]
    runs: dict[str, list[float]] = {name: [] for name, _, _ in contenders}
    for round_ in range(args.rounds):
        for name, source, precision in contenders:
            seconds = latencies(source, store, precision, args.queries)
            runs[name] += seconds
            print(json.dumps({"round": round_, "contender": name, "p50_ms": 1000 * float(np.median(seconds))}),
                  flush=True)
    summary = {name: {"p50_ms": round(1000 * float(np.median(s)), 2), "p90_ms": round(1000 * float(np.percentile(s, 90)), 2)}
               for name, s in runs.items()}
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
              "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
              "store": "40 demo images, ViT-B-32 random-init weights, flat index", "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
