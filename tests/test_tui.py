"""The Textual app under pilot, on the tiny random model: launch, chat, panel, cancel, settings, text safety."""

from __future__ import annotations

import asyncio

from fmchat import settings as settings_mod
from fmchat.config import RunConfig
from fmchat.tui.app import FmchatApp
from fmchat.tui.state import AppState
from fmchat.tui.widgets.chat import AssistantMessage, ChatInput, ChatView, Note, UserMessage
from fmchat.tui.widgets.panel import InferencePanel

SIZE = (120, 40)
HOSTILE = "[bold red]x[/] [link=file:///etc]y[/link] \x1b[2J\x07 [red]z"


def tiny_settings(model, **kw) -> RunConfig:
    base = {"model": str(model), "device": "cpu", "dtype": "float32", "temperature": 0.0, "seed": 0, "max_new_tokens": 8}
    base.update(kw)
    return RunConfig(**base)


def screen_text(app) -> str:
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())


async def wait_for(pilot, cond, what: str, steps: int = 3000) -> None:
    """Let the app run until ``cond()`` holds (bounded by a step count, not by a clock)."""
    for _ in range(steps):
        if cond():
            return
        await pilot.pause(0.01)
    raise AssertionError(f"never happened: {what}")


async def ready(pilot) -> None:
    await wait_for(pilot, lambda: pilot.app.ready, "model loaded")


async def send(pilot, text: str) -> None:
    app = pilot.app
    app.query_one(ChatInput).text = text
    app.query_one(ChatInput).focus()
    await pilot.press("enter")


def streaming(app) -> bool:
    """A reply is on screen and has text."""
    current = app.query_one(ChatView).current
    return current is not None and len(current.text) > 0


async def turn_done(pilot, turns: int) -> None:
    app = pilot.app
    await wait_for(
        pilot,
        lambda: not app.generating and sum(m.role == "assistant" for m in app.session.messages) >= turns,
        f"{turns} replies",
    )
    await pilot.pause()


async def test_launch_chat_stream_and_panel(tiny_model):
    app = FmchatApp(tiny_settings(tiny_model), persist=False)
    states = []
    enter = app._enter
    app._enter = lambda state: (states.append(state), enter(state))  # the app's one state, as it moves
    async with app.run_test(size=SIZE) as pilot:
        # The first frame is up before the model: the input takes text while loading runs in a worker.
        app.query_one(ChatInput).focus()
        await pilot.press(*"Hi", "ctrl+j", *"there")
        assert app.query_one(ChatInput).text == "Hi\nthere"
        was_loading = app.loading
        await pilot.press("enter")  # while loading, the message waits for the model; else it goes now
        if was_loading:
            assert any("still loading" in str(n.render()) for n in app.query(Note))
        await ready(pilot)
        assert any("resolving model" in s for s in app.load_steps), app.load_steps
        panel = app.query_one(InferencePanel)
        await turn_done(pilot, 1)
        assert app.query_one(ChatInput).text == ""

        user = app.query_one(UserMessage)
        assert user.text == "Hi\nthere"
        reply = app.query_one(AssistantMessage)
        done = app.session.messages[-1]
        assert done.role == "assistant" and done.stats is not None
        assert reply.text == done.content and reply.text  # the streamed text is the reply
        footer = str(reply.footer.render())
        assert f"{done.stats.generated_tokens} tokens" in footer and "TTFT" in footer and "tok/s" in footer

        # The panel moved: context used, KV fill per row, bytes with units, speed and memory.
        st = panel.state
        assert st.ctx_size == 2048
        first_used = st.ctx_used
        assert first_used == done.stats.ctx_used > 0
        assert st.seq_lens == [first_used]
        assert st.reused == 0 and st.prefilled == done.stats.prefilled_tokens > 0
        assert len(st.decode_history) == 1
        text = screen_text(app)
        assert f"{first_used} / 2048 tokens" in text
        assert f"[{first_used}] tokens" in text
        assert "MiB" in text and "tok/s" in text and "ms" in text

        # Second turn: the KV cache is reused (requirement: reused vs prefilled this turn).
        await send(pilot, "And again")
        await turn_done(pilot, 2)
        assert st.reused > 0 and st.ctx_used > first_used
        assert len(st.decode_history) == 2
        assert f"{st.reused} tokens this turn" in screen_text(app)
        S = AppState
        assert states == [S.LOADING, S.READY, S.GENERATING, S.READY, S.GENERATING, S.READY], states


