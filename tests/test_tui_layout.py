"""What the app shows about itself, under pilot on the tiny model: choices that cannot be used now (disabled,
with the reason, following the form), one compact transcript line per settings change, turns that left the
model's window (dimmed, marked) with the memory policy's note before the reply it made room for, and the key
bar at 80 columns. The 80x24 snapshots of the main, settings and sessions screens are in
test_tui_snapshots.py."""

from __future__ import annotations

import re

from test_tui import ready, screen_text, send, tiny_settings, turn_done, wait_for
from textual.widgets import Input

from fmchat.config import RunConfig
from fmchat.tui.app import FmchatApp
from fmchat.tui.screens.settings import ChoiceSet, SettingsScreen, describe_changes, flow, form_reason
from fmchat.tui.widgets.chat import OUT_OF_WINDOW, AssistantMessage, ChatInput, Note, UserMessage

NARROW = (80, 24)


def settings(model, **kw) -> RunConfig:
    return tiny_settings(model, compile="eager", **kw)  # no compile in the background while the tests run


def button(screen, kind: str, value: str):
    box = screen.query_one(f"#set-{kind}", ChoiceSet)
    return next(b for b, c in zip(box.query("RadioButton"), box.choices) if c.value == value)


def notes(app) -> list[str]:
    return [str(n.render()) for n in app.query(Note)]


async def open_settings(pilot) -> SettingsScreen:
    await pilot.press("f2")
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, SettingsScreen), "settings open")
    await pilot.pause()
    return pilot.app.screen


def test_form_reason_and_flow():
    # A choice the rest of the config rules out says why, in the words after its name; others say nothing.
    assert form_reason(RunConfig(), "backend", "openai") == "needs a server URL"
    assert form_reason(RunConfig(base_url="http://127.0.0.1:9/v1"), "backend", "openai") == ""
    assert form_reason(RunConfig(), "kernel", "fmc") == ""
    # Choices flow like words: a new line only when the next does not fit (2 cells between two).
    assert flow([10, 10, 10], 34) == [[0, 1, 2]]
    assert flow([10, 30, 10], 34) == [[0], [1], [2]]
    assert flow([10, 10, 30, 5], 40) == [[0, 1], [2, 3]]
    assert describe_changes(RunConfig(), RunConfig()) == ""
    changed = RunConfig(quant="int8", kernel="fmc", kv_cache=False, system="Be  brief.")
    want = 'quant none → int8, kernel sdpa → fmc, kv-cache on → off, system default → "Be brief."'
    assert describe_changes(RunConfig(quant="none", kernel="sdpa", kv_cache=True), changed) == want


async def test_openai_is_disabled_without_a_server_url_and_says_why(tiny_model):
    app = FmchatApp(settings(tiny_model), persist=False, save_sessions=False)
    async with app.run_test(size=NARROW) as pilot:
        await ready(pilot)
        screen = await open_settings(pilot)
        openai = button(screen, "backend", "openai")
        assert openai.disabled and "openai — needs a server URL" in str(openai.label)
        assert "openai — needs a server URL" in screen_text(app)  # on screen in an 80x24 terminal
        assert not button(screen, "backend", "transformers").disabled
        # The form decides: with a server URL typed in, openai can be chosen; emptied again, it cannot.
        url = screen.query_one("#set-base_url", Input)
        url.value = "http://127.0.0.1:9/v1"
        await pilot.pause()
        assert not openai.disabled and str(openai.label) == "openai"
        url.value = ""
        await pilot.pause()
        assert openai.disabled and "needs a server URL" in str(openai.label)
        # A disabled choice cannot be picked with the keys: the arrows skip it.
        box = screen.query_one("#set-backend", ChoiceSet)
        box.focus()
        for _ in range(4):
            await pilot.press("down")
        await pilot.press("enter")
        assert box.selected != "openai"


async def test_each_settings_change_is_one_compact_line(tiny_model):
    app = FmchatApp(settings(tiny_model), persist=False, save_sessions=False)
    async with app.run_test(size=NARROW) as pilot:
        await ready(pilot)
        await send(pilot, "Hello")
        await turn_done(pilot, 1)

        before = notes(app)
        screen = await open_settings(pilot)
        screen.query_one("#set-temperature", Input).value = "0.5"
        screen.query_one("#set-top_p", Input).value = "0.9"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: not isinstance(app.screen, SettingsScreen), "settings applied")
        await pilot.pause()
        added = notes(app)[len(before) :]
        assert added == ["settings: temperature 0.0 → 0.5, top-p 0.95 → 0.9"]

        # A change that reloads the model: still one line, written when the reload is done, with its cost.
        before = notes(app)
        first = app.session.backend
        old_kernel = app.settings.kernel
        kernel = "eager" if old_kernel != "eager" else "sdpa"
        screen = await open_settings(pilot)
        button(screen, "kernel", kernel).value = True
        button(screen, "quant", "int8").value = True
        await pilot.pause()
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: app.session.backend is not first and app.ready, "reloaded")
        await pilot.pause()
        added = notes(app)[len(before) :]
        assert len(added) == 1, added
        change = f"quant none → int8, kernel {old_kernel} → {kernel}"
        line = rf"settings: {change} \(reloaded in [0-9.]+ s; the conversation carries on\)"
        assert re.fullmatch(line, added[0]), added[0]

        # Applying without a change writes nothing.
        before = notes(app)
        await open_settings(pilot)
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: not isinstance(app.screen, SettingsScreen), "settings closed")
        await pilot.pause()
        assert notes(app) == before


