"""Indexing throughput: clipdex vs LanceDB's open-clip function vs clip-retrieval, same files and weights.

Every contender runs as a whole process (model load, decoding, embedding, writing) on the same
JPEGs with the same weights file, one after another in the same run; img/s = files / wall time.
The forward-only rate of each model (random pixels, no decoding) is measured too, as the ceiling.

    python bench/bench_indexing.py --images 2000 --work /tmp/clipdex-bench \
        --clip-retrieval /work/peers/cr/bin/python --out bench/results/indexing.json

With ``--precisions fp32,int8 --pairs 3`` clipdex alone runs once per precision in each pair,
alternating, after the int8 export was built (a first run on a few files); "net" is files per second
of the run less its start-up (imports, the model, the store: the summary's ``load`` stage).

    python bench/bench_indexing.py --images 2000 --models ViT-B-32 --precisions fp32,int8 --pairs 3 \
        --skip-lancedb --out bench/results/indexing-precision.json
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
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_jpegs(directory: Path, count: int, seed: int = 2024, short_side: tuple[int, int] = (300, 1200),
               processes: int = 1) -> list[str]:
    """*count* JPEGs of mixed sizes (short side 300-1200 px by default), generated once and reused,
    in *processes* slices (20,000 pictures take minutes on one core)."""
    per = -(-count // max(1, processes))
    slices = [(directory, seed, short_side, start, min(count, start + per)) for start in range(0, count, per)]
    if processes > 1:
        with ProcessPoolExecutor(processes) as pool:
            list(pool.map(_make_slice, slices))
    else:
        for one in slices:
            _make_slice(one)
    return [str(directory / f"img_{index:05d}.jpg") for index in range(count)]


def _make_slice(task) -> None:
    from demo.shapes import sample

    directory, seed, short_side, start, stop = task
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(start, stop):
        path = directory / f"img_{index:05d}.jpg"
        if not path.exists():
            sample(seed, index, short_side=short_side)[0].save(path, quality=90)


def weights_for(model: str, work: Path) -> str:
    """The bundled weights, or random-init open_clip weights saved to a file (speed needs no training)."""
    import torch

    from encoder.registry import BUNDLED_MODELS, open_clip_module

    if model in BUNDLED_MODELS:
        return str(BUNDLED_MODELS[model].weights)
    path = work / f"{model}-random.pt"
    if not path.exists():
        torch.manual_seed(0)
        torch.save(open_clip_module().create_model(model).state_dict(), path)
    return str(path)


def forward_only(model: str, weights: str, batch: int = 64, seconds: float = 20.0, device: str = "cpu") -> float:
    import torch

    from encoder.model import load_model

    clip = load_model(model, weights, device=device)
    pixels = torch.randn(batch, 3, *clip.image_size, device=device)
    clip.encode_pixels(pixels)  # warm-up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        clip.encode_pixels(pixels)
        done += batch
    return done / (time.perf_counter() - started)


def timed(command: list[str], env: dict | None = None) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{command[0]} failed: {result.stderr[-2000:]}")
    return seconds, result.stdout


def run_clipdex(model: str, weights: str, images: Path, work: Path, batch: int, *options: str,
                device: str = "cpu") -> dict:
    store = work / f"store-{model}"
    shutil.rmtree(store, ignore_errors=True)
    clipdex = str(Path(sys.executable).parent / "clipdex")
    with GpuUtilisation(device) as gpu:
        seconds, out = timed([clipdex, "index", str(images), "--store", str(store), "--model", model, "--pretrained",
                              weights, "--device", device, "--batch-size", str(batch), "--json", *options])
    summary = json.loads(out)
    return {"seconds": seconds, "embedded": summary["embedded"], "inner_seconds": summary["seconds"],
            "stages": summary["stages"], "feed": summary["feed"], "gpu_utilisation": gpu.mean}


class GpuUtilisation:
    """The GPU's mean utilisation (nvidia-smi, every 200 ms) while the block runs; None off CUDA."""

    def __init__(self, device: str) -> None:
        self.device, self.mean, self._sampler = device, None, None

    def __enter__(self) -> "GpuUtilisation":
        if self.device.startswith("cuda") and shutil.which("nvidia-smi"):
            self._sampler = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                              "-lms", "200"], stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._sampler is not None:
            self._sampler.terminate()
            samples = [float(line) for line in self._sampler.communicate()[0].split() if line.strip().isdigit()]
            self.mean = round(sum(samples) / len(samples), 1) if samples else None


def run_lancedb(model: str, weights: str, paths: list[str], work: Path) -> dict:
    listing = work / "paths.txt"
    listing.write_text("\n".join(paths))
    database = work / f"lancedb-{model}"
    shutil.rmtree(database, ignore_errors=True)
    seconds, out = timed([sys.executable, str(ROOT / "bench" / "peer_lancedb.py"), model, weights, str(listing),
                          str(database)], env={"PYTHONPATH": str(ROOT)})
    return {"seconds": seconds, "embedded": int(out.split()[-1])}


