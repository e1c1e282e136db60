"""Bring the index up to the table without a rebuild, when that is sound (store/delta.py).

A build is needed, and this says so by returning None, when there is no built index or no values
file to start from, when the index was built on fewer than ``delta_min_rows`` rows (a build that
small takes a second or two and re-tunes on every query set), when the index's kind is no longer the one the table's size calls for (an
exact index past ``ann_threshold``), when the rows new or changed since the build are more than
``rebuild_growth - 1`` times the rows it was built on (the delta is searched exactly: it must stay
small beside the trained index), or when most of the built rows are gone. Otherwise the delta is
made from the build's ids, the table's ids and the recorded changes, and the manifest published.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from store.ann import RECALL_K, AnnConfig, GroundTruth, choose_kind, load_index
from store.delta import Delta, changed_since_build, merged
from store.manifest import IndexInfo
from store.sharded import SCALABLE_KINDS
from store.tables import Tables, column_vectors
from store.values import IDS_FILE

MAX_HIDDEN_SHARE = 0.5  # of the built rows: past this, searching the index mostly finds what is hidden


def delta_update(directory: Path, info: IndexInfo, tables: Tables, config: AnnConfig) -> IndexInfo | None:
    """The index info to publish, a delta written that brings the index *info* describes up to
    *tables*, or None when a full build is needed (see the module's doc)."""
    built_rows = info.built_rows or info.count
    if not info.file or not info.values or not (directory / info.values / IDS_FILE).is_file():
        return None
    if config.kind not in ("auto", info.type) or built_rows < config.delta_min_rows:
        return None
    table_ids = np.sort(tables.vector_source().all_ids())
    if choose_kind(len(table_ids), tables.dim, config) != info.type:
        return None
    built_ids = np.load(directory / info.values / IDS_FILE)
    changed, _ = changed_since_build(directory)
    new = np.setdiff1d(table_ids, built_ids, assume_unique=True)
    rewritten = np.intersect1d(changed, built_ids)
    delta_ids = np.union1d(new, np.intersect1d(rewritten, table_ids))
    hidden = np.union1d(np.setdiff1d(built_ids, table_ids, assume_unique=True), rewritten)
    if len(delta_ids) > (config.rebuild_growth - 1) * built_rows or len(hidden) > MAX_HIDDEN_SHARE * built_rows:
        return None
    table_version = tables.version()
    folder = None
    if len(delta_ids) or len(hidden):
        folder = f"faiss/delta-v{table_version}"
        if (directory / folder).exists() or folder == info.delta:  # a dead update's, or the one readers use
            folder = f"{folder}-{np.random.default_rng().integers(1 << 30)}"
        Delta.beside(_delta_ivf(directory, info), delta_ids, _vectors(tables, delta_ids, built_ids),
                     hidden).write(directory / folder)
    return replace(info, table_version=table_version, count=len(table_ids), built_rows=built_rows,
                   delta=folder or "", delta_rows=len(delta_ids), hidden_rows=len(hidden))


def _delta_ivf(directory: Path, info: IndexInfo):
    """An empty IVF-Flat on a copy of the built index's coarse quantizer, searched as it is, for
    the kinds whose quantizer works on the vectors as they are (a compressed index's works after a
    rotation: its delta is searched exactly); None for the others."""
    if info.type not in SCALABLE_KINDS:
        return None
    import faiss

    built = load_index(directory / info.file, info.params, use_gpu=False)
    ivf = faiss.extract_index_ivf(built)  # a view into *built*: copied while it is alive
    # faiss's Python wrapper keeps the copied quantizer alive with the index it is given to
    empty = faiss.IndexIVFFlat(faiss.clone_index(ivf.quantizer), ivf.d, ivf.nlist, faiss.METRIC_INNER_PRODUCT)
    empty.nprobe = ivf.nprobe
    return empty


def _vectors(tables: Tables, ids: np.ndarray, built_ids: np.ndarray) -> np.ndarray:
    """The embeddings of *ids* (sorted), in that order: rows above every built id (all new rows:
    ids only grow) in one range read, rows written again by id."""
    vectors = np.zeros((len(ids), tables.dim), np.float32)
    highest = int(built_ids[-1]) if len(built_ids) else -1
    above = ids > highest
    parts = []
    if above.any():
        parts.append(tables.rows_in_range(highest + 1, ["id", "embedding"]))
    if (~above).any():
        parts.append(tables.rows_by_id(ids[~above].tolist(), ["id", "embedding"]))
    for rows in parts:
        if rows.num_rows:
            found = rows.column("id").to_numpy()
            keep = np.isin(found, ids)
            positions = np.searchsorted(ids, found[keep])
            vectors[positions] = column_vectors(rows)[keep]
    return vectors


TRUTH_FILE = "truth.npz"


def save_truth(folder: Path, truth: GroundTruth | None) -> None:
    """What a build measured recall against, kept beside its values for measuring its deltas."""
    if truth is None or truth.scores is None:
        return
    names = list(truth.named())
    bounds = np.array([[rows.start, rows.stop] for rows in truth.named().values()], np.int64).reshape(-1, 2)
    with open(folder / TRUTH_FILE, "wb") as out:
        np.savez(out, queries=truth.queries, ids=truth.ids, scores=truth.scores, names=np.array(names), bounds=bounds)


def load_truth(folder: Path) -> GroundTruth | None:
    try:
        with np.load(folder / TRUTH_FILE, allow_pickle=False) as data:
            sets = {str(name): slice(int(a), int(b)) for name, (a, b) in zip(data["names"], data["bounds"])}
            return GroundTruth(data["queries"], data["ids"], sets, data["scores"])
    except (OSError, ValueError, KeyError):
        return None  # a build before this release, or a file cut short: the recorded recall stands


def truth_after(truth: GroundTruth, delta: Delta) -> GroundTruth | None:
    """The exact top-k of the build's queries over the rows there are now, from the build's
    TRUTH_DEPTH-deep neighbours less the hidden ones and the delta's rows searched exactly; only
    queries for which that is certain (at least k of their built neighbours still shown), or None
    when that leaves fewer than half of any set."""
    k = RECALL_K
    shown = (truth.ids >= 0) & ~np.isin(truth.ids, delta.hidden)
    certain = shown.sum(axis=1) >= min(k, truth.ids.shape[1])
    built = (np.where(shown, truth.scores, -np.inf), np.where(shown, truth.ids, -1))
    best = merged(built, delta.exact(truth.queries, k), k)
    sets, kept, start = {}, [], 0
    for name, rows in truth.named().items():
        chosen = np.flatnonzero(certain[rows]) + rows.start
        if len(chosen) < (rows.stop - rows.start) / 2:
            return None
        sets[name] = slice(start, start + len(chosen))
        kept.append(chosen)
        start += len(chosen)
    rows = np.concatenate(kept)
    return GroundTruth(truth.queries[rows], best[1][rows], sets, best[0][rows])
