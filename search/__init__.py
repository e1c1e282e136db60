"""clipdex search: text/image queries, cache retrieval with blending, zero-shot tools, quality measures."""

from search.blend import WEIGHTINGS, blend_paper, blend_reference
from search.cache import Blended, CacheRetriever
from search.labelsets import LABEL_SETS, get_label_set
from search.quality import precision_at_k, shapes_library_quality, store_quality, zero_shot_accuracy
from search.query import Query, Term, parse_term
from search.zeroshot import DEFAULT_TEMPLATE, LabelScore, check_template, classify, classify_features, clean_labels, similarity
from store.errors import ClipdexError, InputError

__all__ = [
    "DEFAULT_TEMPLATE", "LABEL_SETS", "WEIGHTINGS", "Blended", "CacheRetriever", "ClipdexError", "InputError", "LabelScore", "Query", "Term", "blend_paper", "blend_reference", "check_template", "classify", "classify_features",
    "clean_labels", "get_label_set", "parse_term", "precision_at_k", "shapes_library_quality", "similarity",
    "store_quality",
    "zero_shot_accuracy",
]
