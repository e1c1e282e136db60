"""What `clipdex index` costs its driver per file, before any image is decoded: the figures of the
100M-image model in BENCHMARKS.md ("A driver that scales").

Writes N small files whose sizes collide the way a large dataset's do (a few hundred distinct
sizes), then times, per file: the scan; the first plan against an empty store (how many files it
hashes: the rule before issue 30 hashed every file whose size another file shared, which at 100M
images is nearly every file); the plan of a rerun against N stored rows; the Ray engine's job
table; and the same for webdataset shards (listing a shard, and skipping an unchanged one).
Memory: the peak Python allocations of scan + first plan, and of a rerun's plan over the stored
rows (the scan held apart), per file (tracemalloc).

    python bench/bench_driver.py --files 100000 --out bench/results/driver.json
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tarfile
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from indexer import plan as plan_module
from indexer.plan import make_plan
from indexer.ray_engine import _job_table
from indexer.scanner import scan
from indexer.shards import list_shards
from store.files import DEFAULT_CONTENT_HASH
from store.tables import FILE_COLUMNS, IDENTITY_COLUMNS, split_path


def write_files(folder: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1000, 1400, count)  # 400 sizes: nearly every file shares one, as at 100M
    for i, size in enumerate(sizes):
        sub = folder / f"{i // 1000:04d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i:07d}.jpg").write_bytes(rng.bytes(int(size)))


def write_shards(folder: Path, count: int, per_shard: int = 1000, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(count // per_shard):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{shard:05d}{i:04d}"
                for name, data in ((f"{key}.jpg", rng.bytes(int(rng.integers(1000, 1400)))),
                                   (f"{key}.txt", b"a caption"), (f"{key}.json", b'{"url": "u", "status": "success"}')):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def stored_rows(found) -> pa.Table:
    """The rows a finished run leaves for *found* (what a rerun's plan compares with)."""
    columns = {name: [] for name in FILE_COLUMNS}
    for i, file in enumerate(found.files):
        member = file.member
        values = {"id": i + 1, "hash": f"{i:032x}", "path": split_path(file.path)[0], "bytes": file.bytes,
                  "mtime": file.mtime, "etag": file.etag,
                  **dict(zip(IDENTITY_COLUMNS, file.identity or (None,) * 3)),
                  "shard": member and member.shard, "key": member and member.key,
                  "shard_offset": member and member.offset, "shard_bytes": member and member.shard_bytes,
                  "shard_mtime": member and member.shard_mtime, "shard_images": member and member.shard_images}
        for name in FILE_COLUMNS:
            columns[name].append(values.get(name))
    return pa.table(columns)


def timed(function):
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def old_rule(found):
    """The rule before issue 30: hash every changed file whose size another file or row shares."""
    sizes = Counter(file.bytes for file in found.files)

    def worth_hashing(changed, existing, stored_sizes, absent):
        absent_sizes = {row["bytes"] for row in absent.values()}
        return [file for file in changed
                if (existing[file.path]["bytes"] == file.bytes if file.path in existing
                    else sizes[file.bytes] > 1 or file.bytes in absent_sizes)]

    return worth_hashing


def files_case(folder: Path, count: int) -> dict:
    empty = pa.table({name: pa.array([], pa.string()) for name in FILE_COLUMNS})
    tracemalloc.start()
    found, scan_s = timed(lambda: scan([folder]))
    first, plan_s = timed(lambda: make_plan(found, empty, 1, lambda path: None, hashing=DEFAULT_CONTENT_HASH))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    hashed = sum(job.hash is not None for job in first.embed)
    rows = stored_rows(found)
    rescanned = scan([folder])
    tracemalloc.start()
    again, rerun_s = timed(lambda: make_plan(rescanned, rows, count + 1, lambda path: None,
                                             hashing=DEFAULT_CONTENT_HASH))
    rerun_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    table, table_s = timed(lambda: _job_table(first.embed))
    real = plan_module._worth_hashing
    plan_module._worth_hashing = old_rule(found)
    try:
        before, before_s = timed(lambda: make_plan(found, empty, 1, lambda path: None, hashing=DEFAULT_CONTENT_HASH))
    finally:
        plan_module._worth_hashing = real
    return {
        "files": count, "scan_us_per_file": round(scan_s / count * 1e6, 1),
        "first_plan_us_per_file": round(plan_s / count * 1e6, 1), "first_plan_hashed": hashed,
        "first_plan_before_issue_30_us_per_file": round(before_s / count * 1e6, 1),
        "first_plan_before_issue_30_hashed": sum(job.hash is not None for job in before.embed),
        "rerun_plan_us_per_file": round(rerun_s / count * 1e6, 1), "rerun_unchanged": again.unchanged,
        "rerun_plan_peak_bytes_per_file": rerun_peak // count,
        "ray_job_table_us_per_file": round(table_s / count * 1e6, 1), "job_table_bytes_per_file": table.nbytes // count,
        "scan_and_first_plan_peak_bytes_per_file": peak // count,
    }


def shards_case(folder: Path, count: int) -> dict:
    empty = pa.table({name: pa.array([], pa.string()) for name in FILE_COLUMNS})
    found = scan([folder])
    listed, list_s = timed(lambda: list_shards(found, empty, ()))
    rows = stored_rows(listed)
    skipped, skip_s = timed(lambda: list_shards(scan([folder]), rows, ()))
    return {"members": count, "shards": len(found.shards), "list_us_per_member": round(list_s / count * 1e6, 1),
            "unchanged_skip_incl_scan_us_per_member": round(skip_s / count * 1e6, 1),
            "listed": len(listed.files), "skipped_rows": len(skipped.files)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--folder", default="/tmp/clipdex-bench/driver")
    parser.add_argument("--out")
    args = parser.parse_args()
    root = Path(args.folder)
    shutil.rmtree(root, ignore_errors=True)
    write_files(root / "files", args.files)
    write_shards(root / "shards", args.files)
    result = {"machine": f"{os.cpu_count()} cores", "files": files_case(root / "files", args.files),
              "shards": shards_case(root / "shards", args.files)}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
