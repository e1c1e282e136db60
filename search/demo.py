"""`clipdex demo`: the whole product on the bundled model and a generated library, offline."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

DEMO_MODEL = "clipdex-shapes"
DEMO_SEED = 7  # the bundled model was trained on seed 0: the demo library is unseen data


def demo_lines(directory: Path, count: int, write_library: Callable[[Path, int, int], Path]) -> Iterator[str]:
    """Run the demo step by step, yielding what to show the user."""
    from indexer.models import load_model
    from indexer.shapes import SHAPES, read_labels
    from search.plots import plot_classification, plot_similarity
    from search.quality import shapes_library_quality
    from search.zeroshot import classify, similarity
    from indexer.images import load_image

    labels_path = directory / "labels.csv"
    if labels_path.is_file():
        yield f"1. reusing the demo library in {directory}"
    else:
        write_library(directory, count, DEMO_SEED)
        yield f"1. generated {count} images of coloured shapes in {directory} (labels in {labels_path})"
    rows = read_labels(labels_path)

    model = load_model(DEMO_MODEL)
    yield f"2. loaded the bundled model {DEMO_MODEL}: {model.embed_dim}-d embeddings, {model.image_size[0]}px input"

    samples = [next(r for r in rows if r["shape"] == shape) for shape in SHAPES]
    pictures = [load_image(r["path"]) for r in samples]
    texts = [f"a {r['colour']} {r['shape']}" for r in samples]
    sims = similarity(model, pictures, texts)
    names = [Path(r["path"]).name for r in samples]
    yield "3. clipdex compare: cosine similarity, texts x images (the diagonal should win each row)"
    width = max(map(len, texts))
    yield " " * width + "".join(f"  {n:>16}" for n in names)
    for text, row in zip(texts, sims):
        yield f"{text:<{width}}" + "".join(f"  {v:>16.3f}" for v in row)
    plot_similarity(sims, pictures, texts, directory / "compare.png")

    results = classify(model, pictures, list(SHAPES), k=2)
    yield '4. clipdex classify: zero-shot "a photo of a {}" over the four shapes'
    for name, sample, top in zip(names, samples, results):
        guesses = ", ".join(f"{s.label} {s.prob:.0%}" for s in top)
        yield f"   {name}: {guesses}   (truth: {sample['shape']})"
    plot_classification(pictures, results, names, directory / "classify.png")
    yield f"   plots: {directory / 'compare.png'}, {directory / 'classify.png'}"

    quality = shapes_library_quality(model, rows)
    yield (f"5. quality on all {quality['images']} images: text->image precision@5 "
           f"{quality['precision_at_5']:.3f} over {quality['queries']} 'a {{colour}} {{shape}}' queries, "
           f"zero-shot shape accuracy {quality['zero_shot_shape']:.3f}")
