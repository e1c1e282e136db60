"""clipdex serving: the HTTP API (FastAPI) and the search web page over one live store."""

from server.app import create_app
from server.config import ServeConfig
from server.live import LiveStore, Snapshot

__all__ = ["LiveStore", "ServeConfig", "Snapshot", "create_app"]
