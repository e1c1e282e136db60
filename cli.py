"""clipdex command line: thin click wrappers that build inputs, call the packages, print results.

Only this module exits the process; library code raises ClipdexError subclasses, printed here as
one line each.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import sys
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import click
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from demo import DEMO_COUNT, DEMO_DIR, DEMO_SEED, demo_lines, plot_classification, plot_similarity, write_demo_library
from encoder import DEFAULT_MODEL, MODELS, can_load, list_models, load_image, pretrained_label
from encoder.feed import DECODERS
from encoder.precision import DEFAULT_PRECISION, PRECISIONS
from encoder.prompts import text_queries
from indexer import IndexConfig, index_paths
from indexer.config import RayConfig
from indexer.engines import engine_for
from indexer.run import ENGINES
from search import (
    DEFAULT_TEMPLATE,
    WEIGHTINGS,
    BlendParams,
    CacheRetriever,
    Query,
    Term,
    check_text,
    classify,
    clean_labels,
    get_label_set,
    similarity,
)
from search.dupes import DEFAULT_THRESHOLD as DUPES_THRESHOLD
from search.dupes import find_duplicates
from search.filters import parse_filter
from search.query import DEFAULT_K, SORT_POOL
from search.zeroshot import DEFAULT_TOP_K, check_template
from server.config import MIB, ServeConfig
from store import AnnConfig, ClipdexError, InputError, Store, import_features
from store.ann import ANN_KINDS, memory_bytes
from store.damage import explained
from store.errors import DamagedStoreError, first_line, os_error_line
from store.export import FORMATS as EXPORT_FORMATS
from store.export import ExportConfig, export_store
from store.export import format_for as export_format_for
from store.export_faiss import INDEX_TYPES as FAISS_INDEX_TYPES
from store.export_faiss import export_faiss, faiss_summary_line
from store.health import DAMAGE, check_store
from store.importer import IMPORTED, ImportConfig
from store.queries import has_query_set
from store.remote import is_url
from store.remote import parse_options as parse_storage_options
from store.repair import RepairConfig, repair_store
from store.report import inspect, recall_text
from store.store import reindex
from store.tables import PHOTO_COLUMNS
from store.values import VALUES_DTYPES

INDEX = IndexConfig()  # option defaults come from the config objects, never re-declared here
BLEND = BlendParams()

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
EXIT_UNAVAILABLE = 3  # finished, but some given paths could not be seen; their rows were kept
EXIT_DAMAGED = 4  # the store is damaged (`check` found damage, or a command could not read it): `clipdex repair`


def shown(path: str) -> str:
    """A path as one printable line: newlines, tabs and other control characters escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in path)


def ann_options(command: Callable) -> Callable:
    """The index options of every command that (re)builds a store's index, handed to it as one
    ``ann`` AnnConfig."""

    @functools.wraps(command)
    def with_ann(*args, index_type, ann_threshold, index_memory, target_recall, max_query_ms, cache_dtype,
                 tune_queries, **kwargs):
        return command(*args, ann=AnnConfig(kind=index_type, ann_threshold=ann_threshold, max_memory=index_memory,
                                            max_query_ms=max_query_ms, target_recall=target_recall,
                                            values_dtype=cache_dtype, tune_queries=tuple(tune_queries)), **kwargs)

    options = [
        click.option("--index-type", type=click.Choice(list(ANN_KINDS)), default=INDEX.ann.kind, show_default=True,
                     help="auto: exact search up to --ann-threshold vectors; above, the most exact index whose build "
                          "fits --index-memory: IVF-Flat while the float32 vectors fit, IVF with 8-bit codes "
                          "(ivf-sq8) while a byte per dimension does, else the compressed index autofaiss picks. "
                          "Lossy codes are reranked by exact cosine, tuned to --target-recall."),
        click.option("--ann-threshold", default=INDEX.ann.ann_threshold, show_default=True,
                     type=click.IntRange(min=0)),
        click.option("--index-memory", default=INDEX.ann.max_memory, show_default=True,
                     help=f"Memory budget of the whole index build, e.g. 4G, 512M; auto: a third of this machine's "
                          f"memory ({memory_bytes('auto') / 2**30:.1f}G here)."),
        click.option("--target-recall", default=INDEX.ann.target_recall, show_default=True,
                     type=click.FloatRange(0, 1, min_open=True),
                     help="ANN indexes: the smallest nprobe (and rerank depth) whose measured recall@10 reaches this "
                          "on every query set: sampled stored vectors, 256 text prompts in the store's own text "
                          "encoder (CIFAR-100 labels in 4 templates), the store's captions, and --tune-queries."),
        click.option("--tune-queries", multiple=True, type=click.Path(exists=True, dir_okay=False),
                     help="A .npy of queries [N, dim] the index must also serve (e.g. an LLM pipeline's audio or "
                          "text features), named by its file name (repeatable). Kept in the store: later builds "
                          "are tuned on it too."),
        click.option("--max-query-ms", default=INDEX.ann.max_query_ms, show_default=True, type=float,
                     help="ANN indexes: never tune nprobe past this time per query."),
        click.option("--cache-dtype", type=click.Choice(list(VALUES_DTYPES)), default=INDEX.ann.values_dtype,
                     show_default=True,
                     help="The id-sorted copy of the vectors written beside the index, which the cache blends and "
                          "lossy indexes rerank from (memory-mapped): float16 halves its disk and page cache."),
    ]
    for option in reversed(options):
        with_ann = option(with_ann)
    return with_ann


def model_options(command: Callable | None = None, *, default_model: str | None = DEFAULT_MODEL) -> Callable:
    """--model/--pretrained/--device, shared by every command that embeds."""
    model_help = ("open_clip model name (see `clipdex models`), or the bundled demo model 'clipdex-shapes'. "
                  "Env: CLIPDEX_MODEL.")
    if default_model is None:
        model_help += " Default: the store's model, or ViT-B-32 for a new store."

    def decorate(command: Callable) -> Callable:
        options = [
            click.option("--model", "model_name", default=default_model, envvar="CLIPDEX_MODEL",
                         show_default=default_model is not None, help=model_help),
            click.option("--pretrained", default=None, envvar="CLIPDEX_PRETRAINED",
                         help="Pretrained tag (e.g. laion2b_s34b_b79k, downloaded once) or a local checkpoint file. "
                              "Default: the model's default tag (laion2b_s34b_b79k for ViT-B-32); the bundled "
                              "weights for clipdex-shapes. Env: CLIPDEX_PRETRAINED."),
            click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda."),
            precision_option("images and texts"),
        ]
        for option in reversed(options):
            command = option(command)
        return command

    return decorate(command) if command is not None else decorate


