"""What `clipdex serve` is told: one frozen config object, built by cli.py and passed whole."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20


@dataclass(frozen=True)
class ServeConfig:
    store: Path
    host: str = "127.0.0.1"  # loopback unless told otherwise: the API has no TLS of its own
    port: int = 8000
    api_key: str | None = None  # when set, every endpoint but /health requires it
    device: str = "auto"
    precision: str = "fp32"  # how queries are embedded: encoder.precision.PRECISIONS
    max_k: int = 1000
    max_batch: int = 1024  # queries per /cache/blend request
    max_body_bytes: int = 16 * MIB  # uploads, base64 images and embedding batches alike
    max_image_pixels: int = 40_000_000  # uploads above this are refused before decoding
    thumbnail_size: int = 256
    # Up to this many rows, result metadata is served from memory (about 20 MB); above, it is read by
    # id from Lance (7-14 ms at 1M rows), so the server's memory does not grow with the store.
    metadata_cache_rows: int = 100_000
    refresh_seconds: float = 0.5  # how often the store's manifest is checked for a newer index
    allow_hosts: tuple[str, ...] = ()  # Host names answered besides the bound address and localhost ("*": any)
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API (none by default)
    access_log: str | None = None  # a file to append one line per request to, "-" for stdout

    @property
    def hosts(self) -> frozenset[str]:
        """Host header names this server answers to: its address, localhost, and --allow-host."""
        bound = () if self.host in ("0.0.0.0", "::", "") else (self.host.strip("[]"),)
        return frozenset((*bound, "localhost", "127.0.0.1", "::1", *self.allow_hosts))
