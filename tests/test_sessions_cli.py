"""`fmchat run` saves sessions, `fmchat sessions ...` manages them, `run --session` continues one; bad input
is one clear error; a SIGKILL mid-reply loses only that reply."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys

from typer.testing import CliRunner

from fmchat.cli import app
from fmchat.store import SCHEMA_VERSION, Store, default_path, transcript

runner = CliRunner()
TINY = ("--temperature", "0", "--max-new-tokens", "6", "--dtype", "float32", "--device", "cpu")


def cli(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def session_id_of(stderr: str) -> str:
    ids = [line.split("session: ", 1)[1].strip() for line in stderr.splitlines() if line.startswith("session: ")]
    assert len(ids) == 1, stderr
    return ids[0]


def test_run_saves_exports_and_continues_a_session(tiny_model, tmp_path):
    r = cli("run", "My name is Ada.", "What is two plus two?", "--model", tiny_model, *TINY, "--json")
    assert r.exit_code == 0, r.output
    sid = session_id_of(r.stderr)
    replies = [json.loads(line)["reply"] for line in r.stdout.splitlines()]

    e = cli("sessions", "export", sid, "--format", "json")
    assert e.exit_code == 0, e.output
    data = json.loads(e.stdout)
    assert data["format"] == "fmchat-transcript" and data["version"] == transcript.VERSION
    msgs = data["messages"]
    assert [(m["role"], m["content"]) for m in msgs] == [
        ("user", "My name is Ada."), ("assistant", replies[0]), ("user", "What is two plus two?"), ("assistant", replies[1]),
    ]  # fmt: skip
    assert msgs[1]["stats"]["generated_tokens"] > 0 and data["session"]["model"] == tiny_model.name

    # Continue without naming the model: the session remembers it; the KV snapshot spares the prefill.
    c = cli("run", "--session", sid, "What did I ask first?", *TINY, "--json")
    assert c.exit_code == 0, c.output
    assert session_id_of(c.stderr) == sid
    assert "tokens from the KV snapshot (ok)" in c.stderr
    row = json.loads(c.stdout.splitlines()[0])
    assert row["reused_tokens"] > 0 and row["prefilled_tokens"] < row["prompt_tokens"]
    after = json.loads(cli("sessions", "export", sid[:5], "--format", "json").stdout)
    assert [m["content"] for m in after["messages"] if m["role"] == "user"] == [
        "My name is Ada.", "What is two plus two?", "What did I ask first?",
    ]  # fmt: skip

    # list (table and JSON), show, Markdown export to a 0600 file
    listed = json.loads(cli("sessions", "list", "--json").stdout)
    mine = next(x for x in listed if x["id"] == sid)
    assert mine["title"] == "My name is Ada." and mine["messages"] == 6
    assert sid in cli("sessions", "list").stdout
    assert json.loads(cli("sessions", "list", "--json", "--search", "two plus").stdout)[0]["id"] == sid
    show = cli("sessions", "show", sid)
    assert show.exit_code == 0 and "## You" in show.stdout and "What did I ask first?" in show.stdout
    out = tmp_path / "chat.md"
    m = cli("sessions", "export", sid, "--format", "md", "-o", out)
    assert m.exit_code == 0 and out.read_text().startswith("# My name is Ada.")
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(default_path()).st_mode) == 0o600

    # JSON export -> rm -> import gives the same transcript back, byte for byte.
    jf = tmp_path / "chat.json"
    assert cli("sessions", "export", sid, "--format", "json", "-o", jf).exit_code == 0
    assert cli("sessions", "rm", sid).exit_code == 0
    assert cli("sessions", "show", sid).exit_code == 2
    imp = cli("sessions", "import", jf)
    assert imp.exit_code == 0, imp.output
    assert imp.stdout.strip() == sid
    assert cli("sessions", "export", sid, "--format", "json").stdout == jf.read_text()


def test_unknown_ids_and_bad_arguments_exit_2(tiny_model):
    for args in (("sessions", "show", "nope"), ("sessions", "export", "nope"), ("sessions", "rm", "nope"),
                 ("run", "--session", "nope", "hi", "--model", tiny_model), ("--session", "nope")):  # fmt: skip
        r = cli(*args)
        assert r.exit_code == 2, (args, r.output)
        assert "no session 'nope'" in r.stderr and "Traceback" not in r.output
    r = cli("sessions", "export", "x", "--format", "pdf")
    assert r.exit_code == 2 and "use md or json" in r.stderr


def test_bad_imports_write_nothing(tmp_path):
    from test_store import _bad_files, _sample

    with Store(tmp_path / "src.db") as src:
        good = transcript.to_json(src.get(_sample(src)))
    before = json.loads(cli("sessions", "list", "--json").stdout)
    for name, path in _bad_files(tmp_path, good).items():
        r = cli("sessions", "import", path)
        assert r.exit_code == 2, (name, r.output)
        lines = r.stderr.strip().splitlines()
        assert (
            len(lines) == 1 and lines[0].startswith("fmchat: error: import:") and "nothing was imported" in lines[0]
        ), r.stderr
    assert json.loads(cli("sessions", "list", "--json").stdout) == before


def test_a_newer_database_is_refused_untouched(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    db = default_path()
    Store(db).close()
    con = sqlite3.connect(db)
    con.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    con.close()
    before = db.read_bytes()
    for args in (("sessions", "list"), ("run", "hi", "--model", "x")):
        r = cli(*args)
        assert r.exit_code == 2 and "newer fmchat" in r.stderr and "not touched" in r.stderr, r.output
    assert db.read_bytes() == before


def test_sigkill_mid_reply_loses_only_that_reply_then_resumes(tiny_model, tmp_path):
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "data"), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "fmchat", "run", "--model", str(tiny_model), "--temperature", "0", "--dtype", "float32",
           "--device", "cpu", "--threads", "1"]  # fmt: skip
    first = subprocess.run(
        [*cmd, "--max-new-tokens", "6", "Hello"], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert first.returncode == 0, first.stderr
    sid = session_id_of(first.stderr)
    exported = subprocess.run([sys.executable, "-m", "fmchat", "sessions", "export", sid, "--format", "json"], env=env,
                              capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    before = [(m["role"], m["content"]) for m in json.loads(exported.stdout)["messages"]]
    assert [role for role, _ in before] == ["user", "assistant"] and before[1][1]

    p = subprocess.Popen([*cmd, "--max-new-tokens", "100000", "--session", sid, "Tell me a very long story"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        assert p.stdout.read(1)  # the reply is streaming: its user message was committed before generation
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL

    db = tmp_path / "data" / "fmchat" / "sessions.db"
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = con.execute("SELECT role, content FROM messages WHERE session_id=? ORDER BY seq", (sid,)).fetchall()
    con.close()
    # every message written before the kill survives unchanged; the killed reply is the only loss
    assert rows == [*before, ("user", "Tell me a very long story")]

    again = subprocess.run([*cmd, "--max-new-tokens", "6", "--session", sid, "Shorter, please"], env=env,
                           capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert f"session: {sid}" in again.stderr
    with Store(db) as s:
        resumed = [(m.role, m.content) for m in s.get(sid).messages]
    assert resumed[:4] == [*before, ("user", "Tell me a very long story"), ("user", "Shorter, please")]
    assert [role for role, _ in resumed] == ["user", "assistant", "user", "user", "assistant"]


def test_plain_repl_saves_its_conversation(tiny_model):
    r = cli(
        "chat", "--plain", "--model", tiny_model, *TINY, input="Hello from the REPL\n/reset\nA second chat\n/quit\n"
    )
    assert r.exit_code == 0, r.output
    ids = [line.split("session: ", 1)[1] for line in r.stderr.splitlines() if line.startswith("session: ")]
    assert len(ids) == 2 and ids[0] != ids[1]  # /reset starts a new saved session
    with Store(default_path()) as s:
        assert [m.content for m in s.get(ids[0]).messages if m.role == "user"] == ["Hello from the REPL"]
        assert [m.role for m in s.get(ids[1]).messages] == ["user", "assistant"]


def test_no_save_continues_without_writing(tiny_model):
    r = cli("run", "Keep me", "--model", tiny_model, *TINY)
    sid = session_id_of(r.stderr)
    before = cli("sessions", "export", sid, "--format", "json").stdout
    c = cli("run", "--session", sid, "--no-save", "Not saved", *TINY)
    assert c.exit_code == 0, c.output
    assert cli("sessions", "export", sid, "--format", "json").stdout == before
    n = cli("run", "--no-save", "Nothing at all", "--model", tiny_model, *TINY)
    assert n.exit_code == 0 and "session:" not in n.stderr
