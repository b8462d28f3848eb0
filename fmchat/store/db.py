"""The session store: one SQLite database in the user data dir.

WAL journal (a reader never blocks the writer; a killed process leaves at most its open transaction
behind, which SQLite rolls back), foreign keys on, a busy timeout so two fmchat processes can share the
file, and a schema versioned with ``PRAGMA user_version``: the files in ``upgrades/`` (``NNNN_name.sql``,
read in number order into ``MIGRATIONS``; ``MIGRATIONS[i]`` takes version i to i+1, see upgrades/README.md).
A database written by a newer fmchat is refused and left untouched. The file is created 0600; SQLite
gives its -wal and -shm files the database's permissions.

No torch: standard library, fmchat.errors and the leaf modules here (deleting a session removes its KV snapshot
through ``files``, not ``kvsnap``).
"""

from __future__ import annotations

import functools
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Self

from fmchat.errors import StoreError, UnknownSession  # one line for the user; CLI exit status 2

from .files import DB_NAME, default_path, remove_snapshot, touch_private
from .records import TITLE_CHARS, SessionInfo, SessionRecord, StoredMessage, derive_title, new_id

__all__ = [
    "BUSY_TIMEOUT_MS", "DB_NAME", "MIGRATIONS", "SCHEMA_VERSION", "TITLE_CHARS", "SessionInfo", "SessionRecord",
    "Store", "StoreError", "StoredMessage", "UnknownSession", "default_path", "derive_title", "load_upgrades",
    "new_id", "split_statements", "touch_private",
]  # fmt: skip

BUSY_TIMEOUT_MS = 10_000
UPGRADE_NAME = re.compile(r"(\d{4})_[a-z0-9_]+\.sql")


def load_upgrades(folder=None) -> list[str]:
    """The SQL of ``upgrades/NNNN_*.sql`` in number order (element i: version i to i+1), read as package
    resources so it works from a wheel or a zip (``folder``: another directory, for tests). A misnamed file,
    a repeated number or a gap is an error."""
    if folder is None:
        folder = resources.files(__package__) / "upgrades"
    found: dict[int, str] = {}
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        m = UPGRADE_NAME.fullmatch(entry.name)
        if m is None:
            raise RuntimeError(f"fmchat/store/upgrades/{entry.name}: not named NNNN_name.sql")
        n = int(m[1])
        if n in found:
            raise RuntimeError(f"fmchat/store/upgrades: two files numbered {m[1]}")
        found[n] = entry.read_text(encoding="utf-8")
    if sorted(found) != list(range(1, len(found) + 1)):
        raise RuntimeError(f"fmchat/store/upgrades: not numbered 0001, 0002... without gaps: {sorted(found)}")
    return [found[n] for n in sorted(found)]


def split_statements(script: str) -> list[str]:
    """The statements of an SQL script, each with its ';' (one inside a string, a comment or a trigger body
    does not end a statement; blank ones are dropped)."""
    pieces = script.split(";")
    out: list[str] = []
    buf = ""
    for i, piece in enumerate(pieces):
        buf += piece
        if i == len(pieces) - 1:
            break
        buf += ";"
        if sqlite3.complete_statement(buf):
            if buf[:-1].strip():
                out.append(buf)
            buf = ""
    if buf.strip():
        out.append(buf)  # the last statement may lack its ';'
    return out


MIGRATIONS: list[str] = load_upgrades()
SCHEMA_VERSION = len(MIGRATIONS)


def _is_busy(exc: BaseException) -> bool:
    msg = str(exc).lower()
    return "locked" in msg or "busy" in msg