def run_clip_retrieval(python: str, model: str, weights: str, images: Path, work: Path, batch: int) -> dict:
    from encoder.registry import BUNDLED_MODELS

    output = work / f"clip-retrieval-{model}"
    shutil.rmtree(output, ignore_errors=True)
    config = str(BUNDLED_MODELS[model].config) if model in BUNDLED_MODELS else "-"
    command = [python, str(ROOT / "bench" / "peer_clip_retrieval.py"), config, "--", "inference",
               "--input_dataset", str(images), "--output_folder", str(output),
               "--clip_model", f"open_clip:{model}/{weights}", "--batch_size", str(batch),
               "--num_prepro_workers", str(os.cpu_count()), "--enable_text", "False", "--enable_metadata", "False"]
    seconds, _ = timed(command)
    embedded = sum(np.load(f).shape[0] for f in (output / "img_emb").glob("*.npy"))
    return {"seconds": seconds, "embedded": embedded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--short-side", default="300,1200", help="range of the images' short sides, in pixels")
    parser.add_argument("--work", type=Path, default=Path("/tmp/clipdex-bench"))
    parser.add_argument("--models", default="clipdex-shapes,ViT-B-32")
    parser.add_argument("--clip-retrieval", help="python of a virtualenv with clip-retrieval installed")
    parser.add_argument("--skip-lancedb", action="store_true")
    parser.add_argument("--exact-decode", action="store_true", help="also time clipdex index --exact-decode")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="cuda: clipdex and the forward-only ceiling on the GPU "
                        "(fp16 autocast), with the GPU's utilisation during the run")
    parser.add_argument("--precisions", help="e.g. fp32,int8: clipdex alone, at each precision, alternating")
    parser.add_argument("--pairs", type=int, default=1, help="with --precisions: how many alternating rounds")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "indexing.json")
    args = parser.parse_args()
    if args.precisions:
        return compare_precisions(args)

    args.work.mkdir(parents=True, exist_ok=True)
    low, high = (int(side) for side in args.short_side.split(","))
    images = args.work / (f"jpegs-{args.images}" if (low, high) == (300, 1200) else f"jpegs-{args.images}-{low}-{high}")
    paths = make_jpegs(images, args.images, short_side=(low, high), processes=os.cpu_count() or 1)
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}", "device": args.device,
              "images": len(paths), "command": " ".join(sys.argv), "models": {}}
    for model in args.models.split(","):
        weights = weights_for(model, args.work)
        row = {"forward_only_img_s": forward_only(model, weights, args.batch_size, device=args.device)}
        row["clipdex"] = run_clipdex(model, weights, images, args.work, args.batch_size, device=args.device)
        if args.exact_decode:
            row["clipdex_exact_decode"] = run_clipdex(model, weights, images, args.work, args.batch_size,
                                                      "--exact-decode", device=args.device)
        if not args.skip_lancedb:
            row["lancedb"] = run_lancedb(model, weights, paths, args.work)
        if args.clip_retrieval:
            row["clip_retrieval"] = run_clip_retrieval(args.clip_retrieval, model, weights, images, args.work,
                                                       args.batch_size)
        for name in ("clipdex", "clipdex_exact_decode", "lancedb", "clip_retrieval"):
            if name in row:
                row[name]["img_s"] = row[name]["embedded"] / row[name]["seconds"]
        for peer in ("lancedb", "clip_retrieval"):
            if peer in row:
                row[f"speedup_vs_{peer}"] = row["clipdex"]["img_s"] / row[peer]["img_s"]
        row["clipdex_vs_forward_only"] = row["clipdex"]["img_s"] / row["forward_only_img_s"]
        report["models"][model] = row
        print(json.dumps({model: row}, indent=1), flush=True)
    write_report(args.out, report)


def compare_precisions(args) -> None:
    args.work.mkdir(parents=True, exist_ok=True)
    images = args.work / f"jpegs-{args.images}"
    make_jpegs(images, args.images, processes=os.cpu_count() or 1)
    precisions = args.precisions.split(",")
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
              "images": args.images, "command": " ".join(sys.argv), "models": {}}
    for model in args.models.split(","):
        weights = weights_for(model, args.work)
        warm = args.work / "jpegs-warm"
        make_jpegs(warm, 4)
        for precision in precisions:  # builds the exports once, outside the timed runs
            run_clipdex(model, weights, warm, args.work, args.batch_size, "--precision", precision)
        runs: dict[str, list[dict]] = {p: [] for p in precisions}
        for pair in range(args.pairs):
            for precision in precisions:
                run = run_clipdex(model, weights, images, args.work, args.batch_size, "--precision", precision)
                run["img_s"] = run["embedded"] / run["seconds"]
                run["net_img_s"] = run["embedded"] / (run["inner_seconds"] - run["stages"]["load"])
                runs[precision].append(run)
                print(json.dumps({"model": model, "pair": pair, "precision": precision, "img_s": run["img_s"],
                                  "net_img_s": run["net_img_s"], "stages": run["stages"]}), flush=True)
        row = {"runs": runs, "forward_only_fp32_img_s": forward_only(model, weights, args.batch_size)}
        for precision in precisions:
            row[f"{precision}_median_img_s"] = float(np.median([r["img_s"] for r in runs[precision]]))
            row[f"{precision}_median_net_img_s"] = float(np.median([r["net_img_s"] for r in runs[precision]]))
        first = precisions[0]
        for precision in precisions[1:]:
            row[f"{precision}_vs_{first}_net"] = [b["net_img_s"] / a["net_img_s"]
                                                  for a, b in zip(runs[first], runs[precision])]
        report["models"][model] = row
    write_report(args.out, report)
    print(json.dumps({m: {k: v for k, v in row.items() if k != "runs"} for m, row in report["models"].items()},
                     indent=1))


def write_report(out: Path, report: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
