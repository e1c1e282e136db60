"""`clipdex repair`: bring a damaged store back from what it still holds, under the writer lock.

In order, each step on what the previous one left:

1. **Table versions** that no longer read (the newest manifests of a Lance table, cut short or
   overwritten) are moved aside into ``damaged/`` (kept, never deleted), so the table opens at
   its newest readable version.
2. **Fragments**: a data or deletion file that is missing, cut short or unreadable takes its
   fragment out of the table, and the rows it held are taken back from the newest version whose
   files all read (Lance keeps earlier versions and their files: before a compaction, the rows
   were in the files it compacted), except rows deleted since where that is still known. With
   ``deep``, rows whose vectors read back as garbage (bytes overwritten inside a file) are
   deleted. Rows that no version holds are counted as lost, with their paths where known
   (recorded as failures with reason ``lost``). The next ``clipdex index`` embeds exactly the
   files that have no row, which are these.
3. **The id index** of the table is made again when its files are damaged or the table changed.
4. **The manifest** is rebuilt when it does not read: the store's identity (model, weights,
   dimension, preprocessing, content hash, roots) from the images table's metadata, where every
   writer keeps a copy; counts and the next free id from the rows.
5. **The FAISS index** is built again from the rows (a damaged index, values or delta, or any
   change above); damaged query sets are removed (the next ``index`` makes the text set again).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from store.ann import AnnConfig
from store.errors import ClipdexError, InputError, StoreError
from store.files import writing
from store.fragments import (
    DEEP_BATCH_ROWS,
    Damage,
    any_version_reads,
    bad_vectors,
    fragment_damage,
    index_damage,
    live_rows,
    open_version,
    readable_versions,
    recorded_identity,
    relative,
    version_files,
)
from store.health import DAMAGE, CheckReport, check_store
from store.lock import writer_lock
from store.manifest import IDENTITY_KEY, IndexInfo, Manifest, from_identity, read_manifest, write_manifest
from store.queries import QUERIES_DIR
from store.store import INDEX_DIR, Store
from store.tables import FAILURE_SCHEMA, FAILURES, IMAGES, TABLE_DIR, conformed

DAMAGED_DIR = "damaged"  # where repair moves what it takes out of the store: nothing is deleted
LOST = "lost"  # the failure reason of a row that repair could not keep
KNOWN_LOST_LIMIT = 100_000  # paths of lost rows recorded at most (the rest are counted)


@dataclass(frozen=True)
class RepairConfig:
    dry_run: bool = False
    deep: bool = False  # find damage by a full scan of every fragment, not by sizes and footers only
    model: str | None = None  # the store's model, where neither manifest nor table records it
    pretrained: str | None = None
    ann: AnnConfig = field(default_factory=AnnConfig)
    wait: bool = False


@dataclass
class RepairReport:
    store: str
    dry_run: bool
    actions: list[str] = field(default_factory=list)  # what was done (or would be, with dry_run), a line each
    rows_before: int | None = None  # rows the images table recorded before (unreadable ones included)
    rows_after: int | None = None
    lost: int = 0  # rows that are no longer in the store
    lost_paths: list[str] = field(default_factory=list)  # those whose path is known
    index: str = ""  # the index built, in words
    problems: int = 0  # what check found before

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _TablePlan:
    """What becomes of one Lance table: versions moved aside, unreadable fragments dropped, their
    rows recovered from an earlier version, rows of overwritten vectors deleted."""
    uri: Path
    current: int | None  # the newest readable version (None: none reads)
    aside: tuple[Path, ...] = ()  # version manifests moved aside
    drop: tuple[int, ...] = ()  # unreadable fragments
    damaged: tuple[Damage, ...] = ()
    recover_from: int | None = None  # the newest version whose files all read
    recover: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # ids to take from it, sorted
    overwritten: tuple[int, ...] = ()  # ids of rows whose vectors were overwritten (a deep scan): deleted
    rows_before: int = 0
    rows_after: int = 0
    lost: int = 0
    lost_paths: tuple[str, ...] = ()
    max_id: int = 0  # the largest id of the readable rows before: never handed out again

    @property
    def changes(self) -> bool:
        return bool(self.aside or self.drop or self.current is None or self.overwritten)


def repair_store(directory: str | os.PathLike, config: RepairConfig = RepairConfig()) -> RepairReport:
    """Repair the store at *directory* (see the module doc); with ``config.dry_run`` only say what
    would be done. Raises StoreBusyError while another process writes to it."""
    directory = Path(os.path.expanduser(os.fspath(directory)))
    if config.dry_run:
        return _repair(directory, config)
    with writer_lock(directory, wait=config.wait):
        return _repair(directory, config)


def _repair(directory: Path, config: RepairConfig) -> RepairReport:
    checked = check_store(directory, config.deep)
    report = RepairReport(str(directory), config.dry_run, problems=sum(p.severity == DAMAGE for p in checked.problems))
    if not checked.damaged:
        report.rows_before = report.rows_after = checked.rows
        report.actions.append("nothing is damaged" + ("; the index is out of date: `clipdex index` or `clipdex "
                                                     "reindex` brings it up" if checked.problems else ""))
        return report
    images = _overwritten(_plan_table(directory / TABLE_DIR / f"{IMAGES}.lance", config.deep, recover=True),
                          config.deep)
    failures = _plan_table(directory / TABLE_DIR / f"{FAILURES}.lance", config.deep, recover=False)
    report.rows_before, report.rows_after = images.rows_before, images.rows_after
    report.lost, report.lost_paths = images.lost, list(images.lost_paths)
    for plan, name in ((images, IMAGES), (failures, FAILURES)):
        report.actions += _describe(plan, name, directory, config.dry_run)
    manifest = _manifest(directory, config, images, report)
    if (images.aside or images.current is None) and manifest is not None and manifest.count > images.rows_before:
        # Rows of the versions moved aside: unreadable, but the manifest counted them.
        report.lost += manifest.count - images.rows_before
        report.rows_before = manifest.count
    rebuild = images.changes or manifest is None or _faiss_damaged(checked)
    if config.dry_run:
        report.actions += _rest(checked, images, rebuild)
        return report
    for plan in (images, failures):
        _apply(plan, directory)
    _fix_id_index(images, checked)
    store = _open(directory, config, manifest, images)
    if _record_lost(store, images):
        report.actions.append(f"recorded {len(images.lost_paths):,} lost rows' paths as failures (reason '{LOST}')")
    report.actions += _remove_damaged_queries(directory, checked)
    if rebuild:
        report.index = _rebuild(store, config.ann)
        report.actions.append(f"built the index again: {report.index}")
    return report


def _plan_table(uri: Path, deep: bool, recover: bool) -> _TablePlan:
    """What repair does to the table at *uri*: its newest version that opens, without the
    fragments whose files do not read; with *recover*, the rows those held taken back from the
    newest version whose files all read (the version before a compaction holds them in the files
    it compacted), except rows deleted since where that is still known."""
    if not uri.is_dir():
        return _TablePlan(uri, current=0)
    versions = version_files(uri)
    aside, current = [], None
    for version in reversed(versions):
        try:
            dataset = open_version(uri, version)
            current = version
            break
        except Exception:  # noqa: BLE001 - Lance's error for an unreadable manifest varies
            aside.append(versions[version])
    if current is None:
        return _TablePlan(uri, None, tuple(aside))
    damaged = fragment_damage(dataset, deep)
    rows = dataset.count_rows()
    if not damaged:
        return _TablePlan(uri, current, tuple(aside), rows_before=rows, rows_after=rows)
    bad = {d.fragment for d in damaged}
    good = [f for f in dataset.get_fragments() if f.fragment_id not in bad]
    unreadable = sum(live_rows(f) for f in dataset.get_fragments() if f.fragment_id in bad)
    plan = _TablePlan(uri, current, tuple(aside), drop=tuple(sorted(bad)), damaged=tuple(damaged), rows_before=rows,
                      rows_after=rows - unreadable, lost=unreadable)
    if not recover:
        return plan
    kept, deleted = _ids(dataset, good)
    plan = replace(plan, max_id=int(kept.max()) if len(kept) else 0)
    source = next(readable_versions(uri, deep=deep), None)
    if source is None:
        return plan
    earlier, _ = _ids(open_version(uri, source), None)
    taken = np.setdiff1d(earlier, np.union1d(kept, deleted))
    return replace(plan, recover_from=source, recover=taken, rows_after=plan.rows_after + len(taken),
                   lost=max(0, unreadable - len(taken)), max_id=max(plan.max_id, int(taken.max()) if len(taken) else 0))


def _overwritten(plan: _TablePlan, deep: bool) -> _TablePlan:
    """With *deep*: *plan* also deleting the rows whose vectors read back as garbage (bytes
    overwritten inside a file: Lance keeps no checksums to notice)."""
    if not deep or plan.current is None or not plan.uri.is_dir():
        return plan
    bad = [rows for _, rows in bad_vectors(open_version(plan.uri, plan.current), skip=set(plan.drop))]
    if not bad:
        return plan
    rows = pa.concat_tables(bad)
    return replace(plan, overwritten=tuple(rows.column("id").to_pylist()), rows_after=plan.rows_after - rows.num_rows,
                   lost=plan.lost + rows.num_rows, lost_paths=plan.lost_paths + _paths(rows))



def _ids(dataset, fragments) -> tuple[np.ndarray, np.ndarray]:
    """(ids of the rows, ids of rows deleted but still in the files) of *fragments* (all when
    None), each sorted: 8 bytes a row, no vectors."""
    if fragments is not None and not fragments:  # an empty list would scan every fragment
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    table = dataset.scanner(columns=["id"], fragments=fragments, with_row_id=True, include_deleted_rows=True).to_table()
    ids = table.column("id").to_numpy()
    live = pc.is_valid(table.column("_rowid")).to_numpy(zero_copy_only=False)
    return np.sort(ids[live]), np.sort(ids[~live])


def _paths(rows: pa.Table | None) -> tuple[str, ...]:
    return tuple(rows.column("path").to_pylist()[:KNOWN_LOST_LIMIT]) if rows is not None else ()


def _say(dry_run: bool, present: str, past: str) -> str:
    """A line of the report: what would be done (a dry run) or what was."""
    return f"would {present}" if dry_run else past


def _describe(plan: _TablePlan, name: str, directory: Path, dry_run: bool) -> list[str]:
    lines = [_say(dry_run, "move", "moved") + f" {relative(p, directory)} (an unreadable version of the {name} table) "
             f"to {DAMAGED_DIR}/" for p in plan.aside]
    damaged = ", ".join(f"{relative(plan.uri / d.path, directory)} {d.what}" for d in plan.damaged[:3])
    damaged += f" and {len(plan.damaged) - 3} more" if len(plan.damaged) > 3 else ""
    if plan.current is None:
        lines.append(_say(dry_run, "move", "moved") + f" the {name} table to {DAMAGED_DIR}/: no version of it reads")
    elif plan.drop:
        lines.append(_say(dry_run, "drop", "dropped") + f" {len(plan.drop)} unreadable fragment(s) of the {name} "
                     f"table ({damaged})")
    if plan.recover_from is not None and len(plan.recover):
        lines.append(_say(dry_run, "take", "took") + f" {len(plan.recover):,} of their rows back from version "
                     f"{plan.recover_from}, the newest whose files all read")
    if plan.overwritten:
        lines.append(_say(dry_run, "delete", "deleted") + f" {len(plan.overwritten):,} rows of the {name} table "
                     "whose vectors were overwritten")
    return lines


def _manifest(directory: Path, config: RepairConfig, images: _TablePlan, report: RepairReport) -> Manifest | None:
    """The manifest as it is, or None when it must be rebuilt (said in *report*); refuses when the
    store's identity is recorded nowhere and no --model is given."""
    try:
        return read_manifest(directory)
    except ClipdexError:
        pass
    if not images.uri.is_dir() or not any_version_reads(images.uri):
        raise StoreError(f"{directory} cannot be repaired: neither its manifest nor any version of its table reads "
                         "(a copy cut short?); index its folders into a new store")
    identity = _identity(images)
    if identity is not None:
        report.actions.append(_say(config.dry_run, "rebuild", "rebuilt") + " manifest.json from the record of the "
                              "store kept in the images table")
        return None
    if not config.model:
        raise InputError(f"the manifest of {directory} is damaged and its images table does not record the store's "
                         f"model (a store made before clipdex kept it there): run `clipdex repair --store {directory} "
                         "--model NAME [--pretrained TAG]` with the model it was indexed with")
    report.actions.append(_say(config.dry_run, "rebuild", "rebuilt") + f" manifest.json for --model {config.model}")
    return None


