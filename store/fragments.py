"""The files of a Lance table, checked one by one: which versions still open, which fragments'
data and deletion files are present, whole and readable, which scalar indexes have their files.

Shared by `clipdex check` (store/health.py), which reports, and `clipdex repair`
(store/repair.py), which rolls back or drops what is found here. Nothing here writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Collection, Iterator

if TYPE_CHECKING:
    import lance
    import pyarrow as pa

VERSIONS_DIR = "_versions"
DEEP_BATCH_ROWS = 4096  # a full scan reads this many rows at a time (16 MB of 1024-d float32)
UNIT_TOLERANCE = 1e-3  # stored vectors are unit length to float32 rounding, far within this


@dataclass(frozen=True)
class Damage:
    """One unreadable file of a table: *path* relative to the table's folder."""
    path: str
    what: str
    fragment: int | None = None  # the fragment it belongs to (None: a version or an index file)
    rows: int = 0  # rows that cannot be read because of it


def version_files(uri: str | Path) -> dict[int, Path]:
    """Every version manifest in the table's folder, by version number (newest last).

    Lance names them ``u64::MAX - version`` (newest first when listed) or, in older tables, by
    the version itself."""
    folder = Path(uri) / VERSIONS_DIR
    found = {}
    for path in folder.glob("*.manifest") if folder.is_dir() else ():
        try:
            number = int(path.stem)
        except ValueError:
            continue
        found[(1 << 64) - 1 - number if number >= 1 << 63 else number] = path
    return dict(sorted(found.items()))


def open_version(uri: str | Path, version: int | None = None) -> "lance.LanceDataset":
    """The table at *version* (newest when None); raises whatever Lance raises."""
    import lance

    return lance.dataset(str(uri), version=version)


def unreadable_versions(uri: str | Path) -> list[Damage]:
    """The newest version manifests that Lance cannot read (cut short, overwritten): while the
    newest is one, the table does not open at all. Older unreadable ones matter only to a
    rollback and are found by :func:`readable_versions`."""
    damaged = []
    for version, path in reversed(version_files(uri).items()):
        try:
            open_version(uri, version)
            break
        except Exception as error:  # Lance reports a bad manifest as ValueError, OSError or RuntimeError
            damaged.append(Damage(relative(path, uri), f"version {version} cannot be read ({short(error)})"))
    return damaged


def fragment_damage(dataset: "lance.LanceDataset", deep: bool = False) -> list[Damage]:
    """The fragments of *dataset* (one version) whose files are missing, of another size than
    recorded, without a readable footer or, with *deep*, that do not scan to the end."""
    damaged = []
    for fragment in dataset.get_fragments():
        what = _fragment_files(dataset.uri, fragment)
        if what is None and deep:
            what = _scan(fragment)
        if what is not None:
            damaged.append(Damage(what[0], what[1], fragment.fragment_id, live_rows(fragment)))
    return damaged


def index_damage(dataset: "lance.LanceDataset") -> list[Damage]:
    """Scalar indexes of this version whose folder is gone or empty (a filter on the indexed
    column fails until the index is made again)."""
    damaged = []
    for index in _indexes(dataset):
        folder = Path(dataset.uri) / "_indices" / index["uuid"]
        if not folder.is_dir() or not any(folder.iterdir()):
            damaged.append(Damage(relative(folder, dataset.uri), f"the {index['name']} index's files are missing"))
        else:
            for path in folder.iterdir():
                what = _footer(path) if path.suffix == ".lance" else None
                if what:
                    damaged.append(Damage(relative(path, dataset.uri), f"the {index['name']} index is {what}"))
                    break
    return damaged


def recorded_identity(uri: str | Path, key: str) -> str | None:
    """The table metadata's *key* in the newest version that opens and records it (None: none)."""
    for version in reversed(version_files(uri)):
        try:
            text = open_version(uri, version).metadata.get(key)
        except Exception:  # noqa: BLE001 - an unreadable version records nothing
            continue
        if text:
            return text
    return None


def any_version_reads(uri: str | Path) -> bool:
    for version in reversed(version_files(uri)):
        try:
            open_version(uri, version)
            return True
        except Exception:  # noqa: BLE001 - Lance's error for an unreadable manifest varies
            continue
    return False


