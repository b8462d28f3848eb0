"""The session store on real SQLite files: schema, permissions, autosave, restore, KV snapshots, transcripts."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
import subprocess
import sys

import pytest
from conftest import make_session

from fmchat.engine import TurnDone, TurnStarted
from fmchat.store import (
    SCHEMA_VERSION,
    Recorder,
    Store,
    StoreError,
    UnknownSession,
    kvsnap,
    open_session,
    rebuild_cache,
    transcript,
)
from fmchat.store.db import derive_title


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def record_turn(session, recorder, text) -> TurnDone:
    """One turn with the app's autosave points: user message at TurnStarted, reply at TurnDone."""
    done = None
    for ev in session.turn(text):
        if isinstance(ev, TurnStarted):
            recorder.sync(session)
        elif isinstance(ev, TurnDone):
            done = ev
            recorder.sync(session)
    return done


def test_schema_wal_permissions_and_cascade(tmp_path):
    path = tmp_path / "d" / "sessions.db"
    with Store(path) as store:
        assert store.schema_version == SCHEMA_VERSION
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        sid = store.create_session(model="m", backend="transformers")
        from fmchat.store import StoredMessage

        store.append_messages(
            sid, 0, [StoredMessage("user", "  Hello\n  world  ", 1.0), StoredMessage("assistant", "hi", 2.0)]
        )
        for side in ("", "-wal", "-shm"):
            p = str(path) + side
            if os.path.exists(p):
                assert mode(p) == 0o600, side
        assert mode(path.parent) == 0o700
        info = store.list_sessions()
        assert [(i.id, i.title, i.message_count) for i in info] == [(sid, "Hello world", 2)]
        store.delete(sid)
        assert store.conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 0  # ON DELETE CASCADE
    assert derive_title("x" * 100).endswith("…") and len(derive_title("x" * 100)) == 60


def test_newer_schema_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "sessions.db"
    Store(path).close()
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version={SCHEMA_VERSION + 5}")
    con.close()
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(StoreError, match="newer fmchat"):
        Store(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert not os.path.exists(str(path) + "-wal")


def test_not_a_database_is_a_clear_error(tmp_path):
    path = tmp_path / "sessions.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a readable database"):
        Store(path)


def test_search_rename_delete_and_unknown_ids(tmp_path):
    from fmchat.store import StoredMessage

    with Store(tmp_path / "s.db") as store:
        a = store.create_session(model="m")
        store.append_messages(
            a, 0, [StoredMessage("user", "about penguins", 1.0), StoredMessage("assistant", "they swim", 2.0)]
        )
        b = store.create_session(model="m")
        store.append_messages(b, 0, [StoredMessage("user", "100% sure_thing", 3.0)])
        assert [s.id for s in store.list_sessions()] == [b, a]  # newest first
        assert [s.id for s in store.list_sessions("SWIM")] == [a]  # message text, case-insensitive
        assert [s.id for s in store.list_sessions("100%")] == [b]  # LIKE wildcards are literal
        assert store.list_sessions("0% s_x") == []
        store.rename(a, "Birds")
        store.append_messages(a, 2, [StoredMessage("user", "more", 4.0)])
        assert store.get(a).title == "Birds"  # a chosen title is kept as the chat goes on
        store.rename(a, "")
        assert store.get(a).title == "about penguins"
        assert store.resolve(a[:6]) == a
        with pytest.raises(UnknownSession, match="no session 'zzz'"):
            store.get("zzz")
        with pytest.raises(UnknownSession):
            store.delete("")


