"""SIGTERM (a service manager, `kill`, a job's time limit) is handled like Ctrl-C: one line, exit
code 143, the store at its last commit and a rerun finishes it."""

from __future__ import annotations

import signal
import time

from tests.helpers import MODEL, clipdex, demo_jpegs


def test_sigterm_during_index_is_one_line_and_the_store_finishes_on_rerun(tmp_path):
    library = demo_jpegs(tmp_path / "lib", 400, 3, (64, 96))
    store = tmp_path / "store"
    args = ["index", library, "--store", store, *MODEL, "--commit-every", "50", "--batch-size", "8"]
    process = clipdex(*args, wait=False)
    deadline = time.monotonic() + 120
    while not (store / "manifest.json").exists() and time.monotonic() < deadline:  # the run is writing now
        time.sleep(0.05)
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.strip()][-1].startswith("terminated: ")
    again = clipdex(*args)
    assert again.returncode == 0, again.stderr
    info = clipdex("info", "--store", store, "--json")
    assert '"count": 400' in info.stdout