async def test_escape_cancels_reply_and_app_keeps_running(tiny_model):
    app = FmchatApp(tiny_settings(tiny_model, max_new_tokens=5000, ctx=None), persist=False)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "Write a very long story")
        await wait_for(pilot, lambda: streaming(app), "streaming started")
        # Typing stays possible while the reply streams (the UI thread is free). One key: under the pilot a key press
        # while a reply streams takes ~1.5 s, and the tiny model fills its 2048-token window in ~8 s.
        await pilot.press("n")
        assert app.query_one(ChatInput).text == "n"
        assert app.generating, "the reply ended before Escape could cancel it"
        await pilot.press("escape")
        await turn_done(pilot, 1)
        last = app.session.messages[-1]
        assert last.cancelled and last.stats.finish_reason == "cancelled", (last.stats.finish_reason, last.stats.generated_tokens)
        assert last.stats.generated_tokens < 5000
        assert "cancelled" in str(app.query_one(AssistantMessage).footer.render())
        assert app.is_running
        # The chat goes on after a cancel.
        app.query_one(ChatInput).clear()
        await app.workers.wait_for_complete()


async def test_quit_mid_reply_is_clean(tiny_model):
    app = FmchatApp(tiny_settings(tiny_model, max_new_tokens=5000), persist=False)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "Go on and on")
        await wait_for(pilot, lambda: streaming(app), "streaming started")
        await pilot.press("ctrl+q")
    assert app.return_code in (0, None)
    # The worker saw the cancel: the session is free again and the reply is kept, marked cancelled.
    for _ in range(2000):
        if not app.session.busy:
            break
        await asyncio.sleep(0.005)
    assert not app.session.busy
    assert app.session.messages[-1].cancelled


async def test_markup_and_control_characters_are_text(tiny_model):
    app = FmchatApp(tiny_settings(tiny_model, max_new_tokens=2), persist=False)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, HOSTILE)
        await turn_done(pilot, 1)
        assert app.query_one(UserMessage).text == HOSTILE
        # A reply with the same text goes through the same streaming path as model output.
        reply = AssistantMessage("model [bold]x[/bold]")
        await app.query_one("#chat").mount(reply)
        for piece in ("[bold red]x[/] ", "[link=file:///etc]y[/link] ", "\x1b[2J\x07", " [red]z"):
            await reply.write(piece)
        await reply.finish(None, note="done")
        await pilot.pause()
        text = screen_text(app)
        assert text.count("[bold red]x[/]") == 2, text
        assert text.count("[link=file:///etc]y[/link]") == 2
        assert text.count("␛[2J␇") == 2
        assert "\x1b" not in text and "\x07" not in text
        assert "model [bold]x[/bold]" in text


async def test_context_overflow_is_a_message_not_a_crash(tiny_model):
    app = FmchatApp(tiny_settings(tiny_model, ctx=32, memory="none"), persist=False)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        long = "word " * 200
        await send(pilot, long)
        await wait_for(pilot, lambda: not app.generating and any("not sent" in str(n.render()) for n in app.query(Note)), "overflow note")
        assert app.session.messages == []
        assert not app.query(UserMessage)
        assert app.query_one(ChatInput).text == long  # given back to edit
        assert "context window" in screen_text(app)


