"""What `clipdex index` costs its driver per file, before any image is decoded: the figures of the
100M-image model in BENCHMARKS.md ("A driver that scales").

Writes N small files whose sizes collide the way a large dataset's do (a few hundred distinct
sizes), then runs what the driver of a run does with them, jobs handed to no engine: the walk,
each chunk of ``chunk_files`` planned against the stored rows, the end of the walk settled. Once
against an empty store (a first run), once against N rows in a Lance dataset (a rerun: every file
unchanged). Memory: the peak resident memory of each, above what the process held before it
(VmHWM, reset through /proc/self/clear_refs). Run at two sizes, a driver that holds a chunk
shows the same peak at both; one that holds the library, a peak that grows with it. Then the
same for webdataset shards: listing a shard, and skipping an unchanged one.

    python bench/bench_driver.py --files 100000 300000 --out bench/results/driver.json
"""
from __future__ import annotations

import argparse
import gc
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa

from indexer.config import IndexConfig
from indexer.plan import Plan, Planner
from indexer.scanner import Walk, scan
from indexer.shards import list_shards
from indexer.stored import StoredIndex, StoredRows, TableSource
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


class LanceRows:
    """The stored rows in a Lance dataset, read as the run reads the store's table
    (store.tables.Tables: batches of every row, rows by id)."""

    def __init__(self, uri: str) -> None:
        self.dataset = lance.dataset(uri)

    def file_batches(self, columns):
        for batch in self.dataset.to_batches(columns=list(columns), batch_size=65_536):
            yield pa.Table.from_batches([batch])

    def rows_by_id(self, ids, columns):
        return self.dataset.to_table(filter=f"id IN ({','.join(map(str, ids))})", columns=list(columns))


def peak_rss() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))


def reset_peak() -> int:
    """The resident memory now, as the peak from here on (Linux: clear_refs 5 resets VmHWM)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return peak_rss()


def streamed(folder: Path, rows, chunk: int) -> tuple[Plan, float, int]:
    """What `clipdex index` does on its driver, jobs handed to no engine: the walk, each chunk
    planned against the rows, the end settled. Returns the plan totals, seconds, peak bytes."""
    base = reset_peak()
    started = time.perf_counter()
    walk = Walk([folder])
    planner = Planner(StoredIndex(rows), 1 + (rows.dataset.count_rows() if isinstance(rows, LanceRows) else 0),
                      lambda path: None, hashing=(DEFAULT_CONTENT_HASH, ()))
    total, files = Plan(), []
    for found in walk:
        files.append(found)
        if len(files) == chunk:
            total = _tally(total, planner.chunk(files))
            files = []
    total = _tally(_tally(total, planner.chunk(files)), planner.finish(walk.summary(), walk.empty_roots()))
    return total, time.perf_counter() - started, peak_rss() - base


def _tally(total: Plan, plan: Plan) -> Plan:
    """Counts only: the run hands a chunk's jobs to its engine and keeps none."""
    total.unchanged += plan.unchanged
    total.next_id += len(plan.embed)
    total.removed_ids += plan.removed_ids
    return total


def files_case(folder: Path, count: int, chunk: int) -> dict:
    """The first run and the rerun, each in a fresh process (a process that ran one keeps its freed
    memory, and the next one's peak would hide in it)."""
    uri = str(folder.parent / "rows.lance")
    first = _in_child(["first", str(folder), uri, str(chunk)])
    found = scan([folder])
    lance.write_dataset(stored_rows(found), uri, mode="overwrite")
    lance.dataset(uri).create_scalar_index("id", "BTREE")
    del found
    again = _in_child(["rerun", str(folder), uri, str(chunk)])
    return {
        "files": count, "chunk_files": chunk,
        "first_run_driver_us_per_file": round(first["seconds"] / count * 1e6, 1), "first_run_embedded": first["embed"],
        "first_run_peak_rss_bytes": first["peak"], "first_run_peak_rss_bytes_per_file": first["peak"] // count,
        "rerun_driver_us_per_file": round(again["seconds"] / count * 1e6, 1), "rerun_unchanged": again["unchanged"],
        "rerun_peak_rss_bytes": again["peak"], "rerun_peak_rss_bytes_per_file": again["peak"] // count,
    }


