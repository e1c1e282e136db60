"""`clipdex index --engine ray` against `--engine local`: same files, same cores, whole processes.

Runs, per model, on the JPEGs bench_indexing.py generates:

- local: `clipdex index` as it runs by default;
- ray: `--engine ray`, a local Ray cluster started for the run (as many CPUs as the machine);
- two nodes (with --two-node): a Ray head and a second node started with `ray start` as separate
  processes on this machine, one CPU each, and `--ray-address` pointing at the head, so the work
  is split across both raylets.

    python bench/bench_ray.py --images 2000 --work /tmp/clipdex-bench --two-node --out bench/results/ray.json
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PORT = 6391


def index(images: Path, store: Path, model: str, weights: str, *options: str) -> dict:
    from bench.bench_indexing import timed

    shutil.rmtree(store, ignore_errors=True)
    clipdex = str(Path(sys.executable).parent / "clipdex")
    seconds, out = timed([clipdex, "index", str(images), "--store", str(store), "--model", model, "--pretrained",
                          weights, "--device", "cpu", "--json", *options])
    summary = json.loads(out)
    return {"seconds": round(seconds, 1), "embedded": summary["embedded"], "inner_seconds": summary["seconds"],
            "img_s": round(summary["embedded"] / seconds, 2)}


def ray_command(*args: str) -> None:
    subprocess.run([str(Path(sys.executable).parent / "ray"), *args], check=True, capture_output=True, text=True)


def two_nodes(images: Path, store: Path, model: str, weights: str) -> dict:
    # Ray 2.5x turns token authentication on for a head once a token exists (any local ray.init
    # makes one); every process of the cluster must then say so too.
    os.environ["RAY_AUTH_MODE"] = "token"
    address = f"{socket.gethostbyname(socket.gethostname())}:{PORT}"
    ray_command("start", "--head", "--port", str(PORT), "--num-cpus", "1", "--include-dashboard", "false")
    try:
        ray_command("start", "--address", address, "--num-cpus", "1")
        import ray

        ray.init(address=address, logging_level="ERROR")
        nodes = len([n for n in ray.nodes() if n["Alive"]])
        ray.shutdown()
        row = index(images, store, model, weights, "--engine", "ray", "--ray-address", address)
        return {**row, "nodes": nodes}
    finally:
        ray_command("stop", "--force")
        del os.environ["RAY_AUTH_MODE"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/clipdex-bench"))
    parser.add_argument("--models", default="clipdex-shapes,ViT-B-32")
    parser.add_argument("--two-node", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ray.json")
    args = parser.parse_args()

    from bench.bench_indexing import make_jpegs, weights_for, write_report

    images = args.work / f"jpegs-{args.images}"
    make_jpegs(images, args.images)
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
              "images": args.images, "command": " ".join(sys.argv), "models": {}}
    for model in args.models.split(","):
        weights = weights_for(model, args.work)
        store = args.work / f"store-ray-{model}"
        row = {"local": index(images, store, model, weights),
               "ray": index(images, store, model, weights, "--engine", "ray")}
        row["ray_over_local"] = round(row["ray"]["seconds"] / row["local"]["seconds"], 3)
        if args.two_node:
            try:
                row["two_nodes"] = two_nodes(images, store, model, weights)
            except (subprocess.CalledProcessError, RuntimeError) as error:
                row["two_nodes"] = {"error": str(error)[-500:] + getattr(error, "stderr", "")[-1500:]}
        report["models"][model] = row
        print(json.dumps({model: row}, indent=1), flush=True)
    write_report(args.out, report)


if __name__ == "__main__":
    main()
