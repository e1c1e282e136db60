"""`clipdex demo`: the whole product on the bundled model and a generated library, offline."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

from demo.plots import plot_classification, plot_similarity
from demo.quality import store_quality
from demo.shapes import SHAPES, read_labels, write_library
from encoder import MODELS, load_image
from indexer import IndexConfig, index_paths
from search import Query, classify, similarity
from store import InputError, Store

DEMO_MODEL = "clipdex-shapes"
DEMO_SEED = 7  # the bundled model was trained on seed 0: the demo library is unseen data
DEMO_COUNT = 300
DEMO_DIR = "clipdex-demo"
TEXT_QUERIES = ("a red circle", "a blue star", "a green triangle")


def write_demo_library(directory: Path, count: int, seed: int = DEMO_SEED,
                       progress: Callable[[int], object] | None = None) -> Path:
    """A new demo library in *directory*, which must be empty or new (nothing is overwritten)."""
    if directory.exists() and any(directory.iterdir()):
        raise InputError(f"{directory} is not empty: choose a new directory so nothing in it is overwritten")
    return write_library(directory, count, seed, progress=progress)


def demo_lines(directory: Path, count: int,
               write: Callable[[Path, int, int], Path] = write_demo_library) -> Iterator[str]:
    """Run the demo step by step, yielding what to show the user; *write* makes the library
    (the CLI's draws a progress bar)."""
    directory = directory.resolve()  # the store records absolute paths; compare like with like
    library, store_dir = directory / "library", directory / "store"
    labels_path = library / "labels.csv"
    if labels_path.is_file():
        yield f"1. reusing the demo library in {library}"
    else:
        write(library, count, DEMO_SEED)
        yield f"1. generated {count} images of coloured shapes in {library} (truth in {labels_path})"
    rows = read_labels(labels_path)
    truth = {row["path"]: row for row in rows}

    summary = index_paths([library], store_dir, IndexConfig(model=DEMO_MODEL, captions=(str(labels_path),)))
    yield (f"2. clipdex index {library} --store {store_dir} --model {DEMO_MODEL}\n"
           f"   {summary.embedded} embedded, {summary.unchanged} unchanged, {summary.failed} failed in "
           f"{summary.seconds:.1f}s; {summary.index} index, recall@10 {summary.recall_at_10:.3f}")

    store = Store.open(store_dir)
    for text in TEXT_QUERIES:
        hits = Query.create(store, text).limit(3).to_list()
        yield f'3. clipdex search "{text}" -k 3   (✓ = the picture really is a {text[2:]})'
        for hit in hits:
            row = truth.get(hit["path"], {})
            mark = "✓" if f"a {row.get('colour')} {row.get('shape')}" == text else "✗"
            yield f"   {mark} {hit['score']:.3f}  {Path(hit['path']).relative_to(library)}  ({row.get('caption', '?')})"

    example = rows[0]
    hits = Query.create(store, image=example["path"]).limit(4).to_list()[1:]
    shown = Path(example["path"]).relative_to(library)
    yield f"4. clipdex search --image {shown}  ({example['caption']}): nearest others"
    for hit in hits:
        yield f"   {hit['score']:.3f}  {truth.get(hit['path'], {}).get('caption', hit['path'])}"

    hits = Query.create(store, "a yellow square").where("width > 500").limit(3).to_list()
    yield '5. clipdex search "a yellow square" --where "width > 500"'
    for hit in hits:
        yield f"   {hit['score']:.3f}  {hit['width']}x{hit['height']}  {truth.get(hit['path'], {}).get('caption', '')}"

    model = MODELS.for_manifest(store.manifest)
    samples = [next(r for r in rows if r["shape"] == shape) for shape in SHAPES]
    pictures = [load_image(r["path"]) for r in samples]
    names = [Path(r["path"]).name for r in samples]
    texts = [f"a {r['colour']} {r['shape']}" for r in samples]
    plot_similarity(similarity(model, pictures, texts), pictures, texts, directory / "compare.png")
    results = classify(model, pictures, list(SHAPES), k=1)
    plot_classification(pictures, results, names, directory / "classify.png")
    right = sum(top[0].label == r["shape"] for top, r in zip(results, samples))
    yield (f"6. clipdex classify --labels {','.join(SHAPES)}: {right}/4 sample shapes right; "
           f"plots in {directory / 'compare.png'} and {directory / 'classify.png'}")

    quality = store_quality(store, rows)
    yield (f"7. quality on all {quality['images']} images: text->image precision@5 {quality['precision_at_5']:.3f} "
           f"over {quality['queries']} 'a {{colour}} {{shape}}' queries, zero-shot shape accuracy "
           f"{quality['zero_shot_shape']:.3f}")

    info = store.manifest
    yield (f"8. clipdex info --store {store_dir}\n   {info.model} ({info.pretrained}), {info.dim}-d, "
           f"{info.count} images, {info.failures} failures, {info.index.type} index, "
           f"recall@10 {info.index.recall_at_10:.3f}")
    yield f'Try: clipdex search "a pink star" --store {store_dir}'
    yield f"Or serve it: clipdex serve --store {store_dir}   (then open http://127.0.0.1:8000/)"
