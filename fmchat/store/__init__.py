"""Saved sessions: the SQLite store, the transcript format, KV snapshots. See docs/sessions.md.

Modules, leaves first (an arrow is "imports"; only kvsnap imports torch, and nothing here imports kvsnap at
module level):

- ``records``: the record types (StoredMessage, SessionInfo, SessionRecord) and pure helpers (ids, titles);
- ``files``: where the files live (the database, ``kv/<id>.*`` snapshots), id-checked paths -> records;
- ``upgrades/``: the schema, one ``NNNN_name.sql`` file per version (see its README.md);
- ``db``: the SQLite store (Store, StoreError, SCHEMA_VERSION) -> records, files, upgrades/;
- ``transcript``: the JSON transcript format and Markdown export -> records;
- ``kvsnap``: KV-cache snapshots (torch) -> files;
- ``sessions``: between the engine and the store (Recorder, open_session, rebuild_cache) -> db, kvsnap (lazily).
"""

from .db import SCHEMA_VERSION, Store, StoreError, UnknownSession, default_path
from .records import SessionInfo, SessionRecord, StoredMessage
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
