"""Helpers shared by the tests that drive the command line in-process or as a process of its own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cli

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["--model", "clipdex-shapes", "--device", "cpu", "--workers", "0"]
CAN_DROP_PRIVILEGES = hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("setpriv") is not None


def run(capsys, *args):
    with pytest.raises(SystemExit) as caught:
        cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return caught.value.code, out, err


def run_quietly(*args):
    """:func:`run` where no capsys is at hand (a module fixture): exit code, stdout, stderr."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as caught:
        cli.main([str(a) for a in args])
    return caught.value.code, out.getvalue(), err.getvalue()


def clipdex(*args, wait=True, unprivileged=False, **kwargs) -> subprocess.Popen | subprocess.CompletedProcess:
    """`clipdex ARGS` in a process of its own (as root without capabilities if *unprivileged*)."""
    command = [sys.executable, "-c", "import cli; cli.main()", *map(str, args)]
    if unprivileged:
        command = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", *command]
    if not wait:
        return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, **kwargs)




LOCAL = "http://127.0.0.1:8000"  # a Host the server answers to (the test client's own is "testserver")


def bitmap(path: Path, colour: tuple[int, int, int]) -> Path:
    """A 32 x 32 BMP of one colour: two of them differ in content, never in length."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path, "BMP")
    return path


def local_client(app, **kwargs):
    from fastapi.testclient import TestClient

    return TestClient(app, base_url=LOCAL, **kwargs)


def demo_jpegs(folder, count: int, seed: int, short_side: tuple[int, int], name: str = "{:04d}.jpg"):
    """*count* demo-shape JPEGs in a new *folder*, each *name* formatted with its number."""
    from demo.shapes import sample

    folder.mkdir(parents=True)
    for index in range(count):
        sample(seed, index, short_side=short_side)[0].save(folder / name.format(index), quality=90)
    return folder
