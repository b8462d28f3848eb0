"""fmchat's full-screen app: chat on the left, what it costs on the right.

The app keeps the layout, the key bindings, the screens, and the orchestration of loading, switching and
restoring; the chat is built and run only through the conversation service (``fmchat.conversation``):

* loading: a thread worker calls ``load_backend`` and posts ``Loaded``/``LoadFailed``; the UI thread then
  ``attach``-es the backend to the Conversation (the first load builds the chat, later ones switch the
  backend keeping the transcript);
* a turn: ``ChatView`` (``widgets/chat.py``) runs ``Conversation.turn`` in its own worker and posts typed
  messages; the Conversation saves every message as it happens;
* restoring a saved session: a thread worker calls ``open_saved`` then ``rebuild_cache`` with progress.

Workers talk to the UI only by posting messages, so the UI thread never waits on the model. Everything that
changes the chat (a new chat, a retry, new settings, opening a session) runs only in ``READY``; asked for in
another state it is deferred (cancelling a reply first where that is the point) until the app is idle again.
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from functools import partial
from typing import ClassVar

from rich.text import Text
from textual import events, on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Header, ProgressBar, Static

from fmchat import models
from fmchat import settings as settings_mod
from fmchat.backends.base import BackgroundDecode
from fmchat.config import RunConfig, field_info
from fmchat.conversation import Conversation, describe_load, load_backend
from fmchat.errors import FmchatError, describe
from fmchat.text import neutralize, one_newline

from .commands import PALETTE_FIELDS, choice_commands, choice_problem, current_choice
from .messages import Loaded, LoadFailed, LoadStep, RestoreDone, RestoreStep, SaveWarning, SessionOpened
from .screens.help import HelpScreen
from .screens.sessions import ConfirmScreen, RenameScreen, SessionDeleted, SessionsScreen
from .screens.settings import SettingsScreen, describe_changes
from .state import IDLE, AppState, check_transition
from .themes import load_themes
from .widgets.chat import ChatInput, ChatView, Note, TurnBegan, TurnEnded, TurnFailed, TurnFinished, TurnText
from .widgets.footer import AppFooter
from .widgets.panel import InferencePanel

PANEL_REFRESH_S = 0.2  # the panel updates 5 times a second while a reply is generated


class DecodeChanged(Message):
    """The background compile of ``backend``'s decode step changed phase or finished (posted from its thread)."""

    def __init__(self, backend) -> None:
        super().__init__()
        self.backend = backend


