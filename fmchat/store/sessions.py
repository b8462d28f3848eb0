"""Between the engine and the store: record a ChatSession as it goes, and rebuild one from a record."""

from __future__ import annotations

import dataclasses
import time

from .db import SessionRecord, Store, StoredMessage


def stats_from_dict(d: dict | None):
    from fmchat.engine.stats import TurnStats

    if not d:
        return None
    names = {f.name for f in dataclasses.fields(TurnStats)}
    return TurnStats(**{k: v for k, v in d.items() if k in names})


def model_spec(spec: str | None) -> str | None:
    """The --model value to save: a local path made absolute, so a later resume finds it from anywhere."""
    from pathlib import Path

    if spec and Path(spec).expanduser().exists():
        return str(Path(spec).expanduser().resolve())
    return spec


def settings_of(session, spec: str | None = None) -> dict:
    """The settings a chat ran with, as saved beside it."""
    b, c = session.backend, session.config
    return {"model_spec": model_spec(spec),
        "dtype": b.dtype, "device": b.device, "quant": b.quant, "kernel": b.kernel, "decode_path": b.decode_path,
        "ctx": c.ctx, "kv_cache": c.kv_cache, "memory": c.memory,
        "max_new_tokens": c.gen.max_new_tokens, "temperature": c.gen.temperature, "top_p": c.gen.top_p, "seed": c.gen.seed,
    }  # fmt: skip


class Recorder:
    """Saves a ChatSession's messages to the store as they appear.

    ``sync(session)`` writes what changed since the last call: the messages are compared by identity with
    those already written, so a retry (messages popped, new ones appended) or a turn undone by a server
    error rewrites exactly the tail. The session row is created with the first message.
    """

    def __init__(self, store: Store, session_id: str | None = None, saved: list | None = None, spec: str | None = None):
        self.store = store
        self.spec = spec  # the --model value the chat was started with
        self.session_id = session_id
        self._saved: list = list(saved or [])  # engine Message objects already in the store, in order

    def detach(self) -> None:
        """The next message starts a new saved session (new chat)."""
        self.session_id = None
        self._saved = []

    def sync(self, session) -> str | None:
        msgs = list(session.messages)
        same = 0
        while same < min(len(msgs), len(self._saved)) and msgs[same] is self._saved[same]:
            same += 1
        if same == len(msgs) == len(self._saved):
            return self.session_id
        now = time.time()
        new = [StoredMessage(m.role, m.content, now, m.cancelled,
                             None if m.stats is None else m.stats.to_dict(), list(m.token_ids) or None) for m in msgs[same:]]  # fmt: skip
        if self.session_id is None:
            if not msgs:
                return None
            b = session.backend
            self.session_id = self.store.create_session(
                model=b.model_name,
                backend=b.name,
                settings=settings_of(session, self.spec),
                system=session.config.system,
                messages=new,
                window_start=session.window_start,
                memory_note=session.memory_note,
            )
        else:
            self.store.append_messages(
                self.session_id, same, new, window_start=session.window_start, memory_note=session.memory_note
            )
        self._saved = msgs
        return self.session_id

    def update_settings(self, session) -> None:
        if self.session_id is not None:
            b = session.backend
            self.store.update_meta(self.session_id, model=b.model_name, backend=b.name, settings=settings_of(session, self.spec),
                                   system=session.config.system)  # fmt: skip


def apply_record(session, rec: SessionRecord) -> list:
    """Put a saved conversation into ``session`` (cache emptied); returns the engine messages."""
    from fmchat.engine.session import Message

    msgs = [
        Message(m.role, m.content, m.cancelled, stats_from_dict(m.stats), list(m.token_ids or [])) for m in rec.messages
    ]
    session.load_transcript(msgs, window_start=rec.window_start, memory_note=rec.memory_note, system=rec.system)
    return msgs


def rebuild_cache(session, store: Store, session_id: str, progress=None, use_snapshot: bool = True) -> dict:
    """Bring the engine's KV cache up to the transcript: from the KV snapshot when one matches, then prefill
    whatever is left. Returns {"restored": tokens from the snapshot, "prefilled": tokens computed, "snapshot": why}."""
    from . import kvsnap

    restored, why = (0, "not used")
    if use_snapshot and session.token_level:
        restored, why = kvsnap.load(store, session_id, session)
    prefilled = session.prefill_transcript(progress)
    return {"restored": restored, "prefilled": prefilled, "snapshot": why}


def open_session(store: Store, session_id: str, session, spec: str | None = None) -> tuple[Recorder, SessionRecord]:
    """Load a saved chat into ``session`` and return the recorder that keeps saving it."""
    rec = store.get(session_id)
    msgs = apply_record(session, rec)
    return Recorder(store, rec.id, msgs, spec), rec
