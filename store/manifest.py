"""The store manifest: what model made the vectors, which index serves them, and how good it is.

Stored as ``manifest.json``, written atomically (temp file + rename), versioned with step-by-step
migrations so an old store opens in a new clipdex.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from store.errors import ManifestDamagedError, StoreError, first_line
from store.files import DEFAULT_CONTENT_HASH, write_atomically

MANIFEST_NAME = "manifest.json"
PHOTO_VERSION = 1  # how the photo columns are read (encoder/exif.py): a store below it is read again
MANIFEST_VERSION = 8


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class IndexInfo:
    type: str = "none"  # "flat", "ivf", "ivf-sq8", "autofaiss" or "none" (nothing built yet)
    key: str = ""  # faiss index_factory string
    params: str = ""  # search-time parameters (nprobe, efSearch)
    file: str = ""  # relative to the store
    count: int = 0
    table_version: int = 0  # Lance version of the rows the index was built from
    recall_at_10: float | None = None
    recall_queries: int = 0
    build_seconds: float = 0.0
    built: str = ""
    values: str = ""  # folder of ids.npy + values.npy, id-sorted, for the cache (relative to the store)
    rerank: int = 1  # lossy codes: candidates per result, ordered by exact cosine from the values
    recall: dict[str, float] = field(default_factory=dict)  # query set (image, text, captions, ...) -> recall@10
    query_sets: dict[str, int] = field(default_factory=dict)  # query set -> queries measured
    target_met: bool | None = None  # every set reached the target recall (False: the query time limit came first)
    # Rows new or changed since the build, searched beside the index (store/delta.py):
    built_rows: int = 0  # rows the index was built on (count: rows it serves now, the delta's included)
    delta: str = ""  # folder of the delta (relative to the store), "" for none
    delta_rows: int = 0
    hidden_rows: int = 0  # built rows removed or changed since, excluded from the index's answers


@dataclass(frozen=True)
class Manifest:
    model: str
    pretrained: str
    dim: int
    space: str  # embedding space: the model for stores clipdex embedded, or what an import names
    has_text_encoder: bool = True
    weights_sha256: str = ""  # content of a local checkpoint: the same weights at a new path are accepted
    roots: tuple[str, ...] = ()  # folders indexed into this store (real paths)
    preprocess: dict[str, Any] = field(default_factory=dict)
    content_hash: str = DEFAULT_CONTENT_HASH  # how rows' file hashes are made: store.files.CONTENT_HASHES
    # What the photo columns (taken_at, camera, place) were read with: PHOTO_VERSION once every row's
    # file was read for them; below, the next index run reads the files it sees (no re-embedding).
    photo_version: int = 0
    # The precisions the stored vectors were computed with (encoder.precision), in the order first
    # used: a store may mix those measured within fidelity of each other. Empty for imported features.
    precisions: tuple[str, ...] = ()
    count: int = 0
    failures: int = 0
    next_id: int = 1
    index: IndexInfo = field(default_factory=IndexInfo)
    created: str = field(default_factory=now)
    updated: str = field(default_factory=now)
    version: int = MANIFEST_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def evolve(self, **changes: Any) -> "Manifest":
        return replace(self, updated=now(), **changes)


# What a store is, kept also in the images table's metadata (written with the table, and again when
# it changes) so that a lost or damaged manifest can be rebuilt from the table: `clipdex repair`.
IDENTITY_KEY = "clipdex.identity"
IDENTITY_FIELDS = ("model", "pretrained", "dim", "space", "has_text_encoder", "weights_sha256", "roots", "preprocess",
                   "content_hash", "created")


def identity_of(manifest: Manifest) -> str:
    return json.dumps({name: getattr(manifest, name) for name in IDENTITY_FIELDS}, sort_keys=True)


def from_identity(text: str) -> Manifest:
    """The manifest of a store known only by :func:`identity_of` (counts and index still to fill)."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return _typed(Manifest, {name: data[name] for name in IDENTITY_FIELDS if name in data})


def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    # v1 named the embedding space implicitly by the model; v2 records it (imports need it).
    data.setdefault("space", data.get("model", "unknown"))
    data.setdefault("has_text_encoder", True)
    return data


def _v2_to_v3(data: dict[str, Any]) -> dict[str, Any]:
    # v3 records a checkpoint's hash and the indexed roots; both are filled by the next index run.
    data.setdefault("weights_sha256", "")
    data.setdefault("roots", [])
    return data


def _v3_to_v4(data: dict[str, Any]) -> dict[str, Any]:
    # v4 indexes may hold lossy codes searched deeper and reranked; older ones never are.
    data.setdefault("index", {}).setdefault("rerank", 1)
    return data


