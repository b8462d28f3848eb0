"""The inference panel under Textual's pilot, read back as drawn: every figure belongs to the chat on screen and to
this moment (live while a turn streams, reset on new chat / opened session / backend switch), n/a where the backend
cannot know it; llama.cpp's GGUF quantization; a restored session's history; the one-line form on a narrow terminal.
Real models (a tiny random one, the default GGUF), a real llama_cpp.server on loopback."""

from __future__ import annotations

import io
import json
import re
from dataclasses import replace

import pytest
from rich.console import Console
from test_tui import SIZE, ready, screen_text, send, tiny_settings, turn_done, wait_for
from textual.widgets import Sparkline, Static

from fmchat.engine.stats import fmt_bytes
from fmchat.tui.app import FmchatApp
from fmchat.tui.widgets.panel import InferencePanel

LABELS = ("seq_lens", "KV size", "reused", "prefilled", "last drop", "decode", "TTFT", "prefill", "peak RSS", "RSS",
          "weights", "KV cache", "GPU", "model", "backend", "device", "dtype", "quant", "kernel")  # fmt: skip


def drawn(app, section: str) -> dict[str, str]:
    """A panel section as drawn (label -> value); the context section as {"context": first line}."""
    content = app.query_one(f"#sec-{section}", Static).content
    console = Console(width=200, file=io.StringIO(), color_system=None, legacy_windows=False)
    with console.capture() as cap:
        console.print(content)
    lines = [line.rstrip() for line in cap.get().splitlines()]
    if section == "context":
        return {"context": lines[0]}
    rows = {}
    for line in lines:
        for label in LABELS:
            if line.startswith(label + " ") and label not in rows:
                rows[label] = line[len(label) :].strip()
                break
    return rows


def panel_text(app) -> dict[str, str]:
    """The figures as drawn (Context, KV cache, Speed, Memory; the Running rows are ``drawn(app, "running")``)."""
    return {k: v for s in ("context", "kv", "speed", "memory") for k, v in drawn(app, s).items()}


def to_bytes(shown: str) -> float:
    """The bytes in use of a drawn KV size ("1.1 MiB", or "1.1 MiB of 180.0 MiB" where more is allocated)."""
    value, unit = shown.split(" of ")[0].split()
    return float(value) * {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}[unit]


def settings(model, **kw):
    """The tiny model on PyTorch's sdpa over a growing cache, eager decode (no compile in the background)."""
    return tiny_settings(model, **{"kernel": "sdpa", "compile": "eager", **kw})


def spark(app) -> list[float]:
    return list(app.query_one("#spark", Sparkline).data or [])


@pytest.mark.parametrize("kernel", ["sdpa", "fmc"])
async def test_kv_size_grows_with_seq_lens_while_the_first_reply_streams(tiny_model, kernel):
    """sdpa's cache grows as it fills; fmc's is allocated for the whole window at load: its KV size says both, the
    bytes in use (growing) "of" the bytes allocated (fixed)."""
    cfg = json.loads((tiny_model / "config.json").read_text())
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 4  # K and V, float32
    app = FmchatApp(settings(tiny_model, max_new_tokens=4000, kernel=kernel), persist=False, save_sessions=False)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        allocated = app.session.backend.kv_bytes()
        empty = "0 B" if kernel == "sdpa" else f"0 B of {fmt_bytes(allocated)}"
        assert drawn(app, "kv")["seq_lens"] == "[0] tokens" and drawn(app, "kv")["KV size"] == empty
        await send(pilot, "Tell me a very long story about the sea")
        samples = []  # (seq_lens, KV bytes, context used) as drawn while the reply streams
        for _ in range(2000):
            if app.generating and app.query_one("#chat").current is not None:
                kv, ctx = drawn(app, "kv"), drawn(app, "context")["context"]
                if (m := re.fullmatch(r"\[(\d+)\] tokens", kv["seq_lens"])) and not kv["KV size"].startswith("0 B"):
                    samples.append((int(m.group(1)), to_bytes(kv["KV size"]), int(ctx.split(" / ")[0]), kv["KV size"]))
            if len({s[0] for s in samples}) >= 4:
                break
            await pilot.pause(0.05)
        await pilot.press("escape")
        await turn_done(pilot, 1)
    seqs = [s[0] for s in samples]
    assert len(set(seqs)) >= 4, samples  # the panel moved at its refresh rate during the turn, not only at its end
    for seq, kv, used, _ in samples:
        # one reading, taken while the model may be mid-step (the cache grows in the forward, the ledger after it)
        assert seq - 1 <= used <= seq, samples
        assert abs(kv - per_token * seq) <= per_token + 52, (seq, kv, per_token)  # read within one token of each other
    assert samples[-1][1] > samples[0][1] and seqs == sorted(seqs)
    if kernel == "fmc":  # the allocation, unchanged beside the growing figure
        assert all(s[3].endswith(f" of {fmt_bytes(allocated)}") for s in samples), samples