async def test_turns_out_of_the_window_are_dimmed_and_the_memory_note_comes_before_the_reply(tiny_model):
    app = FmchatApp(settings(tiny_model, ctx=160, max_new_tokens=16, memory="shift"), persist=False,
                    save_sessions=False)  # fmt: skip
    async with app.run_test(size=NARROW) as pilot:
        await ready(pilot)
        for i in range(8):
            await send(pilot, f"Turn {i}: tell me about the sea and the sky.")
            await turn_done(pilot, i + 1)
            if app.session.window_start > 0:
                break
        start = app.session.window_start
        assert start > 0, "the memory policy never dropped a turn"
        blocks = [w for w in app.chat.children if isinstance(w, (UserMessage, AssistantMessage))]
        assert [w.index for w in blocks] == list(range(len(app.session.messages)))
        for w in blocks:
            out = w.index < start
            assert w.has_class("out-of-window") == out, (w.index, start)
            assert (w.border_subtitle == OUT_OF_WINDOW) == out
        assert OUT_OF_WINDOW in screen_text(app) or start < len(blocks) - 4  # the last dropped may be scrolled away

        # The policy's note sits between the message it made room for and the reply, not after the reply.
        children = list(app.chat.children)
        [note] = [n for n in app.query(Note) if "memory policy 'shift'" in str(n.render())]
        at = children.index(note)
        dropped_in = next(i for i, m in enumerate(app.session.messages) if m.stats and m.stats.memory_note)
        assert isinstance(children[at + 1], AssistantMessage) and children[at + 1].index == dropped_in
        assert isinstance(children[at - 1], UserMessage) and children[at - 1].index == dropped_in - 1
        assert str(note.render()).endswith(app.session.messages[dropped_in].stats.memory_note)  # what it did, exactly

        # A new chat starts with nothing dimmed.
        await pilot.press("ctrl+n")
        await pilot.pause()
        await send(pilot, "Fresh start")
        await turn_done(pilot, 1)
        assert not app.chat.query(".out-of-window")


async def test_a_reopened_session_shows_which_turns_are_out_of_the_window(tiny_model, tmp_path):
    from fmchat.store import Store
    from fmchat.store.records import SessionRecord, StoredMessage

    store = Store(tmp_path / "sessions.db")
    texts = ["first question", "first answer", "second question", "second answer"]
    msgs = [StoredMessage("user" if i % 2 == 0 else "assistant", t, 1.0) for i, t in enumerate(texts)]
    sid = store.insert_record(SessionRecord(id="s1", title="t", created=1.0, updated=1.0, window_start=2,
                                            memory_note="", messages=msgs))  # fmt: skip
    app = FmchatApp(settings(tiny_model), persist=False, store=store, session_id=sid)
    async with app.run_test(size=NARROW) as pilot:
        await wait_for(pilot, lambda: app.ready and len(app.chat.query(".message")) == 4, "session restored")
        blocks = list(app.chat.query(".message"))
        assert [w.has_class("out-of-window") for w in blocks] == [True, True, False, False]
        assert [w.border_subtitle for w in blocks[:2]] == [OUT_OF_WINDOW] * 2


async def test_the_key_bar_keeps_the_keys_that_matter_at_80_columns(tiny_model):
    app = FmchatApp(settings(tiny_model), persist=False, save_sessions=False)
    async with app.run_test(size=NARROW) as pilot:
        await ready(pilot)
        await wait_for(pilot, lambda: "f1 Keys" in screen_text(app), "the footer drawn")
        footer = screen_text(app).splitlines()[-1]
        for shown in ("^q Quit", "esc Cancel", "^n New chat", "^r Retry", "f2 Settings", "f3 Panel", "f4 Sessions",
                      "f1 Keys"):  # fmt: skip
            assert shown in footer, footer
        assert "Send" not in footer  # said by the message box's placeholder instead
        # Ctrl+J still breaks the line and Enter still sends, though the bar does not show them.
        box = app.query_one(ChatInput)
        box.focus()
        await pilot.press("H", "ctrl+j", "i")
        assert box.text == "H\ni"
        await pilot.press("enter")
        await turn_done(pilot, 1)
        assert app.session.messages[0].content == "H\ni"
        # Wider, the bar has room for them again.
        await pilot.resize_terminal(120, 40)
        await wait_for(pilot, lambda: "Send" in screen_text(app).splitlines()[-1], "the wide footer")
        footer = screen_text(app).splitlines()[-1]
        assert "Newline" in footer and "^p palette" in footer and "f4 Sessions" in footer
