"""What a user asks for, checked once for every way in (Python, CLI, HTTP): query terms, the
empty-text rule and the limits on k. Each mistake is an :class:`InputError` with one message, so
the CLI prints the same line and the server answers the same 400 whoever made it."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from encoder.images import is_image_path
from store.errors import InputError

if TYPE_CHECKING:
    from PIL import Image

SOURCES = ("text", "image", "picture", "id", "vector")


def check_text(text: str, what: str = "the search text") -> str:
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{what} is empty")
    return text


def check_k(k: Any, maximum: int | None = None) -> int:
    """*k* as an int in [1, maximum]; strings, booleans and fractions are refused, not coerced."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise InputError(f"k must be a whole number, got {k!r}")
    if k < 1:
        raise InputError(f"k must be at least 1, got {k}")
    if maximum is not None and k > maximum:
        raise InputError(f"k={k} is above the maximum of {maximum}")
    return int(k)


def check_min_score(score: Any) -> float | None:
    """A relevance cut-off as a cosine in [-1, 1], or None for none; strings and NaN refused."""
    if score is None:
        return None
    if isinstance(score, bool) or not isinstance(score, (int, float, np.integer, np.floating)):
        raise InputError(f"min_score must be a number, got {score!r}")
    if not -1.0 <= float(score) <= 1.0:  # NaN fails this too
        raise InputError(f"min_score is a cosine similarity, between -1 and 1; got {score}")
    return float(score)


@dataclass(frozen=True, eq=False)
class Term:
    """One weighted part of a query: exactly one of a text, an image file path, a decoded picture
    (an upload), a stored image's id, or a raw vector."""

    weight: float = 1.0
    text: str | None = None
    image: str | None = None
    picture: "Image.Image | None" = None
    id: int | None = None
    vector: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        given = [name for name in SOURCES if getattr(self, name) is not None]
        if len(given) != 1:
            raise InputError(f"a query term needs exactly one of {', '.join(SOURCES)}; "
                             f"got {', '.join(given) or 'none'}")
        if not math.isfinite(self.weight):
            raise InputError(f"a term's weight must be a finite number, got {self.weight}")
        if self.text is not None:
            check_text(self.text)

    def negated(self) -> "Term":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Term(**{**values, "weight": -self.weight})

    def describe(self) -> str:
        what = (self.text if self.text is not None else self.image if self.image is not None
                else f"<id {self.id}>" if self.id is not None else "<image>" if self.picture is not None
                else "<vector>")
        return f"{self.weight:g}:{what}"


def parse_term(spec: str, weight: float = 1.0) -> Term:
    """A term as the CLI writes it: ``cat``, ``2:cat``, ``0.5:~/photo.jpg``, ``-1:red``.

    ``W:`` must be a number; a colon followed by a space is text (``"note: cat"``). A term that
    looks like a path (ends in an image extension, or starts with ``/``, ``./``, ``../`` or ``~``)
    must name an existing image file; anything else is text.
    """
    head, sep, tail = spec.partition(":")
    if sep and not tail[:1].isspace():
        if not head.strip():
            raise InputError(f"'{spec}': nothing before the colon; write WEIGHT:TERM, e.g. 2:sunset")
        try:
            weight, spec = weight * float(head), tail
        except ValueError:
            raise InputError(f"'{spec}': the weight '{head}' is not a number; write WEIGHT:TERM, e.g. 2:sunset, "
                             "or put a space after the colon to search for the text") from None
        if not math.isfinite(weight):
            raise InputError(f"the weight '{head}' must be a finite number")
    if not spec.strip():
        raise InputError("a query term is empty: give some text or an image path")
    if _looks_like_path(spec):
        path = os.path.expanduser(spec)
        if not os.path.isfile(path):
            raise InputError(f"no such image file: {spec}")
        return Term(weight, image=path)
    return Term(weight, text=spec)


def _looks_like_path(spec: str) -> bool:
    return is_image_path(spec.strip()) or spec.startswith(("/", "./", "../", "~"))


def vector_term(values: Any, weight: float = 1.0) -> Term:
    """A term from raw numbers; values beyond float32 become inf and are refused with a message."""
    with np.errstate(over="ignore"):
        vector = np.asarray(values, np.float32).reshape(-1)
    if not np.isfinite(vector).all():
        raise InputError("embedding values must be finite float32 numbers (|x| < 3.4e38)")
    return Term(weight, vector=tuple(vector.tolist()))