def test_autosave_restore_round_trip_and_retry(tiny_model, tmp_path):
    store = Store(tmp_path / "s.db")
    s1 = make_session(tiny_model, system="Be brief.")
    rec1 = Recorder(store, spec=str(tiny_model))
    record_turn(s1, rec1, "Hello!")
    record_turn(s1, rec1, "Tell me more.")
    sid = rec1.session_id
    saved = store.get(sid)
    assert [m.role for m in saved.messages] == ["user", "assistant", "user", "assistant"]
    assert saved.system == "Be brief." and saved.title == "Hello!" and saved.model == tiny_model.name
    assert saved.settings["model_spec"] == str(tiny_model.resolve()) and saved.settings["dtype"] == "float32"
    assert saved.messages[1].stats["generated_tokens"] == s1.messages[1].stats.generated_tokens
    assert saved.messages[1].token_ids == s1.messages[1].token_ids

    # retry: the last exchange is popped and sent again; the store follows exactly
    text = s1.pop_last_exchange()
    record_turn(s1, rec1, text)
    again = store.get(sid)
    assert [m.content for m in again.messages] == [m.content for m in s1.messages]

    s2 = make_session(tiny_model)
    rec2, _ = open_session(store, sid, s2)
    assert [(m.role, m.content, m.cancelled) for m in s2.messages] == [
        (m.role, m.content, m.cancelled) for m in s1.messages
    ]
    assert (
        s2.config.system == "Be brief."
        and s2.messages[1].stats.generated_tokens == s1.messages[1].stats.generated_tokens
    )
    record_turn(s2, rec2, "And finally?")
    assert len(store.get(sid).messages) == 6
    assert len(store.list_sessions()) == 1
    store.close()


def test_cancelled_reply_is_saved_as_cancelled(tiny_model, tmp_path):
    store = Store(tmp_path / "s.db")
    s = make_session(tiny_model, max_new_tokens=50)
    rec = Recorder(store)
    for ev in s.turn("Go on and on"):
        if isinstance(ev, TurnStarted):
            rec.sync(s)
            assert [m.role for m in store.get(rec.session_id).messages] == ["user"]  # committed before generation
            s.cancel()
        elif isinstance(ev, TurnDone):
            rec.sync(s)
    msgs = store.get(rec.session_id).messages
    assert (
        [m.role for m in msgs] == ["user", "assistant"]
        and msgs[1].cancelled
        and msgs[1].stats["finish_reason"] == "cancelled"
    )


def test_kv_snapshot_resume_equals_continuous_and_full_prefill(tiny_model, tmp_path):
    store = Store(tmp_path / "s.db")
    s1 = make_session(tiny_model, max_new_tokens=10)
    rec = Recorder(store)
    record_turn(s1, rec, "Hello there, how are you?")
    sid = rec.session_id
    path = kvsnap.save(store, sid, s1)
    assert path is not None and mode(path) == 0o600
    continuous = s1.run_turn("What did I ask first?").reply

    s2 = make_session(tiny_model, max_new_tokens=10)
    open_session(store, sid, s2)
    r = rebuild_cache(s2, store, sid)
    assert r["snapshot"] == "ok" and r["restored"] > 0
    assert r["restored"] + r["prefilled"] == len(s2.ledger) == s2.backend.cached_tokens()
    cached = len(s2.ledger)
    done = s2.run_turn("What did I ask first?")
    assert done.reply == continuous
    assert done.stats.reused_tokens == cached  # the whole saved transcript came from the cache

    s3 = make_session(tiny_model, max_new_tokens=10)
    open_session(store, sid, s3)
    r3 = rebuild_cache(s3, store, sid, use_snapshot=False)
    assert r3["restored"] == 0 and r3["prefilled"] > 0
    assert s3.run_turn("What did I ask first?").reply == continuous  # greedy: same reply without the snapshot

    # A snapshot that disagrees with the transcript is cut back to the agreeing prefix, never trusted whole.
    store.conn.execute("UPDATE messages SET content='Something else entirely' WHERE session_id=? AND seq=0", (sid,))
    s4 = make_session(tiny_model, max_new_tokens=10)
    open_session(store, sid, s4)
    r4 = rebuild_cache(s4, store, sid)
    rendered = s4.backend.render(s4.template_messages(), add_generation_prompt=False)
    assert r4["restored"] < r["restored"] and s4.ledger == rendered

    # Damaged file: ignored, rebuilt by prefill.
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    s5 = make_session(tiny_model, max_new_tokens=10)
    open_session(store, sid, s5)
    r5 = rebuild_cache(s5, store, sid)
    assert r5["restored"] == 0 and "unreadable" in r5["snapshot"] and r5["prefilled"] == len(s5.ledger) > 0
    store.close()


