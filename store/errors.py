"""The one exception hierarchy of clipdex: every error a user can cause or fix is a ClipdexError.

Subclasses also derive from the matching builtin, so ``except ValueError`` keeps working for
callers who do not know clipdex. Messages say what went wrong and what to do about it.
"""

from __future__ import annotations


def first_line(error: BaseException, limit: int = 300) -> str:
    """An exception's first message line (its type name if it has none), for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


class ClipdexError(Exception):
    """Root of every error clipdex raises on purpose."""


class InputError(ClipdexError, ValueError):
    """Bad input from the caller: a missing file, an empty label list, a malformed option."""


class ImageError(InputError):
    """A file that cannot be used as an image; ``reason`` is a short machine-friendly cause."""

    def __init__(self, path: str, reason: str, detail: str = "") -> None:
        self.path, self.reason, self.detail = path, reason, detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


class NotFoundError(InputError, LookupError):
    """The caller named something the store does not hold (an unknown id)."""


class NoEncoderError(InputError):
    """A text or image query on a store of imported features that clipdex has no encoder for."""


class GoneError(NotFoundError):
    """What the caller names existed, but it changed since it was indexed (a file swapped or edited)."""


class ModelLoadError(ClipdexError, RuntimeError):
    """A model or its weights could not be loaded."""


class StoreError(ClipdexError, RuntimeError):
    """The store is missing, damaged, or cannot do what was asked."""


class DamagedStoreError(StoreError):
    """A file of the store cannot be read: cut short, deleted, overwritten. The message names the
    file and ``clipdex repair``, which brings the store back from what it still holds."""


class ManifestDamagedError(DamagedStoreError):
    """``manifest.json`` cannot be read or holds values of the wrong type."""


class ModelMismatchError(StoreError):
    """The store was built with another model (or embedding space) than the one asked for."""


class StoreBusyError(StoreError):
    """Another process is writing to the store (it holds the writer lock)."""


class ReadOnlyStoreError(StoreError):
    """The store cannot be written by this process (read-only mount, permissions, another owner)."""


def os_error_line(error: OSError) -> str:
    """An OSError as one line naming the file: ``Permission denied: /path``."""
    what = error.strerror or type(error).__name__
    return f"{what}: {error.filename}" if error.filename else what
