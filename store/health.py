"""`clipdex check`: what in a store is damaged or out of date, read-only, like `git fsck`.

Every piece is checked on its own, so one damaged file never hides another: the manifest (JSON,
types, agreement with the table), each Lance table's newest version and every fragment's files
(present, of the size written, a readable footer; with *deep* a full scan), the table's scalar
indexes, the ids (unique), and the FAISS side (index, values, delta and query files present,
readable and of the sizes the manifest records, built from a version the table still has).
Each problem says what it costs and whether `clipdex repair` mends it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from store.ann import lists_file, load_index
from store.delta import Delta
from store.errors import ClipdexError, StoreError, first_line
from store.fragments import (
    Damage,
    any_version_reads,
    bad_vectors,
    fragment_damage,
    index_damage,
    open_version,
    recorded_identity,
    relative,
    short,
    unreadable_versions,
    version_files,
)
from store.manifest import IDENTITY_KEY, MANIFEST_NAME, Manifest, read_manifest
from store.queries import QUERIES_DIR
from store.store import CURRENT_INDEX, INDEX_DIR
from store.tables import FAILURES, IMAGES, TABLE_DIR
from store.values import IDS_FILE, VALUES_FILE

DAMAGE, STALE = "damage", "stale"  # stale: readable and consistent, but not up to date


@dataclass(frozen=True)
class Problem:
    part: str  # manifest, images, failures, index, values, delta, queries
    path: str  # the file or folder, relative to the store
    what: str
    consequence: str
    severity: str = DAMAGE
    repairable: bool = True  # False: `clipdex repair` has nothing to rebuild this from


@dataclass(frozen=True)
class CheckReport:
    store: str
    deep: bool
    problems: tuple[Problem, ...] = ()
    rows: int | None = None  # rows the images table's newest readable version holds (None: unknown)
    table_version: int | None = None
    fragments: int = 0
    checked: tuple[str, ...] = field(default_factory=tuple)  # what was looked at

    @property
    def damaged(self) -> bool:
        return any(p.severity == DAMAGE for p in self.problems)

    @property
    def repairable(self) -> bool:
        return all(p.repairable for p in self.problems)

    def to_dict(self) -> dict:
        return {**asdict(self), "damaged": self.damaged, "repairable": self.repairable,
                "repair": f"clipdex repair --store {self.store}" if self.damaged and self.repairable else None}


def check_store(directory: str | os.PathLike, deep: bool = False, ids: bool = True) -> CheckReport:
    """Look at every piece of the store at *directory*; never writes, never raises for damage.
    *ids* False skips reading the id column (a quick look, to name the file an error came from)."""
    directory = Path(os.path.expanduser(os.fspath(directory)))
    if not directory.is_dir():
        raise StoreError(f"no store at {directory}")
    if not (directory / MANIFEST_NAME).exists() and not (directory / TABLE_DIR / f"{IMAGES}.lance").is_dir():
        raise StoreError(f"{directory} is not a clipdex store (no {MANIFEST_NAME}, no tables)")
    found: list[Problem] = []
    manifest = _manifest(directory, found)
    rows, version, fragments = _images(directory, manifest, deep, ids, found)
    _failures(directory, deep, found)
    if manifest is not None:
        _faiss(directory, manifest, version, found)
    _queries(directory, manifest, found)
    return CheckReport(str(directory), deep, tuple(found), rows, version, fragments,
                       ("manifest", "images", "failures", "index", "values", "queries"))


def _manifest(directory: Path, found: list[Problem]) -> Manifest | None:
    try:
        return read_manifest(directory)
    except ClipdexError as error:
        what = ("missing" if not (directory / MANIFEST_NAME).exists() else
                first_line(error).split("; run `clipdex repair")[0].replace(f"{directory / MANIFEST_NAME} ", ""))
        rebuilt_from = _rebuilt_from(directory)
        found.append(Problem("manifest", MANIFEST_NAME, what, "no command opens the store; " + rebuilt_from,
                             repairable=not rebuilt_from.startswith("no version")))
        return None


def _rebuilt_from(directory: Path) -> str:
    """What `repair` can rebuild a lost manifest from, in words."""
    uri = directory / TABLE_DIR / f"{IMAGES}.lance"
    if not any_version_reads(uri):
        return "no version of the table reads either: nothing to rebuild it from; index the folders into a new store"
    if recorded_identity(uri, IDENTITY_KEY):
        return "repair rebuilds it from the table, which records the store"
    return "the table does not record the store's model: repair needs --model"


def _images(directory: Path, manifest: Manifest | None, deep: bool, ids: bool,
            found: list[Problem]) -> tuple[int | None, int | None, int]:
    """The images table: versions, fragments, scalar index, ids, schema against the manifest."""
    uri = directory / TABLE_DIR / f"{IMAGES}.lance"
    if not uri.is_dir():
        if manifest is not None and (manifest.count or manifest.index.file):
            found.append(Problem(IMAGES, relative(uri, directory), "the images table is missing",
                                 f"all {manifest.count:,} rows are gone; `clipdex index` embeds the files again"))
        return None, None, 0
    for damage in unreadable_versions(uri):
        found.append(_table_problem(IMAGES, uri, directory, damage,
                                    "the table does not open: no command reads the store"))
    try:
        dataset = open_version(uri)
    except Exception as error:  # noqa: BLE001 - whatever Lance raises: no version of the table opens
        found.append(Problem(IMAGES, relative(uri, directory), f"no version of the table opens ({short(error)})",
                             "every row is unreadable"))
        return None, None, 0
    damaged = fragment_damage(dataset, deep)
    for damage in damaged:
        found.append(_table_problem(IMAGES, uri, directory, damage,
                                    f"{damage.rows:,} rows unreadable: search, info, export and index fail"))
    for damage in index_damage(dataset):
        found.append(_table_problem(IMAGES, uri, directory, damage, "filters and lookups by id fail"))
    rows = dataset.count_rows()
    if manifest is not None:
        width = dataset.schema.field("embedding").type.list_size if "embedding" in dataset.schema.names else None
        if width != manifest.dim:
            found.append(Problem(IMAGES, relative(uri, directory), f"the table holds {width}-d vectors, the manifest says "
                                 f"{manifest.dim}", "no search or index build can run"))
    if deep and "embedding" in dataset.schema.names:
        for path, bad in bad_vectors(dataset, {d.fragment for d in damaged}):
            found.append(Problem(IMAGES, relative(uri / path, directory), f"{bad.num_rows:,} rows hold vectors that are "
                                 "not unit length (bytes overwritten inside the file)",
                                 "these rows are found by the wrong queries"))
    if ids and not damaged:
        _unique_ids(dataset, uri, directory, found)
    return rows, dataset.version, len(dataset.get_fragments())


def _unique_ids(dataset, uri: Path, directory: Path, found: list[Problem]) -> None:
    """Every id once: read a column of int64 (8 bytes a row; 24 MB at 3M rows)."""
    chunks = [batch.column(0).to_numpy() for batch in dataset.to_batches(columns=["id"], batch_size=1 << 20)]
    ids = np.concatenate(chunks) if chunks else np.zeros(0, np.int64)
    repeated = len(ids) - len(np.unique(ids))
    if repeated:
        found.append(Problem(IMAGES, relative(uri, directory), f"{repeated:,} ids are used by more than one row",
                             "searches may return a row in place of another"))


def _failures(directory: Path, deep: bool, found: list[Problem]) -> None:
    uri = directory / TABLE_DIR / f"{FAILURES}.lance"
    if not uri.is_dir():
        return
    consequence = "`info --failures` and the next `index` fail; the failures are found again by `index`"
    for damage in unreadable_versions(uri):
        found.append(_table_problem(FAILURES, uri, directory, damage, consequence))
    try:
        dataset = open_version(uri)
    except Exception:  # noqa: BLE001 - reported above by version
        return
    for damage in fragment_damage(dataset, deep) + index_damage(dataset):
        found.append(_table_problem(FAILURES, uri, directory, damage, consequence))


def _faiss(directory: Path, manifest: Manifest, table_version: int | None, found: list[Problem]) -> None:
    """The index files the manifest names: present, readable, of the recorded sizes."""
    info = manifest.index
    rebuild = "search and cache queries fail until the index is built again"
    _leftovers(directory, manifest, found)
    if not info.file:
        if table_version is not None and (manifest.count or version_files(directory / TABLE_DIR / f"{IMAGES}.lance")):
            found.append(Problem("index", "faiss", "no index has been built", "the rows are not searched until "
                                 "`clipdex reindex` (or the next `index`) builds one", STALE))
        return
    if table_version is not None:
        versions = version_files(directory / TABLE_DIR / f"{IMAGES}.lance")
        if info.table_version not in versions:
            found.append(Problem("index", info.file, f"built from table version {info.table_version}, which the "
                                 "table no longer has", rebuild))
        elif info.table_version != table_version:
            found.append(Problem("index", info.file, f"built from table version {info.table_version}; the table is at "
                                 f"{table_version}", "rows changed since are not searched until `clipdex index` or "
                                 "`clipdex reindex`", STALE))
    what = _index_file(directory / info.file, info.built_rows or info.count)
    if what:
        found.append(Problem("index", info.file, what, rebuild))
    if info.values:
        what = _values(directory / info.values, info.built_rows or info.count, manifest.dim)
        if what:
            consequence = rebuild if info.rerank > 1 else "cache queries fail until the index is built again"
            found.append(Problem("values", info.values, what, consequence))
    if info.delta:
        what = _delta(directory / info.delta, info.params)
        if what:
            found.append(Problem("delta", info.delta, what, rebuild))
    if not (directory / "faiss" / "index.faiss").is_file():
        found.append(Problem("index", "faiss/index.faiss", "missing", "programs reading the index without clipdex "
                             "find none (clipdex itself reads the file above)", STALE))


def _leftovers(directory: Path, manifest: Manifest, found: list[Problem]) -> None:
    """Files in the index folder that the manifest does not name: a build that died (kill -9)."""
    info, folder = manifest.index, directory / INDEX_DIR
    named = {info.file, info.values, info.delta, CURRENT_INDEX}
    named |= {lists_file(Path(name)).as_posix() for name in named if name.endswith(".faiss")}
    dead = [path for path in (folder.iterdir() if folder.is_dir() else ()) if f"{INDEX_DIR}/{path.name}" not in named]
    if dead:
        size = sum(_size(path) for path in dead)
        found.append(Problem("index", INDEX_DIR, f"{len(dead)} files of a build that did not finish "
                             f"({size / 2**20:,.1f} MiB: {', '.join(sorted(p.name for p in dead)[:3])})",
                             "disk space only; the next index, import, reindex or repair removes them", STALE))


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _index_file(path: Path, rows: int) -> str | None:
    if not path.is_file():
        return "missing"
    try:
        index = load_index(path)
    except Exception as error:  # noqa: BLE001 - FAISS raises RuntimeError for any unreadable file
        return f"unreadable ({first_line(error, 120)})"
    if index.ntotal != rows:
        return f"holds {index.ntotal:,} vectors where the manifest records {rows:,}"
    return None


def _values(folder: Path, rows: int, dim: int) -> str | None:
    try:
        ids = np.load(folder / IDS_FILE, mmap_mode="r")
        values = np.load(folder / VALUES_FILE, mmap_mode="r")
    except FileNotFoundError as error:
        return f"{Path(error.filename).name} is missing"
    except (OSError, ValueError) as error:
        return f"cut short or unreadable ({first_line(error, 120)})"
    if ids.shape != (rows,) or values.shape != (rows, dim):
        return f"holds {ids.shape} ids and {values.shape} vectors where {rows:,} x {dim} were built"
    return None


def _delta(folder: Path, params: str) -> str | None:
    try:
        Delta.open(folder, params)
    except (OSError, ValueError, RuntimeError) as error:
        return f"missing or unreadable ({first_line(error, 120)})"
    return None


def _queries(directory: Path, manifest: Manifest | None, found: list[Problem]) -> None:
    for path in sorted((directory / QUERIES_DIR).glob("*.npy")) if (directory / QUERIES_DIR).is_dir() else ():
        try:
            array = np.load(path, allow_pickle=False)
            good = array.ndim == 2 and (manifest is None or array.shape[1] == manifest.dim)
        except (OSError, ValueError):
            good = False
        if not good:
            found.append(Problem("queries", relative(path, directory), "unreadable or of another width",
                                 "index builds are no longer tuned on this query set", STALE))


def _table_problem(table: str, uri: Path, directory: Path, damage: Damage, consequence: str) -> Problem:
    return Problem(table, relative(uri / damage.path, directory), damage.what, consequence)

