"""Keyword search over captions beside the vector search, fused by reciprocal rank fusion.

Captions carry what an image embedding does not: a name, a product code, a rare word. The store's
full-text (BM25) index on ``caption`` (``store.tables.Tables.full_text``) answers the words; the
vector index answers the meaning; each result's fused score is the sum over the rankings it is in
of ``1 / (RRF_K + rank)`` (Cormack, Clarke and Büttcher, 2009), which needs no calibration between
a BM25 score and a cosine.
"""

from __future__ import annotations

from typing import Sequence

MODES = ("vector", "hybrid", "fts")  # what a search ranks by: the embedding, both fused, the caption's words
RRF_K = 60  # the paper's constant, and LanceDB's RRFReranker default
HYBRID_DEPTH = 50  # candidates each side contributes at least (2 x k where that is more)
# Caption matches scored under this share of the best match's BM25 matched only words that nearly
# every caption has ("lot" in "lot 48000" where each caption names its lot): ranks carry no weight,
# so without this they would rank every caption, by noise, against the vector's ranking.
KEYWORD_FLOOR = 0.1


def informative(ids: Sequence[int], bm25: Sequence[float]) -> list[int]:
    """The caption matches (best first) that score at least KEYWORD_FLOOR of the best one."""
    best = max(bm25, default=0.0)
    return [item for item, score in zip(ids, bm25) if score >= KEYWORD_FLOOR * best]


def rrf(*rankings: Sequence[int], k: int = RRF_K) -> list[int]:
    """Ids ordered by reciprocal rank fusion of *rankings* (each best first); ties keep the order
    in which the ids first appear (the vector ranking is given first)."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, 1):
            fused[item] = fused.get(item, 0.0) + 1.0 / (k + rank)
    first = {item: i for i, item in enumerate(dict.fromkeys(item for ranking in rankings for item in ranking))}
    return sorted(fused, key=lambda item: (-fused[item], first[item]))
