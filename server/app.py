"""The FastAPI application: wiring, the API key, errors as ``{"error": ...}`` JSON, and the web page."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import APIKeyHeader
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from server.config import ServeConfig
from server.context import Encoder, ServerContext
from server.live import LiveStore
from server.routes import context, router
from server.bodies import add_component_schemas
from server.schemas import ERROR_RESPONSES, ClassifyForm, ClassifyRequest, Health, SearchForm, SearchRequest
from server.security import KEY_COOKIE, KEY_HEADER, BodyLimit, key_matches, presented_key
from store.errors import ClipdexError, InputError, NotFoundError

LOG = logging.getLogger(__name__)
KEY_MISSING = f"missing or wrong API key: send it in the {KEY_HEADER} header (or Authorization: Bearer KEY)"


def create_app(config: ServeConfig, live: LiveStore | None = None) -> FastAPI:
    """The app for one store. *live* defaults to a :class:`LiveStore` on ``config.store``."""
    live = live or LiveStore(config.store, config.refresh_seconds, config.device, config.metadata_cache_rows)
    ctx = ServerContext(config, live, Encoder(config.device))
    if live.current().store.manifest.has_text_encoder:
        ctx.encoder.model(live.current())  # load now: fail at start, not on the first query

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        live.start()
        yield
        live.stop()

    app = FastAPI(title="clipdex", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None, description="Search and cache retrieval over one clipdex store.")
    app.state.context = ctx
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    _install_error_handlers(app)
    guard = _key_guard(config.api_key)

    @app.get("/health", response_model=Health, summary="Liveness; needs no API key")
    def health() -> dict:
        snapshot = live.current()
        return {"status": "ok", "version": snapshot.version, "count": snapshot.store.manifest.index.count}

    @app.get("/info", dependencies=[guard], responses=ERROR_RESPONSES, summary="The manifest being served")
    def info(ctx: ServerContext = Depends(context)) -> dict[str, Any]:
        snapshot = ctx.live.current()
        limits = {"max_k": config.max_k, "max_batch": config.max_batch, "max_body_bytes": config.max_body_bytes}
        return {"store": str(snapshot.store.directory), "serving_version": snapshot.version,
                **snapshot.store.manifest.to_dict(), "limits": limits}

    generate = app.openapi

    def openapi_with_bodies() -> dict[str, Any]:
        if app.openapi_schema is None:  # generate() fills it in; the bodies read by hand go in once
            add_component_schemas(generate(), [SearchRequest, SearchForm, ClassifyRequest, ClassifyForm])
        return app.openapi_schema

    app.openapi = openapi_with_bodies  # type: ignore[method-assign]

    @app.get("/openapi.json", dependencies=[guard], include_in_schema=False)
    def openapi() -> dict[str, Any]:
        return app.openapi()

    @app.get("/", include_in_schema=False)
    def page(request: Request, key: str | None = None) -> Response:
        if config.api_key is None or key_matches(config.api_key, presented_key(request.headers, request.cookies)):
            return HTMLResponse(_asset("index.html"))
        if key is not None and key_matches(config.api_key, key):
            response = RedirectResponse("/", status_code=303)  # drop the key from the address bar
            response.set_cookie(KEY_COOKIE, key, httponly=True, samesite="strict")
            return response
        return HTMLResponse(_asset("key.html"), status_code=401)

    app.include_router(router, dependencies=[guard])
    return app


def _key_guard(expected: str | None) -> Any:
    header = APIKeyHeader(name=KEY_HEADER, auto_error=False, description="The key given to --api-key.")

    def require_key(request: Request, _: str | None = Security(header)) -> None:
        if not key_matches(expected, presented_key(request.headers, request.cookies)):
            raise HTTPException(401, KEY_MISSING, headers={"WWW-Authenticate": "Bearer"})

    def open_door() -> None:
        return None

    # The schema declares the key only where one is needed.
    return Depends(require_key if expected is not None else open_door)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ClipdexError)
    async def clipdex_error(_: Request, error: ClipdexError) -> JSONResponse:
        status = 404 if isinstance(error, NotFoundError) else 400 if isinstance(error, InputError) else 503
        return JSONResponse({"error": str(error)}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": validation_message(error.errors())}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(ClientDisconnect)
    async def gone(_: Request, __: ClientDisconnect) -> JSONResponse:  # nobody left to answer; not a fault
        return JSONResponse({"error": "the client disconnected before sending the whole body"}, status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        LOG.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": "internal error; the server log has the details"}, status_code=500)


def validation_message(errors: Any) -> str:
    """Pydantic's error list as one line: ``k: Input should be greater than or equal to 1; ...``."""
    parts = []
    for error in list(errors)[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path", "form"))
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts) or "invalid request"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("clipdex")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def _asset(name: str) -> str:
    return resources.files("server").joinpath("static", name).read_text(encoding="utf-8")