async def test_new_chat_opened_session_and_retry_show_only_this_chats_figures(tiny_model, tmp_path):
    app = FmchatApp(settings(tiny_model, ctx=160, max_new_tokens=16, memory="shift"), persist=False,
                    store=tmp_path / "sessions.db")  # fmt: skip
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        turns = 0
        while not any(m.stats and m.stats.memory_note for m in app.session.messages):  # chat A: until the policy acts
            assert turns < 12, "the memory policy never acted"
            await send(pilot, f"Turn {turns}: tell me about the sea and the sky.")
            turns += 1
            await turn_done(pilot, turns)
        chat_a = app.current_session_id
        a_history = [m.stats.decode_tok_s for m in app.session.messages if m.stats and m.stats.decode_tok_s is not None]
        a_drop = drawn(app, "kv")["last drop"]
        assert a_drop.startswith(f"turn {turns}:") and "shifted" in a_drop
        assert spark(app) == a_history and len(a_history) == turns

        # Ctrl+N: nothing of chat A is left.
        await pilot.press("ctrl+n")
        await pilot.pause()
        shown = panel_text(app)
        for label in ("reused", "prefilled", "decode", "TTFT", "prefill"):
            assert shown[label] == "n/a", (label, shown)
        assert shown["last drop"] == "none yet" and spark(app) == []
        assert shown["seq_lens"] == "[0] tokens" and shown["context"].startswith("0 / 160 tokens")

        # Chat B, then a retry: all of it cached but the last token, recomputed for its logits ("1 token").
        await send(pilot, "Hello there")
        await turn_done(pilot, 1)
        b = app.session.messages[-1].stats
        assert drawn(app, "speed")["TTFT"] == f"{b.ttft_ms:.0f} ms" and spark(app) == [b.decode_tok_s]
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: not app.generating and app.session.messages[-1].stats is not b, "retried")
        await pilot.pause()
        assert drawn(app, "kv")["prefilled"] == "1 token this turn"

        # Opening chat A again: its own history and last drop come back from the store; no turn of B is shown.
        app.open_saved(chat_a)
        await wait_for(pilot, lambda: app.ready and app.current_session_id == chat_a, "chat A restored", steps=6000)
        await pilot.pause()
        shown = panel_text(app)
        for label in ("reused", "prefilled", "decode", "TTFT", "prefill"):
            assert shown[label] == "n/a", (label, shown)
        assert shown["last drop"] == a_drop and spark(app) == a_history
        used = len(app.session.ledger)
        assert shown["seq_lens"] == f"[{used}] tokens" and shown["context"].startswith(f"{used} / 160 tokens")