def readable_versions(uri: str | Path, deep: bool = False) -> Iterator[int]:
    """Versions, newest first, whose manifest opens and whose fragments are all readable (where
    repair takes the rows of unreadable fragments back from)."""
    for version in reversed(list(version_files(uri))):
        try:
            dataset = open_version(uri, version)
        except Exception:  # noqa: BLE001 - an unreadable manifest is no candidate, whatever Lance raised
            continue
        if not fragment_damage(dataset, deep) and not index_damage(dataset):
            yield version


def bad_vectors(dataset: "lance.LanceDataset", skip: Collection[int] = ()) -> list[tuple[str, "pa.Table"]]:
    """(data file, (id, path) of its rows) for the fragments not in *skip* that hold embeddings
    which are not finite unit vectors: every writer stores unit vectors, and Lance keeps no
    checksums, so bytes overwritten inside a data file read back as such vectors, not as an error."""
    import numpy as np
    import pyarrow as pa

    found = []
    for fragment in dataset.get_fragments():
        if fragment.fragment_id in skip:
            continue
        bad_rows = []
        for batch in fragment.to_batches(columns=["id", "path", "embedding"], batch_size=DEEP_BATCH_ROWS):
            vectors = batch.column(2)
            with np.errstate(all="ignore"):
                flat = vectors.flatten().to_numpy(zero_copy_only=False).reshape(len(vectors), -1).astype(np.float64)
                norms = np.linalg.norm(flat, axis=1)
            bad = ~np.isfinite(norms) | (np.abs(norms - 1) > UNIT_TOLERANCE)
            if bad.any():
                bad_rows.append(pa.Table.from_batches([batch.select(["id", "path"]).filter(pa.array(bad))]))
        if bad_rows:
            files = fragment.metadata.files
            found.append((f"data/{files[0].path}" if files else "data", pa.concat_tables(bad_rows)))
    return found


def _fragment_files(uri: str, fragment) -> tuple[str, str] | None:
    for data_file in fragment.metadata.files:
        path = Path(uri) / "data" / data_file.path
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            return relative(path, uri), "missing"
        except OSError as error:
            return relative(path, uri), f"cannot be read ({error.strerror})"
        if data_file.file_size_bytes and size != data_file.file_size_bytes:
            return relative(path, uri), f"{size:,} bytes where {data_file.file_size_bytes:,} were written"
        what = _footer(path)
        if what:
            return relative(path, uri), what
    deletion = fragment.metadata.deletion_file
    if deletion is not None:
        suffix = "arrow" if deletion.file_type == "array" else "bin"
        path = Path(uri) / "_deletions" / f"{fragment.fragment_id}-{deletion.read_version}-{deletion.id}.{suffix}"
        if not path.is_file():
            return relative(path, uri), "missing (the list of the fragment's deleted rows)"
    return None


def _footer(path: Path) -> str | None:
    from lance.file import LanceFileReader

    try:
        LanceFileReader(str(path)).metadata()
        return None
    except Exception as error:  # noqa: BLE001 - whatever Lance raises, the file cannot be read
        return f"unreadable ({short(error)})"


def _scan(fragment) -> tuple[str, str] | None:
    try:
        for _ in fragment.to_batches(batch_size=DEEP_BATCH_ROWS):
            pass
        return None
    except Exception as error:  # noqa: BLE001 - a file that does not decode to its end
        files = fragment.metadata.files
        return (f"data/{files[0].path}" if files else "data", f"does not read to its end ({short(error)})")


def live_rows(fragment) -> int:
    """Rows of a fragment that are not deleted, from its metadata (nothing is read)."""
    deletion = fragment.metadata.deletion_file
    return fragment.metadata.physical_rows - (deletion.num_deleted_rows if deletion is not None else 0)


def _indexes(dataset) -> list[dict]:
    try:
        return list(dataset.list_indices())
    except Exception:  # noqa: BLE001 - index metadata that cannot be read: no index to check
        return []


def relative(path: Path, uri: str | Path) -> str:
    """*path* relative to *uri* where it lies below it, else as it is."""
    try:
        return Path(path).relative_to(Path(uri)).as_posix()
    except ValueError:
        return str(path)


def short(error: BaseException) -> str:
    """Lance's message without its source locations: ``Not found: /x/data/y.lance, /root/...rs:273``."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = text.split(", /")[0].split(", /rustc")[0]
    return text[:200]
