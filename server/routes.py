"""The API endpoints. The work runs in FastAPI's thread pool (plain ``def`` handlers, or
``run_in_threadpool`` after reading a body), and each request takes one snapshot of the store at
its start and uses only that one."""

from __future__ import annotations

import mimetypes
import os
from importlib import resources
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Path, Request
from fastapi import Query as Param
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from search.blend import BlendParams
from search.dupes import DEFAULT_THRESHOLD, find_duplicates
from search.filters import MAX_LENGTH as MAX_FILTER_LENGTH
from search.filters import parse_filter
from search.query import Query
from search.terms import Term, vector_term
from search.zeroshot import classify_features
from server.blending import BlendJob
from server.bodies import body_openapi, read_body
from server.context import ServerContext, stored_row
from server.media import image_from_base64, image_from_upload, open_indexed, served_size, thumbnail
from server.schemas import (
    ERROR_RESPONSES,
    BlendRequest,
    BlendResponse,
    ClassifyForm,
    ClassifyRequest,
    DuplicateGroup,
    ErrorBody,
    Health,
    Hit,
    LabelProb,
    SearchForm,
    SearchRequest,
    Source,
)
from server.security import PageAccess, page_access
from store.errors import InputError
from store.tables import IDENTITY_COLUMNS, PHOTO_COLUMNS, SHARD_COLUMNS

# Routes that need the API key (when one is set); /health and the page are on `public`.
router = APIRouter(responses=ERROR_RESPONSES)
public = APIRouter()
ImageIdPath = Annotated[int, Path(ge=0, le=2**63 - 1, description="A stable image id of this store.")]
HIT_COLUMNS = ("id", "path", "width", "height", "caption", *PHOTO_COLUMNS)
SERVED_COLUMNS = ["path", "path_bytes", "link_target", "bytes", "mtime", "hash", *IDENTITY_COLUMNS, *SHARD_COLUMNS]


def context(request: Request) -> ServerContext:
    return request.app.state.context


Context = Annotated[ServerContext, Depends(context)]


@public.get("/health", response_model=Health, summary="Liveness; needs no API key")
def health(ctx: Context) -> dict:
    snapshot = ctx.live.current()
    return {"status": "ok", "version": snapshot.version, "count": snapshot.store.manifest.index.count}


@public.get("/", include_in_schema=False)
def page(access: Annotated[PageAccess, Depends(page_access)]) -> Response:
    """The search page; with a key set, a visitor without it gets the key prompt, and ``/?key=KEY``
    trades the key for a cookie (and drops it from the address bar)."""
    if access.granted:
        return HTMLResponse(_asset("index.html"))
    if access.cookie is not None:
        response = RedirectResponse("/", status_code=303)
        access.cookie.set_on(response)
        return response
    return HTMLResponse(_asset("key.html"), status_code=401)


@router.get("/info", summary="The manifest being served")
def info(ctx: Context) -> dict[str, Any]:
    snapshot, config = ctx.live.current(), ctx.config
    limits = {"max_k": config.max_k, "max_batch": config.max_batch, "max_body_bytes": config.max_body_bytes}
    return {"store": str(snapshot.store.directory), "serving_version": snapshot.version,
            **snapshot.store.manifest.to_dict(), "limits": limits}


@router.get("/openapi.json", include_in_schema=False)
def openapi(request: Request) -> dict[str, Any]:
    return request.app.openapi()


@router.post("/search", response_model=list[Hit], summary="Search by text, image, id or embedding",
             openapi_extra=body_openapi(SearchRequest, SearchForm))
async def search(request: Request, ctx: Context) -> list[dict]:
    """Nearest images to the query, best first.

    JSON: exactly one of ``text``, ``image`` (base64), ``id`` or ``embedding``; ``add``/``subtract``
    terms move the query vector (normalize(sum of weight x term)); ``where`` restricts the candidates
    with SQL before the search; ``min_score`` drops results below a cosine similarity; ``sort`` orders them by a
    column (``-mtime``: newest first). Multipart: an ``image`` file, with ``k``, ``where``, ``min_score``, ``sort``.
    """
    body = await read_body(request, SearchRequest, SearchForm)
    return await run_in_threadpool(_search, ctx, body)


def _search(ctx: ServerContext, body: SearchRequest | SearchForm) -> list[dict]:
    snapshot = ctx.live.current()
    query = Query(snapshot.store, columns=HIT_COLUMNS, encoder=ctx.encoder.for_snapshot(snapshot))
    query = query.limit(body.k, maximum=ctx.config.max_k)
    if isinstance(body, SearchForm):
        query = query.add(Term(picture=image_from_upload(body.image, ctx.config.max_image_pixels)))
    else:
        query = query.add(_term(ctx, body))
        for term in body.add:
            query = query.add(_term(ctx, term, term.weight))
        for term in body.subtract:
            query = query.subtract(_term(ctx, term, term.weight))
    if body.where is not None:
        query = query.where(body.where)
    query = query.min_score(body.min_score).sort(body.sort)
    if isinstance(body, SearchRequest):
        if body.hybrid and body.fts:
            raise InputError("give one of hybrid (words and meaning) and fts (words only)")
        query = query.full_text() if body.fts else query.hybrid(body.hybrid)
    return query.to_list()


