"""clipdex serving: the HTTP API (FastAPI) and the search web page over one live store."""

from typing import Any

from server.config import ServeConfig

__all__ = ["LiveStore", "ServeConfig", "Snapshot", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    # FastAPI costs a quarter of a second to import: `clipdex --help` and every command that only
    # builds a ServeConfig should not pay for it (PEP 562 lazy attributes).
    if name in ("create_app", "serve"):
        from server import app  # start-up time: see above

        return getattr(app, name)
    if name in ("LiveStore", "Snapshot"):
        from server import live  # start-up time: see above

        return getattr(live, name)
    raise AttributeError(f"module 'server' has no attribute {name!r}")
