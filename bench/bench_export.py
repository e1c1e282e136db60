"""`clipdex export` of a large store: wall time and peak memory, per format.

Each export runs as a process of its own; its peak RSS is the kernel's high-water mark for it
(``ru_maxrss`` of the waited child), so page cache of the files read and written does not count.

    python bench/bench_export.py --store /tmp/scale/store --work /tmp/export-bench \
        --out bench/results/export-3m.json
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

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"parquet": ("rows.parquet", []), "csv": ("rows.csv", []),
        "clip-retrieval": ("clip_retrieval", ["--format", "clip-retrieval"])}


def export(store: Path, out: Path, options: list[str]) -> dict:
    clipdex = str(Path(sys.executable).parent / "clipdex")
    summary_file = out.with_name(out.name + ".summary.json")
    started = time.perf_counter()
    with open(summary_file, "w") as stdout:
        child = subprocess.Popen([clipdex, "export", "--store", str(store), "--out", str(out), "--json", *options],
                                 stdout=stdout)
        _, status, usage = os.wait4(child.pid, 0)  # the child's own rusage: its peak RSS alone
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"clipdex export failed ({os.waitstatus_to_exitcode(status)})")
    summary = json.loads(summary_file.read_text())
    summary_file.unlink()
    return {"seconds": round(seconds, 1), "rows": summary["rows"], "bytes": summary["bytes"],
            "peak_rss_bytes": usage.ru_maxrss * 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/export-bench"))
    parser.add_argument("--formats", default="parquet,csv,clip-retrieval")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "export.json")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((args.store / "manifest.json").read_text())
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
              "command": " ".join(sys.argv), "store": {"rows": manifest.get("count"), "dim": manifest.get("dim")},
              "formats": {}}
    for kind in args.formats.split(","):
        name, options = RUNS[kind]
        out = args.work / name
        shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
        row = export(args.store, out, options)
        report["formats"][kind] = row
        print(json.dumps({kind: row}), flush=True)
        shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
