"""kill -9 in the middle of `clipdex index`, rerun: every valid image is in the store exactly once."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from store.store import Store


def clipdex_script() -> str:
    script = Path(sys.executable).parent / "clipdex"
    return str(script) if script.exists() else "clipdex"


def committed_rows(store_dir: Path) -> int:
    if not Store.exists(store_dir) or not (store_dir / "lance" / "images.lance").exists():
        return 0
    try:
        return Store.open(store_dir).tables.count()
    except Exception:  # the table is being created right now
        return 0


def test_sigkill_mid_run_then_rerun(heldout_library, tmp_path):
    directory, rows = heldout_library
    store_dir = tmp_path / "store"
    command = [clipdex_script(), "index", str(directory), "--store", str(store_dir), "--model", "clipdex-shapes",
               "--device", "cpu", "--batch-size", "8", "--commit-every", "8", "--workers", "1", "--json"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while committed_rows(store_dir) < 16 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    partial = committed_rows(store_dir)
    assert process.returncode == -signal.SIGKILL
    assert 16 <= partial < len(rows), "the run must be killed part-way for this test to mean anything"

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["unchanged"] == partial and summary["embedded"] == len(rows) - partial

    store = Store.open(store_dir)
    table = store.tables.images.search().select(["id", "path"]).to_arrow()
    paths, ids = table.column("path").to_pylist(), table.column("id").to_pylist()
    assert sorted(paths) == sorted(row["path"] for row in rows)  # each image exactly once
    assert len(set(ids)) == len(ids) and store.manifest.count == len(rows)
    assert store.manifest.index.count == len(rows) and store.manifest.index.table_version == store.tables.version()