def precision_option(what: str) -> Callable:
    return click.option(
        "--precision", type=click.Choice(list(PRECISIONS)), default=DEFAULT_PRECISION, show_default=True,
        help=f"Arithmetic for embedding {what}. fp32: open_clip in torch. int8: both towers exported once to "
             "ONNX and quantised (kept in the user cache): the fastest on a CPU. bf16: open_clip with bfloat16 "
             "weights. int8 and bf16 are for the CPU and within cosine 0.99 of fp32 (README, \"Precision on a "
             "CPU\").")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"warning: {message}", err=True)


def _load_images(paths: Sequence[str]):
    if not paths:
        raise InputError("give at least one image file")
    return [load_image(path) for path in paths]


def _names(paths: Sequence[str]) -> list[str]:
    """Short, unique column names: file names, or the paths as given where names clash."""
    names = [Path(p).name for p in paths]
    return names if len(set(names)) == len(names) else list(paths)


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="clipdex")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """clipdex: embed image collections with open_clip and search them offline.

    Start with `clipdex demo`, which runs everything on the bundled demo model without a network.
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    warnings.showwarning = _one_line_warning


@cli.command("models", context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
def models_command(as_json: bool) -> None:
    """List the models and pretrained tags clipdex can load (bundled ones first)."""
    infos = list_models()
    if as_json:
        click.echo(json.dumps([{"name": i.name, "pretrained": list(i.tags), "bundled": i.bundled} for i in infos]))
        return
    width = max(len(i.name) for i in infos)
    for info in infos:
        tags = ", ".join(info.tags) or "(no published weights: pass --pretrained FILE)"
        suffix = f"  -- {info.description}" if info.description else ""
        click.echo(f"{info.name:<{width}}  {tags}{suffix}")


@cli.command("compare", context_settings=CONTEXT)
@click.argument("images", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--text", "-t", "texts", multiple=True, required=True, help="A text to compare (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print {texts, images, similarity} as JSON.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Also draw the similarity heatmap into this PNG.")
@model_options()
def compare_command(images, texts, as_json, plot, model_name, pretrained, device, precision) -> None:
    """Cosine similarity of every text with every image (rows texts, columns images).

    \b
    Example:
      clipdex compare a.jpg b.png --text "a dog" --text "a cat" --model clipdex-shapes
    """
    for text in texts:
        check_text(text, "--text")
    pictures = _load_images(images)
    sims = similarity(MODELS.get(model_name, pretrained, device, precision=precision), pictures, texts)
    names = _names(images)
    if as_json:
        click.echo(json.dumps({"texts": list(texts), "images": list(images),
                               "similarity": [[round(float(v), 6) for v in row] for row in sims]}))
    else:
        _print_matrix(sims, texts, names)
    if plot:
        click.echo(f"plot written to {plot_similarity(sims, pictures, texts, plot)}", err=True)


def _print_matrix(sims, rows: Sequence[str], columns: Sequence[str]) -> None:
    row_width = min(max(len(r) for r in rows), 50)
    col_width = max(8, *(len(c) for c in columns))
    click.echo(" " * row_width + "".join(f"  {c:>{col_width}}" for c in columns))
    for label, values in zip(rows, sims):
        click.echo(f"{label[:row_width]:<{row_width}}" + "".join(f"  {v:>{col_width}.3f}" for v in values))


@cli.command("classify", context_settings=CONTEXT)
@click.argument("images", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--labels", help="Comma-separated labels, or the name of a built-in set: cifar100.")
@click.option("--labels-file", type=click.Path(dir_okay=False), help="A file with one label per line.")
@click.option("--template", default=DEFAULT_TEMPLATE, show_default=True, help="Prompt; '{}' is replaced by the label.")
@click.option("-k", "--top-k", "k", default=DEFAULT_TOP_K, show_default=True, type=int,
              help="How many labels to show per image.")
@click.option("--json", "as_json", is_flag=True, help='Print [{"path", "top": [{"label", "prob"}]}] as JSON.')
@click.option("--plot", type=click.Path(dir_okay=False), help="Also draw each image beside its top-k bar chart.")
@model_options()
def classify_command(images, labels, labels_file, template, k, as_json, plot, model_name, pretrained, device,
                     precision) -> None:
    """Zero-shot classification: top-k labels per image, probabilities = softmax(100 * cosine).

    \b
    Example:
      clipdex classify photo.jpg --labels cifar100
      clipdex classify a.png --labels circle,square,triangle,star --model clipdex-shapes
    """
    label_list = clean_labels(_read_labels(labels, labels_file))
    check_template(template)
    pictures = _load_images(images)
    results = classify(MODELS.get(model_name, pretrained, device, precision=precision), pictures, label_list,
                       template, k)
    if as_json:
        click.echo(json.dumps([{"path": path, "top": [{"label": s.label, "prob": round(s.prob, 6)} for s in top]}
                               for path, top in zip(images, results)]))
    else:
        for path, top in zip(images, results):
            click.echo(path)
            for score in top:
                click.echo(f"  {score.prob:7.2%}  {score.label}")
    if plot:
        click.echo(f"plot written to {plot_classification(pictures, results, _names(images), plot)}", err=True)


def _read_labels(labels: str | None, labels_file: str | None) -> list[str]:
    if bool(labels) == bool(labels_file):
        raise InputError("give exactly one of --labels a,b,c (or --labels cifar100) and --labels-file FILE")
    if labels_file:
        try:
            return Path(labels_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise InputError(f"cannot read labels file {labels_file}: {error}") from error
    return list(get_label_set(labels) or labels.split(","))


@cli.command("demo-data", context_settings=CONTEXT)
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--count", "-n", default=DEMO_COUNT, show_default=True, type=click.IntRange(min=1),
              help="Number of images.")
@click.option("--seed", default=DEMO_SEED, show_default=True, type=int,
              help="Library seed; the bundled model was trained on seed 0, so other seeds are unseen data.")
def demo_data_command(directory: str, count: int, seed: int) -> None:
    """Generate a synthetic photo library of coloured shapes (JPEG and PNG) plus labels.csv."""
    labels = _write_demo_library(Path(directory), count, seed)
    click.echo(f"wrote {count} images and {labels}")


def _write_demo_library(directory: Path, count: int, seed: int) -> Path:
    with _progress(count, "generating") as bar:
        return write_demo_library(directory, count, seed, progress=bar.update)


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=None)


@cli.command("demo", context_settings=CONTEXT)
@click.option("--dir", "directory", default=DEMO_DIR, show_default=True, type=click.Path(file_okay=False),
              help="Where the demo library and plots go (reused when it already holds a demo library).")
@click.option("--count", "-n", default=DEMO_COUNT, show_default=True, type=click.IntRange(min=20), help="Library size.")
def demo_command(directory: str, count: int) -> None:
    """Run clipdex end to end, offline, on the bundled clipdex-shapes model and a generated library."""
    for line in demo_lines(Path(directory), count, _write_demo_library):
        click.echo(line)


@cli.command("index", context_settings=CONTEXT)
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--store", "store_dir", required=True, type=click.Path(file_okay=False),
              help="Store folder (created if new).")
@model_options(default_model=None)
@click.option("--batch-size", type=click.IntRange(min=1),
              help="Images per forward pass (default: 64 on CPU, 256 on CUDA); with --engine ray also the jobs "
                   "per actor call, each written as one Lance fragment (default 256).")
@click.option("--workers", type=click.IntRange(min=0),
              help="Decoding threads (default: one per core, at most 8).")
@click.option("--readers", type=click.IntRange(min=1),
              help="Threads reading files (default: as many as --workers; more for network storage).")
@click.option("--decoder", type=click.Choice(list(DECODERS)), default=INDEX.decoder, show_default=True,
              help="pillow: decode on the host, large JPEGs reduced while decoding. torchvision: JPEGs decoded "
                   "on the model's device (nvJPEG on CUDA) and resized there; other formats by Pillow. "
                   "auto: torchvision on CUDA, pillow on CPU.")
@click.option("--captions", multiple=True, type=click.Path(dir_okay=False),
              help="CSV or Parquet with columns path, caption (repeatable). Sidecar photo.txt files are read too.")
@click.option("--engine", type=click.Choice(list(ENGINES)), default=INDEX.engine, show_default=True,
              help="Where decoding and embedding run: this process, or a Ray cluster (needs clipdex[ray]; the "
                   "store must be on a path every node reaches). --workers is then the number of actors, and "
                   "each actor reads and decodes with as many threads as --cpus-per-worker (--readers: reading "
                   "threads per actor).")
@click.option("--ray-address", help="Join this Ray cluster (e.g. 10.0.0.1:6379) instead of starting a local one.")
@click.option("--cpus-per-worker", default=INDEX.ray.cpus_per_worker, show_default=True,
              type=click.FloatRange(min=0.1), help="CPUs each Ray actor reserves (and its torch threads).")
@click.option("--gpus-per-worker", default=INDEX.ray.gpus_per_worker, show_default=True,
              type=click.FloatRange(min=0), help="GPUs each Ray actor reserves (e.g. 1, or 0.5 to share one).")
@click.option("--max-pixels", default=INDEX.max_pixels, show_default=True, type=click.IntRange(min=1),
              help="Refuse images above this many pixels (decompression bombs).")
@click.option("--exact-decode", is_flag=True,
              help="Decode every JPEG at full size. By default a large JPEG is decoded at 1/2 to 1/8 scale, never "
                   "below 3x the model's input, then resized as the model would resize the full image: cosine "
                   ">= 0.996 to the model's own preprocessing on every image measured, median 0.9999 "
                   "(BENCHMARKS.md, \"Decode fidelity\").")
@click.option("--commit-every", default=INDEX.commit_every, show_default=True, type=click.IntRange(min=1),
              help="Rows per commit: an interrupted run loses at most this much work.")
@ann_options
@click.option("--wait", is_flag=True,
              help="If another run is writing to the store, wait for it instead of stopping at once.")
@click.option("--prune", is_flag=True,
              help="Remove the rows of PATHS that are missing, unreadable or empty (kept by default: an unmounted "
                   "drive looks exactly like an empty folder).")
@click.option("--cross-mounts", is_flag=True,
              help="Also index file systems mounted below PATHS (by default only the file system each path is on; "
                   "/proc, /sys, /dev and other kernel file systems never).")
@click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
              help="An option for s3:// and gs:// PATHS, passed to s3fs or gcsfs (repeatable): endpoint_url=..., "
                   "anon=true, profile=... Credentials otherwise come from the AWS environment variables and "
                   "config files (AWS_ENDPOINT_URL names an S3-compatible server).")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"scanned", "embedded", "reused", "moved", "removed", "failed", "unavailable", ...} at the end.')
def index_command(paths, store_dir, model_name, pretrained, device, precision, batch_size, workers, readers, decoder, captions, engine,
                  ray_address, cpus_per_worker, gpus_per_worker, max_pixels, exact_decode, commit_every, ann, wait,
                  prune, cross_mounts, storage_options, as_json) -> None:
    """Embed the images under PATHS into the store, incrementally.

    \b
    PATHS are folders, files, webdataset shards (.tar, img2dataset's KEY.jpg + KEY.txt caption +
    KEY.json metadata; brace patterns such as 'shards/{00000..00099}.tar'), and s3:// or gs://
    prefixes, objects and shards (needs clipdex[cloud]).

    \b
    Files: jpg jpeg png webp bmp gif tif tiff avif (animations by their first frame), heic heif
    hif (pillow-heif), and camera RAW by its embedded preview (libraw): dng cr2 cr3 crw nef nrw
    arw srf sr2 raf orf rw2 pef srw x3f 3fr iiq erf kdc mrw; any letter case, upright by the
    camera's orientation.

    \b
    Reruns embed only new or changed files, drop rows of deleted files, and recognise moved or
    copied files (a renamed library folder too) by content hash without re-embedding them. Bad
    files are recorded in the store's failures table and never stop the run. Safe to interrupt:
    rerun to finish. One run writes to a store at a time.

    \b
    A path that is missing, cannot be listed, or lists no image while the store holds images from
    it is reported as unavailable and its rows are kept (exit code 3); --prune removes them.

    \b
    Example:
      clipdex index ~/Pictures --store pictures.clipdex --model clipdex-shapes
    """
    config = IndexConfig(model=model_name, pretrained=pretrained, device=device, precision=precision,
                         batch_size=batch_size,
                         workers=workers, readers=readers, decoder=decoder, captions=tuple(captions),
                         max_pixels=max_pixels,
                         exact_decode=exact_decode, commit_every=commit_every, wait=wait, prune=prune,
                         cross_mounts=cross_mounts, ann=ann, engine=engine,
                         storage_options=parse_storage_options(storage_options),
                         ray=RayConfig(address=ray_address, cpus_per_worker=cpus_per_worker,
                                       gpus_per_worker=gpus_per_worker,
                                       **(dict(workers=workers, batch_size=batch_size or RayConfig.batch_size)
                                          if engine == "ray" else {})))
    summary = index_paths(paths, store_dir, config)
    if as_json:
        click.echo(json.dumps(summary.to_dict()))
    else:
        recall = "" if summary.recall_at_10 is None else f", {recall_text(summary.recall_at_10, summary.recall, summary.target_met)}"
        click.echo(f"{summary.scanned} images scanned in {summary.seconds:.1f}s: {summary.embedded} embedded, "
                   f"{summary.reused} reused ({summary.moved} moved), {summary.unchanged} unchanged, "
                   f"{summary.removed} removed, {summary.failed} failed. "
                   f"Store: {summary.count} images, {summary.index} index{recall}.")
    if click.get_current_context().find_root().params.get("verbose"):
        click.echo(summary.stage_line(), err=True)
    if summary.skipped_mounts:
        listed = ", ".join(shown(mount) for mount in summary.skipped_mounts[:3])
        more = f" and {len(summary.skipped_mounts) - 3} more" if len(summary.skipped_mounts) > 3 else ""
        click.echo(f"note: not entered, being other file systems: {listed}{more} (pass --cross-mounts to index them)",
                   err=True)
    for root, kept in summary.unavailable.items():
        click.echo(f"warning: {shown(root)} is missing, unreadable or empty; its {kept} images are kept "
                   "(pass --prune to remove them)", err=True)
    if summary.indexed == 0 and summary.failed:
        raise InputError(f"nothing could be indexed: all {summary.failed} files failed "
                         f"(see `clipdex info --store {store_dir} --failures`)")
    if summary.unavailable:
        raise SystemExit(EXIT_UNAVAILABLE)


@cli.command("info", context_settings=CONTEXT)
@click.option("--store", "store_dir", required=True, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest and the counts as JSON.")
@click.option("--failures", "show_failures", is_flag=True, help="Also list the files that could not be indexed.")
def info_command(store_dir, as_json, show_failures) -> None:
    """Show what a store holds, counted from its tables: model, images, captions, failures, the
    indexed folders, disk use, and the index with its measured recall@10. Problems are flagged."""
    store = Store.open(store_dir)
    manifest = store.manifest.to_dict()
    report = inspect(store)
    failures = store.tables.failures.search().to_arrow().to_pylist() if show_failures and report.failures else []
    if as_json:
        payload = {"store": str(store.directory), **manifest, "count": report.rows, "failures": report.failures,
                   "report": report.to_dict()}
        if show_failures:
            payload["failure_list"] = [{**f, "time": str(f["time"])} for f in failures]
        click.echo(json.dumps(payload))
        return
    index = manifest["index"]
    if report.has_index:
        recall = recall_text(index["recall_at_10"], index["recall"], index["target_met"])
        changes = (f" (built on {index['built_rows']}; {index['delta_rows']} new or changed since, searched "
                   f"beside it, {index['hidden_rows']} hidden)" if index["delta"] else "")
        index_line = (f"{index['type']} {index['key']} over {index['count']} vectors{changes}, {recall} "
                      f"({index['recall_queries']} queries), built in {index['build_seconds']}s")
    else:
        index_line = "no index yet (run `clipdex index` on the store to build one)"
    roots = "".join(f"\n           {shown(root)} ({count} images)" for root, count in report.roots.items())
    click.echo(f"store:     {store.directory}\n"
               f"model:     {manifest['model']} ({manifest['pretrained']}), {manifest['dim']}-d{_precisions(manifest)}\n"
               f"images:    {report.rows} ({report.captioned} with captions)\nfailures:  {report.failures}\n"
               f"folders:   {len(report.roots) or 'none recorded'}{roots}\n"
               f"index:     {index_line}\n"
               f"disk:      {_size(report.disk_bytes)}\n"
               f"updated:   {manifest['updated']} (created {manifest['created']})")
    if report.duplicate_rows:
        click.echo(f"warning: {report.duplicate_rows} rows repeat a path that another row already has "
                   "(a damaged store: re-create it, or remove the duplicates)", err=True)
    if report.has_index and not report.index_is_current:
        click.echo(f"warning: the index covers {report.index_rows} rows of table version {report.index_version}; "
                   f"the table is at version {report.table_version} with {report.rows} rows (an interrupted or "
                   "running write): run `clipdex index` to bring the index up to date", err=True)
    for failure in failures:
        detail = f"  ({failure['detail']})" if failure["detail"] else ""
        click.echo(f"  {failure['reason']:<13} {shown(failure['path'])}{detail}")


def _precisions(manifest: dict) -> str:
    """How the vectors were computed, for the model line (nothing for imported features)."""
    made = manifest["precisions"]
    return f", {' and '.join(made)} vectors" if made else ""


@cli.command("search", context_settings=CONTEXT)
@click.argument("query", required=False)
@click.option("--store", "store_dir", required=True, type=click.Path(file_okay=False))
@click.option("-k", "--top-k", "k", default=DEFAULT_K, show_default=True, type=int, help="Number of results.")
@click.option("--image", type=click.Path(dir_okay=False), help="Search by this image instead of (or besides) text.")
@click.option("--add", "adds", multiple=True, metavar="[W:]TERM", help="Add a text or image term, e.g. --add 2:sunset.")
@click.option("--subtract", "subtracts", multiple=True, metavar="[W:]TERM",
              help="Subtract a term, e.g. --subtract dog.")
@click.option("--where", "where", help="SQL prefilter on metadata, e.g. \"width > 500 AND path LIKE '%2024%'\".")
@click.option("--min-score", type=click.FloatRange(-1, 1), metavar="S",
              help="Only results whose cosine similarity is at least S (still at most k). Typical matches: "
                   "0.25-0.35 for ViT-B-32 and ViT-L-14 text queries, 0.8 and above for near-duplicate images; "
                   "see README.")
@click.option("--sort", "sort", metavar="[-]COLUMN",
              help="Order the results by a column, '-' for descending (e.g. --sort=-mtime), ties by score. With "
                   f"--min-score, every match above it (up to {SORT_POOL:,}) is ordered and the first k shown; "
                   "without, the k best matches are reordered.")
@click.option("--hybrid", is_flag=True,
              help="Also search the captions for QUERY's words (BM25) and fuse both rankings by reciprocal rank: "
                   "finds a name, a product code or a rare word the image does not show. Score stays the cosine.")
@click.option("--fts", is_flag=True, help="Search the captions for QUERY's words only (BM25; score is BM25's).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda (for encoding the query).")
@precision_option("the query")
@click.option("--json", "as_json", is_flag=True,
              help="Print [{id, path, score, width, height, caption}] as JSON (with the --sort column).")
def search_command(query, store_dir, k, image, adds, subtracts, where, min_score, sort, hybrid, fts, device,
                   precision, as_json) -> None:
    """Search a store by text (QUERY), by image (--image), or both, with query algebra.

    \b
    Examples:
      clipdex search "a red circle" --store demo.clipdex -k 5
      clipdex search --image photo.jpg --store demo.clipdex --where "width > 300"
      clipdex search "a circle" --add 2:blue --subtract red --store demo.clipdex
      clipdex search "the beach" --min-score 0.25 --sort=-mtime --store photos.clipdex
      clipdex search "SKU 4821" --hybrid --store products.clipdex
    """
    if query is None and image is None:
        raise InputError("give a QUERY text, --image PATH, or both")
    terms = ([Term(1.0, text=query)] if query is not None else []) + ([Term(1.0, image=image)] if image else [])
    search = Query(Store.open(store_dir), terms=tuple(terms), device=device, precision=precision).limit(k)
    for term in adds:
        search = search.add(term)
    for term in subtracts:
        search = search.subtract(term)
    if where:
        search = search.where(where)
    if hybrid and fts:
        raise InputError("give one of --hybrid (words and meaning) and --fts (words only)")
    search = search.min_score(min_score).sort(sort).hybrid(hybrid)
    search = search.full_text() if fts else search
    column = search.order[0] if search.order else None
    results = search.to_list()
    if as_json:
        keep = ("id", "path", "score", "width", "height", "caption", *PHOTO_COLUMNS) + \
            ((column,) if column and column not in PHOTO_COLUMNS else ())
        click.echo(json.dumps([{key: _jsonable(row.get(key)) for key in keep} for row in results]))
        return
    if not results:
        click.echo("no results" + (f" at or above --min-score {min_score}" if min_score is not None else ""))
    for rank, row in enumerate(results, 1):
        value = f"  {_jsonable(row.get(column))}" if column else ""
        click.echo(f"{rank:>3}  {row['score']:.3f}{value}  {shown(row['path'])}")


def _jsonable(value):
    """A column value as JSON takes it (timestamps and dates as ISO text)."""
    return value.isoformat() if hasattr(value, "isoformat") else value


def build_engine_options(command):
    command = click.option("--ray-address", help="Join this Ray cluster instead of starting a local one.")(command)
    return click.option("--engine", type=click.Choice(list(ENGINES)), default="local", show_default=True,
                        help="ray: an IVF index is trained here and its shards added by Ray tasks in parallel, "
                             "then merged on disk beside the index (needs clipdex[ray]).")(command)


def tuning_text_queries(store_dir: str, model: str, pretrained: str | None) -> dict:
    """The tuning prompts (encoder/prompts.py) in the store's text encoder, for a store that does
    not keep them yet; a model that cannot be loaded here leaves text recall unmeasured, with a
    warning, rather than stopping the import or the build."""
    if has_query_set(Path(os.path.expanduser(store_dir)), "text"):
        return {}
    try:
        return {"text": text_queries(MODELS.get(model, pretrained))}
    except ClipdexError as error:
        click.echo(f"warning: the index is not tuned on text queries: {first_line(error)}", err=True)
        return {}


@contextlib.contextmanager
def build_cluster(engine: str, address: str | None):
    """The workers of a scaled-out index build (Ray tasks), or None to build here: the engine's
    session, chosen from the registry as `index` chooses it."""
    config = IndexConfig(engine=engine, ray=RayConfig(address=address))
    with engine_for(config).session(config) as session:
        yield session.workers


@cli.command("import", context_settings=CONTEXT)
@click.argument("features", nargs=-1, required=True, type=click.Path())
@click.option("--store", "store_dir", required=True, type=click.Path(file_okay=False),
              help="Store folder (created if new).")
@click.option("--metadata", type=click.Path(dir_okay=False),
              help="Row-aligned CSV/Parquet for a .npy file (columns like path/url, caption).")
@click.option("--model-name", default=IMPORTED, show_default=True,
              help="The embedding space, e.g. imagebind_huge. An open_clip name (with --pretrained) keeps text "
                   "search working on the store.")
@click.option("--pretrained", default=IMPORTED, show_default=True, help="The weights the features came from.")
@ann_options
@build_engine_options
@click.option("--wait", is_flag=True,
              help="If another run is writing to the store, wait for it instead of stopping at once.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def import_command(features, store_dir, metadata, model_name, pretrained, ann, engine, ray_address, wait,
                   as_json) -> None:
    """Create or extend a store from features computed elsewhere.

    \b
    FEATURES: a .npy file [N, C]; a folder of .npy shards with matching metadata (clip-retrieval's
    img_emb/img_emb_N.npy + metadata/metadata_N.parquet, and text_emb/text_emb_N.npy as caption
    embeddings); a Parquet file with an embedding column; or a Lance table. Features are
    L2-normalised on import. Every metadata column is kept (path/image_path/url is the row's key,
    caption/text its caption, width and height fill clipdex's own) and can be used in --where. A row already in the store (same path
    or row key) keeps its id: skipped when its features are unchanged, updated when they changed,
    so importing twice changes nothing.

    \b
    Example:
      clipdex import cc3m_imagebind/ --store cc3m.clipdex --model-name imagebind_huge
    """
    has_text_encoder = model_name != IMPORTED and can_load(model_name, pretrained)
    config = ImportConfig(metadata=metadata, model_name=model_name, pretrained=pretrained, ann=ann,
                          has_text_encoder=has_text_encoder, wait=wait,
                          queries=tuning_text_queries(store_dir, model_name, pretrained) if has_text_encoder else {})
    with build_cluster(engine, ray_address) as workers:
        summary = import_features(features, store_dir, config, workers=workers)
    if as_json:
        click.echo(json.dumps(summary.to_dict()))
    else:
        click.echo(f"imported {summary.imported} of {summary.read} features ({summary.updated} updated, "
                   f"{summary.skipped} already there) in {summary.seconds:.1f}s. Store: {summary.count} x "
                   f"{summary.dim}-d '{summary.space}', {summary.index} index"
                   f"{'' if summary.recall_at_10 is None else ', ' + recall_text(summary.recall_at_10, summary.recall, summary.target_met)}.")


@cli.command("export", context_settings=CONTEXT)
@click.option("--store", "store_dir", required=True, type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(allow_dash=True),
              help="A .parquet or .csv file, or a folder for --format clip-retrieval; - writes CSV (or "
                   "--format parquet) to standard output, and the summary to stderr. Never inside the store, "
                   "and never a link, device or FIFO. An s3:// or gs:// URL writes to object storage "
                   "(needs clipdex[cloud]).")
@click.option("--format", "kind", type=click.Choice(list(EXPORT_FORMATS)),
              help="Default: from the extension of --out (csv for -). clip-retrieval writes img_emb/img_emb_N.npy "
                   "(float32), metadata/metadata_N.parquet (image_path, caption, ...) and text_emb/ when every "
                   "row has a caption embedding. faiss (or an .index --out) writes a FAISS index that "
                   "ImageBind-LLM's released code loads as its knn.index (row numbers 0..n-1, reconstruct(i) = row "
                   "i's feature) and NAME.rows.parquet beside it (row -> id, path, caption, metadata).")
@click.option("--columns", help="Comma-separated columns to write (default: all but clipdex's own path_bytes, "
                                "link_target, file_dev, file_ino, file_ctime_ns, etag and the shard offsets; CSV "
                                "leaves the vectors out).")
@click.option("--where", "where", help='Only rows matching this condition, e.g. "width >= 512 AND caption IS NOT NULL".')
@click.option("--shard-rows", default=1_000_000, show_default=True, type=click.IntRange(min=1),
              help="Rows per clip-retrieval shard.")
@click.option("--overwrite", is_flag=True,
              help="Replace --out if it is a regular file (for clip-retrieval: a folder of a previous export).")
@click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
              help="An option for an s3:// or gs:// --out, passed to s3fs or gcsfs (repeatable), as for index.")
@click.option("--index-type", type=click.Choice(list(FAISS_INDEX_TYPES)), default="flat", show_default=True,
              help="--format faiss: flat (IndexFlatIP, exact, written as it streams: any size), hnsw (HNSW32,Flat) "
                   "or ivf (IVF-Flat with a direct map); hnsw and ivf are built in memory.")
@click.option("--index-memory", default="auto", show_default=True,
              help="--format faiss: the most an hnsw or ivf build may hold (512M, 16G; auto: a third of memory).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def export_command(store_dir, out, kind, columns, where, shard_rows, overwrite, storage_options, index_type,
                   index_memory, as_json) -> None:
    """Write the store's rows out: id, path, metadata and embeddings (fixed-size float32 lists).

    \b
    \b
    Streams from one version of the store, so it works at any size and while a writer runs; the
    output appears under its name only when complete.

    \b
    Examples:
      clipdex export --store pictures.clipdex --out pictures.parquet
      clipdex export --store pictures.clipdex --out big.csv --where "width >= 1024" --columns id,path,caption
      clipdex export --store cc3m.clipdex --out cc3m_embeddings --format clip-retrieval
      clipdex export --store pictures.clipdex --out - --columns id,path,caption | grep circle
      clipdex export --store cc3m.clipdex --out s3://bucket/cc3m.parquet
      clipdex export --store cc3m.clipdex --out knn.index        # ImageBind-LLM's cache file
    """
    to_stdout = out == "-"
    store = Store.open(store_dir)
    condition = (parse_filter(where, store.tables.filter_columns(), store.tables.time_columns())
                 if where is not None else None)
    if export_format_for(out, kind) == "faiss":
        if to_stdout or is_url(out) or columns:
            raise InputError("--format faiss writes a local file and its row map (--out knn.index), every column "
                             "of the rows in the map: not standard output, object storage or --columns")
        summary = export_faiss(store, Path(out), index_type, index_memory, condition, overwrite)
        click.echo(json.dumps(asdict(summary)) if as_json else faiss_summary_line(summary))
        return
    config = ExportConfig(out=out if is_url(out) else Path(out), format=export_format_for(out, kind),
                          columns=tuple(c.strip() for c in columns.split(",") if c.strip()) if columns else (),
                          where=condition, overwrite=overwrite, shard_rows=shard_rows,
                          storage_options=parse_storage_options(storage_options))
    if to_stdout and config.format == "parquet" and sys.stdout.isatty():
        raise InputError("Parquet is binary: send standard output to a file or a pipe, or export --format csv")
    try:
        summary = export_store(store, config, stream=sys.stdout.buffer if to_stdout else None)
    except BrokenPipeError:  # the reader of standard output stopped early (| head)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error as Python exits
        raise InputError("standard output was closed before the export finished") from None
    if as_json:
        click.echo(json.dumps(asdict(summary)), err=to_stdout)
    else:
        click.echo(f"exported {summary.rows} rows ({', '.join(summary.columns)}) to {summary.out} as "
                   f"{summary.format}, {summary.bytes / 1e6:.1f} MB in {summary.seconds:.1f}s."
                   + (f" {summary.note}." if summary.note else ""), err=to_stdout)


@cli.command("reindex", context_settings=CONTEXT)
@click.option("--store", "store_dir", required=True, type=click.Path(file_okay=False))
@ann_options
@build_engine_options
@click.option("--wait", is_flag=True,
              help="If another run is writing to the store, wait for it instead of stopping at once.")
@click.option("--json", "as_json", is_flag=True, help="Print the new index's description as JSON.")
def reindex_command(store_dir, ann, engine, ray_address, wait, as_json) -> None:
    """Build the store's index again from its rows.

    \b
    For a store whose last index build died (`clipdex info` says the index is older than the
    table), or to change the index's kind or budget. `index` and `import` also rebuild a stale
    index on their next run.
    """
    manifest = Store.open(store_dir).manifest
    queries = tuning_text_queries(store_dir, manifest.model, manifest.pretrained) if manifest.has_text_encoder else {}
    with build_cluster(engine, ray_address) as workers:
        info = reindex(store_dir, ann, wait, workers, queries)
    if as_json:
        click.echo(json.dumps(asdict(info)))
        return
    recall = "" if info.recall_at_10 is None else f", {recall_text(info.recall_at_10, info.recall, info.target_met)}"
    click.echo(f"indexed {info.count} vectors in {info.build_seconds:.1f}s: {info.type} {info.key} {info.params}"
               f"{recall}")


@cli.command("check", context_settings=CONTEXT)
@click.option("--store", "store_dir", required=True, type=click.Path(file_okay=False))
@click.option("--deep", is_flag=True, help="Also read every row of every fragment (a full scan), which finds bytes "
                                           "overwritten inside a file; without it, sizes and file footers are checked.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check_command(store_dir, deep, as_json) -> None:
    """Check every piece of a store, read-only (like `git fsck`).

    \b
    The manifest (readable, of the right types, agreeing with the table); each Lance table's
    versions, fragments and id index; that ids are unique; the FAISS index, its values, delta and
    query sets (present, readable, of the recorded sizes, built from a version the table has).
    Each problem is listed with what it costs. Exit code 0: nothing damaged (an index out of date
    is reported, not damage); 4: damage found, which `clipdex repair` mends.
    """
    report = check_store(store_dir, deep)
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    else:
        rows = "unknown" if report.rows is None else f"{report.rows:,}"
        click.echo(f"store {report.store}: {rows} rows, table version {report.table_version}, "
                   f"{report.fragments} fragments{' (full scan)' if deep else ''}")
        for problem in report.problems:
            click.echo(f"{problem.severity:<7} {shown(problem.path)}: {problem.what} -> {problem.consequence}")
        damaged = sum(p.severity == DAMAGE for p in report.problems)
        if damaged and not report.repairable:
            click.echo(f"{damaged} damaged, beyond repair: index the store's folders into a new store")
        else:
            click.echo(f"{damaged} damaged: run `clipdex repair --store {store_dir}`" if damaged else
                       "nothing damaged" + (" (see above)" if report.problems else ""))
    if report.damaged:
        raise SystemExit(EXIT_DAMAGED)


@cli.command("repair", context_settings=CONTEXT)
@click.option("--store", "store_dir", required=True, type=click.Path(file_okay=False))
@click.option("--dry-run", is_flag=True, help="Say what would be done, change nothing.")
@click.option("--deep", is_flag=True, help="Find damage by a full scan of every fragment, and delete the rows whose "
                                           "vectors were overwritten (see `check --deep`).")
@click.option("--model", "model_name", help="The store's model, needed only where neither the manifest nor the "
                                            "table records it (a store made before clipdex kept it in the table).")
@click.option("--pretrained", help="With --model: its pretrained tag or checkpoint file.")
@ann_options
@click.option("--wait", is_flag=True,
              help="If another run is writing to the store, wait for it instead of stopping at once.")
@click.option("--json", "as_json", is_flag=True, help="Print what was done as JSON.")
def repair_command(store_dir, dry_run, deep, model_name, pretrained, ann, wait, as_json) -> None:
    """Bring a damaged store back from what it still holds, under the store's writer lock.

    \b
    - table versions that no longer read are moved aside into STORE/damaged/ (nothing is deleted);
    - fragments whose files do not read leave the table, and the rows they held come back from
      the newest version whose files all read; rows no version holds are counted as lost, and
      their paths, where known, listed by `clipdex info --failures` (reason 'lost');
    - a damaged manifest is rebuilt from the copy of the store's identity kept in the table;
    - the FAISS index is built again.
    Then `clipdex index` on the same folders embeds exactly the files whose rows were lost.
    Exit code 0 when repaired (or nothing was damaged), 1 when it cannot be.
    """
    if model_name:
        pretrained = pretrained_label(model_name, pretrained)  # as `index` records it: "bundled", a tag, a path
    report = repair_store(store_dir, RepairConfig(dry_run=dry_run, deep=deep, model=model_name, pretrained=pretrained,
                                                  ann=ann, wait=wait))
    if as_json:
        click.echo(json.dumps(report.to_dict()))
        return
    for line in report.actions:
        click.echo(line)
    if report.lost:
        known = f"; {len(report.lost_paths):,} of their paths listed by `clipdex info --store {store_dir} " \
                "--failures`" if report.lost_paths else ""
        click.echo(f"{'would lose' if dry_run else 'lost'} {report.lost:,} of {report.rows_before:,} rows{known}. "
                   "`clipdex index` on the store's folders (or `clipdex import` of its features) then adds them "
                   "again, and nothing else")


@cli.command("dupes", context_settings=CONTEXT)
@click.option("--store", "store_dir", required=True, type=click.Path(file_okay=False))
@click.option("--threshold", default=DUPES_THRESHOLD, show_default=True, type=click.FloatRange(-1, 1),
              help="Near-duplicates: photos whose embeddings are at least this similar (cosine). The default was "
                   "calibrated on the demo model for precision >= 0.9 (BENCHMARKS.md); see README for other models.")
@click.option("--exact-only", is_flag=True, help="Only files with the same content (same hash).")
@click.option("--where", help="Only among the rows this SQL filter admits, e.g. \"taken_at >= '2024-01-01'\".")
@click.option("--json", "as_json", is_flag=True,
              help='Print [{"kind", "ids", "paths", "bytes", "times", "score", "keep"}] as JSON.')
@click.option("--csv", "as_csv", is_flag=True, help="Print one CSV line per member: group,kind,score,keep,id,path,"
                                                    "bytes,time.")
def dupes_command(store_dir, threshold, exact_only, where, as_json, as_csv) -> None:
    """Groups of duplicate photos: exact copies (the same bytes), then near-duplicates (re-encoded,
    resized, cropped a little, lightly edited, bursts), each with the lowest similarity between two
    of its members and a suggested photo to keep: the largest, then the oldest. Nothing is deleted.

    \b
    Example:
      clipdex dupes --store pictures.clipdex --where "taken_at >= '2024-01-01'" --csv > dupes.csv
    """
    if as_json and as_csv:
        raise InputError("give one of --json and --csv")
    store = Store.snapshot(store_dir)
    condition = (parse_filter(where, store.tables.filter_columns(), store.tables.time_columns())
                 if where is not None else None)
    groups = find_duplicates(store, threshold, exact_only, condition)
    if as_json:
        click.echo(json.dumps([group.to_dict() for group in groups]))
    elif as_csv:
        import csv

        out = csv.writer(click.get_text_stream("stdout"), lineterminator="\n")
        out.writerow(["group", "kind", "score", "keep", "id", "path", "bytes", "time"])
        for number, group in enumerate(groups, 1):
            for row in zip(group.ids, group.paths, group.bytes, group.times):
                out.writerow([number, group.kind, group.score, group.keep, *row])
    else:
        for group in groups:
            click.echo(f"{group.kind:<5} {group.score:.3f}  {len(group.ids)} photos, keep {group.keep}")
            for row_id, path in zip(group.ids, group.paths):
                click.echo(f"  {'*' if row_id == group.keep else ' '} {row_id:>8}  {shown(path)}")
        click.echo(f"{len(groups)} groups ({sum(g.kind == 'exact' for g in groups)} exact), "
                   f"{sum(len(g.ids) - 1 for g in groups)} photos besides the ones to keep", err=True)


@cli.group("cache", context_settings=CONTEXT)
def cache_group() -> None:
    """Top-k cache retrieval with residual feature blending (ImageBind-LLM's cache model)."""


@cache_group.command("query", context_settings=CONTEXT)
@click.option("--store", "store_dir", required=True, type=click.Path(file_okay=False))
@click.option("--queries", "queries_path", required=True, type=click.Path(dir_okay=False),
              help=".npy file of query features [B, C] (or [C]).")
@click.option("-k", "k", default=BLEND.k, show_default=True, type=int, help="Neighbours per query.")
@click.option("--alpha", default=BLEND.alpha, show_default=True, type=float,
              help="Weight of the cache aggregate, in [0, 1].")
@click.option("--weighting", type=click.Choice(list(WEIGHTINGS)), default=BLEND.weighting, show_default=True,
              help="reference: the authors' released code (softmax(t*S), renormalised); paper: eq. 3-4 as printed.")
@click.option("--temperature", default=BLEND.temperature, show_default=True, type=float,
              help="Softmax temperature (reference).")
@click.option("--restore-norm/--unit", default=BLEND.restore_norm, show_default=True,
              help="Scale each blend back to its query's norm, as the authors' image generation path does; "
                   "--unit (the default) writes unit rows, as their LLM path (forward_visual) uses.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="How the cache's values are held in memory: float16 halves the memory and moves a blend by "
                   "about 1e-3; float32 gives the released code's numbers to 1e-5.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Where to write the blended .npy.")
@click.option("--neighbours-out", type=click.Path(dir_okay=False), help="Also write ids and scores as Parquet.")
def cache_query_command(store_dir, queries_path, k, alpha, weighting, temperature, restore_norm, device, dtype,
                        out_path, neighbours_out) -> None:
    """Blend each query feature with its k nearest cache features; write the result as .npy."""
    for out in (out_path, neighbours_out):
        _check_output(out)
    try:
        queries = np.load(os.path.expanduser(queries_path))
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read {queries_path} as a .npy array: {error}") from error
    retriever = CacheRetriever.open(store_dir, device=device, dtype=dtype)
    result = retriever.blend(queries, k=k, alpha=alpha, weighting=weighting, temperature=temperature,
                             restore_norm=restore_norm, return_neighbours=True)
    np.save(os.path.expanduser(out_path), result.features)
    if neighbours_out:
        ids, scores = np.atleast_2d(result.ids), np.atleast_2d(result.scores)
        pq.write_table(pa.table({"query": np.repeat(np.arange(len(ids)), ids.shape[1]),
                                 "rank": np.tile(np.arange(1, ids.shape[1] + 1), len(ids)),
                                 "id": ids.reshape(-1), "score": scores.reshape(-1)}), os.path.expanduser(neighbours_out))
    click.echo(f"blended {np.atleast_2d(queries).shape[0]} queries with k={min(k, retriever.size)} "
               f"({weighting}, alpha {alpha}) -> {out_path}")


@cli.command("serve", context_settings=CONTEXT)
@click.option("--store", "store_dir", required=True, type=click.Path(file_okay=False), help="The store to serve.")
@click.option("--host", default=ServeConfig.host, show_default=True,
              help="Address to listen on; only this machine can connect unless you give 0.0.0.0 or an "
                   "interface's address.")
@click.option("--port", default=ServeConfig.port, show_default=True, type=click.IntRange(1, 65535))
@click.option("--api-key", envvar="CLIPDEX_API_KEY",
              help="Require this key (X-API-Key header, Authorization: Bearer, or the web page's prompt) on every "
                   "endpoint but /health. Env: CLIPDEX_API_KEY (keeps it out of the process list).")
@click.option("--max-k", default=ServeConfig.max_k, show_default=True, type=click.IntRange(min=1),
              help="Largest k a request may ask for.")
@click.option("--max-batch", default=ServeConfig.max_batch, show_default=True, type=click.IntRange(min=1),
              help="Most queries in one /cache/blend request.")
@click.option("--max-body-mb", default=ServeConfig.max_body_bytes / MIB, show_default=True,
              type=click.FloatRange(min=0.001), help="Largest request body (uploads, base64 images, query batches).")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME",
              help="Also answer requests whose Host header is NAME (repeatable; '*' for any). Others are refused: "
                   "that stops web pages from reaching the API through DNS rebinding.")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              help="Let pages from ORIGIN (e.g. https://app.example) call the API from a browser (repeatable). "
                   "Requests that browsers send for pages of any other site are refused. '*' (any site) "
                   "needs --api-key.")
