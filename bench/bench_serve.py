"""Load on `clipdex serve`: 200 concurrent clients for 30 s against /search and /cache/blend.

A one-client run follows each, for the latency without queueing. The server runs as its own
process (`clipdex serve`, defaults) on the demo store: 300 generated images indexed with the
bundled clipdex-shapes model. The load comes from wrk (Debian package `wrk`, C, one connection
per client) so that the client costs little of the 2 cores the server also needs. Queries vary:
/search draws from 96 texts, /cache/blend from 256 random features.

    apt-get install wrk
    python bench/bench_serve.py --duration 30 --connections 200 --out bench/results/serve.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEMPLATES = ("a {} {}", "a photo of a {} {}", "a picture of a {} {}", "a drawing of a {} {}")
LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local bodies = %(bodies)s
request = function() return wrk.format(nil, nil, nil, bodies[math.random(#bodies)]) end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('RESULT {"requests": %%d, "seconds": %%.3f, "p50_ms": %%.2f, "p90_ms": %%.2f, ' ..
    '"p99_ms": %%.2f, "max_ms": %%.2f, "errors": {"connect": %%d, "read": %%d, "write": %%d, "status": %%d, ' ..
    '"timeout": %%d}}\\n', summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3,
    latency:percentile(90) / 1e3, latency:percentile(99) / 1e3, latency.max / 1e3, e.connect, e.read, e.write,
    e.status, e.timeout))
end
"""


def demo_store(work: Path) -> Path:
    from demo.shapes import write_library
    from indexer.run import IndexConfig, index_paths

    store = work / "store"
    if not (store / "manifest.json").is_file():
        labels = write_library(work / "library", 300, 7)
        index_paths([work / "library"], store, IndexConfig(model="clipdex-shapes", captions=(str(labels),)))
    return store


def search_bodies() -> list[str]:
    from demo.shapes import COLOURS, SHAPES

    return [json.dumps({"text": t.format(c, s), "k": 10}) for t in TEMPLATES for c in COLOURS for s in SHAPES]


def blend_bodies(dim: int, count: int = 256) -> list[str]:
    queries = np.random.default_rng(0).normal(size=(count, dim)).astype(np.float32)
    return [json.dumps({"queries": [[round(float(x), 6) for x in q]], "k": 10}) for q in queries]


def lua_list(items: list[str]) -> str:
    return "{" + ",".join("[==[" + item + "]==]" for item in items) + "}"


def start_server(store: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-c", "import cli; cli.main()", "serve", "--store", str(store),
                               "--port", str(port)], cwd=ROOT)
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return server
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.5)


def run_wrk(url: str, bodies: list[str], connections: int, seconds: int, threads: int) -> dict:
    time.sleep(3)  # wrk stops with requests still queued in the server: let them drain first
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(LUA % {"bodies": lua_list(bodies)})
    try:
        out = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
                              "-s", script.name, url], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(script.name)
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    result["requests_per_s"] = round(result["requests"] / result["seconds"], 1)
    result["error_count"] = sum(result["errors"].values())
    return result


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def measure(url: str, bodies: list[str], connections: int, seconds: int, single_seconds: int, threads: int,
            warmup: int = 3) -> dict:
    """A warm-up, then *connections* clients for *seconds*, then one client (latency without queueing)."""
    run_wrk(url, bodies, connections, warmup, threads)
    return {f"{connections} clients": run_wrk(url, bodies, connections, seconds, threads),
            "1 client": run_wrk(url, bodies, 1, single_seconds, 1)}


def report_header() -> dict:
    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}; server and wrk share it",
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/clipdex-serve-bench", help="Where the demo store is built.")
    parser.add_argument("--duration", type=int, default=30)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--single-duration", type=int, default=10, help="Seconds of the one-client run.")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (the load generator).")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench/results/serve.json"))
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk")

    store = demo_store(Path(args.work))
    port = free_port()
    server = start_server(store, port)
    try:
        runs = {}
        for endpoint, bodies in (("/search", search_bodies()), ("/cache/blend", blend_bodies(64))):
            runs[endpoint] = measure(f"http://127.0.0.1:{port}{endpoint}", bodies, args.connections, args.duration,
                                     args.single_duration, args.threads, args.warmup)
            print(endpoint, json.dumps(runs[endpoint]), flush=True)
        rss = peak_rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    report = {
        **report_header(),
        "store": "demo: 300 images, clipdex-shapes (64-d), flat index",
        "connections": args.connections, "duration_s": args.duration, "single_client_duration_s": args.single_duration,
        "wrk_threads": args.threads,
        "server_peak_rss_mb": rss, "runs": runs,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