async def test_switch_to_llamacpp_keeps_the_running_rows_whole_and_shows_the_gguf_quant(tiny_model, default_gguf):
    app = FmchatApp(settings(tiny_model, quant="int8", max_new_tokens=6), persist=False, save_sessions=False)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "What is the capital of France?")
        await turn_done(pilot, 1)
        old = drawn(app, "running")
        assert (old["backend"], old["quant"]) == ("transformers", "int8")
        app.apply_settings(replace(app.settings, backend="llamacpp", model=str(default_gguf), dtype="auto"))
        seen = []
        for _ in range(20000):  # during the reload the section is the running backend's, never a mix
            seen.append(drawn(app, "running"))
            if app.ready:
                break
            await pilot.pause(0.02)
        assert app.session.backend.name == "llamacpp"
        await pilot.pause()
        new = drawn(app, "running")
        assert (new["backend"], new["dtype"], new["quant"], new["kernel"]) == ("llamacpp", "Q4_1", "Q4_1", "llama.cpp")
        assert all(rows in (old, new) for rows in seen), [r for r in seen if r not in (old, new)][:1]
        # The new backend's cache is empty; the turn figures were the other backend's: reset.
        shown = panel_text(app)
        for label in ("reused", "prefilled", "decode", "TTFT", "prefill"):
            assert shown[label] == "n/a", (label, shown)
        assert shown["seq_lens"] == "[0] tokens" and shown["KV size"] == f"0 B of {fmt_bytes(app.session.backend.kv_bytes())}"
        await wait_for(pilot, lambda: re.search(r"quant +Q4_1 ", screen_text(app)), "quant Q4_1 on screen")
        await send(pilot, "And of Italy?")
        await turn_done(pilot, 2)
        shown, last = panel_text(app), app.session.messages[-1].stats
        assert (
            shown["reused"] == "0 tokens this turn"
            and shown["prefilled"] == f"{last.prefilled_tokens} tokens this turn"
        )
        assert shown["seq_lens"] == f"[{last.ctx_used}] tokens" and shown["TTFT"] == f"{last.ttft_ms:.0f} ms"


async def test_openai_backend_shows_na_never_zero_during_and_after_a_turn(tiny_model, default_gguf):
    from test_backends import free_port, start_llama_server, stop

    port = free_port()
    proc = start_llama_server(default_gguf, port)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        cfg = settings(tiny_model, backend="openai", base_url=url, max_new_tokens=48)
        app = FmchatApp(cfg, persist=False, save_sessions=False)
        async with app.run_test(size=SIZE) as pilot:
            await ready(pilot)
            before = panel_text(app)
            assert before["context"] == "n/a / n/a" and before["seq_lens"] == before["KV size"] == "n/a"
            await send(pilot, "Write a short poem about the sea.")
            during = []  # drawn while the reply streams (the panel's state and its text change together)
            while app.generating:
                if app.query_one(InferencePanel).state.generating:
                    during.append(panel_text(app))
                await pilot.pause(0.05)
            await turn_done(pilot, 1)
            after = panel_text(app)
            st = app.session.messages[-1].stats
        assert any(d["decode"].endswith("chunks/s (live)") for d in during), during  # a rate of what it counts
        for shown in during:
            assert shown["context"] == "n/a / n/a", shown
            for label in ("seq_lens", "KV size", "reused", "prefilled", "KV cache", "weights"):
                assert shown[label] == "n/a", (label, shown)
            assert "tok/s" not in shown["decode"], shown
        # after: what the server's usage report said (prompt + reply tokens, cached tokens), else n/a
        assert after["context"] == ("n/a" if st.ctx_used is None else str(st.ctx_used)) + " / n/a", (after, st)
        assert after["seq_lens"] == after["KV size"] == after["weights"] == "n/a"
        if st.reused_tokens is None:
            assert after["reused"] == after["prefilled"] == "n/a"
        unit = "tok/s" if st.decode_tok_s is not None else "chunks/s"
        assert after["decode"] == f"{(st.decode_tok_s or st.stream_chunks_s):.1f} {unit}", after
        for shown in [*during, after]:
            assert not any(re.match(r"0(\.0)? ", v) or v == "0 B" for v in shown.values()), shown
    finally:
        stop(proc)


