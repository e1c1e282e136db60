"""Who may ask what: the Host check (DNS rebinding), the API key (header, bearer token or the
page's cookie), and a request body size limit enforced before the body is read; plus the access
log. All authentication lives here."""

from __future__ import annotations

import hmac
import json
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, TextIO
from urllib.parse import urlsplit

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader
from starlette.exceptions import HTTPException
from starlette.responses import Response

from store.errors import InputError

KEY_HEADER = "X-API-Key"
KEY_COOKIE = "clipdex_key"
KEY_MISSING = f"missing or wrong API key: send it in the {KEY_HEADER} header (or Authorization: Bearer KEY)"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class BodyTooLarge(HTTPException):
    """Raised while a streamed body is read; an HTTPException so FastAPI's body parsing passes it on."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, too_large_message(max_bytes))


def too_large_message(max_bytes: int) -> str:
    return f"the request body is larger than the server's limit of {max_bytes:,} bytes (see --max-body-mb)"


class BodyLimit:
    """ASGI middleware: 413 for a declared Content-Length over the limit, and for a streamed
    (chunked) body the moment it crosses the limit, so an oversized upload is never buffered."""

    def __init__(self, app: Callable, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._refuse(send)
        seen = 0
        started = False

        async def counted_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracked_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        await _json(send, 413, too_large_message(self.max_bytes))


async def _json(send: Send, status: int, message: str) -> None:
    """Answer ``{"error": message}`` straight from a middleware and close the connection."""
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def presented_key(headers: Any, cookies: dict[str, str]) -> str | None:
    """The key a request carries: ``X-API-Key``, ``Authorization: Bearer``, or the web page's cookie."""
    if headers.get(KEY_HEADER):
        return headers[KEY_HEADER]
    scheme, _, token = (headers.get("authorization") or "").partition(" ")
    if scheme.lower() == "bearer" and token:
        return token.strip()
    return cookies.get(KEY_COOKIE)


def key_matches(expected: str | None, given: str | None) -> bool:
    if expected is None:
        return True
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())


def key_guard(expected: str | None) -> Any:
    """The dependency every keyed route carries: 401 unless the request presents *expected*."""
    header = APIKeyHeader(name=KEY_HEADER, auto_error=False, description="The key given to --api-key.")

    def require_key(request: Request, _: str | None = Security(header)) -> None:
        if not key_matches(expected, presented_key(request.headers, request.cookies)):
            raise HTTPException(401, KEY_MISSING, headers={"WWW-Authenticate": "Bearer"})

    def open_door() -> None:
        return None

    # The schema declares the key only where one is needed.
    return Depends(require_key if expected is not None else open_door)


@dataclass(frozen=True)
class KeyCookie:
    key: str

    def set_on(self, response: Response) -> None:
        response.set_cookie(KEY_COOKIE, self.key, httponly=True, samesite="strict")


@dataclass(frozen=True)
class PageAccess:
    """May the visitor see the page; if not, a cookie to set when ``?key=`` carried the right key."""

    granted: bool
    cookie: KeyCookie | None = None


def page_access(request: Request, key: str | None = None) -> PageAccess:
    expected = request.app.state.context.config.api_key
    if expected is None or key_matches(expected, presented_key(request.headers, request.cookies)):
        return PageAccess(True)
    if key is not None and key_matches(expected, key):
        return PageAccess(False, KeyCookie(key))
    return PageAccess(False)


class HostCheck:
    """ASGI middleware: refuse a request whose Host header names another server.

    With no key on 127.0.0.1, this is what stops DNS rebinding: a web page the user opens makes
    the browser send requests to 127.0.0.1 under the attacker's host name, which is refused here.
    """

    def __init__(self, app: Callable, hosts: frozenset[str]) -> None:
        self.app, self.hosts = app, hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and "*" not in self.hosts:
            given = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if host_name(given) not in self.hosts:
                return await _json(send, 400, f"this server does not answer to the host '{given[:100]}' "
                                               "(start it with --allow-host NAME to allow one)")
        await self.app(scope, receive, send)


def host_name(header: str) -> str:
    """The name in a Host header, without its port: ``[::1]:8000`` -> ``::1``."""
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


