"""The seed tutorial's model-only tools: image x text similarity and zero-shot classification."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from search.terms import check_k, check_text
from store.errors import InputError

if TYPE_CHECKING:
    from PIL import Image

    from encoder.model import ClipModel

DEFAULT_TEMPLATE = "a photo of a {}"
DEFAULT_TOP_K = 5  # labels shown per image
# CLIP's learned logit scale saturates at 100; the tutorial uses it as a fixed temperature.
LOGIT_SCALE = 100.0


@dataclass(frozen=True)
class LabelScore:
    label: str
    prob: float


def clean_labels(labels: Sequence[str]) -> list[str]:
    """Strip, drop empties and duplicates (first one wins); an empty result is an error."""
    seen: dict[str, None] = {}
    for label in labels:
        if label.strip():
            seen.setdefault(label.strip(), None)
    if not seen:
        raise InputError("the label list is empty: give at least one label")
    return list(seen)


def check_template(template: str) -> str:
    if "{}" not in template:
        raise InputError(f"the template must contain '{{}}' where the label goes, e.g. \"{DEFAULT_TEMPLATE}\"; got \"{template}\"")
    return template


def similarity(model: "ClipModel", images: Sequence["Image.Image"], texts: Sequence[str]) -> np.ndarray:
    """Cosine similarity ``[len(texts), len(images)]`` (rows texts, columns images)."""
    if not texts:
        raise InputError("give at least one text")
    for text in texts:
        check_text(text, "a text to compare")
    return model.encode_texts(texts) @ model.encode_images(images).T


def classify(model: "ClipModel", images: Sequence["Image.Image"], labels: Sequence[str],
             template: str = DEFAULT_TEMPLATE, k: int = DEFAULT_TOP_K) -> list[list[LabelScore]]:
    """Top-*k* labels per image with probabilities softmax(100 * cosine)."""
    _check_request(labels, template, k)  # before the costly image encoding
    return classify_features(model, model.encode_images(images), labels, template, k)


def classify_features(model: "ClipModel", features: np.ndarray, labels: Sequence[str],
                      template: str = DEFAULT_TEMPLATE, k: int = DEFAULT_TOP_K) -> list[list[LabelScore]]:
    """:func:`classify` for image features already embedded (``[n, dim]``, L2-normalised)."""
    labels, template = _check_request(labels, template, k)
    class_embeddings = model.encode_texts([template.replace("{}", label) for label in labels])
    logits = LOGIT_SCALE * np.asarray(features, np.float32) @ class_embeddings.T
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :min(k, len(labels))]
    return [[LabelScore(labels[j], float(row[j])) for j in order] for row, order in zip(probs, top)]


def _check_request(labels: Sequence[str], template: str, k: int) -> tuple[list[str], str]:
    check_k(k)
    return clean_labels(labels), check_template(template)
