"""Saved sessions: the SQLite store, the transcript format, KV snapshots. See docs/sessions.md."""

from .db import (
    SCHEMA_VERSION,
    SessionInfo,
    SessionRecord,
    Store,
    StoredMessage,
    StoreError,
    UnknownSession,
    default_path,
)
from .sessions import Recorder, apply_record, open_session, rebuild_cache

__all__ = [
    "SCHEMA_VERSION",
    "Recorder",
    "SessionInfo",
    "SessionRecord",
    "Store",
    "StoreError",
    "StoredMessage",
    "UnknownSession",
    "apply_record",
    "default_path",
    "open_session",
    "rebuild_cache",
]  # fmt: skip