@click.option("--access-log", metavar="FILE", help="Append one line per request to FILE ('-': standard output).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@precision_option("the queries")
def serve_command(store_dir, host, port, api_key, max_k, max_batch, max_body_mb, allow_hosts, cors_origins, access_log,
                  device, precision) -> None:
    """Serve a store over HTTP: the search page at /, the API described at /openapi.json.

    The server follows the store: when `clipdex index` publishes a new version, it is served from
    the next request on, without a restart.

    \b
    Example:
      clipdex serve --store clipdex-demo/store
      curl -s localhost:8000/search -H 'Content-Type: application/json' -d '{"text": "a red circle", "k": 3}'
    """
    from server import create_app, serve  # start-up time: FastAPI and uvicorn load only for `serve`
    from server.security import check_cors_origins, open_access_log  # as above (create_app checks too)

    if api_key is not None and not api_key.strip():
        raise InputError("--api-key is empty: give a key, or leave the option out")
    check_cors_origins(tuple(cors_origins), api_key)
    if access_log and access_log != "-":
        _check_output(access_log)
        open_access_log(access_log).close()
    config = ServeConfig(store=Path(store_dir), host=host, port=port, api_key=api_key, max_k=max_k,
                         max_batch=max_batch, max_body_bytes=int(max_body_mb * MIB), device=device,
                         precision=precision,
                         allow_hosts=tuple(allow_hosts), cors_origins=tuple(cors_origins), access_log=access_log)
    _check_port_free(host, port)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: listening on {host} without --api-key: anyone who can reach it can search this store",
                   err=True)
    if host in ("0.0.0.0", "::") and not allow_hosts:
        click.echo("warning: other machines reach this server under a name or address: give it with --allow-host "
                   "(requests under any other Host are refused)", err=True)
    app = create_app(config)
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"serving {store_dir} on http://{shown}:{port}/  (API: http://{shown}:{port}/openapi.json; Ctrl-C stops)")
    serve(config, app)