async def test_settings_apply_reload_keep_transcript_and_persist(tiny_model):
    path = settings_mod.settings_path()
    path.unlink(missing_ok=True)
    app = FmchatApp(tiny_settings(tiny_model, max_new_tokens=4), persist=True)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "Hello")
        await turn_done(pilot, 1)
        first_backend = app.session.backend

        await pilot.press("f2")
        from fmchat.tui.screens.settings import ChoiceSet, SettingsScreen

        await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen), "settings open")
        screen = app.screen
        # Choices that cannot be used here are listed, disabled, with the reason.
        device = screen.query_one("#set-device", ChoiceSet)
        cuda = next(b for b, c in zip(device.query("RadioButton"), device.choices) if c.value == "cuda")
        assert cuda.disabled and "CUDA" in str(cuda.label)
        policy = screen.query_one("#set-memory", ChoiceSet)
        sliding = next(b for b, c in zip(policy.query("RadioButton"), policy.choices) if c.value == "sliding")
        sliding.value = True

        # Switch kernel to eager (needs a reload), turn the KV cache off, new sampling settings.
        kernel = screen.query_one("#set-kernel", ChoiceSet)
        eager = next(b for b, c in zip(kernel.query("RadioButton"), kernel.choices) if c.value == "eager")
        eager.value = True
        from textual.widgets import Input, Switch

        screen.query_one("#set-kv_cache", Switch).value = False
        screen.query_one("#set-max_new_tokens", Input).value = "3"
        screen.query_one("#set-temperature", Input).value = "0.5"
        await pilot.pause()
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: app.session.backend is not first_backend and app.ready, "reloaded")
        assert app.session.backend.kernel == "eager"
        assert app.session.config.kv_cache is False
        assert app.session.config.memory == "sliding"
        assert app.session.config.gen.max_new_tokens == 3 and app.session.config.gen.temperature == 0.5
        # The transcript survived; the next turn runs on the new configuration and rebuilds the cache.
        assert [m.role for m in app.session.messages] == ["user", "assistant"]
        assert len(app.query(UserMessage)) == 1
        await send(pilot, "Again")
        await turn_done(pilot, 2)
        stats = app.session.messages[-1].stats
        assert stats.reused_tokens == 0 and stats.generated_tokens <= 3
        assert app.query_one(InferencePanel).state.kernel == "eager"

    saved = settings_mod.load(path)
    assert saved.kernel == "eager" and saved.kv_cache is False and saved.max_new_tokens == 3
    assert saved.temperature == 0.5 and saved.model == str(tiny_model) and saved.memory == "sliding"


async def test_settings_reject_bad_values(tiny_model):
    app = FmchatApp(tiny_settings(tiny_model), persist=False)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("f2")
        from textual.widgets import Input

        from fmchat.tui.screens.settings import SettingsScreen

        await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen), "settings open")
        app.screen.query_one("#set-top_p", Input).value = "7"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert isinstance(app.screen, SettingsScreen)  # still open, with the reason
        assert "top-p must be at most 1.0" in str(app.screen.query_one("#settings-error").render())
        await pilot.press("escape")
        assert not isinstance(app.screen, SettingsScreen)
        assert app.session.config.gen.top_p == 0.95


async def test_new_chat_retry_toggle_panel_and_palette(tiny_model):
    app = FmchatApp(tiny_settings(tiny_model, max_new_tokens=4), persist=False)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "One")
        await turn_done(pilot, 1)
        reply1 = app.session.messages[-1].content
        await pilot.press("ctrl+r")  # retry: same text again, greedy -> the same reply
        await turn_done(pilot, 1)
        await wait_for(pilot, lambda: not app.generating and len(app.session.messages) == 2, "retried")
        assert [m.content for m in app.session.messages] == ["One", reply1]
        assert len(app.query(UserMessage)) == 1

        await pilot.press("f3")
        assert not app.query_one(InferencePanel).display
        await pilot.press("f3")
        assert app.query_one(InferencePanel).display

        # The command palette lists the app's commands.
        titles = [c.title for c in app.get_system_commands(app.screen)]
        for want in ("New chat", "Settings", "Toggle panel", "Cancel reply", "Retry last turn", "Copy last reply", "Theme", "Quit"):
            assert want in titles

        await pilot.press("ctrl+n")
        await pilot.pause()
        assert app.session.messages == [] and not app.query(UserMessage)
        assert app.query_one(InferencePanel).state.ctx_used == 0
        assert "0 / 2048 tokens" in screen_text(app)

        await pilot.press("f1")
        await pilot.pause()
        assert "retry the last turn" in screen_text(app)


async def test_typed_burst_then_enter_sends_everything(tiny_model):
    """A terminal delivers 'abc\\r' in one read: Enter must act after the characters, not before them."""
    from textual import events

    app = FmchatApp(tiny_settings(tiny_model, max_new_tokens=2), persist=False)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        app.query_one(ChatInput).focus()
        for ch in "abc":
            app.post_message(events.Key(ch, ch))
        app.post_message(events.Key("enter", "\r"))
        await turn_done(pilot, 1)
        assert app.session.messages[0].content == "abc"
        assert app.query_one(ChatInput).text == ""
