"""Residual feature blending of ImageBind-LLM's cache model (arXiv 2309.03905, §3.2.3), two ways.

Given a query F_M ``[B, C]`` and its top-k cache neighbours (cosine scores S ``[B, k]`` and values
F_value ``[B, k, C]``; in the cache keys = values = L2-normalised image features):

``paper`` (eq. 3-4, exactly as printed; the query is L2-normalised first, q = F_M / ||F_M||)::

    out = alpha * sum_j S_j * F_value_j + (1 - alpha) * q

The weights are the raw cosines, the aggregate is not normalised and the output is not rescaled.

``reference`` (the authors' released code, the default)::

    q   = F_M / ||F_M||
    w   = softmax(temperature * S)                  (temperature 20)
    agg = normalise(sum_j w_j * F_value_j)
    out = normalise(alpha * agg + (1 - alpha) * q)

``restore_norm`` multiplies either output by ||F_M||. The released code does both: its LLM path
(LLaMA-Adapter ``imagebind_LLM/llama/llama_adapter.py``, ``forward_visual``) feeds the unit blend
to the model, so the default is off; its image generation path (``image_generate.py``) scales the
blend back to the query's norm, which ``restore_norm=True`` gives.

Free functions over numpy arrays or torch tensors (float32 math, any device) that take the queries
already split into unit directions and norms; validation is the caller's job.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass
from typing import Literal

Weighting = Literal["paper", "reference"]
WEIGHTINGS: tuple[str, ...] = ("paper", "reference")


@dataclass(frozen=True)
class BlendParams:
    """One blend request's settings; the defaults are what ``clipdex cache query``, the Python API
    and the HTTP API use."""

    k: int = 10
    alpha: float = 0.5
    weighting: Weighting = "reference"
    temperature: float = 20.0
    restore_norm: bool = False

    def astuple(self) -> tuple:
        return astuple(self)


def array_module(array):
    """numpy or torch, whichever *array* belongs to. The formulas below are written once for both:
    numpy runs a CPU batch of numpy queries with a third of torch's per-operation overhead (what a
    batch-1 blend costs, next to the search), torch runs them on CUDA."""
    import numpy as np

    if isinstance(array, np.ndarray):
        return np
    import torch

    return torch


def weighted_sum(weights, values):
    """sum_j w_j F_value_j: ``[B, k] x [B, k, C] -> [B, C]``, each library's fastest way on a CPU
    (measured at batch 1-64: numpy's stacked matmul loops in C without BLAS, 50x slower than einsum;
    torch's einsum costs more than a batched matmul)."""
    import numpy as np

    if array_module(weights) is np:
        return np.einsum("bk,bkc->bc", weights, values)
    return (weights[:, None, :] @ values)[:, 0, :]


def unit_rows(rows):
    """Rows divided by their L2 norms (eps 1e-12, as torch.nn.functional.normalize)."""
    xp = array_module(rows)
    norms = xp.sqrt(xp.sum(rows * rows, axis=-1, keepdims=True))
    return rows / xp.where(norms > 1e-12, norms, 1e-12)  # (np.clip costs 4x this at batch 1)


def softmax(x):
    xp = array_module(x)
    e = xp.exp(x - xp.amax(x, axis=-1, keepdims=True))
    return e / xp.sum(e, axis=-1, keepdims=True)


def blend_paper(unit, scores, values, alpha: float):
    """eq. 4 as printed, on unit queries q (so the output never depends on the query's scale)."""
    return alpha * weighted_sum(scores, values) + (1.0 - alpha) * unit


def blend_reference(unit, scores, values, alpha: float, temperature: float):
    """The released code's blend of unit queries q (a unit vector per query)."""
    aggregate = unit_rows(weighted_sum(softmax(temperature * scores), values))
    return unit_rows(alpha * aggregate + (1.0 - alpha) * unit)


def blend(unit, norm, scores, values, alpha: float, weighting: Weighting, temperature: float,
          restore_norm: bool = False):
    """*unit*: the queries divided by their norms *norm* ``[B, 1]`` (computed in float64 by the
    caller, so tiny queries keep their direction); numpy arrays or torch tensors, float32, one
    kind throughout. Validation is the caller's job."""
    if weighting == "paper":
        out = blend_paper(unit, scores, values, alpha)
    else:
        out = blend_reference(unit, scores, values, alpha, temperature)
    return out * norm if restore_norm else out