def _check_output(path: str | None) -> None:
    """Refuse an output file in a folder that does not exist before any work is done."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(os.path.expanduser(path)))
    if not os.path.isdir(folder):
        raise InputError(f"cannot write {path}: the folder {folder} does not exist")


def _size(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def _check_port_free(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise InputError(f"--host {host} is not an address of this machine: {error.strerror}") from error
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            raise InputError(f"cannot listen on {host}:{port}: {error.strerror}; pick another --port or --host") from error


def _explain_store_errors(group: click.Group) -> None:
    """Every command that takes --store: what the storage libraries raise on a damaged store
    becomes one line naming the damaged file and `clipdex repair` (store/damage.py)."""
    for command in group.commands.values():
        if isinstance(command, click.Group):
            _explain_store_errors(command)
        elif any(param.name == "store_dir" for param in command.params):
            command.callback = _explained(command.callback)


def _explained(callback: Callable) -> Callable:
    @functools.wraps(callback)
    def run(*args, **kwargs):
        with explained(kwargs["store_dir"]):
            return callback(*args, **kwargs)

    return run


_explain_store_errors(cli)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a service manager, `kill`, a job's time limit), raised where Ctrl-C would be."""


def _terminate(signum, frame) -> None:
    raise Terminated


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: one line per error, never a traceback. Exit codes: 0 ok, 1 failed, 2 usage,
    3 finished but some paths were unavailable (their rows kept), 4 the store is damaged (`clipdex
    repair`), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM)."""
    # SIGTERM takes the path Ctrl-C takes: the run stops between commits, the store keeps its last
    # one and says so, instead of the process vanishing without a word.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        code = cli.main(args=argv, prog_name="clipdex", standalone_mode=False)
    except click.UsageError as error:
        hint = f" (see '{error.ctx.command_path} --help')" if error.ctx else ""
        click.echo(f"error: {error.format_message()}{hint}", err=True)
        sys.exit(error.exit_code)
    except click.ClickException as error:
        click.echo(f"error: {error.format_message()}", err=True)
        sys.exit(error.exit_code)
    except ClipdexError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(EXIT_DAMAGED if isinstance(error, DamagedStoreError) else 1)
    except OSError as error:  # a full disk, a read-only folder, a file that vanished: the OS's words
        click.echo(f"error: {shown(os_error_line(error))}", err=True)
        sys.exit(1)
    except (click.Abort, KeyboardInterrupt) as error:
        terminated = isinstance(error, Terminated) or isinstance(error.__cause__, Terminated)  # click wraps it
        click.echo(f"{'terminated' if terminated else 'interrupted'}: a store being written keeps its last "
                   "commit; run the same command again to finish", err=True)
        sys.exit(143 if terminated else 130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
