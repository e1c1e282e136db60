"""A damaged store as one line: what the storage libraries raise on a store whose files were cut
short, deleted or overwritten (Lance's ``lance error: Not found: .../data/x.lance``, FAISS's
``Error in read_index``, NumPy's ``mmap length is greater than file size``) becomes a
:class:`DamagedStoreError` that names the damaged file, found by :func:`store.health.check_store`,
and the way out: ``clipdex repair``. Every command and the server pass their errors through here.
"""

from __future__ import annotations

import errno
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from store.errors import ClipdexError, DamagedStoreError, StoreError
from store.fragments import short
from store.health import DAMAGE, check_store

LOG = logging.getLogger(__name__)
# Where an exception raised inside these libraries comes from the store's files, not from the caller.
STORAGE_MODULES = ("lance", "lancedb", "faiss", "pyarrow", "numpy", "json")


@contextmanager
def explained(directory: str | os.PathLike) -> Iterator[None]:
    """Run the body; an error of the storage libraries on the store at *directory* leaves it as a
    :class:`StoreError` of one line (a full disk) or a :class:`DamagedStoreError`."""
    try:
        yield
    except ClipdexError:
        raise
    except Exception as error:
        line = explain(error, directory)
        if line is None:
            raise
        LOG.debug("the error behind: %s", line, exc_info=error)  # `clipdex -vv` shows where it came from
        if _disk_full(error):
            raise StoreError(line) from error
        raise DamagedStoreError(line) from error


def explain(error: BaseException, directory: str | os.PathLike) -> str | None:
    """One line for *error*, or None when it did not come from reading or writing the store."""
    if isinstance(error, ClipdexError) or not _from_storage(error):
        return None
    directory = Path(os.path.expanduser(os.fspath(directory)))
    if _disk_full(error):
        return (f"no space left on the device of the store {directory}: it keeps its last commit; "
                "free some space and run the same command again")
    repair = f"run `clipdex repair --store {directory}`"
    try:
        damage = [p for p in check_store(directory, ids=False).problems if p.severity == DAMAGE]
    except Exception:  # noqa: BLE001 - a store too damaged to check: say what the library said
        damage = []
    if damage:
        first = damage[0]
        more = f" (and {len(damage) - 1} more: `clipdex check --store {directory}`)" if len(damage) > 1 else ""
        return f"the store {directory} is damaged: {first.path} {first.what}{more}; {repair}"
    return (f"the store {directory} could not be read ({short(error)}); `clipdex check --store {directory} --deep` "
            f"finds the damage, then {repair}")


def _from_storage(error: BaseException) -> bool:
    text = str(error)
    if "lance error" in text or "LanceError" in text or "Error in faiss::" in text:
        return True
    traceback = error.__traceback__
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    module = traceback.tb_frame.f_globals.get("__name__", "") if traceback is not None else ""
    return module.split(".")[0] in STORAGE_MODULES


def _disk_full(error: BaseException) -> bool:
    return (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left on device" in str(error) \
        or "os error 28" in str(error)