def test_kv_snapshot_from_another_configuration_is_ignored(tiny_model, tmp_path):
    from fmchat.config import RunConfig
    from fmchat.conversation import load_backend
    from fmchat.engine import ChatSession, GenerationConfig, SessionConfig

    store = Store(tmp_path / "s.db")
    s1 = make_session(tiny_model)
    rec = Recorder(store)
    record_turn(s1, rec, "Hi")
    kvsnap.save(store, rec.session_id, s1)
    b = load_backend(RunConfig(model=str(tiny_model), device="cpu", dtype="float32", kernel="eager"))
    s2 = ChatSession(b, SessionConfig(gen=GenerationConfig(max_new_tokens=8, temperature=0.0, seed=0)))
    open_session(store, rec.session_id, s2)
    r = rebuild_cache(s2, store, rec.session_id)
    assert r["restored"] == 0 and "another model" in r["snapshot"] and r["prefilled"] > 0
    store.delete(rec.session_id)
    assert not kvsnap.snapshot_path(store, rec.session_id).exists()
    store.close()


def test_prefill_transcript_reports_progress_and_makes_the_next_turn_reuse_it(tiny_model):
    s = make_session(tiny_model)
    s.run_turn("One")
    s.run_turn("Two")
    msgs = list(s.messages)
    fresh = make_session(tiny_model)
    fresh.messages[:] = msgs
    seen = []
    n = fresh.prefill_transcript(lambda done, total: seen.append((done, total)))
    total = len(fresh.backend.render(fresh.template_messages(), add_generation_prompt=False))
    assert n == total == len(fresh.ledger) and seen[-1] == (total, total)
    done = fresh.run_turn("Three")
    assert done.stats.reused_tokens == total


# ---------------------------------------------------------------- transcripts
def _sample(store) -> str:
    from fmchat.store import StoredMessage

    sid = store.create_session(
        model="tiny", backend="transformers", settings={"dtype": "float32", "seed": 0}, system="sys"
    )
    store.append_messages(sid, 0, [
        StoredMessage("user", "Héllo \u2603 \"quoted\"\n", 1700000000.123456),
        StoredMessage("assistant", "partial", 1700000001.5, cancelled=True, stats={"ttft_ms": 12.5, "generated_tokens": 3}, token_ids=[1, 2, 3]),
    ], window_start=1, memory_note="note")  # fmt: skip
    return sid


def test_json_export_import_round_trips_exactly(tmp_path):
    with Store(tmp_path / "a.db") as a:
        sid = _sample(a)
        text = transcript.to_json(a.get(sid))
        md = transcript.to_markdown(a.get(sid))
    assert "## You" in md and "## Assistant (cancelled)" in md and "Héllo" in md
    f = tmp_path / "t.json"
    transcript.write_private(f, text)
    assert mode(f) == 0o600
    with Store(tmp_path / "b.db") as b:
        new = b.insert_record(transcript.read_file(f))
        assert new == sid
        assert transcript.to_json(b.get(new)) == text
        again = b.insert_record(transcript.read_file(f))  # the id is taken: a new one, same content
        assert again != sid
        d1, d2 = json.loads(transcript.to_json(b.get(again))), json.loads(text)
        d1["session"].pop("id"), d2["session"].pop("id")
        assert d1 == d2