@router.get("/duplicates", response_model=list[DuplicateGroup], summary="Groups of duplicate photos")
def duplicates(ctx: Context, threshold: Annotated[float, Param(ge=-1, le=1, allow_inf_nan=False)] = DEFAULT_THRESHOLD,
               exact_only: bool = False,
               where: Annotated[str | None, Param(max_length=MAX_FILTER_LENGTH)] = None) -> list[dict]:
    """Exact copies (the same bytes) and near-duplicates (embeddings at least ``threshold`` similar),
    each group with its members (the suggested keeper first), as ``clipdex dupes --json`` gives them.
    Every row's neighbours are searched: about a minute at 1M rows."""
    store = ctx.live.current().store
    condition = parse_filter(where, store.tables.filter_columns(), store.tables.time_columns()) if where else None
    return [group.to_dict() for group in find_duplicates(store, threshold, exact_only, condition)]


@router.get("/images/{image_id}", response_class=StreamingResponse, summary="The indexed file itself",
            responses={200: {"content": {"image/*": {}}}, 410: {"model": ErrorBody}})
def image_file(image_id: ImageIdPath, ctx: Context) -> StreamingResponse:
    """Only a row's own file is served (see ``open_indexed``): the id is looked up, no path comes
    from the URL, and a file swapped or changed since indexing is refused with 410."""
    snapshot = ctx.live.current()
    row = stored_row(snapshot, image_id, SERVED_COLUMNS)
    handle = open_indexed(row, snapshot.store.manifest.roots, snapshot.store.manifest.content_hash)
    name = os.fsdecode(row["link_target"]) if row["link_target"] is not None else row["path"]
    return StreamingResponse(_chunks(handle), media_type=mimetypes.guess_type(name)[0] or "application/octet-stream",
                             headers={"Content-Length": str(served_size(handle))})


@router.get("/thumbnails/{image_id}", response_class=Response, summary="A JPEG thumbnail, cached in the store",
            responses={200: {"content": {"image/jpeg": {}}}, 410: {"model": ErrorBody}})
def image_thumbnail(image_id: ImageIdPath, ctx: Context) -> Response:
    snapshot = ctx.live.current()
    row = stored_row(snapshot, image_id, SERVED_COLUMNS)
    with open_indexed(row, snapshot.store.manifest.roots, snapshot.store.manifest.content_hash) as handle:
        made = thumbnail(snapshot.store.directory, handle, row["hash"], ctx.config.thumbnail_size, row["path"])
    return Response(made, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})


def _chunks(handle, size: int = 1 << 16):
    with handle:
        while chunk := handle.read(size):
            yield chunk


@router.post("/classify", response_model=list[LabelProb], summary="Zero-shot classification of one image",
             openapi_extra=body_openapi(ClassifyRequest, ClassifyForm))
async def classify(request: Request, ctx: Context) -> list[dict]:
    """softmax(100 x cosine) over ``template`` filled with each label; the top ``k``. JSON: a stored
    image's ``id`` or a base64 ``image``; multipart: an ``image`` file and repeated ``labels``."""
    body = await read_body(request, ClassifyRequest, ClassifyForm)
    return await run_in_threadpool(_classify, ctx, body)


def _classify(ctx: ServerContext, body: ClassifyRequest | ClassifyForm) -> list[dict]:
    ctx.check_k(body.k)
    snapshot = ctx.live.current()
    if isinstance(body, ClassifyRequest) and body.id is not None:
        term = Term(id=body.id)
    else:
        term = Term(picture=image_from_upload(body.image, ctx.config.max_image_pixels)
                    if isinstance(body, ClassifyForm) else image_from_base64(body.image, ctx.config.max_image_pixels))
    features = Query(snapshot.store, (term,), encoder=ctx.encoder.for_snapshot(snapshot)).vector()
    model = ctx.encoder.model(snapshot)
    with ctx.encoder.lock:
        ranked = classify_features(model, features[None, :], body.labels, body.template, body.k)[0]
    return [{"label": s.label, "prob": s.prob} for s in ranked]


@router.post("/cache/blend", response_model=BlendResponse, summary="Top-k cache retrieval with residual blending")
def cache_blend(body: BlendRequest, ctx: Context) -> dict:
    """ImageBind-LLM's cache: each query's k nearest stored features are blended into it
    (``weighting`` "reference", the default: the authors' released code; "paper": eq. 3-4 of
    arXiv 2309.03905; ``restore_norm``: scaled back to each query's norm)."""
    ctx.check_k(body.k)
    if len(body.queries) > ctx.config.max_batch:
        raise InputError(f"{len(body.queries)} queries is above this server's maximum batch of {ctx.config.max_batch}")
    cache = ctx.live.current().cache()
    lengths = {len(row) for row in body.queries}
    if lengths != {cache.dim}:
        raise InputError(f"every query must have {cache.dim} values (this store's dimension); "
                         f"got {', '.join(str(n) for n in sorted(lengths))}")
    with np.errstate(over="ignore"):  # beyond float32 becomes inf, which check() refuses with a message
        queries = np.asarray(body.queries, np.float32)
    params = BlendParams(min(body.k, cache.size), body.alpha, body.weighting, body.temperature, body.restore_norm)
    cache.check(queries, *params.astuple())  # here, so one bad request never fails the batch it would join
    out = ctx.blender(BlendJob(cache, queries, params))
    neighbours = {"ids": out.ids.tolist(), "scores": out.scores.tolist()} if body.return_neighbours else {}
    return {"features": out.features.tolist(), "k": params.k, **neighbours}


def _term(ctx: ServerContext, source: Source, weight: float = 1.0) -> Term:
    """A JSON term as a query term; every check on it is the query's own."""
    if source.image is not None:
        return Term(weight, picture=image_from_base64(source.image, ctx.config.max_image_pixels))
    if source.embedding is not None:
        return vector_term(source.embedding, weight)
    return Term(weight, text=source.text, id=source.id)


def _asset(name: str) -> str:
    return resources.files("server").joinpath("static", name).read_text(encoding="utf-8")