class FmchatApp(App):
    CSS_PATH = "fmchat.tcss"
    TITLE = "fmchat"
    SUB_TITLE = "what inference really costs"

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel"),  # short: the footer has room for every shown key at 120 columns
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("ctrl+r", "retry", "Retry"),
        Binding("ctrl+y", "copy_reply", "Copy reply", show=False),
        Binding("f2", "settings", "Settings"),
        Binding("f3", "toggle_panel", "Panel"),
        Binding("f4", "sessions", "Sessions"),
        Binding("ctrl+t", "change_theme", "Theme", show=False),
        Binding("f1", "help", "Keys"),
        Binding("pageup", "scroll_chat(-1)", "Scroll up", show=False),
        Binding("pagedown", "scroll_chat(1)", "Scroll down", show=False),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(
        self,
        config: RunConfig | None = None,
        *,
        persist: bool = True,
        mask_volatile: bool = False,
        file_settings: RunConfig | None = None,
        cli_overrides: dict | None = None,
        session_id: str | None = None,
        store=None,
        save_sessions: bool = True,
    ) -> None:
        super().__init__()
        self.settings = config or RunConfig()  # what the user asked for (the chat runs conversation.config)
        # What the config file held, and the CLI flags laid over it: flags are not written back to the file
        # unless the user changes that setting in the app.
        self.file_settings = file_settings
        self.cli_overrides = dict(cli_overrides or {})
        self.persist = persist  # save settings changes to the config file
        self.mask_volatile = mask_volatile  # snapshot tests: hide timings that differ run to run
        # Saved sessions: ``store`` is a Store or a database path (default: the user data dir); the
        # Conversation saves every message as it happens. ``session_id`` opens that chat once the model is up.
        self.store = store
        self.save_sessions = save_sessions
        self.conversation: Conversation | None = None  # built when the first load has finished
        self.state = AppState.STARTING
        self._resume_id = session_id
        self._queued: str | None = None  # a message sent while loading or restoring, sent on READY
        self._deferred: list[Callable[[], None]] = []  # actions waiting for the app to be idle
        # Every load/convert/restore step shown, in order (for the curious and for tests).
        self.load_steps: list[str] = []
        self._settings_change = ""  # what a settings change that reloads changed, said once the reload is done
        loaded = load_themes()
        for theme in loaded.themes:
            self.register_theme(theme)
        self.theme_problems = loaded.problems

    def get_driver_class(self):
        """Textual's driver, except on a Linux/macOS terminal: there ``FmchatDriver``, whose parser keeps a
        bracketed paste whole and in order (see ``fmchat/tui/terminal.py``)."""
        from textual import constants

        if constants.DRIVER is not None or sys.platform == "win32":
            return super().get_driver_class()
        from .terminal import FmchatDriver

        return FmchatDriver

    async def on_event(self, event: events.Event) -> None:
        # A paste goes to the focused widget. The message box keeps control characters (shown as pictures, sent
        # as pasted); any other field (settings, session search, rename, palette) gets the pictures themselves.
        if isinstance(event, events.Paste) and not event.is_forwarded and not isinstance(self.focused, ChatInput):
            event = events.Paste(neutralize(one_newline(event.text)))
        await super().on_event(event)

    # ------------------------------------------------------------------ state
    def _enter(self, new: AppState) -> None:
        self.state = check_transition(self.state, new)
        if new in IDLE:
            self._hide_status()
            self._run_deferred()

    def _run_deferred(self) -> None:
        """Run what waited for the app to be idle: deferred actions first, then a queued message."""
        while self._deferred and self.state in IDLE:
            self._deferred.pop(0)()
        if self.state is AppState.READY and self._queued is not None:
            text, self._queued = self._queued, None
            self.send(text)

    def _defer(self, fn: Callable[[], None], why: str, *, cancel: bool = False) -> None:
        """Run ``fn`` once the app is idle; ``cancel``: stop the reply (or restore) under way first."""
        self._deferred.append(fn)
        if cancel and self.conversation is not None:
            self.conversation.cancel()
            self.notify(f"cancelling the {'restore' if self.restoring else 'reply'} to {why}")
        else:
            self.notify(f"waiting for the {self.state.value} to finish to {why}")

    @property
    def loading(self) -> bool:
        return self.state in (AppState.LOADING, AppState.SWITCHING)

    @property
    def generating(self) -> bool:
        return self.state is AppState.GENERATING

    @property
    def restoring(self) -> bool:
        return self.state is AppState.RESTORING

    @property
    def ready(self) -> bool:
        """A chat is loaded and idle: a message goes out now."""
        return self.state is AppState.READY

    @property
    def session(self):
        """The engine's ChatSession (None before the first load)."""
        return None if self.conversation is None else self.conversation.session

    @property
    def current_session_id(self) -> str | None:
        return None if self.conversation is None else self.conversation.session_id

    @property
    def chat(self) -> ChatView:
        return self.query_one("#chat", ChatView)

    @property
    def panel(self) -> InferencePanel:
        # on the main screen, also while a modal one (settings, keys, sessions) is on top of it
        return self.screen_stack[0].query_one(InferencePanel)

    # ------------------------------------------------------------------ layout
    def compose(self) -> ComposeResult:
        yield Header(show_clock=False, icon="≡")
        with Horizontal(id="main"):
            with Vertical(id="chat-column"):
                yield ChatView(id="chat", can_focus=True)
                with Horizontal(id="load-status"):
                    yield ProgressBar(total=None, show_eta=False, show_percentage=False, id="load-bar")
                    yield Static("", id="load-step", markup=False)
                yield ChatInput(id="input", placeholder="Type a message · Enter sends · Ctrl+J newline · F1 keys")
            yield InferencePanel(id="panel", mask_volatile=self.mask_volatile)
        yield AppFooter()  # fitted to the width: the keys that matter show at 80 columns

    def on_mount(self) -> None:
        if self.settings.theme in self.available_themes:
            self.theme = self.settings.theme
        self.theme_changed_signal.subscribe(self, self._theme_changed)
        for problem in self.theme_problems:
            self.note(problem, "error")
        self.panel.display = self.settings.show_panel
        self.panel.fit_width(self.size.width)
        self.refresh_panel()
        self.set_interval(PANEL_REFRESH_S, self._tick)
        self.query_one(ChatInput).focus()
        self._open_store()
        self.start_load(self.settings)

    def _open_store(self) -> None:
        """Open the session store; one that cannot be opened is a note, and the chat goes on unsaved."""
        from fmchat.store import Store

        if not self.save_sessions:
            self.store = None
            return
        if not isinstance(self.store, Store):
            try:
                self.store = Store(self.store)
            except Exception as exc:  # noqa: BLE001  a newer schema, an unreadable file...: chat unsaved
                self.store = None
                self.note(f"sessions are not saved: {describe(exc)}", "error")

    # ------------------------------------------------------------------ helpers
    def note(self, text: str, kind: str = "info") -> Note:
        return self.chat.note(text, kind)

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

    def _show_status(self, text: str) -> None:
        self.query_one("#load-status").display = True
        self.query_one("#load-bar", ProgressBar).update(total=None, progress=0)
        self.query_one("#load-step", Static).update(Text(neutralize(text)))

    def _hide_status(self) -> None:
        self.query_one("#load-status").display = False

    def _step(self, text: str, done: float | None, total: float = 1.0) -> None:
        self.load_steps.append(text)
        bar = self.query_one("#load-bar", ProgressBar)
        if done is None:
            bar.update(total=None)
        else:
            bar.update(total=total, progress=done)
        self.query_one("#load-step", Static).update(Text(neutralize(text)))

    def refresh_panel(self) -> None:
        """The panel, derived again from the chat on screen (the settings' model while none is loaded)."""
        self.panel.show(self.conversation, self.settings, generating=self.generating)

    def _tick(self) -> None:
        # live while a turn or a restore runs (seq_lens, KV bytes, context, rate); idle, once a second (RSS, a
        # decode path compiling in the background)
        if not self.screen_stack or not self.screen_stack[0].query(InferencePanel):
            return  # a tick after the app began to close (its screens going) or before the main screen is composed
        self.panel.tick(generating=self.generating, busy=self.state in (AppState.GENERATING, AppState.RESTORING))

    def on_resize(self, event: events.Resize) -> None:
        if self.screen_stack:  # narrow: the panel is one line (F3 opens it)
            for panel in self.screen_stack[0].query(InferencePanel):
                panel.fit_width(event.size.width)

    # ------------------------------------------------------------------ loading
    def start_load(self, config: RunConfig, previous: RunConfig | None = None) -> None:
        """Load ``config``'s backend in a worker: the first chat (LOADING), or a switch (SWITCHING)."""
        self._enter(AppState.SWITCHING if self.conversation is not None else AppState.LOADING)
        self._show_status(f"loading {config.model or models.DEFAULT_MODEL}…")
        self._load_worker(config, previous)

    @work(thread=True, exclusive=True, group="load")
    def _load_worker(self, config: RunConfig, previous: RunConfig | None) -> None:
        def progress(step: str, fraction: float | None = None) -> None:
            self.post_message(LoadStep(step, fraction))

        try:
            backend = load_backend(config, progress)
        except Exception as exc:  # noqa: BLE001  FmchatError, or a bug: a message on screen, never a traceback
            self.post_message(LoadFailed(describe(exc), config, previous))
            return
        self.post_message(Loaded(backend, config))

    def on_load_step(self, msg: LoadStep) -> None:
        self._step(msg.step, msg.fraction)

    def on_loaded(self, msg: Loaded) -> None:
        switched = self.conversation is not None
        if not switched:
            self.conversation = Conversation(msg.config, store=self.store, save=self.store is not None,
                                             warn=lambda text: self.post_message(SaveWarning(text)))  # fmt: skip
        self.conversation.attach(msg.backend, msg.config)  # a switch keeps the transcript
        line = describe_load(msg.backend)
        if self.mask_volatile:
            line = re.sub(r"in [0-9.]+ s$", "in masked s", line)
        if switched:  # a settings change: one line says what changed and what the reload cost
            report = msg.backend.load_report
            secs = "masked" if self.mask_volatile else f"{report.seconds:.2f}"
            how = "converted and reloaded" if report.converted else "reloaded"
            carry = "; the conversation carries on" if self.session.messages else ""
            change, self._settings_change = self._settings_change or "the model", ""
            line = f"settings: {change} ({how} in {secs} s{carry})"
        self.note(line)
        self.save_settings()
        self._watch_decode(msg.backend)
        if not switched and self._resume_id is not None:
            sid, self._resume_id = self._resume_id, None
            if self._start_restore(sid):
                self.refresh_panel()
                return
        self._enter(AppState.READY)
        self.refresh_panel()

    def _watch_decode(self, backend) -> None:
        """Redraw the panel when ``backend``'s background compile (``--compile auto``) changes phase or finishes.
        The callback runs on the compile thread: it posts a message and returns (``post_message`` is thread-safe
        and does not wait, unlike ``call_from_thread``, so a closing app never holds up the compile or its save)."""
        if not isinstance(backend, BackgroundDecode):
            return

        def changed() -> None:
            with contextlib.suppress(RuntimeError):  # the app has closed, its event loop with it
                self.post_message(DecodeChanged(backend))  # dropped by a closing app

        backend.watch_decode(changed)

    def on_decode_changed(self, msg: DecodeChanged) -> None:
        if self.conversation is not None and self.conversation.backend is msg.backend:  # not a backend reloaded away
            self.refresh_panel()

    def on_load_failed(self, msg: LoadFailed) -> None:
        if self.conversation is not None:
            if msg.previous is not None:
                self.settings = msg.previous  # keep running what worked
            self.note(f"could not load: {msg.error}; still running the previous model", "error")
            self._enter(AppState.READY)
        else:
            if self._queued is not None:
                self.query_one(ChatInput).text, self._queued = self._queued, None
            self.note(f"could not load the model: {msg.error}. Open the settings (F2) to pick another.", "error")
            self._enter(AppState.NO_MODEL)
        self.refresh_panel()

    # ------------------------------------------------------------------ chatting
    @on(ChatInput.Submitted)
    def _on_submit(self, msg: ChatInput.Submitted) -> None:
        state = self.state
        if state is AppState.READY:
            self.query_one(ChatInput).clear()
            self.send(msg.text)
        elif state in (AppState.STARTING, AppState.LOADING, AppState.RESTORING) and self._queued is None:
            self._queued = msg.text
            self.query_one(ChatInput).clear()
            why = "the session is being restored" if state is AppState.RESTORING else "the model is still loading"
            self.note(f"{why}: your message goes out as soon as it is ready")
        elif state is AppState.GENERATING:
            self.notify("a reply is being generated: wait, or press Escape to cancel it", severity="warning")
        elif state is AppState.NO_MODEL:
            self.notify("no model loaded: open the settings (F2)", severity="warning")
        else:
            self.notify(f"the app is {state.value}: send again when it is ready", severity="warning")

    def send(self, text: str) -> None:
        """Run a turn (READY only)."""
        self._enter(AppState.GENERATING)
        self.panel.state.generating = True
        self.chat.start_turn(self.conversation, text)

    def on_turn_began(self, msg: TurnBegan) -> None:
        self.panel.turn_started(msg.event)

    def on_turn_text(self, msg: TurnText) -> None:
        self.panel.turn_progress(msg.event, msg.ttft_ms)

    def on_turn_finished(self, msg: TurnFinished) -> None:
        stats = msg.event.stats
        conv = self.conversation
        self.panel.turn_finished(stats, conv.backend, conv.config)  # the chat view shows the memory note

    def on_turn_failed(self, msg: TurnFailed) -> None:
        if msg.before_start:
            # Nothing changed in the chat (the view took the exchange off the screen): give the text back.
            inp = self.query_one(ChatInput)
            if not inp.text:
                inp.text = msg.text
            policy = ""
            if msg.context_full:
                memory = self.conversation.config.memory
                policy = f" (memory policy '{memory}': start a new chat with Ctrl+N, or pick another policy in F2)"
            self.note(f"not sent: {msg.error}{policy}", "error")
        else:
            self.note(f"error during the reply: {msg.error}", "error")

    def on_turn_ended(self, msg: TurnEnded) -> None:
        self.panel.state.generating = False
        self._enter(AppState.READY)
        self.refresh_panel()

    def on_save_warning(self, msg: SaveWarning) -> None:
        self.note(msg.error, "error")

    # ------------------------------------------------------------------ actions
    def action_cancel(self) -> None:
        if self.state in (AppState.GENERATING, AppState.RESTORING):
            self.conversation.cancel()
        elif self.loading:
            self.notify("the model is loading; it cannot be cancelled half-way", severity="warning")

    def action_new_chat(self) -> None:
        if self.generating:
            self._defer(self.action_new_chat, "start a new chat", cancel=True)
            return
        if self.restoring:
            self.notify("the session is being restored: press Escape to stop it first", severity="warning")
            return
        if self.conversation is not None:
            self.conversation.new_chat()  # the next message starts a new saved session
        self.chat.clear()
        self.note("new chat")
        self.refresh_panel()

    def action_retry(self) -> None:
        if self.generating:
            self._defer(self.action_retry, "retry", cancel=True)
            return
        if not self.ready:
            return
        text = self.conversation.retry()
        if text is None:
            self.notify("nothing to retry yet")
            return
        self.chat.drop_last_exchange()
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
        panel = self.panel
        if panel.narrow and panel.display:
            panel.toggle_compact()  # a narrow terminal: one line <-> the whole panel (not saved)
            return
        panel.display = not panel.display
        self.settings.show_panel = bool(panel.display)
        self.save_settings()

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_settings(self) -> None:
        if not isinstance(self.screen, SettingsScreen):
            self.push_screen(SettingsScreen(self.settings, check=self._check_settings), self.apply_settings)

    def _check_settings(self, config: RunConfig) -> list[str]:
        """What the app adds to RunConfig.validate(): the theme must be one it knows."""
        if config.theme not in self.available_themes:
            return [f"unknown theme '{config.theme}' (available: {', '.join(sorted(self.available_themes))})"]
        return []

    def action_scroll_chat(self, direction: int) -> None:
        """PgUp / PgDn, wherever the focus is. Scrolling up holds the view still while a reply streams; back at
        the bottom (PgDn, or the mouse) it follows new text again (the chat view's anchor)."""
        chat = self.chat
        (chat.scroll_page_down if direction > 0 else chat.scroll_page_up)(animate=False)  # a page at once

    def apply_settings(self, new: RunConfig | None) -> None:
        """New settings from the pane: applied to the chat from the next turn, or by a reload when a setting
        that needs one changed (the chat stays on the running model if the load fails)."""
        if new is None:
            return
        if self.generating:
            self._defer(lambda: self.apply_settings(new), "apply the settings", cancel=True)
            return
        if self.state not in IDLE:
            self._defer(lambda: self.apply_settings(new), "apply the settings")
            return
        old, self.settings = self.settings, new
        change = describe_changes(old, new)  # one line in the transcript per change: "settings: quant none → int8"
        if new.theme in self.available_themes and new.theme != self.theme:
            self.theme = new.theme
        conv = self.conversation
        if conv is None:
            self.note("loading the model with the new settings…")
            self.start_load(new)
        elif new.load_key() != conv.config.load_key():
            self._settings_change = change  # the line is written when the reload is done (on_loaded)
            self.start_load(new, previous=old)
        else:
            try:
                conv.apply(new)
            except FmchatError as exc:
                self.settings = old
                self.note(f"settings not applied: {exc}", "error")
                return
            self.save_settings()
            if change:
                self.note(f"settings: {change}")
        self.refresh_panel()

    def choose_setting(self, name: str, value: str) -> None:
        """One choice from the command palette (e.g. the decode path): refused with the reason where it cannot be
        used now (as the settings pane disables it), else applied as the pane's Apply is (``apply_settings``)."""
        label = field_info(name).metadata["label"].lower()
        if problem := choice_problem(self.settings, name, value):
            self.notify(problem, title="not applied", severity="warning")
            return
        if current_choice(self.settings, name) == value:
            self.notify(f"{label} is already {value}")
            return
        self.apply_settings(replace(self.settings, **{name: value}))

    # ------------------------------------------------------------------ saved sessions
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
            self.open_saved(sid)

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
                    self._defer(lambda: done(True), "delete the session", cancel=True)
                    return
                self.store.delete(sid)
                self.post_message(SessionDeleted(sid))

        self.push_screen(ConfirmScreen(f"Delete this chat (session {sid})? This cannot be undone."), done)

    def on_session_deleted(self, msg: SessionDeleted) -> None:
        conv = self.conversation
        if conv is not None and conv.session_id == msg.session_id:
            conv.forget_saved()  # the chat stays on screen; the next message starts a new saved session
            self.note("this chat was deleted from the saved sessions; sending a message saves it as a new one")

    def open_saved(self, session_id: str) -> None:
        """Show a saved chat and rebuild the engine state from it (KV snapshot, else a background prefill)."""
        if self.generating:
            self._defer(lambda: self.open_saved(session_id), "open the session", cancel=True)
            return
        if self.restoring:  # stop the restore under way (between two prefill chunks), then open
            self._defer(lambda: self.open_saved(session_id), "open the session", cancel=True)
            return
        if self.loading:
            self._defer(lambda: self.open_saved(session_id), "open the session")
            return
        self._start_restore(session_id)

    def _start_restore(self, session_id: str) -> bool:
        if self.conversation is None or self.store is None:
            self.notify("no model loaded yet" if self.conversation is None else "sessions are not available",
                        severity="warning")  # fmt: skip
            return False
        self._enter(AppState.RESTORING)
        self._show_status("restoring the session…")
        self._restore_worker(session_id)
        return True

    @work(thread=True, exclusive=True, group="restore")
    def _restore_worker(self, session_id: str) -> None:
        conv = self.conversation
        t0 = time.perf_counter()
        try:
            opened = conv.open_saved(session_id)
        except Exception as exc:  # noqa: BLE001  the chat on screen is unchanged
            self.post_message(RestoreDone(None, f"could not open the session: {describe(exc)}", 0.0))
            return
        self.post_message(SessionOpened(opened))
        try:
            result = conv.rebuild_cache(opened, lambda done, total: self.post_message(RestoreStep(done, total)))
        except Exception as exc:  # noqa: BLE001  the transcript is there; the next turn prefills what it needs
            msg = f"could not rebuild the KV cache ({describe(exc)}); the next turn prefills the conversation"
            self.post_message(RestoreDone(None, msg, time.perf_counter() - t0))
            return
        self.post_message(RestoreDone(result, None, time.perf_counter() - t0))

    async def on_session_opened(self, msg: SessionOpened) -> None:
        opened = msg.opened
        # The settings pane shows (and Apply keeps) the system prompt this chat was saved with.
        self.settings = replace(self.settings, system=self.conversation.config.system)
        model = self.conversation.backend.model_name
        await self.chat.show_transcript(self.session.messages, opened.recorded_model or model,
                                        window_start=self.session.window_start)  # fmt: skip
        self.note(
            f"session “{opened.title or opened.session_id}” ({opened.messages} messages, saved as {opened.session_id})"
        )
        if opened.recorded_model and opened.recorded_model != model:
            self.note(f"this chat was recorded with {opened.recorded_model}; it carries on with {model}")
        self.refresh_panel()  # this chat's figures only: its history, no other chat's turn

    def on_restore_step(self, msg: RestoreStep) -> None:
        self._step(f"restoring the session: prefilled {msg.done}/{msg.total} tokens", msg.done, max(msg.total, 1))

    def on_restore_done(self, msg: RestoreDone) -> None:
        if msg.error is not None:
            self.note(msg.error, "error")
        else:
            r = msg.result
            secs = "masked" if self.mask_volatile else f"{msg.seconds:.2f}"
            snap = f"{r.restored} tokens from the KV snapshot" if r.restored else f"KV snapshot not used: {r.snapshot}"
            self.note(f"restored: {snap}, {r.prefilled} tokens prefilled in {secs} s")
        self._enter(AppState.READY)
        self.refresh_panel()

    async def action_quit(self) -> None:
        if self.state in (AppState.GENERATING, AppState.RESTORING):
            self.conversation.cancel()  # the worker stops within one token (or one prefill chunk)
        self.exit()

    # ------------------------------------------------------------------ command palette
    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield SystemCommand("New chat", "Start a new conversation (same model and settings)", self.action_new_chat)
        yield SystemCommand(
            "Settings", "Backend, model, quantization, kernel, KV cache, sampling…", self.action_settings
        )
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
        for name in PALETTE_FIELDS:  # "Decode path: eager", one per choice (shown when searched: type "decode")
            for cmd in choice_commands(self.settings, name):
                yield SystemCommand(cmd.title, cmd.help, partial(self.choose_setting, name, cmd.value), discover=False)
        yield from (c for c in super().get_system_commands(screen) if c.title in ("Theme", "Quit", "Screenshot"))
