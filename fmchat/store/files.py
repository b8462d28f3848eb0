"""Where the store keeps its files: the database, and beside it the KV snapshots (``kv/``).

Standard library only (plus fmchat.paths): the database layer deletes a session's snapshot through
this module without importing the snapshot code, which needs torch. Every path built here from a
session id checks the id first (``records.ID_RE``: letters, digits, '-' and '_'; no separators, no dots),
so an id can only ever name entries directly inside ``kv/``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fmchat.paths import data_dir

from .records import is_session_id

DB_NAME = "sessions.db"
KV_DIR = "kv"
SNAPSHOT_SUFFIX = ".safetensors"


def default_path() -> Path:
    return data_dir() / DB_NAME


def touch_private(path: Path) -> None:
    """Create ``path`` (and its directory) readable by the user only, before anything writes to it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)


def checked_id(session_id: str) -> str:
    """``session_id`` itself, or ValueError when it is not a session id (and so must not name a file)."""
    if not is_session_id(session_id):
        raise ValueError(f"not a session id: {session_id!r}")
    return session_id


def kv_dir(db_path: Path | str) -> Path:
    """The folder of KV snapshots beside the database at ``db_path``."""
    return Path(db_path).parent / KV_DIR


def snapshot_path(db_path: Path | str, session_id: str) -> Path:
    """The session's KV snapshot file, ``kv/<id>.safetensors`` beside the database; ValueError for a bad id."""
    return kv_dir(db_path) / f"{checked_id(session_id)}{SNAPSHOT_SUFFIX}"


def snapshot_files(db_path: Path | str, session_id: str) -> list[Path]:
    """What a session's snapshot consists of, as it is on disk now: ``kv/<id>.*`` and ``kv/<id>`` (a folder,
    say, for a snapshot in several files). Only entries directly in ``kv/``; ValueError for a bad id."""
    sid = checked_id(session_id)
    kv = kv_dir(db_path)
    try:
        with os.scandir(kv) as entries:
            names = [e.name for e in entries if e.name == sid or e.name.startswith(sid + ".")]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [kv / name for name in sorted(names)]


def remove_snapshot(db_path: Path | str, session_id: str) -> list[Path]:
    """Delete the session's snapshot files (a folder with what is in it; a symlink itself, never its target).
    Tries every one; returns those removed, then raises the first OSError if any could not be. ValueError
    for a bad id (nothing is touched)."""
    removed: list[Path] = []
    failed: OSError | None = None
    for path in snapshot_files(db_path, session_id):
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        except OSError as exc:
            failed = failed or exc
    if failed is not None:
        raise failed
    return removed
