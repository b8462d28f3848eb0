"""Every key in README's keys table, pressed with the focus in the message box (where it always is after
sending), on the tiny random model; PgUp while a reply streams; and bracketed pastes of control characters,
through the pilot and through a real terminal (tmux)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_tui import SIZE, ready, screen_text, tiny_settings, turn_done, wait_for
from textual import constants, events
from textual.app import App
from textual.command import CommandPalette
from textual.widgets import Input

from fmchat.store import Store
from fmchat.tui.app import FmchatApp
from fmchat.tui.screens.help import HelpScreen
from fmchat.tui.screens.sessions import SessionsScreen
from fmchat.tui.screens.settings import ChoiceSet, SettingsScreen
from fmchat.tui.terminal import PasteParser
from fmchat.tui.widgets.chat import AssistantMessage, ChatInput, Note, UserMessage
from fmchat.tui.widgets.panel import InferencePanel

PASTE = "AAA \x1b[2J BBB \x07 CCC"
SHOWN = "AAA ␛[2J BBB ␇ CCC"
REPO = Path(__file__).resolve().parents[1]


def make_app(model, tmp_path, **settings) -> FmchatApp:
    return FmchatApp(tiny_settings(model, **settings), persist=False, store=tmp_path / "sessions.db")


def box(app) -> ChatInput:
    """The message box, asserted to hold the focus."""
    inp = app.query_one(ChatInput)
    assert app.focused is inp, f"focus is on {app.focused!r}, not the message box"
    return inp


async def ready_in_box(pilot) -> ChatInput:
    """The model is loaded, and the focus is in the message box (where the app puts it)."""
    await ready(pilot)
    return box(pilot.app)


async def chat_once(pilot, text: str = "Hi") -> None:
    await pilot.press(*text, "enter")
    await turn_done(pilot, 1)
    box(pilot.app)  # the focus stays in the message box after sending


# ------------------------------------------------------------------ one test per key of the README table
async def test_enter_sends(tiny_model, tmp_path):
    app = make_app(tiny_model, tmp_path, max_new_tokens=3)
    async with app.run_test(size=SIZE) as pilot:
        await ready_in_box(pilot)
        await pilot.press(*"Hello", "enter")
        await turn_done(pilot, 1)
        assert [m.content for m in app.session.messages][:1] == ["Hello"]
        assert box(app).text == ""


async def test_ctrl_j_inserts_a_newline_and_sends_nothing(tiny_model, tmp_path):
    app = make_app(tiny_model, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready_in_box(pilot)
        await pilot.press(*"one", "ctrl+j", *"two")
        assert box(app).text == "one\ntwo"
        assert app.ready and app.session.messages == []


async def test_escape_cancels_the_reply_being_generated(tiny_model, tmp_path):
    app = make_app(tiny_model, tmp_path, max_new_tokens=5000)
    async with app.run_test(size=SIZE) as pilot:
        await ready_in_box(pilot)
        await pilot.press(*"Go on and on", "enter")
        await wait_for(pilot, lambda: app.chat.current is not None and app.chat.current.text, "streaming")
        await pilot.press("escape")
        await turn_done(pilot, 1)
        last = app.session.messages[-1]
        assert last.cancelled and last.stats.generated_tokens < 5000
        assert app.is_running and box(app).text == ""


async def test_ctrl_n_starts_a_new_chat(tiny_model, tmp_path):
    app = make_app(tiny_model, tmp_path, max_new_tokens=3)
    async with app.run_test(size=SIZE) as pilot:
        await ready_in_box(pilot)
        await chat_once(pilot)
        await pilot.press(*"draft")
        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: not app.query(UserMessage), "the transcript cleared")
        assert app.session.messages == []
        assert any("new chat" in str(n.render()) for n in app.query(Note))
        assert box(app).text == "draft"  # the key went to the app, not into the text


async def test_ctrl_r_retries_the_last_turn(tiny_model, tmp_path):
    app = make_app(tiny_model, tmp_path, max_new_tokens=3)
    async with app.run_test(size=SIZE) as pilot:
        await ready_in_box(pilot)
        await chat_once(pilot, "One")
        first = app.query_one(AssistantMessage)
        reply = app.session.messages[-1].content
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: not first.is_attached and app.ready and len(app.session.messages) == 2, "retried")
        assert [m.content for m in app.session.messages] == ["One", reply]  # greedy: the same reply again
        assert len(app.query(UserMessage)) == 1 and app.query_one(AssistantMessage) is not first
        box(app)


async def test_ctrl_y_copies_the_last_reply(tiny_model, tmp_path):
    app = make_app(tiny_model, tmp_path, max_new_tokens=4)
    async with app.run_test(size=SIZE) as pilot:
        await ready_in_box(pilot)
        await chat_once(pilot, "Say something")
        await pilot.press(*"draft", "ctrl+z")  # something for the text area's redo to bring back, if it got the key
        undone = box(app).text
        await pilot.press("ctrl+y")
        reply = app.session.messages[-1].content
        assert reply and app.clipboard == reply  # what copy_to_clipboard recorded (and sent as OSC 52)
        assert box(app).text == undone


async def test_f2_opens_the_settings_with_each_radio_group_on_its_selected_option(tiny_model, tmp_path):
    app = make_app(tiny_model, tmp_path, dtype="float32", memory="sliding")
    async with app.run_test(size=SIZE) as pilot:
        await ready_in_box(pilot)
        box(app)
        await pilot.press("f2")
        await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen), "settings open")
        groups = list(app.screen.query(ChoiceSet))
        assert any(g.pressed_index > 0 for g in groups), "no group whose selection is not its first option"

        def highlighted(g: ChoiceSet) -> list[int]:
            return [i for i, b in enumerate(g.query("RadioButton")) if b.has_class("-selected")]

        want = {
            g.id: [g.pressed_index] for g in groups if g.pressed_button is not None and not g.pressed_button.disabled
        }
        await wait_for(pilot, lambda: all(highlighted(g) == want[g.id] for g in groups if g.id in want), "highlights")
        await pilot.press("escape")
        await wait_for(pilot, lambda: not isinstance(app.screen, SettingsScreen), "settings closed")
        box(app)


async def test_f3_hides_and_shows_the_panel(tiny_model, tmp_path):
    app = make_app(tiny_model, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready_in_box(pilot)
        panel = app.query_one(InferencePanel)
        assert panel.display
        await pilot.press("f3")
        assert not panel.display
        await pilot.press("f3")
        assert panel.display
        box(app)


async def test_f4_opens_the_sessions_and_the_footer_shows_it(tiny_model, tmp_path):
    app = make_app(tiny_model, tmp_path, max_new_tokens=3)
    async with app.run_test(size=SIZE) as pilot:
        await ready_in_box(pilot)
        await wait_for(pilot, lambda: "^p palette" in screen_text(app), "the footer drawn")
        [footer] = [line for line in screen_text(app).splitlines() if "^p palette" in line]
        for shown in ("Send", "Newline", "Quit", "Cancel", "New chat", "Retry", "f2 Settings", "f3 Panel", "f4 Sessions",
                      "f1 Keys"):  # fmt: skip
            assert shown in footer, footer
        await chat_once(pilot, "Remember the puffin")
        await pilot.press("f4")
        await wait_for(pilot, lambda: isinstance(app.screen, SessionsScreen), "sessions open")
        await wait_for(pilot, lambda: "Remember the puffin" in screen_text(app), "this chat listed")


async def test_ctrl_t_changes_the_theme(tiny_model, tmp_path):
    app = make_app(tiny_model, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready_in_box(pilot)
        assert app.theme != "fmchat-light"
        await pilot.press("ctrl+t")
        await wait_for(pilot, lambda: isinstance(app.screen, CommandPalette), "theme picker open")
        await pilot.press(*"fmchat-light")
        await wait_for(pilot, lambda: "fmchat-light" in screen_text(app), "theme listed")
        await pilot.press("down", "enter")
        await wait_for(pilot, lambda: app.theme == "fmchat-light", "theme changed")


async def test_ctrl_p_opens_the_command_palette(tiny_model, tmp_path):
    app = make_app(tiny_model, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready_in_box(pilot)
        panel = app.query_one(InferencePanel)
        assert panel.display
        await pilot.press("ctrl+p")
        await wait_for(pilot, lambda: isinstance(app.screen, CommandPalette), "palette open")
        await pilot.press(*"Toggle panel")
        await wait_for(pilot, lambda: "Show or hide the inference panel" in screen_text(app), "command listed")
        await pilot.press("down", "enter")
        await wait_for(pilot, lambda: not panel.display, "panel toggled from the palette")


async def test_f1_shows_all_keys(tiny_model, tmp_path):
    app = make_app(tiny_model, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready_in_box(pilot)
        box(app)
        await pilot.press("f1")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen), "help open")
        text = screen_text(app)
        assert "saved sessions" in text and "PgUp / PgDn" in text
        await pilot.press("escape")
        await wait_for(pilot, lambda: not isinstance(app.screen, HelpScreen), "help closed")


async def test_pgup_holds_the_view_while_a_reply_streams_and_pgdn_to_the_bottom_follows_again(tiny_model, tmp_path):
    app = make_app(tiny_model, tmp_path, max_new_tokens=5000, show_panel=False)
    async with app.run_test(size=(50, 24)) as pilot:  # narrow: the reply grows by rows quickly
        await ready_in_box(pilot)
        chat = app.chat
        # A message taller than the view (pasted: 80 lines), so there is somewhere to scroll to at once.
        app.post_message(events.Paste("\n".join(f"line {i}" for i in range(80))))
        await wait_for(pilot, lambda: box(app).text.endswith("line 79"), "the message in the box")
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.chat.current is not None and app.chat.current.text, "streaming")
        await wait_for(pilot, lambda: chat.scroll_y == chat.max_scroll_y > chat.size.height, "following the reply")

        # Keys are posted the way the terminal driver posts them (pilot.press would wait for a streaming app to idle).
        app.post_message(events.Key("pageup", None))
        await wait_for(pilot, lambda: chat.scroll_y < chat.max_scroll_y - chat.size.height // 2, "scrolled up")
        held, height = chat.scroll_y, chat.max_scroll_y
        await wait_for(pilot, lambda: chat.max_scroll_y >= height + 2, "more text below")
        assert chat.scroll_y == held and app.generating  # new text did not pull the view down

        for _ in range(100):  # PgDn until the bottom: from there the view follows new text again
            if chat.scroll_y >= chat.max_scroll_y:
                break
            before = chat.scroll_y
            app.post_message(events.Key("pagedown", None))
            await wait_for(pilot, lambda before=before: chat.scroll_y > before, "scrolled down")
        height = chat.max_scroll_y
        await wait_for(
            pilot, lambda: chat.max_scroll_y >= height + 2 and chat.scroll_y == chat.max_scroll_y, "following again"
        )
        assert app.generating and box(app).text == ""
        await pilot.press("escape")
        await turn_done(pilot, 1)


async def test_ctrl_q_quits(tiny_model, tmp_path):
    app = make_app(tiny_model, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready_in_box(pilot)
        await pilot.press(*"unsent")
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: app._exit, "the app quitting")
    assert app.return_code == 0


# ------------------------------------------------------------------ pasted control characters
def test_the_terminal_parser_keeps_a_bracketed_paste_whole_and_in_order():
    """What a terminal sends for: x, a paste of PASTE (NUL added), y, arrow up; in one read and byte by byte."""
    wire = "x\x1b[200~" + PASTE + "\x00\x1b[201~y\x1b[A"
    for chunks in ([wire], list(wire)):
        parser = PasteParser()
        got = [e for chunk in chunks for e in parser.feed(chunk)]
        assert [(type(e).__name__, getattr(e, "key", None) or e.text) for e in got] == [
            ("Key", "x"),
            ("Paste", PASTE + "\x00"),
            ("Key", "y"),
            ("Key", "up"),
        ]
    parser = PasteParser()  # a lone ESC is still the Escape key, once the escape delay has passed
    assert list(parser.feed("\x1b")) == []
    deadline = time.monotonic() + 5
    while not (got := list(parser.tick())) and time.monotonic() < deadline:
        time.sleep(constants.ESCAPE_DELAY)
    assert [e.key for e in got] == ["escape"]


async def test_the_message_box_holds_pasted_text_as_typed_and_shows_pictures():
    class Box(App):
        def compose(self):
            yield ChatInput()

    async with Box().run_test() as pilot:
        inp = pilot.app.query_one(ChatInput)
        inp.focus()
        pilot.app.post_message(events.Paste("one\r\ntwo\rthree\x0bfour\x1b\x9b\u2028."))  # CR / CRLF: line breaks
        await wait_for(pilot, lambda: inp.text, "pasted")
        assert inp.text == "one\ntwo\nthree\x0bfour\x1b\x9b\u2028."
        assert inp.document.lines == ["one", "two", "three␋four␛�␤."]  # one picture per character
        assert inp.cursor_location == (2, len("three␋four␛�␤."))
        await pilot.press("left", "left", "backspace")  # deletes U+009B, shown as �
        assert inp.text == "one\ntwo\nthree\x0bfour\x1b\u2028."
        await pilot.press("ctrl+z")  # undo puts back the real character
        assert inp.text == "one\ntwo\nthree\x0bfour\x1b\x9b\u2028."
        inp.select_all()
        assert inp.selected_text == inp.text  # copy / cut take the real characters


async def test_bracketed_paste_keeps_order_shows_pictures_and_sends_what_was_pasted(tiny_model, tmp_path):
    app = make_app(tiny_model, tmp_path, max_new_tokens=2)
    async with app.run_test(size=SIZE) as pilot:
        await ready_in_box(pilot)
        inp = box(app)
        await pilot.press("x")
        app.post_message(events.Paste(PASTE))
        await pilot.press("y")
        await wait_for(pilot, lambda: inp.text.endswith("y"), "paste and keys in")
        assert inp.text == "x" + PASTE + "y"
        assert f"│ x{SHOWN}y " in screen_text(app)
        await pilot.press("enter")
        await turn_done(pilot, 1)
        assert app.session.messages[0].content == "x" + PASTE + "y"  # sent as pasted
        saved = Store(tmp_path / "sessions.db")  # and saved as pasted
        assert saved.get(saved.list_sessions()[0].id).messages[0].content == "x" + PASTE + "y"
        text = screen_text(app)
        assert f"x{SHOWN}y" in text and "\x1b" not in text and "\x07" not in text  # shown as pictures

        # Another field gets the pictures themselves: it would otherwise draw the raw codes.
        await pilot.press("f2")
        await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen), "settings open")
        field = app.screen.query_one("#set-system", Input)
        field.focus()
        await pilot.pause()
        app.post_message(events.Paste(PASTE))
        await wait_for(pilot, lambda: field.value, "pasted into the system prompt field")
        assert field.value == SHOWN


def _tmux(socket: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["tmux", "-L", socket, "-f", "/dev/null", *args], check=check, capture_output=True, text=True)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_bracketed_paste_in_a_real_terminal(tiny_model, tmp_path):
    """`python -m fmchat` in tmux at 120x40: tmux pastes with brackets, the box shows the pictures in order,
    and the saved message holds the real characters."""
    socket = f"fmchat-keys-{os.getpid()}"
    env = {"XDG_CACHE_HOME": tmp_path / "cache", "XDG_CONFIG_HOME": tmp_path / "config",
           "XDG_DATA_HOME": tmp_path / "data", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    cmd = ["env", *(f"{k}={v}" for k, v in env.items()), sys.executable, "-m", "fmchat", "--model", str(tiny_model),
           "--device", "cpu", "--dtype", "float32", "--temperature", "0", "--max-new-tokens", "2"]  # fmt: skip
    _tmux(socket, "new-session", "-d", "-s", "t", "-x", "120", "-y", "40", "-c", str(REPO), shlex.join(cmd))

    def until(cond, what: str, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = _tmux(socket, "capture-pane", "-p", "-t", "t").stdout
            if cond(screen):
                return screen
            assert time.monotonic() < deadline, f"never happened: {what}\n{screen}"
            time.sleep(0.2)

    try:
        until(lambda s: "Type a message" in s, "the app drawn (bracketed paste mode on)")
        _tmux(socket, "set-buffer", "-b", "p", PASTE)
        _tmux(socket, "send-keys", "-t", "t", "x")
        _tmux(socket, "paste-buffer", "-p", "-d", "-b", "p", "-t", "t")
        _tmux(socket, "send-keys", "-t", "t", "y")
        screen = until(lambda s: f"x{SHOWN}y" in s, "the paste shown in order")
        assert "^[" not in screen
        until(lambda s: "loaded" in s, "the model loaded")
        _tmux(socket, "send-keys", "-t", "t", "Enter")
        until(lambda s: "tokens · TTFT" in s, "the reply")
        _tmux(socket, "send-keys", "-t", "t", "C-q")
        deadline = time.monotonic() + 60
        while _tmux(socket, "has-session", "-t", "t", check=False).returncode == 0:
            assert time.monotonic() < deadline, "the app did not quit"
            time.sleep(0.2)
    finally:
        _tmux(socket, "kill-server", check=False)
    store = Store(next((tmp_path / "data").rglob("sessions.db")))
    [session] = store.list_sessions()
    assert store.get(session.id).messages[0].content == "x" + PASTE + "y"