def _guarded(fn):
    """SQLite errors from a public Store method become one clear StoreError."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise self._error(exc) from None

    return wrapper


class Store:
    """Thread-safe (one lock around the connection); every write is its own committed transaction."""

    def __init__(self, path: Path | str | None = None, busy_timeout_ms: int = BUSY_TIMEOUT_MS):
        self.path = Path(path) if path is not None else default_path()
        self._lock = threading.RLock()
        existed = self.path.exists()
        try:
            if not existed:
                touch_private(self.path)
            self.conn = sqlite3.connect(
                str(self.path), timeout=busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the session store {self.path}: {exc}") from None
        try:
            self.conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                self.conn.close()
                raise StoreError(
                    f"the session store {self.path} was written by a newer fmchat (schema version {version}; "
                    f"this fmchat knows up to {SCHEMA_VERSION}); it was not touched: upgrade fmchat"
                )
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            if version < SCHEMA_VERSION:
                self._migrate()
        except sqlite3.DatabaseError as exc:
            self.conn.close()
            if _is_busy(exc):
                raise self._busy_error() from None
            raise StoreError(f"the session store {self.path} is not a readable database: {exc}") from None
        for suffix in ("-wal", "-shm"):
            side = Path(str(self.path) + suffix)
            if side.exists():
                try:
                    os.chmod(side, 0o600)
                except OSError:
                    pass

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    def _busy_error(self) -> StoreError:
        return StoreError(f"the session store {self.path} is busy (another fmchat process holds it); try again")

    def _error(self, exc: sqlite3.Error) -> StoreError:
        if _is_busy(exc):
            return self._busy_error()
        return StoreError(f"session store {self.path}: {exc}")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ schema
    def _migrate(self) -> None:
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")  # one process migrates; another waits, then sees the new version
            try:
                version = self.conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"the session store {self.path} was written by a newer fmchat (schema version {version})"
                    )
                for i in range(version, SCHEMA_VERSION):
                    for stmt in split_statements(MIGRATIONS[i]):
                        self.conn.execute(stmt)
                    self.conn.execute(f"PRAGMA user_version={i + 1}")
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise

    @property
    def schema_version(self) -> int:
        with self._lock:
            return self.conn.execute("PRAGMA user_version").fetchone()[0]

    def _tx(self):
        """One write transaction: BEGIN IMMEDIATE (waits up to the busy timeout for another writer), COMMIT."""
        store = self

        class _Tx:
            def __enter__(self):
                store._lock.acquire()
                try:
                    store.conn.execute("BEGIN IMMEDIATE")
                except BaseException:
                    store._lock.release()
                    raise
                return store.conn

            def __exit__(self, exc_type, exc, tb):
                try:
                    if exc_type is None:
                        try:
                            store.conn.execute("COMMIT")
                        except BaseException:
                            if store.conn.in_transaction:
                                store.conn.execute("ROLLBACK")
                            raise
                    elif store.conn.in_transaction:
                        store.conn.execute("ROLLBACK")
                finally:
                    store._lock.release()
                return False

        return _Tx()

    # ------------------------------------------------------------------ sessions
    @_guarded
    def create_session(self, *, model: str = "", backend: str = "", settings: dict | None = None, system: str | None = None,
                       title: str = "", created: float | None = None, session_id: str | None = None,
                       messages: Iterable[StoredMessage] = (), window_start: int = 0, memory_note: str = "") -> str:  # fmt: skip
        """A new session, with its first ``messages`` in the same transaction (never a half-made session)."""
        now = time.time() if created is None else created
        with self._tx() as c:
            sid = session_id or new_id()
            while c.execute("SELECT 1 FROM sessions WHERE id=?", (sid,)).fetchone():
                sid = new_id()
            c.execute(
                "INSERT INTO sessions (id, title, created, updated, model, backend, settings, system, window_start, memory_note) "
                "VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    sid,
                    title,
                    now,
                    now,
                    model,
                    backend,
                    json.dumps(settings or {}, sort_keys=True),
                    system,
                    window_start,
                    memory_note,
                ),
            )
            msgs = list(messages)
            self._insert_messages(c, sid, 0, msgs)
            first = next((m.content for m in msgs if m.role == "user"), None)
            if first is not None and not title:
                c.execute("UPDATE sessions SET title=? WHERE id=?", (derive_title(first), sid))
        return sid

    @staticmethod
    def _insert_messages(c, sid: str, first_seq: int, messages: list[StoredMessage]) -> None:
        for i, m in enumerate(messages):
            c.execute(
                "INSERT INTO messages (session_id, seq, role, content, created, cancelled, stats, token_ids) VALUES (?,?,?,?,?,?,?,?)",
                (sid, first_seq + i, m.role, m.content, m.created, int(m.cancelled),
                 None if m.stats is None else json.dumps(m.stats), None if m.token_ids is None else json.dumps(m.token_ids)),
            )  # fmt: skip

    @_guarded
    def resolve(self, session_id: str) -> str:
        """The full id for ``session_id`` or a unique prefix of one; UnknownSession otherwise."""
        sid = (session_id or "").strip()
        with self._lock:
            if sid and self.conn.execute("SELECT 1 FROM sessions WHERE id=?", (sid,)).fetchone():
                return sid
            rows = (
                self.conn.execute("SELECT id FROM sessions WHERE substr(id, 1, ?) = ?", (len(sid), sid)).fetchall()
                if sid
                else []
            )
        if len(rows) == 1:
            return rows[0][0]
        if len(rows) > 1:
            raise UnknownSession(f"session id '{session_id}' is ambiguous ({len(rows)} sessions start with it)")
        raise UnknownSession(f"no session '{session_id}' (fmchat sessions list shows them)")

    @_guarded
    def append_messages(self, session_id: str, first_seq: int, messages: Iterable[StoredMessage],
                        *, window_start: int | None = None, memory_note: str | None = None) -> None:  # fmt: skip
        """Replace the session's messages from ``first_seq`` on with ``messages``, in one transaction."""
        now = time.time()
        with self._tx() as c:
            row = c.execute("SELECT title, title_set FROM sessions WHERE id=?", (session_id,)).fetchone()
            if row is None:
                raise UnknownSession(f"no session '{session_id}'")
            c.execute("DELETE FROM messages WHERE session_id=? AND seq>=?", (session_id, first_seq))
            self._insert_messages(c, session_id, first_seq, list(messages))
            sets, args = ["updated=?"], [now]
            if not row[1]:
                first = c.execute(
                    "SELECT content FROM messages WHERE session_id=? AND role='user' ORDER BY seq LIMIT 1",
                    (session_id,),
                ).fetchone()
                sets.append("title=?")
                args.append(derive_title(first[0]) if first else "")
            if window_start is not None:
                sets.append("window_start=?")
                args.append(window_start)
            if memory_note is not None:
                sets.append("memory_note=?")
                args.append(memory_note)
            c.execute(f"UPDATE sessions SET {', '.join(sets)} WHERE id=?", (*args, session_id))

    @_guarded
    def update_meta(self, session_id: str, **fields) -> None:
        allowed = {"model", "backend", "settings", "system"}
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"not a session field: {', '.join(sorted(bad))}")
        if "settings" in fields:
            fields["settings"] = json.dumps(fields["settings"] or {}, sort_keys=True)
        if not fields:
            return
        with self._tx() as c:
            c.execute(
                f"UPDATE sessions SET {', '.join(f'{k}=?' for k in fields)} WHERE id=?", (*fields.values(), session_id)
            )

    @_guarded
    def rename(self, session_id: str, title: str) -> None:
        sid = self.resolve(session_id)
        title = " ".join(title.split())
        with self._tx() as c:
            if title:
                c.execute("UPDATE sessions SET title=?, title_set=1 WHERE id=?", (title, sid))
            else:  # an empty name goes back to the one derived from the first message
                first = c.execute(
                    "SELECT content FROM messages WHERE session_id=? AND role='user' ORDER BY seq LIMIT 1", (sid,)
                ).fetchone()
                c.execute(
                    "UPDATE sessions SET title=?, title_set=0 WHERE id=?",
                    (derive_title(first[0]) if first else "", sid),
                )

    @_guarded
    def delete(self, session_id: str) -> str:
        sid = self.resolve(session_id)
        with self._tx() as c:
            c.execute("DELETE FROM sessions WHERE id=?", (sid,))  # messages go with it (ON DELETE CASCADE)
        try:
            remove_snapshot(self.path, sid)  # kv/<id>.* and a kv/<id>/ folder
        except (ValueError, OSError):
            pass  # no snapshot file can exist under an id that is not a file name; a stray file is harmless
        return sid

    @_guarded
    def list_sessions(self, search: str | None = None) -> list[SessionInfo]:
        """Newest first; ``search`` matches the title or any message text (case-insensitive)."""
        q = (
            "SELECT s.id, s.title, s.created, s.updated, s.model, s.backend, "
            "(SELECT count(*) FROM messages m WHERE m.session_id = s.id) FROM sessions s"
        )
        args: tuple = ()
        if search and search.strip():
            pat = "%" + search.strip().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            q += (" WHERE s.title LIKE ? ESCAPE '\\' OR EXISTS (SELECT 1 FROM messages m WHERE m.session_id = s.id "
                  "AND m.content LIKE ? ESCAPE '\\')")  # fmt: skip
            args = (pat, pat)
        q += " ORDER BY s.updated DESC, s.rowid DESC"
        with self._lock:
            rows = self.conn.execute(q, args).fetchall()
        return [SessionInfo(*r) for r in rows]

    @_guarded
    def get(self, session_id: str) -> SessionRecord:
        sid = self.resolve(session_id)
        with self._lock:
            r = self.conn.execute(
                "SELECT id, title, created, updated, model, backend, settings, system, window_start, memory_note, title_set "
                "FROM sessions WHERE id=?",
                (sid,),
            ).fetchone()
            if r is None:
                raise UnknownSession(f"no session '{session_id}'")
            msgs = self.conn.execute(
                "SELECT role, content, created, cancelled, stats, token_ids FROM messages WHERE session_id=? ORDER BY seq",
                (sid,),
            ).fetchall()
        rec = SessionRecord(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6] or "{}"), r[7], r[8], r[9], bool(r[10]))
        rec.messages = [
            StoredMessage(
                m[0],
                m[1],
                m[2],
                bool(m[3]),
                None if m[4] is None else json.loads(m[4]),
                None if m[5] is None else json.loads(m[5]),
            )
            for m in msgs
        ]
        return rec

    @_guarded
    def insert_record(self, rec: SessionRecord) -> str:
        """Write a whole session (import) in one transaction; keeps ``rec.id`` unless taken. Returns the id."""
        with self._tx() as c:
            sid = rec.id or new_id()
            while c.execute("SELECT 1 FROM sessions WHERE id=?", (sid,)).fetchone():
                sid = new_id()
            c.execute(
                "INSERT INTO sessions (id, title, title_set, created, updated, model, backend, settings, system, window_start, memory_note) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (sid, rec.title, int(rec.title_set), rec.created, rec.updated, rec.model, rec.backend,
                 json.dumps(rec.settings, sort_keys=True), rec.system, rec.window_start, rec.memory_note),
            )  # fmt: skip
            self._insert_messages(c, sid, 0, list(rec.messages))
        return sid
