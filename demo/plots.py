"""Pictures of what compare and classify computed, for people who would rather look than read."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

    from search.zeroshot import LabelScore


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_similarity(similarity: np.ndarray, images: Sequence["Image.Image"], texts: Sequence[str],
                    out: str | Path) -> Path:
    """Heatmap (rows texts, columns images) with each image's thumbnail above its column."""
    plt = _pyplot()
    n_texts, n_images = similarity.shape
    fig, ax = plt.subplots(figsize=(2 + 1.6 * n_images, 1.8 + 0.6 * n_texts + 1.6))
    ax.imshow(similarity, vmin=float(similarity.min()), vmax=float(similarity.max()), cmap="viridis")
    ax.set_yticks(range(n_texts), labels=list(texts))
    ax.set_xticks([])
    for i, image in enumerate(images):
        ax.imshow(image, extent=(i - 0.5, i + 0.5, -1.6, -0.6), origin="upper")
    middle = (similarity.max() + similarity.min()) / 2
    for (row, col), value in np.ndenumerate(similarity):
        ax.text(col, row, f"{value:.2f}", ha="center", va="center",
                color="black" if value > middle else "white", fontsize=9)
    ax.set_xlim(-0.5, n_images - 0.5)
    ax.set_ylim(n_texts - 0.5, -1.7)
    ax.set_title("cosine similarity between text and image features")
    for side in ("left", "top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    return _save(fig, out)


def plot_classification(images: Sequence["Image.Image"], results: Sequence[Sequence["LabelScore"]],
                        names: Sequence[str], out: str | Path) -> Path:
    """One row per image: the picture beside a bar chart of its top-k labels."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(images), 2, figsize=(8, 2.6 * len(images)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1.6]})
    for (picture, bars), image, top, name in zip(axes, images, results, names):
        picture.imshow(image)
        picture.set_title(name, fontsize=9)
        picture.axis("off")
        positions = np.arange(len(top))
        bars.barh(positions, [score.prob for score in top], color="tab:blue")
        bars.set_yticks(positions, labels=[score.label for score in top])
        bars.invert_yaxis()
        bars.set_xlim(0, 1)
        bars.set_xlabel("probability")
    return _save(fig, out)


def _save(fig, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    _pyplot().close(fig)
    return out