def _v4_to_v5(data: dict[str, Any]) -> dict[str, Any]:
    # v5 names the hash of file content; every store before it used blake2b-128, and keeps it.
    data.setdefault("content_hash", "blake2b-128")
    return data


def _v5_to_v6(data: dict[str, Any]) -> dict[str, Any]:
    # v6 records recall per query set; an older index was measured on stored image vectors only.
    index = data.setdefault("index", {})
    if index.get("recall_at_10") is not None:
        index.setdefault("recall", {"image": index["recall_at_10"]})
        index.setdefault("query_sets", {"image": index.get("recall_queries", 0)})
    return data


def _v6_to_v7(data: dict[str, Any]) -> dict[str, Any]:
    # v7 stores keep capture time, camera and place as columns; an older store's rows get them
    # from a metadata-only pass of its next index run.
    data.setdefault("photo_version", 0)
    return data


def _v7_to_v8(data: dict[str, Any]) -> dict[str, Any]:
    # v8 records the precision of the vectors; every vector clipdex computed before it was fp32.
    embedded = data.get("space", data.get("model")) == data.get("model") and data.get("count", 0) > 0
    data.setdefault("precisions", ["fp32"] if embedded else [])
    return data


MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _v1_to_v2, 2: _v2_to_v3, 3: _v3_to_v4,
                                                                     4: _v4_to_v5, 5: _v5_to_v6, 6: _v6_to_v7,
                                                                     7: _v7_to_v8}


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    version = int(data.get("version", 1))
    if version > MANIFEST_VERSION:
        raise StoreError(f"this store was written by a newer clipdex (manifest v{version}); upgrade clipdex")
    while version < MANIFEST_VERSION:
        data = MIGRATIONS[version](dict(data))
        version += 1
        data["version"] = version
    return data


def read_manifest(directory: str | Path) -> Manifest:
    path = Path(directory) / MANIFEST_NAME
    try:
        return parse_manifest(path.read_bytes())
    except FileNotFoundError as error:
        raise StoreError(f"{directory} is not a clipdex store (no {MANIFEST_NAME}); create one with `clipdex index`") from error
    except PermissionError as error:
        raise StoreError(f"cannot read {path}: permission denied") from error
    except OSError as error:
        raise ManifestDamagedError(f"{path} cannot be read ({error.strerror or error}); "
                                   f"run `clipdex repair --store {directory}` to rebuild it from the tables") from error
    except ValueError as error:
        raise ManifestDamagedError(f"{path} is damaged ({first_line(error, 160)}); "
                                   f"run `clipdex repair --store {directory}` to rebuild it from the tables") from error


def parse_manifest(data: bytes) -> Manifest:
    """A manifest from its JSON, every field of the type it is declared with: a hand-edited or
    half-written file is a ValueError here, not a TypeError deep inside a command later."""
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"not JSON: {error}") from None
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")
    version = raw.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"'version' is {version!r}, not a version number")
    if not isinstance(raw.get("index", {}), dict):
        raise ValueError(f"'index' is {type(raw['index']).__name__}, not an object")
    raw = migrate(raw)
    manifest = _typed(Manifest, {**raw, "index": _typed(IndexInfo, raw.pop("index", {}))})
    if manifest.dim < 1:
        raise ValueError(f"'dim' is {manifest.dim}")
    return manifest


def _typed(cls: type, data: dict[str, Any]) -> Any:
    """*cls*(**data), each value checked against the field's declared type (JSON lists become the
    tuples a field declares); unknown keys are refused, missing ones take their defaults."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}")
    values = {}
    for name, value in data.items():
        if not _fits(value, hints[name]):
            raise ValueError(f"{cls.__name__.lower()} field {name!r} is {type(value).__name__} {str(value)[:40]!r}, "
                             f"not {_type_name(hints[name])}")
        values[name] = tuple(value) if isinstance(value, list) else value
    try:
        return cls(**values)
    except TypeError as error:  # a required field left out
        raise ValueError(str(error)) from None


def _fits(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint in (str, Any):
        return hint is Any or isinstance(value, str)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) and _fits(v, args[1]) for k, v in value.items())
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(_fits(v, args[0]) for v in value)
    if isinstance(hint, type) and hint in (IndexInfo,):
        return isinstance(value, hint)
    return False


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def write_manifest(directory: str | Path, manifest: Manifest) -> None:
    write_atomically(Path(directory) / MANIFEST_NAME, json.dumps(manifest.to_dict(), indent=2).encode(), sync=True)
