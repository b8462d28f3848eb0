"""The store's record types and the pure helpers its modules share.

A leaf module: standard library only (no SQL, no torch, nothing else from fmchat), so the database layer,
the transcript format and the KV snapshots can all import it without importing each other.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field

TITLE_CHARS = 60
ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # ids name snapshot files: no path separators, no dots


def new_id() -> str:
    return secrets.token_hex(4)


def is_session_id(text: object) -> bool:
    """True for a string that can be a session id (and so a file name under kv/): ``ID_RE``, whole."""
    return isinstance(text, str) and ID_RE.fullmatch(text) is not None


def derive_title(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1].rstrip() + "…"


@dataclass
class StoredMessage:
    role: str
    content: str
    created: float
    cancelled: bool = False
    stats: dict | None = None
    token_ids: list[int] | None = None


@dataclass
class SessionInfo:
    id: str
    title: str
    created: float
    updated: float
    model: str
    backend: str
    message_count: int


@dataclass
class SessionRecord:
    id: str
    title: str
    created: float
    updated: float
    model: str = ""
    backend: str = ""
    settings: dict = field(default_factory=dict)
    system: str | None = None
    window_start: int = 0
    memory_note: str = ""
    title_set: bool = False
    messages: list[StoredMessage] = field(default_factory=list)
