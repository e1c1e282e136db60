"""The FastAPI application: wiring of the live store, the routes, the API key, the body limit, and
errors as ``{"error": ...}`` JSON; :func:`serve` runs it."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from server.bodies import add_component_schemas
from server.config import ServeConfig
from server.context import Encoder, ServerContext
from server.live import LiveStore
from server.routes import public, router
from server.schemas import ClassifyForm, ClassifyRequest, SearchForm, SearchRequest
from server.security import (
    KEY_HEADER,
    AccessLog,
    BodyLimit,
    HostCheck,
    SiteCheck,
    check_cors_origins,
    key_guard,
    open_access_log,
)
from store.damage import explain
from store.errors import ClipdexError, GoneError, InputError, NotFoundError

LOG = logging.getLogger(__name__)


def create_app(config: ServeConfig, live: LiveStore | None = None) -> FastAPI:
    """The app for one store. *live* defaults to a :class:`LiveStore` on ``config.store``."""
    check_cors_origins(config.cors_origins, config.api_key)
    log = open_access_log(config.access_log) if config.access_log else None
    live = live or LiveStore(config.store, config.refresh_seconds, config.device, config.metadata_cache_rows)
    ctx = ServerContext(config, live, Encoder(config.device, config.precision))
    if live.current().store.manifest.has_text_encoder:
        ctx.encoder.model(live.current())  # load now: fail at start, not on the first query
        ctx.encoder.text_encoder(live.current())  # and export the text tower now, where it is used

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        live.start()
        yield
        live.stop()

    app = FastAPI(title="clipdex", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None, description="Search and cache retrieval over one clipdex store.")
    app.state.context = ctx
    # Added last runs first: the log sees every request, the Host check precedes everything else,
    # then the site check (before CORS: a preflight from a foreign origin is refused too).
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Content-Type", "Authorization", KEY_HEADER], allow_credentials=False)
    app.add_middleware(SiteCheck, origins=frozenset(config.cors_origins))
    app.add_middleware(HostCheck, hosts=config.hosts)
    if log is not None:
        app.add_middleware(AccessLog, out=log)
    _install_error_handlers(app, config)
    generate = app.openapi

    def openapi_with_bodies() -> dict[str, Any]:
        if app.openapi_schema is None:  # generate() fills it in; the bodies read by hand go in once
            add_component_schemas(generate(), [SearchRequest, SearchForm, ClassifyRequest, ClassifyForm])
        return app.openapi_schema

    app.openapi = openapi_with_bodies  # type: ignore[method-assign]
    app.include_router(public)
    app.include_router(router, dependencies=[key_guard(config.api_key)])
    return app


def serve(config: ServeConfig, app: FastAPI | None = None) -> None:
    """Run *app* (default: a new one for *config*) on ``config.host:config.port`` until interrupted."""
    import uvicorn

    uvicorn.run(app or create_app(config), host=config.host, port=config.port, log_level="warning", access_log=False)


def _install_error_handlers(app: FastAPI, config: ServeConfig) -> None:
    @app.exception_handler(ClipdexError)
    async def clipdex_error(_: Request, error: ClipdexError) -> JSONResponse:
        status = (410 if isinstance(error, GoneError) else 404 if isinstance(error, NotFoundError)
                  else 400 if isinstance(error, InputError) else 503)
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

    async def storage_error(request: Request, error: Exception) -> JSONResponse:
        """What Lance, FAISS or NumPy raise on a damaged store: the operator's log gets the file and
        the way out in one line, the client that it is not its fault. Anything else is a bug (500)."""
        damage = explain(error, config.store)
        if damage is None:
            raise error
        LOG.error("%s %s: %s", request.method, request.url.path, damage)
        return JSONResponse({"error": "the store cannot be read: its files are damaged (the server log names "
                                      "them; `clipdex check` and `clipdex repair` mend it)"}, status_code=503)

    for kind in (RuntimeError, OSError, ValueError):  # the types those libraries raise
        app.add_exception_handler(kind, storage_error)

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