def _bad_files(tmp_path, good: str) -> dict:
    data = json.loads(good)
    cases = {
        "malformed": "{not json",
        "truncated": good[: len(good) // 2],
        "empty": "",
        "wrong_version": json.dumps({**data, "version": 99}),
        "wrong_format": json.dumps({**data, "format": "something"}),
        "bad_role": json.dumps({**data, "messages": [{**data["messages"][0], "role": "robot"}]}),
        "not_object": "[1, 2, 3]",
        "bad_window": json.dumps({**data, "session": {**data["session"], "window_start": 7}}),
        "bad_id": json.dumps({**data, "session": {**data["session"], "id": "../../escape"}}),
    }
    out = {}
    for name, text in cases.items():
        p = tmp_path / f"{name}.json"
        p.write_text(text)
        out[name] = p
    big = tmp_path / "oversized.json"
    with open(big, "wb") as f:
        f.truncate(transcript.MAX_IMPORT_BYTES + 1)  # sparse: no real 50 MB written
    out["oversized"] = big
    return out


def test_bad_transcripts_are_refused_with_one_error(tmp_path):
    with Store(tmp_path / "a.db") as a:
        good = transcript.to_json(a.get(_sample(a)))
    expect = {"malformed": "not valid JSON", "truncated": "not valid JSON", "empty": "empty file", "wrong_version": "version 99",
              "wrong_format": "not an fmchat transcript", "bad_role": "role", "not_object": "expected a JSON object",
              "oversized": "import limit", "bad_window": "window_start", "bad_id": "session.id"}  # fmt: skip
    for name, path in _bad_files(tmp_path, good).items():
        with pytest.raises(transcript.TranscriptError, match=expect[name]):
            transcript.read_file(path)
    with pytest.raises(transcript.TranscriptError, match="no such file"):
        transcript.read_file(tmp_path / "missing.json")


WRITER = """
import sys
from fmchat.store import Store, StoredMessage
s = Store(sys.argv[1])
for i in range(40):
    sid = s.create_session(model=sys.argv[2])
    s.append_messages(sid, 0, [StoredMessage("user", f"{sys.argv[2]} {i}", 1.0), StoredMessage("assistant", "ok", 2.0)])
    s.list_sessions()
s.close()
"""


def test_two_processes_share_one_database(tmp_path):
    path = tmp_path / "shared.db"
    Store(path).close()
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), name]) for name in ("p1", "p2")]
    assert [p.wait() for p in procs] == [0, 0]
    with Store(path) as s:
        assert s.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = s.list_sessions()
        assert len(rows) == 80 and all(r.message_count == 2 for r in rows)
        assert {r.model for r in rows} == {"p1", "p2"}


def test_an_older_schema_is_migrated_in_place(tmp_path, monkeypatch):
    from fmchat.store import StoredMessage, db

    path = tmp_path / "old.db"
    with Store(path) as s:
        sid = s.create_session(model="m")
        s.append_messages(sid, 0, [StoredMessage("user", "kept", 1.0)])
    extra = "ALTER TABLE sessions ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0"
    monkeypatch.setattr(db, "MIGRATIONS", [*db.MIGRATIONS, extra])
    monkeypatch.setattr(db, "SCHEMA_VERSION", len(db.MIGRATIONS))
    with db.Store(path) as s:
        assert s.schema_version == len(db.MIGRATIONS)
        assert s.conn.execute("SELECT pinned FROM sessions").fetchone()[0] == 0
        assert s.get(sid).messages[0].content == "kept"


def test_kv_snapshot_with_the_fmc_kernel_cache(tiny_model, tmp_path):
    from fmchat.config import RunConfig
    from fmchat.conversation import load_backend
    from fmchat.engine import ChatSession, GenerationConfig, SessionConfig

    def fmc_session():
        b = load_backend(RunConfig(model=str(tiny_model), device="cpu", dtype="float32", kernel="fmc", ctx=256))
        return ChatSession(b, SessionConfig(ctx=256, gen=GenerationConfig(max_new_tokens=8, temperature=0.0, seed=0)))

    with Store(tmp_path / "s.db") as store:
        s = fmc_session()
        rec = Recorder(store)
        record_turn(s, rec, "Hello")
        assert kvsnap.save(store, rec.session_id, s) is not None
        continuous = s.run_turn("More?").reply
        s2 = fmc_session()
        open_session(store, rec.session_id, s2)
        r = rebuild_cache(s2, store, rec.session_id)
        assert r["snapshot"] == "ok" and r["restored"] > 0 and s2.backend.seq_lens() == [len(s2.ledger)]
        assert s2.run_turn("More?").reply == continuous