def _in_child(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def index_case(folder: Path, rows: int) -> dict:
    """What a run holds of every stored row (indexer.stored.StoredIndex), on *rows* synthetic rows
    (paths as long as a photo library's), in a fresh process: its peak while it reads the paths,
    and what it keeps; then the rows read back by id a chunk at a time, as a rerun's chunks read
    them (the peak of both: what Lance's own reading holds, which Python does not see)."""
    uri = str(folder / "index.lance")
    paths = pa.array([f"/home/someone/Pictures/{i // 1000:05d}/IMG_{i:08d}.jpg" for i in range(rows)])
    table = pa.table({"id": pa.array(np.arange(1, rows + 1)), "path": paths,
                      "path_bytes": pa.nulls(rows, pa.binary()), "bytes": pa.array(np.arange(rows) % 400 + 1000),
                      "shard": pa.nulls(rows, pa.string())})
    lance.write_dataset(table, uri, mode="overwrite")
    lance.dataset(uri).create_scalar_index("id", "BTREE")
    del table, paths
    held = _in_child(["index", "", uri, str(IndexConfig.chunk_files)])
    shutil.rmtree(uri, ignore_errors=True)
    return {"rows": rows, "seconds_per_row_us": round(held["seconds"] / rows * 1e6, 2),
            "peak_rss_bytes": held["peak"], "kept_bytes_per_row": round(held["kept"] / rows, 1),
            "chunk_reads_seconds_per_row_us": round(held["reads"] / rows * 1e6, 2),
            "with_chunk_reads_peak_rss_bytes": held["reads_peak"]}


def child(case: str, folder: str, uri: str, chunk: str) -> None:
    if case == "index":
        base = reset_peak()
        started = time.perf_counter()
        index = StoredIndex(LanceRows(uri))
        seconds = time.perf_counter() - started
        gc.collect()
        kept = index.paths.nbytes + index.path_ids.nbytes + index.shards.nbytes + index.shard_ids.nbytes + \
            index.sizes.nbytes + index.seen.nbytes
        peak = peak_rss() - base
        started = time.perf_counter()
        source, step = LanceRows(uri), int(chunk)
        for start in range(0, len(index.path_ids), step):
            StoredRows(source.rows_by_id(np.sort(index.path_ids[start:start + step]), ("id", "path", "bytes")))
        reads = time.perf_counter() - started
        print(json.dumps({"seconds": seconds, "peak": peak, "kept": kept, "reads": reads,
                          "reads_peak": peak_rss() - base}))
        return
    if case == "first":
        rows = TableSource(pa.table({name: pa.array([], pa.int64() if name == "id" else pa.string())
                                     for name in ("id", "path")}))
    else:
        rows = LanceRows(uri)
    plan, seconds, peak = streamed(Path(folder), rows, int(chunk))
    print(json.dumps({"seconds": seconds, "peak": peak, "embed": plan.next_id - 1, "unchanged": plan.unchanged}))


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
    parser.add_argument("--files", type=int, nargs="+", default=[100_000, 300_000])
    parser.add_argument("--chunk", type=int, default=IndexConfig.chunk_files)
    parser.add_argument("--folder", default="/tmp/clipdex-bench/driver")
    parser.add_argument("--out")
    parser.add_argument("--rows", type=int, nargs="*", default=[1_000_000, 3_000_000],
                        help="stored rows of the StoredIndex case")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    root = Path(args.folder)
    result = {"machine": f"{os.cpu_count()} cores", "files": [], "stored_index": []}
    root.mkdir(parents=True, exist_ok=True)
    for rows in args.rows:
        result["stored_index"].append(index_case(root, rows))
        print(json.dumps(result["stored_index"][-1]), flush=True)
    for count in args.files:
        shutil.rmtree(root, ignore_errors=True)
        write_files(root / "files", count)
        result["files"].append(files_case(root / "files", count, args.chunk))
        print(json.dumps(result["files"][-1]), flush=True)
    shutil.rmtree(root, ignore_errors=True)
    write_shards(root / "shards", args.files[0])
    result["shards"] = shards_case(root / "shards", args.files[0])
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
