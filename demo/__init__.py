"""clipdex demo: the synthetic shapes library, the end-to-end demo, its quality measures and plots.
Nothing in the product depends on it."""

from demo.plots import plot_classification, plot_similarity
from demo.quality import shapes_library_quality, store_quality
from demo.runner import DEMO_COUNT, DEMO_DIR, DEMO_MODEL, DEMO_SEED, demo_lines, write_demo_library
from demo.shapes import COLOURS, SHAPES, ShapeLabel, read_labels, sample, write_library

__all__ = [
    "COLOURS",
    "DEMO_COUNT",
    "DEMO_DIR",
    "DEMO_MODEL",
    "DEMO_SEED",
    "SHAPES",
    "ShapeLabel",
    "demo_lines",
    "plot_classification",
    "plot_similarity",
    "read_labels",
    "sample",
    "shapes_library_quality",
    "store_quality",
    "write_demo_library",
    "write_library",
]