async def test_narrow_terminal_collapses_the_panel_to_one_line_and_f3_opens_it(tiny_model):
    app = FmchatApp(settings(tiny_model, max_new_tokens=4), persist=False, save_sessions=False)

    def summary_lines() -> list[str]:
        return [line for line in screen_text(app).splitlines() if line.strip().startswith("ctx ")]

    async with app.run_test(size=(90, 30)) as pilot:
        await ready(pilot)
        await send(pilot, "Hello")
        await turn_done(pilot, 1)
        panel = app.query_one(InferencePanel)
        st = app.session.messages[-1].stats
        want = f"ctx {st.ctx_used}/2048 ({100 * st.ctx_used / 2048:.1f}%) · KV {fmt_bytes(st.kv_used_bytes)} · "
        # drawn on the next frame: wait for it (a loaded machine may be a frame behind)
        await wait_for(pilot, lambda: any(want in line for line in summary_lines()), f"summary line {want!r}")
        [summary] = summary_lines()
        assert f"TTFT {st.ttft_ms:.0f} ms · RSS " in summary and "MiB" in summary, summary
        text = screen_text(app)
        assert panel.compact and panel.size.height == 1 and "seq_lens" not in text
        assert "f3 Panel" in text.splitlines()[-1], text.splitlines()[-1]  # the key is in the footer
        await pilot.press("f3")  # the whole panel
        await wait_for(pilot, lambda: "seq_lens" in screen_text(app) and not summary_lines(), "whole panel")
        assert not panel.compact
        await pilot.press("f3")  # one line again
        await wait_for(pilot, lambda: "seq_lens" not in screen_text(app) and summary_lines(), "one line again")
        assert panel.compact
        await pilot.resize_terminal(120, 40)  # wide: the whole panel; F3 hides it as before
        await wait_for(pilot, lambda: not panel.compact and "seq_lens" in screen_text(app), "panel whole when wide")
        await pilot.press("f3")
        assert not panel.display


async def test_the_panel_redraws_only_the_sections_whose_figures_changed(tiny_model):
    """The panel is derived 5 times a second while a reply streams, on the cores the model decodes on (docs/tui.md):
    a refresh with nothing new leaves every section as drawn; the next turn redraws what moved (context, KV cache,
    speed) and leaves what did not (Running)."""
    app = FmchatApp(settings(tiny_model, max_new_tokens=4), persist=False, save_sessions=False)
    ids = ("#sec-context", "#sec-kv", "#sec-speed", "#sec-running")  # (not RSS's: it moves by itself)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "Hello")
        await turn_done(pilot, 1)
        panel = app.query_one(InferencePanel)
        panel.show(*panel._source)
        before = {i: app.query_one(i, Static).content for i in ids}
        seq_before = drawn(app, "kv")["seq_lens"]
        for _ in range(3):
            panel.tick(generating=False, busy=True)  # derived again, nothing changed: nothing redrawn
        assert all(app.query_one(i, Static).content is before[i] for i in ids)
        await send(pilot, "And again")
        await turn_done(pilot, 2)
        panel.show(*panel._source)
        redrawn = {i for i in ids if app.query_one(i, Static).content is not before[i]}
        assert {"#sec-context", "#sec-kv", "#sec-speed"} <= redrawn and "#sec-running" not in redrawn, redrawn
        assert drawn(app, "kv")["seq_lens"] != seq_before  # and what is drawn is the new figure


def test_a_turn_with_no_token_has_no_ttft(tmp_path):
    """A server that streams no text: TTFT is unknown (None in --json, n/a in the line), not 0."""
    from test_backends import Script, json_rows, runner, sse, toy_server

    from fmchat.cli import app

    srv, url = toy_server(Script((200, sse(usage={"prompt_tokens": 9, "completion_tokens": 0}))))
    try:
        r = runner.invoke(app, ["run", "hi", "--backend", "openai", "--base-url", url, "--json"])
        assert r.exit_code == 0, r.output
        [row] = json_rows(r.stdout)
        assert row["ttft_ms"] is None and row["reply"] == ""
    finally:
        srv.shutdown()


# ---------------------------------------------------------------- the decode path (``--compile auto``) in the panel
def decode_row(app) -> str:
    return drawn(app, "running")["decode"]  # rendered wide: the whole row on one line


def panel_fits(app) -> tuple[int, int]:
    """(the panel's content height, the height it has): no scrollbar when the first is not above the second."""
    panel = app.query_one(InferencePanel)
    return panel.virtual_size.height, panel.scrollable_content_region.height


