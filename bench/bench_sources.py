"""The same images indexed from three sources: files on disk, webdataset shards on disk, and an
S3-compatible server (moto's server mode on this machine: a local endpoint, so the figure is the
client path's cost, not a network's). The bundled clipdex-shapes model keeps the embedding cheap,
so the reading side shows.

    python bench/bench_sources.py --images 2000 --out bench/results/sources.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from demo.shapes import read_labels, write_library  # noqa: E402
from indexer.config import IndexConfig  # noqa: E402
from indexer.run import index_paths  # noqa: E402


def shards(rows: list[dict], folder: Path, per_shard: int) -> None:
    folder.mkdir(parents=True)
    for number, start in enumerate(range(0, len(rows), per_shard)):
        with tarfile.open(folder / f"{number:05d}.tar", "w") as tar:
            for i, row in enumerate(rows[start:start + per_shard]):
                tar.add(row["path"], arcname=f"{number:05d}{i:04d}{Path(row['path']).suffix}")


def run(name: str, source: str, store: Path, config: IndexConfig) -> dict:
    shutil.rmtree(store, ignore_errors=True)
    first = index_paths([source], store, config)
    again = index_paths([source], store, config)
    feed = first.feed or {}
    return {"source": name, "images": first.embedded, "embed_stage_img_per_s": feed.get("images_per_second"),
            "bound": feed.get("bound"), "read_busy": feed.get("stages", {}).get("read", {}).get("busy"),
            "first_run_s": first.seconds, "rerun_s": again.seconds, "rerun_embedded": again.embedded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--work", default="/tmp/clipdex-bench/sources")
    parser.add_argument("--readers", type=int, default=None)
    parser.add_argument("--out")
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    rows = read_labels(write_library(work / "library", args.images, 5))
    (work / "library" / "labels.csv").unlink()
    shards(rows, work / "shards", 500)

    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://{host}:{port}")
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("bench")
    fs.put(str(work / "library"), "bench/library", recursive=True)
    fs.put(str(work / "shards"), "bench/shards", recursive=True)

    config = IndexConfig(model="clipdex-shapes", device="cpu", progress=False, readers=args.readers)
    results = [run("files on disk", str(work / "library"), work / "s1", config),
               run("shards on disk", str(work / "shards"), work / "s2", config),
               run("files in S3 (moto, local)", "s3://bench/library", work / "s3", config),
               run("files in S3, --readers 16", "s3://bench/library", work / "s4", replace(config, readers=16)),
               run("shards in S3 (moto, local)", "s3://bench/shards", work / "s5", config)]
    server.stop()
    shutil.rmtree(work, ignore_errors=True)
    text = json.dumps({"machine": f"{os.cpu_count()} cores", "images": args.images, "results": results}, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