HAMMER = """
import sys
from fmchat.store import Store, StoredMessage
s = Store(sys.argv[1])
i = 0
while True:
    sid = s.create_session(model="h", messages=[StoredMessage("user", "x" * 5000, 1.0)])
    s.append_messages(sid, 1, [StoredMessage("assistant", "y" * 5000, 2.0), StoredMessage("user", "z", 3.0)])
    i += 1
    if i == 20:
        print("ready", flush=True)
"""


def test_sigkill_while_writing_leaves_a_readable_database(tmp_path):
    path = tmp_path / "k.db"
    Store(path).close()
    p = subprocess.Popen([sys.executable, "-c", HAMMER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"  # mid-stream of writes
    finally:
        p.kill()  # SIGKILL
        p.wait()
    with Store(path) as s:
        assert s.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = s.list_sessions()
        assert len(rows) >= 20 and {r.message_count for r in rows} <= {1, 3}  # every transaction whole or absent


def test_a_writer_held_elsewhere_gives_a_clear_busy_error_and_reads_go_on(tmp_path):
    path = tmp_path / "busy.db"
    with Store(path) as s:
        sid = s.create_session(model="m")
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # another process mid-write
    try:
        with Store(path, busy_timeout_ms=100) as s:
            assert [r.id for r in s.list_sessions()] == [sid]  # WAL: reading does not wait for the writer
            with pytest.raises(StoreError, match="busy"):
                s.create_session(model="m")
            with pytest.raises(StoreError, match="busy"):
                s.rename(sid, "x")
            s.conn.execute("SELECT 1")  # the connection is still usable (lock released, no transaction left open)
            assert not s.conn.in_transaction
    finally:
        other.execute("ROLLBACK")
        other.close()
    with Store(path) as s:
        s.rename(sid, "after")
        assert s.get(sid).title == "after"


def test_the_sql_layer_imports_without_torch_and_without_a_circle():
    # transcript first, then db: with an import circle one of the two orders fails in a fresh process
    code = (
        "import sys\n"
        "import fmchat.store.transcript, fmchat.store.db\n"
        "from fmchat.store.db import derive_title, Store, StoredMessage\n"
        "from fmchat.store.transcript import ID_RE\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'safetensors', 'fmchat.store.kvsnap') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    swapped = code.replace("fmchat.store.transcript, fmchat.store.db", "fmchat.store.db, fmchat.store.transcript")
    for c in (code, swapped):
        r = subprocess.run([sys.executable, "-c", c], check=False, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


def _upgrade_files() -> list[str]:
    from importlib import resources

    return sorted(e.name for e in (resources.files("fmchat.store") / "upgrades").iterdir() if e.name.endswith(".sql"))


def test_upgrades_are_numbered_files_and_a_version_0_database_is_brought_up_to_date(tmp_path):
    import re
    from importlib import resources

    from fmchat.store import StoredMessage, db

    names = _upgrade_files()
    assert names and names[0] == "0001_initial.sql"
    assert all(re.fullmatch(r"\d{4}_[a-z0-9_]+\.sql", n) for n in names), names
    assert [int(n[:4]) for n in names] == list(range(1, len(names) + 1))  # contiguous from 0001
    assert SCHEMA_VERSION == db.SCHEMA_VERSION == len(names)
    folder = resources.files("fmchat.store") / "upgrades"
    assert db.MIGRATIONS == [(folder / n).read_text(encoding="utf-8") for n in names]

    path = tmp_path / "v0.db"
    sqlite3.connect(path).close()  # an existing, empty database: user_version 0
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 0
    with Store(path) as s:
        assert s.schema_version == SCHEMA_VERSION
        tables = {r[0] for r in s.conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'index')")}
        assert {"sessions", "messages", "sessions_updated"} <= tables
        sid = s.create_session(model="m", messages=[StoredMessage("user", "hello", 1.0)])
    with Store(path) as s:  # reopened at the current version: nothing to run again
        assert s.schema_version == SCHEMA_VERSION and s.get(sid).messages[0].content == "hello"


def test_an_upgrade_may_hold_triggers_comments_and_semicolons_in_strings(tmp_path, monkeypatch):
    from fmchat.store import db

    extra = """
    -- a comment; with a semicolon
    CREATE TABLE notes (body TEXT NOT NULL DEFAULT 'a;b');
    CREATE TRIGGER sessions_note AFTER INSERT ON sessions BEGIN
        INSERT INTO notes (body) VALUES ('new; ' || NEW.id);
    END;
    """
    assert len(db.split_statements(extra)) == 2
    monkeypatch.setattr(db, "MIGRATIONS", [*db.MIGRATIONS, extra])
    monkeypatch.setattr(db, "SCHEMA_VERSION", len(db.MIGRATIONS))
    with db.Store(tmp_path / "t.db") as s:
        sid = s.create_session(model="m")
        assert s.conn.execute("SELECT body FROM notes").fetchall() == [(f"new; {sid}",)]


def test_misnumbered_upgrade_files_are_refused(tmp_path):
    from fmchat.store import db

    (tmp_path / "upgrades").mkdir()
    (tmp_path / "upgrades" / "README.md").write_text("not sql")
    (tmp_path / "upgrades" / "0001_initial.sql").write_text("CREATE TABLE a (x);")
    (tmp_path / "upgrades" / "0002_more.sql").write_text("CREATE TABLE b (x);")
    assert db.load_upgrades(tmp_path / "upgrades") == ["CREATE TABLE a (x);", "CREATE TABLE b (x);"]
    (tmp_path / "upgrades" / "0004_gap.sql").write_text("CREATE TABLE c (x);")
    with pytest.raises(RuntimeError, match="without gaps"):
        db.load_upgrades(tmp_path / "upgrades")
    (tmp_path / "upgrades" / "0004_gap.sql").rename(tmp_path / "upgrades" / "3_bad.sql")
    with pytest.raises(RuntimeError, match="not named"):
        db.load_upgrades(tmp_path / "upgrades")


def test_delete_removes_every_snapshot_file_of_the_session_and_nothing_else(tmp_path):
    from fmchat.store import files

    with Store(tmp_path / "s.db") as store:
        sid = store.create_session(model="m")
        other = store.create_session(model="m")
        kv = tmp_path / "kv"
        (kv / sid).mkdir(parents=True)  # a snapshot in several files
        (kv / sid / "layer0.bin").write_bytes(b"k")
        (kv / f"{sid}.safetensors").write_bytes(b"s")
        (kv / f"{sid}.meta.json").write_text("{}")
        outside = tmp_path / "outside.txt"
        outside.write_text("keep me")
        (kv / f"{sid}.link").symlink_to(outside)
        keep = [kv / f"{other}.safetensors", kv / f"{sid}x.safetensors", kv / f"x{sid}.safetensors"]
        for p in keep:
            p.write_bytes(b"o")
        assert kvsnap.snapshot_path(store, sid) == files.snapshot_path(store.path, sid) == kv / f"{sid}.safetensors"
        assert len(files.snapshot_files(store.path, sid)) == 4
        store.delete(sid)
        assert sorted(kv.iterdir()) == sorted(keep) and outside.read_text() == "keep me"
        # an id that is not a file name (written into the database by hand) never names a path
        with pytest.raises(ValueError):
            files.snapshot_files(store.path, "../outside")
        with pytest.raises(ValueError):
            kvsnap.snapshot_path(store, "a/b")
        store.conn.execute("INSERT INTO sessions (id, title, created, updated) VALUES ('..', 't', 1, 1)")
        (tmp_path / "...safetensors").write_text("x")
        assert store.delete("..") == ".."
        assert (tmp_path / "...safetensors").exists() and sorted(kv.iterdir()) == sorted(keep)


def _kv_files(kv) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in kv.glob("*.safetensors")} if kv.is_dir() else {}


def test_a_4k_token_saved_chat_appends_only_the_new_cells_per_reply(tmp_path, smol_tokenizer):
    """After each reply the snapshot grows by the new cells only: < 10% of the whole snapshot's bytes at 4k tokens."""
    from conftest import build_tiny_model

    from fmchat.config import RunConfig
    from fmchat.conversation import Conversation

    model = build_tiny_model(tmp_path / "tiny-4k", smol_tokenizer, max_position_embeddings=8192)
    config = RunConfig(model=str(model), device="cpu", dtype="float32", ctx=4600, max_new_tokens=12, temperature=0.0, seed=0)
    conv = Conversation.open(config, store=tmp_path / "s.db")
    kv = tmp_path / "kv"
    long_text = " ".join(["The sea was calm that evening and the boats came home one after another."] * 265)
    conv.run_turn(long_text)  # ~4k tokens in the cache
    assert len(conv.session.ledger) >= 4000
    first = _kv_files(kv)
    assert sum(size for size, _ in first.values()) > 0
    for i in range(4):
        before = _kv_files(kv)
        conv.run_turn(f"Short question {i}?")
        after = _kv_files(kv)
        written = sum(size for name, (size, mtime) in after.items() if before.get(name) != (size, mtime))
        total = sum(size for size, _ in after.values())
        assert 0 < written < 0.10 * total, (i, written, total)
        assert set(before) <= set(after)  # nothing rewritten, one file more
    sid = conv.session_id
    ledger = conv.session.ledger
    conv.close()

    again = Conversation.open(config, store=tmp_path / "s.db", save=False)
    r = again.resume(sid)
    # Everything but the last reply's tokens comes from the chain; that reply is re-rendered from its text, whose
    # tokens may differ from the sampled ones at the end (the reason a reply gets a file of its own).
    assert r.snapshot == "ok" and r.restored >= len(ledger) - config.max_new_tokens and r.prefilled <= config.max_new_tokens + 2
    again.close()


def test_kv_snapshots_stay_under_their_cap_and_a_dropped_one_says_so(tmp_path, tiny_model):
    from fmchat.config import RunConfig
    from fmchat.conversation import Conversation

    config = RunConfig(model=str(tiny_model), device="cpu", dtype="float32", max_new_tokens=8, temperature=0.0, seed=0)
    db = tmp_path / "s.db"
    old = Conversation.open(config, store=db)
    old.run_turn("Tell me about the sea.")
    one = sum(size for size, _ in _kv_files(tmp_path / "kv").values())
    assert one > 0
    # A cap just above one chat's snapshot: the next chat's snapshot pushes the older one out.
    cap_mib = (one * 1.5) / 2**20
    newer = Conversation.open(config, store=db)
    newer.run_turn("Tell me about the sky.")
    from fmchat.store import kvsnap

    dropped = kvsnap.enforce_cap(newer.store, int(cap_mib * 2**20), keep=newer.session_id)
    assert dropped == [old.session_id]
    assert kvsnap.snapshot_bytes(newer.store, newer.session_id) > 0 and kvsnap.snapshot_bytes(newer.store, old.session_id) == 0
    resumed = Conversation.open(config, store=db, save=False).resume(old.session_id)
    assert resumed.restored == 0 and resumed.prefilled > 0 and "dropped" in resumed.snapshot and "MiB" in resumed.snapshot