async def test_auto_without_background_compile_says_eager_and_why_and_fits_120x40(tiny_model, monkeypatch):
    """``compile="auto"`` with FMCHAT_AUTO_COMPILE=0 (the suite's default): the decode row says eager, with the
    reason; before the load it says what was chosen. After a turn the whole panel fits 120x40 (the reason takes
    the decode row's two lines), without a vertical scrollbar."""
    monkeypatch.setenv("FMCHAT_AUTO_COMPILE", "0")
    app = FmchatApp(tiny_settings(tiny_model, compile="auto", max_new_tokens=6), persist=False, save_sessions=False)
    async with app.run_test(size=SIZE) as pilot:
        assert app.query_one(InferencePanel).state.decode_path == "auto (compiled when ready)"  # nothing loaded yet
        await ready(pilot)
        await pilot.pause()
        status = app.session.backend.decode_status()
        assert status["state"] == "unavailable" and status["path"] == "eager", status
        assert decode_row(app) == "eager (background compile off (FMCHAT_AUTO_COMPILE=0))"
        await send(pilot, "Tell me about the sea")
        await turn_done(pilot, 1)
        await pilot.pause()
        assert decode_row(app).startswith("eager (background compile off")
        height, room = panel_fits(app)
        assert height <= room, (height, room)
        panel = app.query_one(InferencePanel)
        assert panel.max_scroll_y == 0 and not panel.show_vertical_scrollbar
        text = screen_text(app)
        assert "eager (background compile" in text and "off (FMCHAT_AUTO_COMPILE=0))" in text  # two lines, whole
        assert "template" in text.splitlines()[-3], text.splitlines()[-3]  # the last row shows, above its border


async def test_the_settings_pane_hides_the_old_names_and_keeps_an_old_value(tiny_model):
    """``off``/``on`` (capability "alias") are not offered; a settings file's "off" shows as "eager" and is kept
    as "off" by an Apply that does not change it."""
    from fmchat.tui.screens.settings import ChoiceSet, SettingsScreen

    app = FmchatApp(settings(tiny_model, compile="off"), persist=False, save_sessions=False)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("f2")
        await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen), "settings open")
        await pilot.pause()
        box = app.screen.query_one("#set-compile", ChoiceSet)
        assert [c.value for c in box.choices] == ["auto", "eager", "compiled"]
        assert [str(b.label) for b in box.query("RadioButton")] == ["auto", "eager", "compiled"]
        assert box.choices[box.pressed_index].value == "eager" and box.selected == "off"
        new, errors = app.screen.read_form()
        assert errors == [] and new.compile == "off"
        box.query("RadioButton")[2].value = True  # "compiled"
        await pilot.pause()
        assert box.selected == "compiled"
        await pilot.press("escape")


