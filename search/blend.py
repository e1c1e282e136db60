"""Residual feature blending of ImageBind-LLM's cache model (arXiv 2309.03905, §3.2.3), two ways.

Given a query F_M ``[B, C]`` and its top-k cache neighbours (cosine scores S ``[B, k]`` and values
F_value ``[B, k, C]``; in the cache keys = values = L2-normalised image features):

``paper`` (eq. 3-4, exactly as printed; the query is L2-normalised first, q = F_M / ||F_M||)::

    out = alpha * sum_j S_j * F_value_j + (1 - alpha) * q

The weights are the raw cosines, the aggregate is not normalised and the output is not rescaled.

``reference`` (the authors' released code)::

    q   = F_M / ||F_M||
    w   = softmax(temperature * S)                  (temperature 20)
    agg = normalise(sum_j w_j * F_value_j)
    out = normalise(alpha * agg + (1 - alpha) * q) * ||F_M||

Free functions over torch tensors (float32 math, any device) that take the queries already split
into unit directions and norms; validation is the caller's job.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

Weighting = Literal["paper", "reference"]
WEIGHTINGS: tuple[str, ...] = ("paper", "reference")


@dataclass(frozen=True)
class BlendParams:
    """One blend request's settings; the defaults are what ``clipdex cache query``, the Python API
    and the HTTP API use."""

    k: int = 10
    alpha: float = 0.5
    weighting: Weighting = "paper"
    temperature: float = 20.0

    def astuple(self) -> tuple:
        return astuple(self)


def blend_paper(unit: "torch.Tensor", scores: "torch.Tensor", values: "torch.Tensor", alpha: float) -> "torch.Tensor":
    """eq. 4 as printed, on unit queries q (so the output never depends on the query's scale)."""
    import torch

    aggregate = torch.einsum("bk,bkc->bc", scores, values)
    return alpha * aggregate + (1.0 - alpha) * unit


def blend_reference(unit: "torch.Tensor", norm: "torch.Tensor", scores: "torch.Tensor", values: "torch.Tensor",
                    alpha: float, temperature: float) -> "torch.Tensor":
    """The released code's blend of unit queries q, scaled back to the query norms ``[B, 1]``."""
    import torch

    weights = torch.softmax(temperature * scores, dim=-1)
    aggregate = torch.nn.functional.normalize(torch.einsum("bk,bkc->bc", weights, values), dim=-1)
    return torch.nn.functional.normalize(alpha * aggregate + (1.0 - alpha) * unit, dim=-1) * norm


def blend(unit: "torch.Tensor", norm: "torch.Tensor", scores: "torch.Tensor", values: "torch.Tensor", alpha: float,
          weighting: Weighting, temperature: float) -> "torch.Tensor":
    """*unit*: the queries divided by their norms *norm* ``[B, 1]`` (computed in float64 by the
    caller, so tiny queries keep their direction); validation is the caller's job."""
    if weighting == "paper":
        return blend_paper(unit, scores, values, alpha)
    return blend_reference(unit, norm, scores, values, alpha, temperature)
