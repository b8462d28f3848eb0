"""fmchat's full-screen app: chat on the left, what it costs on the right.

Threads: the model loads and every turn runs in Textual thread workers; they talk to the UI only by
posting messages, so the UI thread never waits on the model. Session methods that take the session's
lock (reset, replace_backend, set_generation, pop_last_exchange) are only called when no turn runs;
anything asked for during a turn is cancelled-then-deferred until the turn's worker has finished.
"""

from __future__ import annotations

import time
from dataclasses import replace
from collections.abc import Callable, Iterable

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Header, ProgressBar, Static

from fmchat import settings as settings_mod
from fmchat.settings import Settings
from fmchat.text import neutralize

from .screens.help import HelpScreen
from .screens.sessions import ConfirmScreen, RenameScreen, SessionDeleted, SessionsScreen
from .screens.settings import SettingsScreen
from .themes import load_themes
from .widgets.chat import AssistantMessage, ChatInput, Note, UserMessage
from .widgets.panel import InferencePanel

PANEL_REFRESH_S = 0.2  # the panel updates 5 times a second while a reply is generated


# ------------------------------------------------------------------ messages from worker threads
class LoadStep(Message):
    def __init__(self, step: str, fraction: float | None) -> None:
        super().__init__()
        self.step, self.fraction = step, fraction


class Loaded(Message):
    def __init__(self, backend, settings: Settings, previous: Settings | None) -> None:
        super().__init__()
        self.backend, self.settings, self.previous = backend, settings, previous


class LoadFailed(Message):
    def __init__(self, error: str, settings: Settings, previous: Settings | None) -> None:
        super().__init__()
        self.error, self.settings, self.previous = error, settings, previous


class TurnEvent(Message):
    def __init__(self, event) -> None:
        super().__init__()
        self.event = event


class TurnFailed(Message):
    def __init__(self, error: str, text: str, before_start: bool) -> None:
        super().__init__()
        self.error, self.text, self.before_start = error, text, before_start


class TurnEnded(Message):
    pass


class RestoreStep(Message):
    def __init__(self, done: int, total: int) -> None:
        super().__init__()
        self.done, self.total = done, total


class RestoreDone(Message):
    def __init__(self, result: dict | None, error: str | None, seconds: float) -> None:
        super().__init__()
        self.result, self.error, self.seconds = result, error, seconds


