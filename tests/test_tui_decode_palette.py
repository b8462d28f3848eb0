"""The decode path from the command palette (Ctrl+P, "decode"), under Textual's pilot on real models: one entry per
choice, the one in use marked; choosing one applies it as the settings pane does (a reload, one compact
``settings:`` line in the transcript); on a backend without a decode path (llama.cpp) every entry is unavailable
and says why, in the palette and in the settings pane. And the one-line panel of a narrow terminal: the decode
rate keeps its unit when it is unknown ("n/a tok/s", never a bare "n/a")."""

from __future__ import annotations

import re

from test_tui import ready, screen_text, send, tiny_settings, turn_done, wait_for
from test_tui_panel import decode_row
from textual.command import CommandList, CommandPalette

from fmchat.config import RunConfig
from fmchat.tui.app import FmchatApp
from fmchat.tui.screens.settings import ChoiceSet, SettingsScreen
from fmchat.tui.widgets.chat import Note

SIZE = (120, 40)
NARROW = (80, 24)


def notes(app) -> list[str]:
    return [str(n.render()) for n in app.query(Note)]


def toasts(app) -> str:
    """The notifications as drawn (right of their "▌" edge, less the panel border drawn past them), lines joined: a
    toast wraps its text."""
    parts = [line.rsplit("▌", 1)[1].rstrip(" │╮╯") for line in screen_text(app).splitlines() if "▌" in line]
    return " ".join(" ".join(parts).split())


def shown_entries(app) -> list[tuple[str, str]]:
    """The palette's entries as listed now: (title, help)."""
    options = app.screen.query_one(CommandList).options
    return [(str(o.hit.text or o.prompt), str(o.hit.help or "")) for o in options]


async def search_palette(pilot, query: str, count: int) -> list[tuple[str, str]]:
    """Ctrl+P, type ``query`` key by key, wait until ``count`` entries start with "Decode path"."""
    app = pilot.app
    await pilot.press("ctrl+p")
    await wait_for(pilot, lambda: isinstance(app.screen, CommandPalette), "palette open")
    await pilot.press(*query)
    await wait_for(pilot, lambda: sum(t.startswith("Decode path") for t, _ in shown_entries(app)) == count,
                   f"{count} decode path entries")  # fmt: skip
    await pilot.pause()
    return shown_entries(app)


async def pick(pilot, starts: str) -> None:
    """Move the palette's highlight with the arrow keys to the entry whose title starts with ``starts``; Enter."""
    app = pilot.app
    titles = [t for t, _ in shown_entries(app)]
    want = next(i for i, t in enumerate(titles) if t.startswith(starts))
    commands = app.screen.query_one(CommandList)
    for _ in range(len(titles) + 1):
        if commands.highlighted == want:
            break
        await pilot.press("down")
    assert commands.highlighted == want, (titles, commands.highlighted)
    await pilot.press("enter")
    await wait_for(pilot, lambda: not isinstance(app.screen, CommandPalette), "palette closed")


async def test_palette_sets_the_decode_path_as_the_settings_pane_does(tiny_model):
    app = FmchatApp(tiny_settings(tiny_model, compile="auto", max_new_tokens=4), persist=False, save_sessions=False)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "Hello")
        await turn_done(pilot, 1)
        first = app.session.backend
        assert first.decode_status()["choice"] == "auto"
        assert decode_row(app).startswith("eager (background compile off")  # auto, compile off in the tests

        entries = await search_palette(pilot, "decode", 3)
        decode = {t: h for t, h in entries if t.startswith("Decode path")}
        assert set(decode) == {
            "Decode path: auto (compiled step when ready, eager meanwhile) — current",
            "Decode path: eager (one PyTorch call per op)",
            "Decode path: compiled (at load)",
        }, decode
        assert decode["Decode path: eager (one PyTorch call per op)"].startswith("eager (")
        assert not any("unavailable" in h for h in decode.values())  # transformers has every decode path
        assert "Decode path: compiled (at load)" in screen_text(app)  # drawn, not only listed

        before = notes(app)
        await pick(pilot, "Decode path: eager")
        await wait_for(pilot, lambda: app.session.backend is not first and app.ready, "reloaded on the eager path")
        await pilot.pause()
        # The running config and the backend's own report say eager now.
        assert app.settings.compile == "eager" and app.conversation.config.compile == "eager"
        assert app.session.backend.decode_status()["choice"] == "eager"
        assert app.session.backend.decode_path == "eager"
        await wait_for(pilot, lambda: decode_row(app) == "eager", "the panel's decode row says eager")
        # One compact line in the transcript, the same as the settings pane writes for a change that reloads.
        added = notes(app)[len(before) :]
        assert len(added) == 1, added
        line = r"settings: compile auto → eager \(reloaded in [0-9.]+ s; the conversation carries on\)"
        assert re.fullmatch(line, added[0]), added[0]
        assert [m.role for m in app.session.messages] == ["user", "assistant"]  # the conversation carried on

        # The mark follows: eager is current now; choosing it again changes nothing.
        entries = await search_palette(pilot, "decode", 3)
        titles = [t for t, _ in entries]
        assert "Decode path: eager (one PyTorch call per op) — current" in titles, titles
        assert "Decode path: auto (compiled step when ready, eager meanwhile)" in titles, titles
        backend, before = app.session.backend, notes(app)
        await pick(pilot, "Decode path: eager")
        await pilot.pause()
        assert app.session.backend is backend and notes(app) == before and app.state.name == "READY"


