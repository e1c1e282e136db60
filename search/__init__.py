"""clipdex search: text/image queries, cache retrieval with blending, zero-shot tools, metrics."""

from search.blend import WEIGHTINGS, BlendParams, blend_paper, blend_reference
from search.cache import Blended, CacheRetriever
from search.labelsets import LABEL_SETS, get_label_set
from search.metrics import precision_at_k, zero_shot_accuracy
from search.query import Query, TermEncoder
from search.terms import Term, check_k, check_text, parse_term, vector_term
from search.zeroshot import (
    DEFAULT_TEMPLATE,
    LabelScore,
    check_template,
    classify,
    classify_features,
    clean_labels,
    similarity,
)

__all__ = [
    "DEFAULT_TEMPLATE", "LABEL_SETS", "WEIGHTINGS", "BlendParams", "Blended", "CacheRetriever", "LabelScore", "Query",
    "Term", "TermEncoder", "blend_paper", "blend_reference", "check_k", "check_template", "check_text", "classify",
    "classify_features", "clean_labels", "get_label_set", "parse_term", "precision_at_k", "similarity", "vector_term",
    "zero_shot_accuracy",
]