def test_decode_row_for_each_state_of_the_background_compile():
    """The row as drawn from ``decode_status()`` dicts (the real formatting, no app): short enough for the panel,
    two lines at most at the panel's width, seconds and progress masked for snapshots."""
    from rich.text import Text

    from fmchat.config import RunConfig
    from fmchat.tui.widgets.panel import Clamped, Running, decode_text, mask_decode

    compiled = "compiled (inductor, cached, 14.0 s)"
    base = {"path": "eager", "choice": "auto", "phase": None, "elapsed_s": None, "fraction": None,
            "cached_entry": False, "cached": False, "detail": "", "cache_dir": None}  # fmt: skip
    cases = [
        ({"state": "compiling", "phase": "compiling (torch.compile, inductor)", "elapsed_s": 23.4, "fraction": 0.41},
         "eager · compiling step 23 s (41%)"),
        ({"state": "compiling", "phase": "compiling (torch.compile, inductor)", "elapsed_s": 5.0}, "eager · compiling step 5 s"),
        ({"state": "compiling", "phase": "loading the cached step", "elapsed_s": 2.2, "fraction": 0.1},
         "eager · loading cached step 2 s (10%)"),
        ({"state": "compiling", "phase": "saving the compiled step for the next launch", "elapsed_s": 61.0, "fraction": 0.99},
         "eager · saving compiled step 61 s (99%)"),
        ({"state": "ready", "phase": "ready", "elapsed_s": 60.0, "fraction": 1.0}, "eager · compiled step from the next reply"),
        ({"state": "compiled", "path": "compiled", "cached": True, "detail": compiled}, compiled),
        ({"state": "failed", "detail": "eager: compile failed (RuntimeError: no compiler)"},
         "eager: compile failed (RuntimeError: no compiler)"),
        ({"state": "unavailable", "detail": "eager (auto: the compiled step is CPU-only for now)"},
         "eager (the compiled step is CPU-only for now)"),
        ({"state": "eager", "choice": "eager", "detail": "eager"}, "eager"),
        ({"state": "failed", "detail": "compile failed"}, "eager (compile failed)"),
    ]  # fmt: skip
    for fields_, want in cases:
        status = {**base, **fields_}
        got = decode_text(status, compiled if status["state"] == "compiled" else status["detail"])
        assert got == want, (status, got)
        console = Console(width=28, file=io.StringIO(), color_system=None, legacy_windows=False)  # the value column
        with console.capture() as cap:
            console.print(Clamped(Text(got)))
        lines = cap.get().splitlines()
        assert 1 <= len(lines) <= 2 and all(len(line) <= 28 for line in lines), lines
    assert decode_text(None, "llamacpp") == "llamacpp"  # a backend without decode_status: its decode_path
    assert mask_decode("eager · compiling step 23 s (41%)") == "eager · compiling step masked s (masked %)"
    assert mask_decode(compiled) == "compiled (inductor, cached, masked s)"
    # before a model is loaded: the choice, as what it will run
    shown = {c: Running.of(None, RunConfig(compile=c)).compile for c in ("auto", "compiled", "on", "eager", "off")}
    assert shown == {"auto": "auto (compiled when ready)", "compiled": "compiled (at load)", "on": "compiled (at load)",
                     "eager": "eager", "off": "eager"}  # fmt: skip
    # a long reason: two lines, the second cut with "…"
    console = Console(width=28, file=io.StringIO(), color_system=None, legacy_windows=False)
    with console.capture() as cap:
        console.print(Clamped(Text("eager: compile failed (RuntimeError: " + "x" * 80 + ")")))
    lines = cap.get().splitlines()
    assert len(lines) == 2 and lines[1].rstrip().endswith("…"), lines


@pytest.mark.e2e
async def test_the_decode_row_follows_a_real_background_compile_to_compiled(tiny_model, monkeypatch):
    """``compile="auto"`` with the background compile on: the chat is usable at once, the decode row says eager
    while the step compiles, then that the step is ready, and after the next reply "compiled (inductor, ...)" as
    the backend's ``decode_path`` says it. The idle once-a-second redraw is switched off here, so that every row
    seen before the reply came through the app's ``watch_decode`` callback (a phase change, the end). ~25 s here
    with torch's inductor dir warm; a cold compile takes minutes."""
    from fmchat.tui.widgets import panel as panel_mod

    monkeypatch.setenv("FMCHAT_AUTO_COMPILE", "1")
    monkeypatch.setattr(panel_mod, "IDLE_TICKS", 10**9)
    app = FmchatApp(tiny_settings(tiny_model, compile="auto", max_new_tokens=4), persist=False, save_sessions=False)
    seen: list[str] = []
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        backend = app.session.backend
        assert backend.decode_status()["state"] in ("compiling", "ready"), backend.decode_status()
        for _ in range(60000):  # up to ~10 minutes on a busy machine: a cold compile
            row = decode_row(app)
            if not seen or seen[-1] != row:
                seen.append(row)
            if backend.decode_status()["state"] != "compiling" and row == "eager · compiled step from the next reply":
                break
            await pilot.pause(0.01)
        assert row == "eager · compiled step from the next reply", (backend.decode_status(), seen)
        assert all(re.fullmatch(r"eager · [a-z ]+ \d+ s( \(\d+%\))?", r) for r in seen[:-1]), seen  # its phases
        await send(pilot, "Hello")
        await turn_done(pilot, 1)
        await pilot.pause()
        assert backend.decode_status()["state"] == "compiled", backend.decode_status()
        assert decode_row(app) == backend.decode_path and decode_row(app).startswith("compiled (inductor"), seen
        height, room = panel_fits(app)
        assert height <= room, (height, room)
    print(f"decode rows seen: {seen}")