async def test_no_decode_path_on_llamacpp_entries_unavailable_with_the_reason(default_gguf):
    config = RunConfig(backend="llamacpp", model=str(default_gguf), device="cpu", temperature=0.0, seed=0,
                       max_new_tokens=4)  # fmt: skip
    app = FmchatApp(config, persist=False, save_sessions=False)
    async with app.run_test(size=SIZE, notifications=True) as pilot:  # the refusal is a toast: draw toasts
        await ready(pilot)
        backend = app.session.backend
        assert backend.name == "llamacpp"

        entries = await search_palette(pilot, "decode", 3)
        decode = {t: h for t, h in entries if t.startswith("Decode path")}
        assert set(decode) == {
            "Decode path: auto (compiled step when ready, eager meanwhile) — unavailable",
            "Decode path: eager (one PyTorch call per op) — unavailable",
            "Decode path: compiled (at load) — unavailable",
        }, decode
        assert set(decode.values()) == {"unavailable: llamacpp has no decode path choice"}, decode
        assert "unavailable: llamacpp has no decode path choice" in screen_text(app)  # drawn under the entry

        before = notes(app)
        await pick(pilot, "Decode path: compiled")
        want = "decode path compiled is not available: llamacpp has no decode path choice"
        await wait_for(pilot, lambda: want in toasts(app), "the reason, on screen")
        await pilot.pause()
        # Nothing applied: no reload, no settings line, the app still ready.
        assert app.settings.compile == "auto" and app.conversation.config.compile == "auto"
        assert app.session.backend is backend and notes(app) == before and app.ready

        # The settings pane says the same of its decode path choices (one rule for both).
        await pilot.press("f2")
        await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen), "settings open")
        await pilot.pause()
        box = app.screen.query_one("#set-compile", ChoiceSet)
        buttons = list(box.query("RadioButton"))
        assert [b.disabled for b in buttons] == [True, True, True]
        assert [str(b.label) for b in buttons] == [
            f"{v} — llamacpp has no decode path choice" for v in ("auto", "eager", "compiled")
        ]
        await pilot.press("escape")


async def test_one_line_panel_gives_the_unknown_rate_its_unit(tiny_model):
    app = FmchatApp(tiny_settings(tiny_model, compile="eager", max_new_tokens=4), persist=False, save_sessions=False)

    def summary() -> str:
        lines = [line.strip() for line in screen_text(app).splitlines() if line.strip().startswith("ctx ")]
        assert len(lines) == 1, lines
        return lines[0]

    async with app.run_test(size=NARROW) as pilot:
        await ready(pilot)
        await wait_for(pilot, lambda: "KV 0 B" in summary(), "the one-line panel of the loaded model")
        line = summary()
        # No turn yet: the rate is unknown, and says what it would be counted in.
        assert "KV 0 B · n/a tok/s · TTFT n/a · RSS " in line, line
        assert not re.search(r"· n/a( ·|$)", line), line  # no bare n/a anywhere in the line
        await send(pilot, "Hello")
        await turn_done(pilot, 1)
        st = app.session.messages[-1].stats
        await wait_for(pilot, lambda: f"· {st.decode_tok_s:.1f} tok/s ·" in summary(), "the turn's rate, with its unit")
        await pilot.press("ctrl+n")  # a new chat: the rate is unknown again, still with its unit
        await wait_for(pilot, lambda: "· n/a tok/s ·" in summary(), "n/a tok/s after a new chat")
