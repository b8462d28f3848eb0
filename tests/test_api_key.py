"""README: the API key (FMCHAT_API_KEY / OPENAI_API_KEY) is sent to the server and never written anywhere.

A real llama_cpp.server on loopback that requires a key; a chat through `fmchat run` (autosaved), the same server in
the app with a settings change saved, the session exported; then every file under fmchat's data, config and cache
dirs (the whole isolated test home) and everything the commands printed is searched for the key."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import httpx
from test_backends import free_port, start_llama_server, stop
from test_tui import SIZE, ready, send, tiny_settings, turn_done, wait_for
from test_tui_switching import open_settings
from textual.widgets import Input

from fmchat import settings as settings_mod
from fmchat.tui.app import FmchatApp


def fmchat(*args, key: str):
    env = dict(os.environ, FMCHAT_API_KEY=key)
    return subprocess.run([sys.executable, "-m", "fmchat", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env, check=False)  # fmt: skip


async def test_the_api_key_reaches_the_server_and_is_written_nowhere(default_gguf, tmp_path, monkeypatch, capfd):
    key = "sk-fmchat-" + secrets.token_hex(16)
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    proc = start_llama_server(default_gguf, port, api_key=key)
    printed = []
    try:
        assert httpx.get(f"{url}/models", timeout=5).status_code == 401  # the server really checks the key

        # A wrong key is refused in one line (and neither key is echoed).
        wrong = fmchat("run", "Hello", "--backend", "openai", "--base-url", url, "--no-save", key="sk-wrong-" + secrets.token_hex(8))
        printed += [wrong.stdout, wrong.stderr]
        assert wrong.returncode != 0 and "rejected the API key" in wrong.stderr and "sk-wrong-" not in wrong.stderr

        # The CLI, autosaving.
        r = fmchat("run", "Hello", "--backend", "openai", "--base-url", url, "--max-new-tokens", "8", "--temperature", "0", key=key)
        printed += [r.stdout, r.stderr]
        assert r.returncode == 0, r.stderr
        sid = next(line.split("session: ", 1)[1].strip() for line in r.stderr.splitlines() if line.startswith("session: "))
        for fmt in ("json", "md"):
            out = Path(os.environ["XDG_DATA_HOME"]) / f"export.{fmt}"
            e = fmchat("sessions", "export", sid, "--format", fmt, "-o", out, key=key)
            printed += [e.stdout, e.stderr]
            assert e.returncode == 0 and out.stat().st_size > 0, e.stderr

        # The app: a chat (autosaved) and a settings change (saved).
        monkeypatch.setenv("FMCHAT_API_KEY", key)
        path = settings_mod.settings_path()
        path.unlink(missing_ok=True)
        app = FmchatApp(tiny_settings(default_gguf, backend="openai", base_url=url, dtype="auto"), persist=True)
        async with app.run_test(size=SIZE) as pilot:
            await ready(pilot)
            await send(pilot, "Hi there")
            await turn_done(pilot, 1)
            assert app.session.backend.name == "openai" and app.session.messages[-1].content
            screen = await open_settings(pilot)
            screen.query_one("#set-temperature", Input).value = "0.5"
            await pilot.pause()
            await pilot.press("ctrl+s")
            await wait_for(pilot, lambda: path.is_file() and settings_mod.load(path).temperature == 0.5, "settings saved")
    finally:
        stop(proc)

    try:
        _search_everything_written_for(key, printed, capfd, path)
    finally:
        settings_mod.settings_path().unlink(missing_ok=True)  # the saved openai settings must not reach later tests


def _search_everything_written_for(key: str, printed: list[str], capfd, path: Path) -> None:
    captured = capfd.readouterr()
    printed += [captured.out, captured.err]
    home = Path(os.environ["XDG_DATA_HOME"]).parent  # tests/conftest.py: data, config, cache and HOME live here
    files = [p for p in home.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.name == "sessions.db" for p in files) and path in files
    leaks = [str(p) for p in files if key.encode() in p.read_bytes()]
    assert leaks == []
    assert not any(key in text for text in printed)