def _identity(images: _TablePlan) -> str | None:
    """The store's identity from the newest version of the images table that records it."""
    return recorded_identity(images.uri, IDENTITY_KEY) if images.uri.is_dir() else None


def _faiss_damaged(checked: CheckReport) -> bool:
    return any(p.severity == DAMAGE and p.part in ("index", "values", "delta") for p in checked.problems)


def _rest(checked: CheckReport, images: _TablePlan, rebuild: bool) -> list[str]:
    """The dry run's last lines: what the steps after the tables would do."""
    lines = [f"would record {len(images.lost_paths):,} lost rows' paths as failures (reason '{LOST}')"] \
        if images.lost_paths else []
    lines += [f"would remove {p.path} ({p.what})" for p in checked.problems if p.part == "queries"]
    return lines + (["would build the index again"] if rebuild else [])


def _apply(plan: _TablePlan, directory: Path) -> None:
    import lance

    aside = directory / DAMAGED_DIR / time.strftime("%Y%m%d-%H%M%S")
    for path in plan.aside:
        _move_aside(path, aside / path.relative_to(directory))
    if plan.aside:
        (plan.uri / "_versions" / "latest_version_hint.json").unlink(missing_ok=True)
    if plan.current is None and plan.uri.is_dir():
        _move_aside(plan.uri, aside / plan.uri.relative_to(directory))
        return
    with writing(directory):
        if plan.recover_from is not None and len(plan.recover):
            _take_back(plan)
        if plan.drop:  # after the rows it held are back: a repair cut short here is done again by the next
            lance.LanceDataset.commit(str(plan.uri), lance.LanceOperation.Delete([], list(plan.drop), "damaged"),
                                      read_version=open_version(plan.uri).version)
        if plan.overwritten:
            dataset = open_version(plan.uri)
            for start in range(0, len(plan.overwritten), 2_000):
                dataset.delete(f"id IN ({','.join(map(str, plan.overwritten[start:start + 2_000]))})")