class SaveFailed(Message):
    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class FmchatApp(App):
    CSS_PATH = "fmchat.tcss"
    TITLE = "fmchat"
    SUB_TITLE = "what inference really costs"

    BINDINGS = [
        Binding("escape", "cancel", "Cancel reply"),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("ctrl+r", "retry", "Retry"),
        Binding("ctrl+y", "copy_reply", "Copy reply", show=False),
        Binding("f2", "settings", "Settings"),
        Binding("f3", "toggle_panel", "Panel"),
        Binding("f4", "sessions", "Sessions", show=False),
        Binding("ctrl+t", "change_theme", "Theme", show=False),
        Binding("f1", "help", "Keys"),
        Binding("pageup", "scroll_chat(-1)", "Scroll up", show=False),
        Binding("pagedown", "scroll_chat(1)", "Scroll down", show=False),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        persist: bool = True,
        mask_volatile: bool = False,
        threads: int | None = None,
        file_settings: Settings | None = None,
        cli_overrides: dict | None = None,
        session_id: str | None = None,
        store=None,
        save_sessions: bool = True,
    ) -> None:
        super().__init__()
        # Saved sessions (fmchat.store): every message is committed as it happens; ``store`` is a Store or a
        # database path (default: the user data dir); ``session_id`` opens that saved chat once the model is up.
        self.store = store
        self.save_sessions = save_sessions
        self.recorder = None
        self.restoring = False
        self._resume_id = session_id
        self._restore_running = False  # the restore worker is prefilling (the session lock is held)
        self._open_after_restore: str | None = None
        self._save_warned = False
        self.settings = settings or Settings()
        # What the config file held, and the CLI flags laid over it: flags are not written back to the file
        # unless the user changes that setting in the app.
        self.file_settings = file_settings
        self.cli_overrides = dict(cli_overrides or {})
        self.persist = persist  # save settings changes to the config file
        self.mask_volatile = mask_volatile  # snapshot tests: hide timings that differ run to run
        self.threads = threads
        self.session = None
        self.loading = False
        self.generating = False
        self._after_turn: list[Callable[[], None]] = []
        self._current: AssistantMessage | None = None
        self._current_user: UserMessage | None = None
        self._queued: str | None = None  # a message sent before the first load finished
        self._sent_at = 0.0
        self._first_delta_at: float | None = None
        self.theme_problems: list[str] = []
        self.load_steps: list[str] = []  # every load/convert step shown, in order (for the curious and for tests)
        loaded = load_themes()
        for theme in loaded.themes:
            self.register_theme(theme)
        self.theme_problems = loaded.problems

    # ------------------------------------------------------------------ layout
    def compose(self) -> ComposeResult:
        yield Header(show_clock=False, icon="≡")
        with Horizontal(id="main"):
            with Vertical(id="chat-column"):
                yield VerticalScroll(id="chat", can_focus=True)
                with Horizontal(id="load-status"):
                    yield ProgressBar(total=None, show_eta=False, show_percentage=False, id="load-bar")
                    yield Static("", id="load-step", markup=False)
                yield ChatInput(id="input", placeholder="Type a message · Enter sends · Ctrl+J newline · F1 keys")
            yield InferencePanel(id="panel", mask_volatile=self.mask_volatile)
        yield Footer()

    def on_mount(self) -> None:
        if self.settings.theme in self.available_themes:
            self.theme = self.settings.theme
        self.theme_changed_signal.subscribe(self, self._theme_changed)
        for problem in self.theme_problems:
            self.note(problem, "error")
        chat = self.query_one("#chat", VerticalScroll)
        chat.anchor()  # follow new text while the view is at the bottom; scrolling up releases it
        panel = self.query_one(InferencePanel)
        panel.display = self.settings.show_panel
        self._set_running_state()
        panel.sample_memory()
        panel.refresh_state()
        self.set_interval(PANEL_REFRESH_S, self._tick)
        self.query_one(ChatInput).focus()
        self._open_store()
        self.start_load(self.settings, previous=None)

    def _open_store(self) -> None:
        from fmchat.store import Store, StoreError

        if not self.save_sessions:
            self.store = None
            return
        if self.store is None or not isinstance(self.store, Store):
            try:
                self.store = Store(self.store)
            except StoreError as exc:
                self.store = None
                self.note(f"sessions are not saved: {exc}", "error")

    # ------------------------------------------------------------------ helpers
    @property
    def ready(self) -> bool:
        return self.session is not None and not self.loading

    def note(self, text: str, kind: str = "info") -> Note:
        n = Note(text, kind)
        self.query_one("#chat", VerticalScroll).mount(n)
        return n

    def save_settings(self) -> None:
        if not self.persist:
            return
        to_save = replace(self.settings)
        if self.file_settings is not None:
            for key, value in self.cli_overrides.items():
                if getattr(to_save, key) == value:
                    setattr(to_save, key, getattr(self.file_settings, key))
        try:
            settings_mod.save(to_save)
        except OSError as exc:
            self.note(f"could not save settings: {exc}", "error")

    def _theme_changed(self, theme) -> None:
        if theme.name != self.settings.theme:
            self.settings.theme = theme.name
            self.save_settings()

    def _set_running_state(self) -> None:
        s, st = self.settings, self.query_one(InferencePanel).state
        st.quant = s.quant
        st.kv_cache = s.kv_cache
        st.memory_policy = s.memory_policy
        if self.session is not None:
            b = self.session.backend
            st.model, st.backend, st.device, st.dtype = b.model_name, b.name, b.device, b.dtype
            st.kernel = getattr(b, "kernel", s.kernel)
            st.kv_cache = self.session.config.kv_cache
        else:
            st.model = s.model or "smollm2-135m"
            st.backend, st.kernel = s.backend, s.kernel

    def _set_memory_policy(self, policy: str) -> None:
        if self.session is not None and hasattr(self.session.config, "memory"):
            self.session.config.memory = policy

    def _fill_from_stats(self, stats) -> None:
        st = self.query_one(InferencePanel).state
        st.ctx_used, st.ctx_size = stats.ctx_used, stats.ctx_size
        st.seq_lens = None if stats.seq_lens is None else list(stats.seq_lens)
        st.kv_bytes, st.weights_bytes, st.gpu_mem_mb = stats.kv_bytes, stats.weights_bytes, stats.gpu_mem_mb
        st.rss_mb, st.peak_rss_mb = stats.rss_mb, stats.peak_rss_mb

    def refresh_panel_from_session(self) -> None:
        panel = self.query_one(InferencePanel)
        if self.session is not None and not self.generating:
            self._fill_from_stats(self.session.snapshot_stats())
        self._set_running_state()
        panel.refresh_state()

    def _tick(self) -> None:
        if self.generating:
            panel = self.query_one(InferencePanel)
            panel.sample_memory()
            panel.refresh_state()

    def _defer(self, fn: Callable[[], None], why: str) -> None:
        """Run ``fn`` once the running turn has stopped (cancelling it now)."""
        self._after_turn.append(fn)
        if self.session is not None:
            self.session.cancel()
        self.notify(f"cancelling the reply to {why}")

    # ------------------------------------------------------------------ loading
    def start_load(self, settings: Settings, previous: Settings | None) -> None:
        self.loading = True
        status = self.query_one("#load-status")
        status.display = True
        self.query_one("#load-bar", ProgressBar).update(total=None, progress=0)
        self.query_one("#load-step", Static).update(Text(f"loading {settings.model or 'smollm2-135m'}…"))
        self._load_worker(settings, previous)

    @work(thread=True, exclusive=True, group="load")
    def _load_worker(self, settings: Settings, previous: Settings | None) -> None:
        from fmchat import backends, models
        from fmchat.backends.openai_backend import BackendError

        if self.threads:
            from fmchat.engine.session import set_threads

            set_threads(self.threads)

        def progress(step: str, fraction: float | None = None) -> None:
            self.post_message(LoadStep(step, fraction))

        from fmchat.options import engine_has_quant

        extra = {"quant": settings.quant} if engine_has_quant() else {}
        opts = backends.LoadOptions(
            device=settings.device, dtype=settings.load_dtype, ctx=settings.ctx, kernel=settings.kernel,
            base_url=settings.base_url, api_model=settings.api_model, **extra,
        )  # fmt: skip
        try:
            backend = backends.load(settings.model, settings.backend, opts, progress)
        except (models.ModelNotFound, backends.UnknownBackend, BackendError, ValueError) as exc:
            self.post_message(LoadFailed(str(exc), settings, previous))
            return
        except Exception as exc:  # anything else is still a message on screen, never a traceback
            self.post_message(LoadFailed(f"{type(exc).__name__}: {exc}", settings, previous))
            return
        self.post_message(Loaded(backend, settings, previous))

    def on_load_step(self, msg: LoadStep) -> None:
        self.load_steps.append(msg.step)
        bar = self.query_one("#load-bar", ProgressBar)
        if msg.fraction is None:
            bar.update(total=None)
        else:
            bar.update(total=1.0, progress=msg.fraction)
        self.query_one("#load-step", Static).update(Text(neutralize(msg.step)))

    def on_loaded(self, msg: Loaded) -> None:
        from fmchat.engine import ChatSession, GenerationConfig, SessionConfig

        s = msg.settings
        backend = msg.backend
        if self.session is None:
            gen = GenerationConfig(s.max_new_tokens, s.temperature, s.top_p, s.seed)
            self.session = ChatSession(backend, SessionConfig(system=s.system, kv_cache=s.kv_cache, ctx=s.ctx, gen=gen))
            self._set_memory_policy(s.memory_policy)
            if self.store is not None:
                from fmchat.store import Recorder

                self.recorder = Recorder(self.store, spec=s.model)
                if self._resume_id is not None:
                    sid, self._resume_id = self._resume_id, None
                    self.restoring = True  # a message typed meanwhile waits for the restore
                    self.call_later(self.open_saved, sid)
        else:
            self.session.replace_backend(backend)
            self.session.config.ctx = s.ctx
            if self.recorder is not None:
                self.recorder.spec = s.model
                try:
                    self.recorder.update_settings(self.session)
                except Exception as exc:
                    self.note(f"could not save the session settings: {exc}", "error")
        self.loading = False
        self.query_one("#load-status").display = False
        r = backend.load_report
        how = "converted the GGUF, then loaded" if r.converted else "loaded"
        secs = "masked s" if self.mask_volatile else f"{r.seconds:.2f} s"
        kernel = getattr(backend, "kernel", s.kernel)
        self.note(f"{how} {backend.model_name} ({backend.name}, {backend.device}, {backend.dtype}, {kernel}) in {secs}")
        if msg.previous is not None and self.session.messages:
            self.note("the conversation carries on: the next turn rebuilds the KV cache from the transcript")
        self.save_settings()
        self.refresh_panel_from_session()
        if self._queued is not None and not self.restoring:
            text, self._queued = self._queued, None
            self.send(text)

    def on_load_failed(self, msg: LoadFailed) -> None:
        self.loading = False
        if self._queued is not None:
            self.query_one(ChatInput).text, self._queued = self._queued, None
        self.query_one("#load-status").display = False
        if msg.previous is not None:
            self.settings = msg.previous  # keep running what worked
            self.note(f"could not load: {msg.error}; still running the previous model", "error")
        else:
            self.note(f"could not load the model: {msg.error}. Open the settings (F2) to pick another.", "error")
        self.refresh_panel_from_session()

    # ------------------------------------------------------------------ chatting
    @on(ChatInput.Submitted)
    def _on_submit(self, msg: ChatInput.Submitted) -> None:
        if self.restoring and not self.loading and self._queued is None:
            self._queued = msg.text
            self.query_one(ChatInput).clear()
            self.note("the session is being restored: your message goes out as soon as it is ready")
            return
        if self.loading and self.session is None and self._queued is None:
            # First load still running: keep the message and send it as soon as the model is ready.
            self._queued = msg.text
            self.query_one(ChatInput).clear()
            self.note("the model is still loading: your message goes out as soon as it is ready")
            return
        if self.loading or self.session is None:
            self.notify("the model is not loaded yet" if self.loading else "no model loaded: open the settings (F2)", severity="warning")
            return
        if self.generating:
            self.notify("a reply is being generated: wait, or press Escape to cancel it", severity="warning")
            return
        self.query_one(ChatInput).clear()
        self.send(msg.text)

    def send(self, text: str) -> None:
        chat = self.query_one("#chat", VerticalScroll)
        self._current_user = UserMessage(text)
        self._current = AssistantMessage(self.session.backend.model_name)
        chat.mount(self._current_user)
        chat.mount(self._current)
        chat.anchor()
        self.generating = True
        self._sent_at = time.monotonic()
        self._first_delta_at = None
        st = self.query_one(InferencePanel).state
        st.generating, st.live_tok_s, st.ttft_ms, st.prefill_tok_s = True, None, None, None
        self._turn_worker(text)

    @work(thread=True, group="turn")
    def _turn_worker(self, text: str) -> None:
        from fmchat.engine import ContextOverflow, EmptyPrompt, TurnDone, TurnInProgress, TurnStarted

        started = False
        done = False
        try:
            for ev in self.session.turn(text):
                started = True
                if isinstance(ev, (TurnStarted, TurnDone)):
                    self._autosave()  # the user message before generation; the reply when it ends
                    done = done or isinstance(ev, TurnDone)
                self.post_message(TurnEvent(ev))
        except (ContextOverflow, EmptyPrompt, TurnInProgress) as exc:
            self.post_message(TurnFailed(str(exc), text, before_start=not started))
        except Exception as exc:  # shown in the chat, never as a traceback
            self.post_message(TurnFailed(f"{type(exc).__name__}: {exc}", text, before_start=not started))
        finally:
            self._autosave(snapshot=done)
            self.post_message(TurnEnded())

    def _autosave(self, snapshot: bool = False) -> None:
        """Commit what changed in the conversation (worker thread); after a reply, the KV snapshot too."""
        if self.recorder is None or self.session is None:
            return
        try:
            self.recorder.sync(self.session)
            if snapshot and self.recorder.session_id is not None:
                from fmchat.store import kvsnap

                kvsnap.save(self.store, self.recorder.session_id, self.session)
        except Exception as exc:
            if not self._save_warned:
                self._save_warned = True
                self.post_message(SaveFailed(f"{type(exc).__name__}: {exc}"))

    def on_save_failed(self, msg: SaveFailed) -> None:
        self.note(f"could not save the session: {msg.error}", "error")

    async def on_turn_event(self, msg: TurnEvent) -> None:
        from fmchat.engine import TextDelta, TurnDone, TurnStarted

        ev = msg.event
        panel = self.query_one(InferencePanel)
        st = panel.state
        if isinstance(ev, TurnStarted):
            st.reused, st.prefilled, st.ctx_size = ev.reused_tokens, ev.prefill_tokens, ev.ctx_size
        elif isinstance(ev, TextDelta):
            if self._first_delta_at is None:
                self._first_delta_at = time.monotonic()
                st.ttft_ms = (self._first_delta_at - self._sent_at) * 1000  # live estimate; the engine's figure follows
            st.ctx_used = ev.ctx_used
            if ev.ctx_used is not None and st.seq_lens is not None:
                st.seq_lens = [ev.ctx_used]  # batch of one: the row's fill is the context used
            if ev.generated and ev.elapsed_s and ev.elapsed_s > 0 and ev.generated > 1:
                st.live_tok_s = (ev.generated - 1) / ev.elapsed_s
            if self._current is not None:
                await self._current.write(ev.text)
        elif isinstance(ev, TurnDone):
            stats = ev.stats
            self._fill_from_stats(stats)
            st.reused, st.prefilled = stats.reused_tokens, stats.prefilled_tokens
            st.ttft_ms = stats.ttft_ms or None  # 0 = no token came: unavailable, not zero
            st.prefill_tok_s = stats.prefill_tok_s
            st.live_tok_s = stats.decode_tok_s
            if stats.decode_tok_s is not None:
                st.decode_history.append(stats.decode_tok_s)
            st.generating = False
            if self._current is not None:
                await self._current.finish(stats)
            if getattr(stats, "memory_note", ""):
                self.note(f"memory policy '{self.settings.memory_policy}': {stats.memory_note}")
                st.memory_last = f"turn {stats.turn}: {stats.memory_note}"
            panel.refresh_state()

    async def on_turn_failed(self, msg: TurnFailed) -> None:
        if msg.before_start:
            # Nothing changed in the session: take the exchange off the screen and give the text back.
            for w in (self._current_user, self._current):
                if w is not None:
                    await w.remove()
            self._current = self._current_user = None
            inp = self.query_one(ChatInput)
            if not inp.text:
                inp.text = msg.text
            policy = (
                f" (memory policy '{self.settings.memory_policy}': start a new chat with Ctrl+N, or pick another policy in F2)"
                if "context window" in msg.error
                else ""
            )
            self.note(f"not sent: {msg.error}{policy}", "error")
        else:
            if self._current is not None:
                await self._current.finish(None, note="stopped by an error")
            self.note(f"error during the reply: {msg.error}", "error")

    def on_turn_ended(self, msg: TurnEnded) -> None:
        self.generating = False
        self.query_one(InferencePanel).state.generating = False
        self._current = self._current_user = None
        self.refresh_panel_from_session()
        pending, self._after_turn = self._after_turn, []
        for fn in pending:
            fn()

    # ------------------------------------------------------------------ actions
    def action_cancel(self) -> None:
        if (self.generating or self.restoring) and self.session is not None:
            self.session.cancel()
        elif self.loading:
            self.notify("the model is loading; it cannot be cancelled half-way", severity="warning")

    def action_new_chat(self) -> None:
        if self.generating:
            self._defer(self.action_new_chat, "start a new chat")
            return
        if self.restoring:
            self.notify("the session is being restored: press Escape to stop it first", severity="warning")
            return
        if self.session is not None:
            self.session.reset()
        if self.recorder is not None:
            self.recorder.detach()  # the next message starts a new saved session
        self.query_one("#chat", VerticalScroll).remove_children()
        st = self.query_one(InferencePanel).state
        st.reused = st.prefilled = st.memory_last = None
        self.note("new chat")
        self.refresh_panel_from_session()

    async def action_retry(self) -> None:
        if self.generating:
            self._defer(lambda: self.run_worker(self.action_retry()), "retry")
            return
        if not self.ready:
            return
        text = self.session.pop_last_exchange()
        if text is None:
            self.notify("nothing to retry yet")
            return
        users = list(self.query(UserMessage))
        if users:
            last = users[-1]
            chat = self.query_one("#chat", VerticalScroll)
            after = False
            for child in list(chat.children):
                after = after or child is last
                if after:
                    await child.remove()
        self.send(text)

    def action_copy_reply(self) -> None:
        if self.session is None:
            return
        replies = [m for m in self.session.messages if m.role == "assistant"]
        if not replies:
            self.notify("no reply to copy yet")
            return
        self.copy_to_clipboard(replies[-1].content)
        self.notify(f"copied the last reply ({len(replies[-1].content)} characters)")

    def action_toggle_panel(self) -> None:
        panel = self.query_one(InferencePanel)
        panel.display = not panel.display
        self.settings.show_panel = bool(panel.display)
        self.save_settings()

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_settings(self) -> None:
        if not isinstance(self.screen, SettingsScreen):
            self.push_screen(SettingsScreen(self.settings), self.apply_settings)

    def action_scroll_chat(self, direction: int) -> None:
        chat = self.query_one("#chat", VerticalScroll)
        (chat.scroll_page_down if direction > 0 else chat.scroll_page_up)()

    def apply_settings(self, new: Settings | None) -> None:
        from fmchat.engine import GenerationConfig

        if new is None:
            return
        if self.generating:
            self._defer(lambda: self.apply_settings(new), "apply the settings")
            return
        old = self.settings
        self.settings = new
        if new.theme in self.available_themes and new.theme != self.theme:
            self.theme = new.theme
        if self.session is not None:
            cfg = self.session.config
            cfg.kv_cache, cfg.system = new.kv_cache, new.system
            self._set_memory_policy(new.memory_policy)
            gen = GenerationConfig(new.max_new_tokens, new.temperature, new.top_p, new.seed)
            if gen != cfg.gen:
                self.session.set_generation(gen)
            if self.recorder is not None and self.recorder.session_id is not None:
                try:
                    self.recorder.update_settings(self.session)  # the saved chat records what it now runs with
                except Exception as exc:  # noqa: BLE001  shown, the chat goes on
                    self.note(f"could not save the session settings: {exc}", "error")
        reload = new.load_key() != old.load_key() or (self.session is None and not self.loading)
        if reload and not self.loading:
            self.note("reloading the model for the new settings…")
            self.start_load(new, previous=old if self.session is not None else None)
        else:
            self.save_settings()
            self.note("settings applied")
        self.refresh_panel_from_session()

    # ------------------------------------------------------------------ saved sessions
    @property
    def current_session_id(self) -> str | None:
        return None if self.recorder is None else self.recorder.session_id

    def action_sessions(self, search: bool = False) -> None:
        if not isinstance(self.screen, SessionsScreen):
            self.push_screen(SessionsScreen(self.store, self.current_session_id, search=search), self._sessions_result)

    def action_search_sessions(self) -> None:
        self.action_sessions(search=True)

    def _sessions_result(self, result) -> None:
        if not result:
            return
        what, sid = result
        if what == "new":
            self.action_new_chat()
        elif what == "open" and sid is not None:
            self.call_later(self.open_saved, sid)

    def action_rename_session(self) -> None:
        sid = self.current_session_id
        if sid is None or self.store is None:
            self.notify("this chat is not saved yet: send a message first")
            return
        from fmchat.store import StoreError

        def done(title: str | None) -> None:
            if title is not None:
                try:
                    self.store.rename(sid, title)
                except StoreError as exc:
                    self.note(f"could not rename: {exc}", "error")
                    return
                self.notify(f"renamed to “{self.store.get(sid).title}”")

        self.push_screen(RenameScreen(self.store.get(sid).title), done)

    def action_delete_session(self) -> None:
        sid = self.current_session_id
        if sid is None or self.store is None:
            self.notify("this chat is not saved yet")
            return

        def done(yes: bool | None) -> None:
            if yes:
                if self.generating:
                    self._defer(lambda: done(True), "delete the session")
                    return
                self.store.delete(sid)
                self.post_message(SessionDeleted(sid))

        self.push_screen(ConfirmScreen(f"Delete this chat (session {sid})? This cannot be undone."), done)

    def on_session_deleted(self, msg: SessionDeleted) -> None:
        if self.recorder is not None and self.recorder.session_id == msg.session_id:
            self.recorder.detach()
            self.note("this chat was deleted from the saved sessions; sending a message saves it as a new one")

    async def open_saved(self, session_id: str) -> None:
        """Show a saved chat and rebuild the engine state from it (KV snapshot, else a background prefill)."""
        from fmchat.store import StoreError, open_session

        if self.generating:
            self._defer(lambda: self.call_later(self.open_saved, session_id), "open the session")
            return
        if self._restore_running:  # stop the restore under way (between two prefill chunks), then open
            self._open_after_restore = session_id
            self.session.cancel()
            return
        if self.session is None or self.store is None or self.loading:
            self.restoring = False
            self.notify("no model loaded yet" if self.session is None else "sessions are not available", severity="warning")
            return
        try:
            self.recorder, rec = open_session(self.store, session_id, self.session, spec=self.settings.model)
        except StoreError as exc:
            self.restoring = False
            self.note(f"could not open the session: {exc}", "error")
            return
        chat = self.query_one("#chat", VerticalScroll)
        await chat.remove_children()
        model = self.session.backend.model_name
        for m in self.session.messages:
            if m.role == "user":
                await chat.mount(UserMessage(m.content))
            elif m.role == "assistant":
                w = AssistantMessage(rec.model or model)
                await chat.mount(w)
                w.text = neutralize(m.content)
                if w.text:
                    await w.markdown.update(w.text)
                await w.finish(m.stats, note=None if m.stats else "restored")
            else:
                self.note(f"system: {m.content}")
        chat.anchor()
        self.note(f"session “{rec.title or rec.id}” ({len(rec.messages)} messages, saved as {rec.id})")
        if rec.model and rec.model != model:
            self.note(f"this chat was recorded with {rec.model}; it carries on with {model}")
        self.restoring = True
        status = self.query_one("#load-status")
        status.display = True
        self.query_one("#load-bar", ProgressBar).update(total=None, progress=0)
        self.query_one("#load-step", Static).update(Text("restoring the session…"))
        self._restore_running = True
        self._restore_worker(rec.id)

    @work(thread=True, exclusive=True, group="restore")
    def _restore_worker(self, session_id: str) -> None:
        from fmchat.store import rebuild_cache

        t0 = time.perf_counter()
        try:
            r = rebuild_cache(self.session, self.store, session_id, lambda done, total: self.post_message(RestoreStep(done, total)))
        except Exception as exc:  # the transcript is there; the next turn prefills what it needs
            self.post_message(RestoreDone(None, f"{type(exc).__name__}: {exc}", time.perf_counter() - t0))
            return
        self.post_message(RestoreDone(r, None, time.perf_counter() - t0))

    def on_restore_step(self, msg: RestoreStep) -> None:
        step = f"restoring the session: prefilled {msg.done}/{msg.total} tokens"
        self.load_steps.append(step)
        self.query_one("#load-bar", ProgressBar).update(total=max(msg.total, 1), progress=msg.done)
        self.query_one("#load-step", Static).update(Text(step))

    def on_restore_done(self, msg: RestoreDone) -> None:
        self.restoring = self._restore_running = False
        self.query_one("#load-status").display = False
        if self._open_after_restore is not None:
            sid, self._open_after_restore = self._open_after_restore, None
            self.restoring = True
            self.call_later(self.open_saved, sid)
            return
        if msg.error is not None:
            self.note(f"could not rebuild the KV cache ({msg.error}); the next turn prefills the conversation", "error")
        else:
            r = msg.result
            secs = "masked" if self.mask_volatile else f"{msg.seconds:.2f}"
            snap = f"{r['restored']} tokens from the KV snapshot" if r["restored"] else f"KV snapshot not used: {r['snapshot']}"
            self.note(f"restored: {snap}, {r['prefilled']} tokens prefilled in {secs} s")
        self.refresh_panel_from_session()
        if self._queued is not None and self.ready:
            text, self._queued = self._queued, None
            self.send(text)

    async def action_quit(self) -> None:
        if self.session is not None and (self.generating or self._restore_running):
            self.session.cancel()  # the worker stops within one token (or one prefill chunk)
        self.exit()

    # ------------------------------------------------------------------ command palette
    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield SystemCommand("New chat", "Start a new conversation (same model and settings)", self.action_new_chat)
        yield SystemCommand("Settings", "Backend, model, quantization, kernel, KV cache, sampling…", self.action_settings)
        yield SystemCommand("Sessions", "Saved chats: browse, open, rename, delete (F4)", self.action_sessions)
        yield SystemCommand("Search sessions", "Find a saved chat by its text", self.action_search_sessions)
        yield SystemCommand("Open session", "Pick a saved chat to continue", self.action_sessions)
        yield SystemCommand("Rename session", "Give this chat a title", self.action_rename_session)
        yield SystemCommand("Delete session", "Delete this chat from the saved sessions", self.action_delete_session)
        yield SystemCommand("Toggle panel", "Show or hide the inference panel", self.action_toggle_panel)
        yield SystemCommand("Cancel reply", "Stop the reply being generated", self.action_cancel)
        yield SystemCommand("Retry last turn", "Drop the last exchange and send its message again", self.action_retry)
        yield SystemCommand("Copy last reply", "Copy the last reply to the clipboard", self.action_copy_reply)
        yield SystemCommand("Keys", "Every key binding (F1)", self.action_help)
        yield from (c for c in super().get_system_commands(screen) if c.title in ("Theme", "Quit", "Screenshot"))
