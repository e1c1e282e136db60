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


def write_dng(path: Path, preview, orientation: int = 1, raw_size: tuple[int, int] = (32, 24)) -> Path:
    """A DNG as cameras and converters write them, small: IFD0 a JPEG preview (NewSubFileType 1) with
    the camera's Make, Model and TIFF Orientation, its SubIFD 16-bit Bayer data (CFA RGGB). libraw
    opens it, finds the preview and reads the orientation as its flip."""
    import io
    import struct

    import numpy as np

    buffer = io.BytesIO()
    preview.save(buffer, "JPEG", quality=92)
    jpeg = buffer.getvalue()
    raw = np.random.default_rng(0).integers(0, 4000, (raw_size[1], raw_size[0])).astype("<u2").tobytes()
    short, long_ = (lambda *v: struct.pack(f"<{len(v)}H", *v)), (lambda *v: struct.pack(f"<{len(v)}I", *v))
    sizes = {1: 1, 2: 1, 3: 2, 4: 4}

    def ifd(entries, at):  # (tag, type, count, bytes); values over 4 bytes go after the entries
        out, extra = struct.pack("<H", len(entries)), b""
        start = at + 2 + 12 * len(entries) + 4
        for tag, kind, count, value in sorted(entries):
            if sizes[kind] * count <= 4:
                out += struct.pack("<HHI", tag, kind, count) + value.ljust(4, b"\0")
            else:
                out += struct.pack("<HHII", tag, kind, count, start + len(extra))
                extra += value + (b"\0" if len(value) % 2 else b"")
        return out + long_(0) + extra

    def entries(jpeg_at, raw_at, sub_at):
        first = [(254, 4, 1, long_(1)), (256, 4, 1, long_(preview.width)), (257, 4, 1, long_(preview.height)),
                 (258, 3, 3, short(8, 8, 8)), (259, 3, 1, short(7)), (262, 3, 1, short(6)), (273, 4, 1, long_(jpeg_at)),
                 (274, 3, 1, short(orientation)), (277, 3, 1, short(3)), (279, 4, 1, long_(len(jpeg))),
                 (271, 2, 6, b"Canon\0"), (272, 2, 8, b"EOS R5 \0"), (330, 4, 1, long_(sub_at)),
                 (50706, 1, 4, bytes((1, 4, 0, 0))), (50708, 2, 12, b"Canon EOS R\0")]
        second = [(254, 4, 1, long_(0)), (256, 4, 1, long_(raw_size[0])), (257, 4, 1, long_(raw_size[1])),
                  (258, 3, 1, short(16)), (259, 3, 1, short(1)), (262, 3, 1, short(32803)), (273, 4, 1, long_(raw_at)),
                  (277, 3, 1, short(1)), (278, 4, 1, long_(raw_size[1])), (279, 4, 1, long_(len(raw))),
                  (33421, 3, 2, short(2, 2)), (33422, 1, 4, bytes((0, 1, 1, 2)))]
        return first, second

    first, second = entries(0, 0, 0)  # the sizes do not depend on the offsets
    sub_at = 8 + len(ifd(first, 8))
    data_at = sub_at + len(ifd(second, sub_at))
    first, second = entries(data_at, data_at + len(jpeg), sub_at)
    path.write_bytes(b"II*\0" + long_(8) + ifd(first, 8) + ifd(second, sub_at) + jpeg + raw)
    return path
