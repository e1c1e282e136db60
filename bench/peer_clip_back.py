"""Peer run: clip-retrieval's `back` under the load of bench_serve.py, on the same 300 demo images
and the same model (clipdex-shapes), plus single bad requests to see how it answers them.

clip-retrieval runs unchanged in its own virtualenv, through bench/peer_clip_retrieval.py (which
registers the clipdex-shapes config with open_clip). Its inference + index are built first.

    python bench/peer_clip_back.py --clip-retrieval /path/to/cr/bin/python --out bench/results/serve-peer.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_serve import TEMPLATES, demo_store, free_port, measure, peak_rss_mb, report_header  # noqa: E402

MODEL = ROOT / "indexer" / "model_data"


def shim(python: str, *argv: str) -> list[str]:
    return [python, str(ROOT / "bench" / "peer_clip_retrieval.py"), str(MODEL / "clipdex-shapes.json"), "--", *argv]


def build(python: str, library: Path, work: Path) -> Path:
    clip_model = f"open_clip:clipdex-shapes/{MODEL / 'clipdex-shapes.pt'}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    subprocess.run(shim(python, "inference", "--input_dataset", str(library), "--output_folder", str(work / "emb"),
                        "--clip_model", clip_model, "--batch_size", "64", "--num_prepro_workers", "2",
                        "--enable_text", "False", "--enable_metadata", "True"), check=True, capture_output=True)
    subprocess.run(shim(python, "index", "--embeddings_folder", str(work / "emb"), "--index_folder",
                        str(work / "index")), check=True, capture_output=True)
    (work / "index" / "metadata").mkdir(exist_ok=True)
    for part in (work / "emb" / "metadata").glob("*.parquet"):
        shutil.copy(part, work / "index" / "metadata" / part.name)
    indices = work / "indices.json"
    indices.write_text(json.dumps({"demo": {
        "indice_folder": str(work / "index"), "clip_model": clip_model, "enable_mclip_option": False,
        "use_jit": False, "provide_safety_model": False, "provide_violence_detector": False,
        "provide_aesthetic_embeddings": False, "columns_to_return": ["image_path"]}}))
    return indices


def post(url: str, body: bytes) -> tuple[int | str, str, float]:
    started = time.perf_counter()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode(errors="replace")
    except OSError as error:
        status, text = "no answer", str(error)
    return status, text[:160], round((time.perf_counter() - started) * 1e3, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip-retrieval", required=True, help="python of a virtualenv with clip-retrieval")
    parser.add_argument("--work", default="/tmp/clipdex-serve-bench")
    parser.add_argument("--duration", type=int, default=30)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--out", default=str(ROOT / "bench/results/serve-peer.json"))
    args = parser.parse_args()

    work = Path(args.work)
    demo_store(work)  # the same library bench_serve.py serves
    indices = build(args.clip_retrieval, work / "library", work / "peer")
    port = free_port()
    back = subprocess.Popen(shim(args.clip_retrieval, "back", "--port", str(port), "--indices_paths", str(indices),
                                 "--enable_mclip_option", "False", "--use_jit", "False",
                                 "--clip_model", f"open_clip:clipdex-shapes/{MODEL / 'clipdex-shapes.pt'}",
                                 "--columns_to_return", '["image_path"]'),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/knn-service"
    try:
        deadline = time.monotonic() + 120
        while post(url, b'{"text": "a", "modality": "image", "num_images": 1, "indice_name": "demo"}')[0] != 200:
            if back.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("clip-retrieval back did not start")
            time.sleep(1)
        from demo.shapes import COLOURS, SHAPES

        bodies = [json.dumps({"text": t.format(c, s), "modality": "image", "num_images": 10, "indice_name": "demo"})
                  for t in TEMPLATES for c in COLOURS for s in SHAPES]
        runs = measure(url, bodies, args.connections, args.duration, 10, 2)
        print(json.dumps(runs), flush=True)
        base = {"modality": "image", "num_images": 10, "indice_name": "demo"}
        probes = {
            "missing text": post(url, json.dumps(base).encode()),
            "empty text": post(url, json.dumps({**base, "text": ""}).encode()),
            "num_images 0": post(url, json.dumps({**base, "text": "a red circle", "num_images": 0}).encode()),
            "num_images 1000": post(url, json.dumps({**base, "text": "a red circle", "num_images": 1000}).encode()),
            "unknown indice_name": post(url, json.dumps({**base, "text": "a", "indice_name": "nope"}).encode()),
            "NaN in embedding_input": post(url, json.dumps(
                {**base, "embedding_input": [float("nan")] + [0.1] * 63}).encode()),
            "wrong embedding dimension": post(url, json.dumps({**base, "embedding_input": [0.1] * 3}).encode()),
            "malformed JSON": post(url, b'{"text": '),
        }
        rss = peak_rss_mb(back.pid)
    finally:
        back.terminate()
        back.wait(timeout=30)
    report = {
        **report_header(),
        "peer": "clip-retrieval back (flask development server, its defaults), same demo images and model",
        "request": "POST /knn-service {text, modality: image, num_images: 10, indice_name}",
        "connections": args.connections, "duration_s": args.duration, "server_peak_rss_mb": rss,
        "runs": runs, "probes": {name: {"status": s, "body": b, "ms": ms} for name, (s, b, ms) in probes.items()},
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
