"""One-shot commands against `python -c "import torch"`: wall time and peak memory of
`clipdex search QUERY --store S` and `clipdex info --store S`, each a process of its own, run in
alternation with the torch import (medians of --runs).

The store is the demo store (`clipdex demo`, 300 images, clipdex-shapes), made first if missing;
the text tower's export is built by one search before the timed runs (once per model).

    python bench/bench_startup.py --runs 5 --out bench/results/startup.json

``--before DIR`` (an earlier checkout, e.g. a git worktree) adds its `search` and `info`, run by
the same Python on a demo store of its own making.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def timed(command: list[str]) -> float:
    """Wall seconds of *command*, a process of its own."""
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr[-2000:]}")
    return seconds


def peak_mb(command: list[str]) -> int:
    """Peak RSS of *command* (GNU time's view, the process and nothing else)."""
    result = subprocess.run(["/usr/bin/time", "-f", "%M", *command], capture_output=True, text=True)
    return int(result.stderr.strip().splitlines()[-1]) // 1024 if result.returncode == 0 else -1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--demo", type=Path, default=Path("/tmp/clipdex-bench/startup-demo"))
    parser.add_argument("--query", default="a red circle")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--before", type=Path, help="an earlier checkout, measured alongside")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "startup.json")
    args = parser.parse_args()

    clipdex = str(Path(sys.executable).parent / "clipdex")
    store = args.demo / "store"
    if not (store / "manifest.json").exists():
        subprocess.run([clipdex, "demo", "--dir", str(args.demo)], check=True, capture_output=True)
    commands = {
        "import_torch": [sys.executable, "-c", "import torch"],
        "search": [clipdex, "search", args.query, "--store", str(store), "--precision", args.precision],
        "info": [clipdex, "info", "--store", str(store)],
    }
    if args.before:
        old = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(args.before)!r}); import cli; cli.main()"]
        old_store = args.demo / "before" / "store"
        if not (old_store / "manifest.json").exists():
            subprocess.run([*old, "demo", "--dir", str(old_store.parent)], check=True, capture_output=True,
                           cwd=args.before)
        commands["search_before"] = [*old, "search", args.query, "--store", str(old_store)]
        commands["info_before"] = [*old, "info", "--store", str(old_store)]
    timed(commands["search"])  # the export, once per model, and the page cache
    seconds: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.runs):
        for name, command in commands.items():
            seconds[name].append(timed(command))
    medians = {name: float(np.median(values)) for name, values in seconds.items()}
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "seconds": seconds, "medians": medians,
        "search_vs_import_torch": medians["search"] / medians["import_torch"],
        "info_vs_import_torch": medians["info"] / medians["import_torch"],
        "peak_mb": {name: peak_mb(command) for name, command in commands.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "seconds"}, indent=1))


if __name__ == "__main__":
    main()
