"""Synthetic photo library of coloured shapes: the demo data and the demo model's training set.

Every sample is drawn from its own seeded stream ``default_rng([seed, index])``, so sample *i*
of seed *s* is the same image whatever the worker count, and a library generated with another
seed shares no sample with the training set.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 25),
    "green": (35, 160, 55),
    "cyan": (25, 195, 215),
    "blue": (30, 60, 215),
    "purple": (130, 45, 185),
    "pink": (250, 125, 190),
}
SHAPES = ("circle", "square", "triangle", "star")
# Anchor of each position as a fraction of the central square that centre-crop keeps.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
    "center": (0.5, 0.5),
}
BACKGROUNDS: dict[str, int] = {"white": 238, "gray": 128, "black": 18}

LABEL_FIELDS = ("path", "colour", "shape", "position", "background", "caption")


@dataclass(frozen=True)
class ShapeLabel:
    colour: str
    shape: str
    position: str
    background: str

    @property
    def caption(self) -> str:
        place = "in the center" if self.position == "center" else f"in the {self.position}"
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.shape} on a {self.background} background {place}"


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners, radii = 4, [r * 1.05] * 4
    elif shape == "triangle":
        corners, radii = 3, [r * 1.2] * 3
    else:  # star: alternate outer and inner radius
        corners, radii = 10, [r * 1.25 if i % 2 == 0 else r * 0.5 for i in range(10)]
    return [
        (cx + radii[i] * math.cos(angle + 2 * math.pi * i / corners),
         cy + radii[i] * math.sin(angle + 2 * math.pi * i / corners))
        for i in range(corners)
    ]


def render(rng: np.random.Generator, size: tuple[int, int]) -> tuple[Image.Image, ShapeLabel]:
    """Draw one random sample of the given pixel size (width, height)."""
    width, height = size
    label = ShapeLabel(
        colour=str(rng.choice(list(COLOURS))),
        shape=str(rng.choice(SHAPES)),
        position=str(rng.choice(list(POSITIONS))),
        background=str(rng.choice(list(BACKGROUNDS))),
    )
    base = BACKGROUNDS[label.background]
    # A soft vertical gradient plus grain, so backgrounds are not flat like clip-art.
    gradient = np.linspace(-12, 12, height)[:, None, None] * rng.uniform(-1, 1)
    grain = rng.normal(0, 6, size=(height, width, 3))
    pixels = np.clip(base + gradient + grain, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")

    # Shapes live inside the central square, which is what resize + centre-crop keeps.
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    fx, fy = POSITIONS[label.position]
    jitter = rng.uniform(-0.05, 0.05, size=2)
    cx, cy = left + (fx + jitter[0]) * side, top + (fy + jitter[1]) * side
    radius = side * rng.uniform(0.11, 0.18)
    colour = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLOURS[label.colour])

    draw = ImageDraw.Draw(image)
    if label.shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
    else:
        draw.polygon(_polygon(label.shape, cx, cy, radius, rng.uniform(0, 2 * math.pi)), fill=colour)
    return image, label


def sample_size(rng: np.random.Generator, short_side: tuple[int, int]) -> tuple[int, int]:
    short = int(rng.integers(short_side[0], short_side[1] + 1))
    aspect = rng.uniform(0.75, 1.33)
    return (short, int(short * aspect)) if aspect > 1 else (int(short / aspect), short)


def sample(seed: int, index: int, short_side: tuple[int, int] = (96, 640)) -> tuple[Image.Image, ShapeLabel]:
    """Sample *index* of library *seed*: the same image on every machine and worker count."""
    rng = np.random.default_rng([seed, index])
    return render(rng, sample_size(rng, short_side))


def jpeg_roundtrip(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def iter_library(count: int, seed: int) -> Iterator[tuple[str, Image.Image, ShapeLabel, dict]]:
    """Yield (relative path, image, label, save options) for a library of *count* files."""
    for index in range(count):
        image, label = sample(seed, index)
        fmt_rng = np.random.default_rng([seed, index, 1])
        if fmt_rng.random() < 0.7:
            ext, options = "jpg", {"format": "JPEG", "quality": int(fmt_rng.integers(70, 96))}
        else:
            ext, options = "png", {"format": "PNG"}
        yield f"part-{index // 250:03d}/shape_{index:05d}.{ext}", image, label, options


def write_library(directory: str | Path, count: int, seed: int, progress=None) -> Path:
    """Write *count* images and ``labels.csv`` under *directory*; returns the labels file."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    labels_path = root / "labels.csv"
    with open(labels_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LABEL_FIELDS)
        writer.writeheader()
        for relative, image, label, options in iter_library(count, seed):
            target = root / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            image.save(target, **options)
            writer.writerow({"path": relative, **asdict(label), "caption": label.caption})
            if progress is not None:
                progress(1)
    return labels_path


def write_lot_captions(labels_path: str | Path, captions_path: str | Path, first: int = 10_000,
                       step: int = 7) -> dict[str, tuple[str, str, str]]:
    """A captions file (path, caption) for a library written by :func:`write_library`, each caption
    naming a lot number that no image shows ("..., lot 10007"): words only a caption carries, as
    a data team's product photos have. Returns {absolute path: (colour, shape, lot)}."""
    labels_path = Path(labels_path)
    truth = {}
    with open(labels_path) as handle, open(captions_path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["path", "caption"])
        for index, row in enumerate(csv.DictReader(handle)):
            path, lot = str(labels_path.parent / row["path"]), str(first + step * index)
            writer.writerow([path, f"{row['caption']}, lot {lot}"])
            truth[path] = (row["colour"], row["shape"], lot)
    return truth


def read_labels(labels_path: str | Path) -> list[dict[str, str]]:
    """Rows of a ``labels.csv`` with ``path`` made absolute."""
    labels_path = Path(labels_path)
    with open(labels_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["path"] = str(labels_path.parent / row["path"])
    return rows