def _take_back(plan: _TablePlan) -> None:
    """Append the rows *plan* recovers, read from its earlier version a batch at a time and
    conformed to the table's columns now, in one commit."""
    import lance

    schema = open_version(plan.uri).schema
    source = open_version(plan.uri, plan.recover_from)
    columns = [name for name in schema.names if name in source.schema.names]

    def batches():
        for batch in source.scanner(columns=columns, batch_size=DEEP_BATCH_ROWS).to_batches():
            wanted = np.isin(batch.column("id").to_numpy(), plan.recover)
            if wanted.any():
                rows = pa.Table.from_batches([batch]).filter(pa.array(wanted))
                yield from conformed(rows, schema).to_batches()

    lance.write_dataset(pa.RecordBatchReader.from_batches(schema, batches()), str(plan.uri), mode="append")


def _move_aside(path: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(path), str(target))


def _fix_id_index(images: _TablePlan, checked: CheckReport) -> None:
    """The table's index on ids, made again where its files are damaged or the table changed."""
    if images.current is None or not images.uri.is_dir():
        return
    dataset = open_version(images.uri)
    if not (images.changes or index_damage(dataset)
            or any(p.part == IMAGES and "_indices" in p.path for p in checked.problems)):
        return
    import lancedb

    table = lancedb.connect(str(images.uri.parent)).open_table(IMAGES)
    for index in table.list_indices():
        if "id" in index.columns:
            table.drop_index(index.name)
    table.create_scalar_index("id")


