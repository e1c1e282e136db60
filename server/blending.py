"""/cache/blend requests batched together: one torch call for every request that arrived while the
previous batch ran, instead of dozens of threads contending for the cores with tiny ops."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from search.blend import BlendParams
from search.cache import Blended, CacheRetriever


class BlendJob(NamedTuple):
    cache: CacheRetriever  # requests on different store versions never share a call
    queries: np.ndarray  # [b, C], already checked with cache.check
    params: BlendParams


def blend_jobs(jobs: list[BlendJob]) -> list[Blended]:
    """Each job's (features, ids, scores), computed one call per (cache, params) group."""
    groups: dict[tuple[int, BlendParams], list[int]] = {}
    for position, job in enumerate(jobs):
        groups.setdefault((id(job.cache), job.params), []).append(position)
    results: list[Blended | None] = [None] * len(jobs)
    for positions in groups.values():
        first = jobs[positions[0]]
        queries = np.concatenate([jobs[p].queries for p in positions])
        out = first.cache.blend(queries, *first.params.astuple(), return_neighbours=True)
        start = 0
        for p in positions:
            end = start + len(jobs[p].queries)
            results[p] = Blended(out.features[start:end], out.ids[start:end], out.scores[start:end])
            start = end
    return results
