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

Free functions over torch tensors (float32 math, any device); validation is the caller's job.
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


def blend_paper(queries: "torch.Tensor", scores: "torch.Tensor", values: "torch.Tensor", alpha: float) -> "torch.Tensor":
    import torch

    q = torch.nn.functional.normalize(queries, dim=-1)
    aggregate = torch.einsum("bk,bkc->bc", scores, values)
    return alpha * aggregate + (1.0 - alpha) * q


def blend_reference(queries: "torch.Tensor", scores: "torch.Tensor", values: "torch.Tensor", alpha: float,
                    temperature: float) -> "torch.Tensor":
    import torch

    norm = queries.norm(dim=-1, keepdim=True)
    q = queries / norm
    weights = torch.softmax(temperature * scores, dim=-1)
    aggregate = torch.nn.functional.normalize(torch.einsum("bk,bkc->bc", weights, values), dim=-1)
    return torch.nn.functional.normalize(alpha * aggregate + (1.0 - alpha) * q, dim=-1) * norm


def blend(queries: "torch.Tensor", scores: "torch.Tensor", values: "torch.Tensor", alpha: float,
          weighting: Weighting, temperature: float) -> "torch.Tensor":
    if weighting == "paper":
        return blend_paper(queries, scores, values, alpha)
    return blend_reference(queries, scores, values, alpha, temperature)