def _open(directory: Path, config: RepairConfig, manifest: Manifest | None, images: _TablePlan) -> Store:
    """The store, with its manifest rebuilt where it did not read, its counts taken from the rows."""
    if manifest is None:
        identity = _identity(images)
        if identity is not None:
            manifest = from_identity(identity)
        else:
            dataset = open_version(images.uri)
            manifest = Manifest(model=config.model or "", pretrained=config.pretrained or "",
                                dim=dataset.schema.field("embedding").type.list_size, space=config.model or "")
        manifest = replace(manifest, index=IndexInfo())
        with writing(directory):
            write_manifest(directory, manifest)
    store = Store.open(directory, writable=True)
    highest = store.tables.max_id() if store.tables.exists(IMAGES) else 0
    store.update_manifest(next_id=max(store.manifest.next_id, highest + 1, images.max_id + 1),
                          count=store.tables.count() if store.tables.exists(IMAGES) else 0,
                          failures=store.tables.failure_count())
    return store


def _record_lost(store: Store, images: _TablePlan) -> bool:
    """The known paths of lost rows as failures: `info --failures` lists them until `index` sees them."""
    if not images.lost_paths:
        return False
    when = pa.array([int(time.time())] * len(images.lost_paths), pa.timestamp("s", tz="UTC"))
    rows = pa.table({"path": list(images.lost_paths), "reason": [LOST] * len(images.lost_paths),
                     "detail": ["its row was in a damaged store file; `clipdex index` embeds it again"]
                     * len(images.lost_paths), "time": when}, schema=FAILURE_SCHEMA)
    lost = set(images.lost_paths)
    store.tables.replace_failures(rows, forget=lambda path: path in lost)
    store.update_manifest(failures=store.tables.failure_count())
    return True


def _remove_damaged_queries(directory: Path, checked: CheckReport) -> list[str]:
    done = []
    for problem in checked.problems:
        if problem.part == "queries" and problem.path.startswith(QUERIES_DIR):
            (directory / problem.path).unlink(missing_ok=True)
            done.append(f"removed {problem.path} ({problem.what})")
    return done


def _rebuild(store: Store, ann: AnnConfig) -> str:
    if not store.tables.exists(IMAGES) or store.tables.count() == 0:
        store.update_manifest(index=IndexInfo())
        shutil.rmtree(store.directory / INDEX_DIR, ignore_errors=True)
        return "none: the store holds no rows now; `clipdex index` fills it again"
    info = store.rebuild_index(ann)
    recall = f", recall@10 {info.recall_at_10:.3f}" if info.recall_at_10 is not None else ""
    return f"{info.type} over {info.count:,} rows{recall}"


