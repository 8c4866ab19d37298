"""Atomic file writes: a reader never sees half a file, a killed writer leaves the old one intact."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: os.PathLike | str):
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: os.PathLike | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_csv(path: os.PathLike | str, what: str = "CSV", error: type[Exception] = ValueError, **kwargs):
    """``pandas.read_csv`` whose failures name the file: missing -> "PATH: WHAT not found", malformed or
    empty -> "PATH: unreadable WHAT (...)", both raised as ``error``. Column checks stay with the caller."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    try:
        return pd.read_csv(path, **kwargs)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise error(f"{path}: unreadable {what} ({exc})") from None