BODY_TYPES = ("application/json", "multipart/form-data")
BODY_METHODS = ("POST", "PUT", "PATCH", "DELETE")


class SiteCheck:
    """ASGI middleware: refuse what a page on another web site makes the visitor's browser send.

    A page the user merely visits can send ``fetch("http://127.0.0.1:8000/search", {method:
    "POST", body})`` with no preflight when the body is text/plain or a form; the browser then
    names the page's site in ``Origin`` (and ``Sec-Fetch-Site: cross-site``). Such a request is
    refused unless that origin was given with --cors-origin; a request with neither header (curl,
    Python, another server) is not a browser's and passes. Following a link to the server (a
    top-level GET navigation) passes too: the page that linked cannot read the answer. Bodies are
    taken only as JSON or multipart, the types a browser will not send cross-site unasked.
    """

    def __init__(self, app: Callable, origins: frozenset[str]) -> None:
        self.app, self.origins = app, origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        refusal = self.refusal(scope["method"], headers)
        if refusal is not None:
            return await _json(send, *refusal)
        await self.app(scope, receive, send)

    def refusal(self, method: str, headers: dict[bytes, bytes]) -> tuple[int, str] | None:
        origin = _text(headers.get(b"origin")) or _referrer_origin(headers.get(b"referer"))
        site = _text(headers.get(b"sec-fetch-site"))
        host = (_text(headers.get(b"host")) or "").lower()
        navigation = method == "GET" and _text(headers.get(b"sec-fetch-mode")) == "navigate"
        if site == "same-origin" or (origin not in (None, "null") and urlsplit(origin).netloc.lower() == host):
            pass  # the server's own page (a browser sets Sec-Fetch-Site itself; no page can)
        elif origin is not None and ("*" in self.origins or origin in self.origins):
            pass
        elif origin is not None or site in ("cross-site", "same-site"):
            if not navigation:
                named = f"the page at {origin[:100]}" if origin else "a page on another site"
                return 403, (f"{named} may not call this server from a browser "
                             "(start it with --cors-origin ORIGIN to allow one)")
        if method in BODY_METHODS:
            kind = (_text(headers.get(b"content-type")) or "").split(";")[0].strip().lower()
            if kind not in BODY_TYPES:
                return 415, f"send application/json or multipart/form-data, not {kind or 'a body without a type'}"
        return None


def _text(value: bytes | None) -> str | None:
    """A header's value; None when it is absent or empty."""
    return value.decode("latin-1").strip() or None if value is not None else None


def _referrer_origin(referer: bytes | None) -> str | None:
    """The origin of the page that sent a request without an Origin header (an <img> on it)."""
    parts = urlsplit(_text(referer) or "")
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else None


def check_cors_origins(origins: tuple[str, ...], api_key: str | None) -> None:
    """Origins as --cors-origin must name them, and '*' only behind a key: every site could
    otherwise read every result and image of the store through its visitors' browsers."""
    for origin in origins:
        if origin == "*":
            if api_key is None:
                raise InputError("--cors-origin '*' lets every web site read this store through its visitors' "
                                 "browsers: give --api-key too, or name the origins (--cors-origin https://app.example)")
            continue
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/") or parts.query:
            raise InputError(f"--cors-origin {origin!r} is not an origin: give scheme://host[:port], "
                             "e.g. https://app.example or http://localhost:3000")


def open_access_log(target: str) -> TextIO:
    """The access log's stream, opened at start-up: a file that cannot be written is one line then,
    not a 500 on every request."""
    if target == "-":
        return sys.stdout
    try:
        return open(target, "a", buffering=1, encoding="utf-8")
    except OSError as error:
        raise InputError(f"cannot write the access log {target}: {error.strerror or error}") from error


class AccessLog:
    """ASGI middleware: one line per request, ``time client "METHOD path" status ms``."""

    def __init__(self, app: Callable, out: TextIO) -> None:
        self.app, self.out = app, out
        self.lock = threading.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def noted_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noted_send)
        finally:
            client = (scope.get("client") or ("-",))[0]
            line = (f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {client} \"{scope['method']} {scope['path']}\" {status} "
                    f"{(time.perf_counter() - started) * 1000:.1f}ms\n")
            with self.lock:
                self.out.write(line)
