"""The API endpoints. The work runs in FastAPI's thread pool (plain ``def`` handlers, or
``run_in_threadpool`` after reading a body), and each request takes one snapshot of the store at
its start and uses only that one."""

from __future__ import annotations

import mimetypes
import os
from pathlib import Path as FilePath
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from search.query import Query, Term
from search.zeroshot import classify_features
from server.blending import BlendJob, BlendParams
from server.bodies import body_openapi, read_body
from server.context import ServerContext, stored_embedding, stored_row
from server.media import image_from_base64, image_from_upload, thumbnail
from server.schemas import (ERROR_RESPONSES, BlendRequest, BlendResponse, ClassifyForm, ClassifyRequest, Hit,
                            LabelProb, SearchForm, SearchRequest, Source)
from store.errors import ImageError, InputError, NotFoundError

router = APIRouter(responses=ERROR_RESPONSES)
ImageIdPath = Annotated[int, Path(ge=0, le=2**63 - 1, description="A stable image id of this store.")]
HIT_COLUMNS = ("id", "path", "width", "height", "caption")


def context(request: Request) -> ServerContext:
    return request.app.state.context


Context = Annotated[ServerContext, Depends(context)]


@router.post("/search", response_model=list[Hit], summary="Search by text, image, id or embedding",
             openapi_extra=body_openapi(SearchRequest, SearchForm))
async def search(request: Request, ctx: Context) -> list[dict]:
    """Nearest images to the query, best first.

    JSON: exactly one of ``text``, ``image`` (base64), ``id`` or ``embedding``; ``add``/``subtract``
    terms move the query vector (normalize(sum of weight x term)); ``where`` restricts the candidates
    with SQL before the search. Multipart: an ``image`` file, with ``k`` and ``where``.
    """
    body = await read_body(request, SearchRequest, SearchForm)
    return await run_in_threadpool(_search, ctx, body)


def _search(ctx: ServerContext, body: SearchRequest | SearchForm) -> list[dict]:
    ctx.check_k(body.k)
    snapshot = ctx.live.current()
    if isinstance(body, SearchForm):
        vector = ctx.encoder.images(snapshot, [image_from_upload(body.image, ctx.config.max_image_pixels)])[0]
        return _run(snapshot, [Term(1.0, vector=tuple(vector.tolist()))], body.k, body.where)
    terms = [_term(ctx, snapshot, body, 1.0)]
    terms += [_term(ctx, snapshot, term, term.weight) for term in body.add]
    terms += [_term(ctx, snapshot, term, -term.weight) for term in body.subtract]
    return _run(snapshot, terms, body.k, body.where)


@router.get("/images/{image_id}", response_class=FileResponse, summary="The indexed file itself",
            responses={200: {"content": {"image/*": {}}}})
def image_file(image_id: ImageIdPath, ctx: Context) -> FileResponse:
    """Only files recorded in the store are served: the id is looked up, no path comes from the URL."""
    path = stored_row(ctx.live.current(), image_id, ["path"])["path"]
    if not FilePath(path).is_file():
        raise NotFoundError(f"image {image_id} was indexed from {path}, which is no longer there")
    if not os.access(path, os.R_OK):
        raise NotFoundError(f"image {image_id} is at {path}, which the server is not allowed to read")
    return FileResponse(path, media_type=mimetypes.guess_type(path)[0] or "application/octet-stream")


@router.get("/thumbnails/{image_id}", response_class=Response, summary="A JPEG thumbnail, cached in the store",
            responses={200: {"content": {"image/jpeg": {}}}})
def image_thumbnail(image_id: ImageIdPath, ctx: Context) -> Response:
    snapshot = ctx.live.current()
    row = stored_row(snapshot, image_id, ["path", "hash"])
    try:
        made = thumbnail(snapshot.store.directory, row["path"], row["hash"], ctx.config.thumbnail_size)
    except ImageError as error:
        if error.reason == "missing":
            raise NotFoundError(f"image {image_id} was indexed from {row['path']}, which is no longer there") from error
        raise
    headers = {"Cache-Control": "private, max-age=86400"}
    if isinstance(made, bytes):
        return Response(made, media_type="image/jpeg", headers=headers)
    return FileResponse(made, media_type="image/jpeg", headers=headers)


@router.post("/classify", response_model=list[LabelProb], summary="Zero-shot classification of one image",
             openapi_extra=body_openapi(ClassifyRequest, ClassifyForm))
async def classify(request: Request, ctx: Context) -> list[dict]:
    """softmax(100 x cosine) over ``template`` filled with each label; the top ``k``. JSON: a stored
    image's ``id`` or a base64 ``image``; multipart: an ``image`` file and repeated ``labels``."""
    body = await read_body(request, ClassifyRequest, ClassifyForm)
    return await run_in_threadpool(_classify, ctx, body)


def _classify(ctx: ServerContext, body: ClassifyRequest | ClassifyForm) -> list[dict]:
    snapshot = ctx.live.current()
    if isinstance(body, ClassifyRequest) and body.id is not None:
        features = stored_embedding(snapshot, body.id)
    else:
        image = image_from_upload(body.image, ctx.config.max_image_pixels) if isinstance(body, ClassifyForm) \
            else image_from_base64(body.image, ctx.config.max_image_pixels)
        features = ctx.encoder.images(snapshot, [image])[0]
    model = ctx.encoder.model(snapshot)
    with ctx.encoder.lock:
        ranked = classify_features(model, features[None, :], body.labels, body.template, body.k)[0]
    return [{"label": s.label, "prob": s.prob} for s in ranked]


@router.post("/cache/blend", response_model=BlendResponse, summary="Top-k cache retrieval with residual blending")
def cache_blend(body: BlendRequest, ctx: Context) -> dict:
    """ImageBind-LLM's cache: each query's k nearest stored features are blended into it
    (``weighting`` "paper": eq. 3-4 of arXiv 2309.03905; "reference": the authors' released code)."""
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
    params = BlendParams(min(body.k, cache.size), body.alpha, body.weighting, body.temperature)
    cache.check(queries, *params)  # here, so one bad request never fails the batch it would join
    out = ctx.blender(BlendJob(cache, queries, params))
    neighbours = {"ids": out.ids.tolist(), "scores": out.scores.tolist()} if body.return_neighbours else {}
    return {"features": out.features.tolist(), "k": params.k, **neighbours}


def _term(ctx: ServerContext, snapshot, source: Source, weight: float) -> Term:
    if source.text is not None:
        if not source.text.strip():
            raise InputError("the search text is empty")
        vector = ctx.encoder.text(snapshot, source.text)
    elif source.image is not None:
        vector = ctx.encoder.images(snapshot, [image_from_base64(source.image, ctx.config.max_image_pixels)])[0]
    elif source.id is not None:
        vector = stored_embedding(snapshot, source.id)
    else:
        with np.errstate(over="ignore"):
            vector = np.asarray(source.embedding, np.float32)
        if not np.isfinite(vector).all():
            raise InputError("embedding values must be finite float32 numbers (|x| < 3.4e38)")
    return Term(weight, vector=tuple(vector.tolist()))


def _run(snapshot, terms: list[Term], k: int, where: str | None) -> list[dict]:
    query = Query(snapshot.store, terms=tuple(terms), k=k, columns=HIT_COLUMNS)
    if where is not None:
        query = query.where(where)
    return query.to_list()

