"""Request and response bodies of the HTTP API: strict (unknown fields, NaN and infinities refused),
so a malformed request is a 4xx with a message before any work is done."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from search.blend import BlendParams
from search.filters import MAX_LENGTH as MAX_FILTER_LENGTH
from search.query import DEFAULT_K
from search.zeroshot import DEFAULT_TEMPLATE, DEFAULT_TOP_K

Finite = Annotated[float, Field(allow_inf_nan=False)]
Weight = Annotated[float, Field(allow_inf_nan=False, ge=-100, le=100)]
ImageId = Annotated[int, Field(ge=0, le=2**63 - 1, description="A stable image id of this store.")]
Text = Annotated[str, Field(max_length=2000)]  # emptiness is the query's check (one message, one status)
Embedding = Annotated[list[Finite], Field(min_length=1, max_length=8192)]
SOURCES = ("text", "image", "id", "embedding")
MinScore = Annotated[float | None, Field(ge=-1, le=1, allow_inf_nan=False, description=(
    "Only results whose cosine similarity is at least this (still at most k)."))]
SortColumn = Annotated[str | None, Field(max_length=128, pattern=r"^-?[A-Za-z_][A-Za-z0-9_]*$", description=(
    "Order the results by this column, '-' for descending (e.g. \"-mtime\"), ties by score; with min_score, "
    "every match above it is ordered and the first k returned."), examples=["-mtime"])]


class Strict(BaseModel):
    """JSON bodies: unknown fields refused, and no coercion ("5" and true are not numbers)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class FormFields(BaseModel):
    """Multipart bodies: every field arrives as text, so numbers are parsed from it."""

    model_config = ConfigDict(extra="forbid")


class Source(Strict):
    """Exactly one of ``text``, ``image`` (base64 file content), ``id`` or ``embedding``."""

    text: Text | None = None
    image: str | None = Field(None, description="An image file (JPEG, PNG, ...) as base64, or a data: URL.")
    id: ImageId | None = None
    embedding: Embedding | None = Field(None, description="A vector of the store's dimension (see /info).")

    @model_validator(mode="after")
    def _exactly_one(self) -> "Source":
        given = [name for name in SOURCES if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(SOURCES)}; got {', '.join(given) or 'none'}")
        return self


class Term(Source):
    weight: Weight = 1.0


class SearchRequest(Source):
    add: list[Term] = Field(default_factory=list, max_length=16, description="Terms added to the query.")
    subtract: list[Term] = Field(default_factory=list, max_length=16, description="Terms subtracted from it.")
    k: int = Field(DEFAULT_K, description="How many results, at least 1 (at most the server's max_k, see /info).")
    where: str | None = Field(None, max_length=MAX_FILTER_LENGTH,
                              description="A SQL prefilter on the metadata columns, e.g. \"width > 500\".",
                              examples=["width > 100 AND path LIKE '%beach%'"])
    min_score: MinScore = None
    sort: SortColumn = None
    hybrid: bool = Field(False, description="Also rank by the captions' words (BM25), fused by reciprocal rank; "
                                            "needs a text.")
    fts: bool = Field(False, description="Rank by the captions' words alone (BM25; score is BM25's); needs a text.")

    model_config = ConfigDict(json_schema_extra={"examples": [{"text": "a red circle", "k": 5}]})


class SearchForm(FormFields):
    """``POST /search`` as a multipart upload: ``-F image=@photo.jpg [-F k=5] [-F where=...]``."""

    image: bytes = Field(description="An image file (JPEG, PNG, ...).")
    k: int = DEFAULT_K
    where: str | None = Field(None, max_length=MAX_FILTER_LENGTH)
    min_score: MinScore = None
    sort: SortColumn = None


class Hit(BaseModel):
    id: int
    path: str
    score: float
    width: int | None
    height: int | None
    caption: str | None
    taken_at: datetime | None = Field(None, description="When the photo was taken (EXIF), in UTC.")
    camera_make: str | None = None
    camera_model: str | None = None
    lens: str | None = None
    gps_latitude: float | None = Field(None, description="Decimal degrees, negative south.")
    gps_longitude: float | None = Field(None, description="Decimal degrees, negative west.")


class DuplicateGroup(BaseModel):
    kind: Literal["exact", "near"] = Field(description="exact: the same bytes; near: embeddings at least the threshold "
                                                       "similar")
    ids: list[int] = Field(description="Members, the suggested keeper first.")
    paths: list[str]
    bytes: list[int | None]
    times: list[str | None] = Field(description="When each was taken (EXIF), else its file's mtime, ISO 8601 UTC.")
    score: float = Field(description="The lowest cosine between two members.")
    keep: int = Field(description="The suggested photo to keep: the largest, then the oldest.")


class ClassifyRequest(Strict):
    image: str | None = Field(None, description="An image file as base64 (or a data: URL).")
    id: ImageId | None = None
    labels: list[Text] = Field(min_length=1, max_length=1000)
    template: str = Field(DEFAULT_TEMPLATE, min_length=2, max_length=500, description="Must contain {}.")
    k: int = DEFAULT_TOP_K

    @model_validator(mode="after")
    def _one_image(self) -> "ClassifyRequest":
        if (self.image is None) == (self.id is None):
            raise ValueError("give exactly one of image, id")
        return self

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "examples": [{"id": 1, "labels": ["circle", "square", "star"], "k": 2}]})


class ClassifyForm(FormFields):
    """``POST /classify`` as a multipart upload: ``-F image=@photo.jpg -F labels=cat -F labels=dog``."""

    image: bytes = Field(description="An image file (JPEG, PNG, ...).")
    labels: list[Text] = Field(min_length=1, max_length=1000)
    template: str = Field(DEFAULT_TEMPLATE, min_length=2, max_length=500, description="Must contain {}.")
    k: int = DEFAULT_TOP_K


class LabelProb(BaseModel):
    label: str
    prob: float


class BlendRequest(Strict):
    queries: list[Embedding] = Field(min_length=1, description="Query features [B, C], any norm.")
    k: int = Field(BlendParams.k,
                   description="Neighbours per query, at least 1 (at most max_k; clamped to the cache size).")
    alpha: float = Field(BlendParams.alpha, ge=0.0, le=1.0, allow_inf_nan=False)
    weighting: Literal["paper", "reference"] = BlendParams.weighting
    temperature: float = Field(BlendParams.temperature, gt=0, le=1e4, allow_inf_nan=False,
                               description="Softmax temperature of the 'reference' weighting.")
    restore_norm: bool = Field(BlendParams.restore_norm,
                               description="Scale each blend back to its query's norm (the authors' image "
                                           "generation path); off: unit rows, as their LLM path uses.")
    return_neighbours: bool = False


class BlendResponse(BaseModel):
    features: list[list[float]]
    k: int = Field(description="Neighbours used per query.")
    ids: list[list[int]] | None = None
    scores: list[list[float]] | None = None


class Health(BaseModel):
    status: Literal["ok"]
    version: int = Field(description="The store version being served.")
    count: int


class ErrorBody(BaseModel):
    error: str


ERROR_RESPONSES = {code: {"model": ErrorBody} for code in (400, 401, 404, 413, 422, 503)}
