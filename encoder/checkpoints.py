"""Reading checkpoint files: weights only, never code, and only the file a store was built with.

open_clip's ``factory.load_state_dict`` calls ``torch.load(weights_only=True)`` and, when that
raises a TypeError, calls ``torch.load`` again without it, which unpickles anything: with torch
before 2.6, or with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` set, a crafted checkpoint ran code.
:func:`open_clip_reads_weights_only` hands open_clip :func:`read_state_dict` in its place for
the duration of one load, so every checkpoint it reads (local files, hub tags, ``hf-hub:`` and
``local-dir:`` models) goes through here; open_clip's own conversions (``load_checkpoint``:
third-party layouts, resized position embeddings...) still run on what this returns.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
import warnings
import zipfile
from typing import IO, Iterator

from store.errors import ModelLoadError, ModelMismatchError

ONLY_WEIGHTS = "clipdex loads only weights (a state_dict saved with torch.save, or .safetensors)"
_ADVICE = f"{ONLY_WEIGHTS}: pass such a file saved from this architecture"
SAFE_TORCH = "2.6"  # torch.load(weights_only=True) can run code before 2.6 (CVE-2025-32434)
_SWAP = threading.Lock()  # one load at a time has open_clip's reader swapped for ours


def file_sha256(handle: IO[bytes]) -> str:
    """The SHA-256 of an open file from where it stands to its end."""
    digest = hashlib.sha256()
    while chunk := handle.read(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def check_sha256(path: str, recorded: str, found: str) -> None:
    if found != recorded:
        raise ModelMismatchError(
            f"the checkpoint at {path} is not the one this store was built with (sha256 {recorded[:16]}… recorded, "
            f"{found[:16]}… found); put the original back or reindex")


def read_state_dict(path: str, sha256: str = "", model: str = "") -> dict:
    """The state dict in the checkpoint at *path*, read without unpickling anything but tensors
    and containers. With *sha256*, the file is hashed and read through one open descriptor, so
    the bytes checked are the bytes loaded. *model* names the model in error messages."""
    where = f"'{model}' from {path}" if model else path
    with open(path, "rb") as handle:
        data = None
        if str(path).endswith(".safetensors") and sha256:
            data = handle.read()
            check_sha256(str(path), sha256, hashlib.sha256(data).hexdigest())
        elif sha256:
            check_sha256(str(path), sha256, file_sha256(handle))
            handle.seek(0)
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load, load_file

            checkpoint = load(data) if data is not None else load_file(path, device="cpu")
        else:
            checkpoint = _torch_weights(handle, where)
    # What open_clip's load_state_dict does after reading (its conversions come after, in load_checkpoint).
    state_dict = checkpoint["state_dict"] if isinstance(checkpoint, dict) and "state_dict" in checkpoint else checkpoint
    if not isinstance(state_dict, dict) or not state_dict:
        raise ModelLoadError(f"could not load {where}: it is not a checkpoint of weights, it holds no state_dict "
                             f"({type(state_dict).__name__}); {_ADVICE}")
    if str(next(iter(state_dict))).startswith("module"):
        state_dict = {key[7:]: value for key, value in state_dict.items()}
    return state_dict


def _torch_weights(handle: IO[bytes], where: str):
    import pickle

    import torch

    if _release(torch.__version__) < _release(SAFE_TORCH):
        raise ModelLoadError(f"could not load {where}: torch {torch.__version__} cannot read checkpoints safely; "
                             f"clipdex needs torch>={SAFE_TORCH}")
    if _is_torchscript(handle):
        raise ModelLoadError(f"could not load {where}: it is not a checkpoint of weights but a TorchScript archive, "
                             f"which holds code; {_ADVICE}")
    try:
        with warnings.catch_warnings():  # what it refuses is said by the error, not a warning before it
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            return torch.load(handle, map_location="cpu", weights_only=True)  # and no second try without it
    except pickle.UnpicklingError as error:
        raise ModelLoadError(f"could not load {where}: it is not a checkpoint of weights alone, torch's weights-only "
                             f"reader refused it ({_refusal(error)}); {_ADVICE}") from error


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string: pre-release and local parts (2.6.0a0+git...) are ignored."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else (0, 0)


def _is_torchscript(handle: IO[bytes]) -> bool:
    """A zip with ``constants.pkl`` is what torch.jit.save writes (torch.load would hand it to torch.jit.load)."""
    try:
        if not zipfile.is_zipfile(handle):
            return False
        handle.seek(0)
        with zipfile.ZipFile(handle) as archive:
            return any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False
    finally:
        handle.seek(0)


def _refusal(error: BaseException) -> str:
    """The line of torch's weights-only error that says what was refused (it comes after advice)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = [line for line in lines[1:] if not line.startswith(("Please file an issue", "Check the documentation"))]
    return (detail[0] if detail else "an object that is not a tensor or a container").rstrip(".")[:200]


@contextlib.contextmanager
def open_clip_reads_weights_only(model: str = "", sha256: str = "") -> Iterator[list[str]]:
    """For the duration of one load, open_clip reads checkpoints with :func:`read_state_dict`
    (each checked against *sha256* when given). Yields the list of the files it read."""
    from open_clip import factory

    read: list[str] = []

    def load_state_dict(checkpoint_path: str, device: str = "cpu", weights_only: bool = True) -> dict:
        read.append(os.fspath(checkpoint_path))
        return read_state_dict(os.fspath(checkpoint_path), sha256, model)  # always on the CPU, as open_clip asks

    with _SWAP:
        original = factory.load_state_dict
        factory.load_state_dict = load_state_dict
        try:
            yield read
        finally:
            factory.load_state_dict = original
