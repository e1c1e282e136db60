"""Built-in label sets for zero-shot classification, by name."""

from __future__ import annotations

from encoder.prompts import CIFAR100

# Names as prompts: CIFAR's underscores read better as spaces ("a photo of a lawn mower").
LABEL_SETS: dict[str, tuple[str, ...]] = {
    "cifar100": tuple(name.replace("_", " ") for name in CIFAR100),
}


def get_label_set(name: str) -> tuple[str, ...] | None:
    return LABEL_SETS.get(name.lower())
