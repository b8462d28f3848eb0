"""The conversation service: the one way to build, run, save, resume and switch a chat.

``run``, ``chat --plain``, the full-screen app and every benchmark build their chats here, from one
``RunConfig``. The service loads the backend (with progress), builds the ``ChatSession``, saves every message
as it happens (the user's before generation, the reply when it ends) and the KV snapshot after each reply,
resumes a saved session, and switches backend or settings mid-chat keeping the transcript. Every failure
reaches the caller as an ``FmchatError`` (one line for the user).

Data flows one way: CLI/TUI -> Conversation -> ChatSession -> backend -> model/kernels; events flow back.
The service is not thread-safe by itself: the app calls it from one worker at a time (a turn, a load or a
restore), and ``cancel()`` from anywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from fmchat import backends
from fmchat.backends.base import Backend, ProgressFn, no_progress
from fmchat.config import RunConfig
from fmchat.engine import ChatSession, GenerationConfig, SessionConfig, TurnDone, TurnStarted
from fmchat.engine.events import Event, run_to_done
from fmchat.engine.session import set_threads
from fmchat.errors import BackendError, FmchatError, UserError, describe

WarnFn = Callable[[str], None]


class LoadFailed(UserError):
    """The model could not be loaded (the message says why); a chat that was running goes on as it was."""


class TurnFailed(FmchatError):
    """Something broke during a reply; the transcript is kept and the next turn rebuilds the cache."""

    exit_code = 1


def load_backend(config: RunConfig, progress: ProgressFn = no_progress) -> Backend:
    """Load the backend ``config`` describes (the one way to get one). Raises FmchatError only."""
    config.check()
    set_threads(config.threads)
    try:
        return backends.load(config, progress)
    except BackendError as exc:  # a server that refused at load time: as bad an input as a wrong path
        raise LoadFailed(str(exc)) from None
    except FmchatError:
        raise
    except Exception as exc:
        raise LoadFailed(f"could not load {config.model or 'the default model'}: {describe(exc)}") from exc


def session_config(config: RunConfig) -> SessionConfig:
    gen = GenerationConfig(config.max_new_tokens, config.temperature, config.top_p, config.seed)
    return SessionConfig(system=config.system, kv_cache=config.kv_cache, ctx=config.ctx, gen=gen, memory=config.memory)


def describe_load(backend: Backend) -> str:
    """One line saying what was loaded, how, and how long it took."""
    r = backend.load_report
    how = "converted GGUF to safetensors, then loaded" if r.converted else "loaded"
    quant = backend.quant + (" (codes kept from the first load)" if r.kept_codes else "")
    return (f"{how} {backend.model_name} ({backend.name}, {backend.device}, {backend.dtype}, quant {quant}, "
            f"kernel {backend.kernel}, decode {backend.decode_path}) in {r.seconds:.2f} s")  # fmt: skip


@dataclass(frozen=True)
class Resumed:
    """What resuming a saved session did."""

    session_id: str
    title: str
    messages: int
    recorded_model: str  # the model the chat was recorded with ('' when unknown)
    restored: int = 0  # tokens taken from the KV snapshot
    prefilled: int = 0  # tokens computed again
    snapshot: str = "not used"  # "ok", or why the snapshot was not used


class Conversation:
    """One chat built from one RunConfig. ``store``: a Store, a database path, or None for the default file;
    ``save=False``: nothing is written (the store is still read to resume); ``warn``: one-line warnings (a save that
    failed); ``notice``: one-line notices (after a load: a chat template the model does not carry)."""

    def __init__(self, config: RunConfig, *, store=None, save: bool = True, warn: WarnFn | None = None,
                 notice: WarnFn | None = None) -> None:  # fmt: skip
        self.config = config
        self.save = save
        self.warn = warn or (lambda message: None)
        self.notice = notice or (lambda message: None)
        self.session: ChatSession | None = None
        self.recorder = None
        self._store_arg = store
        self._store = None
        self._save_warned = False

    # ------------------------------------------------------------------ building
    @classmethod
    def open(cls, config: RunConfig, *, progress: ProgressFn = no_progress, store=None, save: bool = True,
             warn: WarnFn | None = None, notice: WarnFn | None = None) -> Conversation:  # fmt: skip
        """Validate ``config``, load its backend and build the chat."""
        conv = cls(config, store=store, save=save, warn=warn, notice=notice)
        if save:
            conv.store  # noqa: B018  a store that cannot be used (e.g. written by a newer fmchat) fails before the load
        conv.load(progress)
        return conv

    @property
    def backend(self) -> Backend:
        if self.session is None:
            raise FmchatError("no model is loaded")
        return self.session.backend

    @property
    def loaded(self) -> bool:
        return self.session is not None

    def load(self, progress: ProgressFn = no_progress) -> Backend:
        """Load the configured backend (the first time, or again after a failed load)."""
        backend = load_backend(self.config, progress)
        self.attach(backend)
        return backend

    def attach(self, backend: Backend, config: RunConfig | None = None) -> None:
        """Run the chat on ``backend`` (loaded from ``config``, default: the current one). The transcript
        carries over; the new backend's cache starts empty and the next turn rebuilds it."""
        if config is not None:
            self.config = config
        if not backend.chat_template_own:  # a built-in or a file: say which, once per load
            self.notice(f"chat template: {backend.chat_template}")
        if self.session is None:
            self.session = ChatSession(backend, session_config(self.config))
        else:
            old = self.session.backend
            self.session.replace_backend(backend)
            self._configure_session()
            if old is not backend:
                old.close()
        if self.recorder is not None:
            self.recorder.spec = self.config.model
            self._update_saved_settings()

    def apply(self, new: RunConfig, progress: ProgressFn = no_progress) -> bool:
        """Switch to ``new`` settings mid-chat, keeping the transcript. Reloads the model when a setting that
        needs it changed (and keeps the running one if the load fails). Returns True when it reloaded."""
        new.check()
        if self.session is None or new.load_key() != self.config.load_key():
            backend = load_backend(new, progress)
            self.attach(backend, new)
            return True
        self.config = new
        self._configure_session()
        self._update_saved_settings()
        return False

    def _configure_session(self) -> None:
        c = self.config
        gen = GenerationConfig(c.max_new_tokens, c.temperature, c.top_p, c.seed)
        self.session.configure(system=c.system, kv_cache=c.kv_cache, ctx=c.ctx, memory=c.memory, gen=gen)

    # ------------------------------------------------------------------ chatting
    def turn(self, text: str) -> Iterator[Event]:
        """Run one turn, saving as it goes: yields the engine's events (TurnStarted, TextDelta..., TurnDone).
        Raises FmchatError: before anything changed (EmptyPrompt, ContextOverflow, TurnInProgress) or
        during the reply (TurnFailed; the transcript keeps the partial reply)."""
        if self.session is None:
            raise FmchatError("no model is loaded")
        done = False
        try:
            for ev in self.session.turn(text):
                if isinstance(ev, TurnStarted):
                    self._autosave()  # the user message is on disk before generation starts
                elif isinstance(ev, TurnDone):
                    done = True
                    self._autosave()  # the reply, as soon as it is complete (or cancelled)
                yield ev
        except FmchatError:
            raise
        except Exception as exc:
            raise TurnFailed(describe(exc)) from exc
        finally:
            self._autosave(snapshot=done)

    def run_turn(self, text: str) -> TurnDone:
        """A whole turn (scripts, benchmarks, tests)."""
        return run_to_done(self.turn(text))

    def cancel(self) -> None:
        """Stop the reply (or restore prefill) under way within one token or chunk; safe from any thread."""
        if self.session is not None:
            self.session.cancel()

    def new_chat(self) -> None:
        """An empty conversation on the same model; the next message starts a new saved session."""
        if self.session is not None:
            self.session.reset()
        if self.recorder is not None:
            self.recorder.detach()

    def forget_saved(self) -> None:
        """Stop saving to the current saved session (say, it was deleted): the next message starts a new one."""
        if self.recorder is not None:
            self.recorder.detach()

    def retry(self) -> str | None:
        """Take back the last exchange; returns the user text to send again (None: nothing to retry)."""
        return None if self.session is None else self.session.pop_last_exchange()

    # ------------------------------------------------------------------ saving
    @property
    def store(self):
        """The session store (opened on first use), or None when sessions are not saved here."""
        if self._store is None:
            from fmchat.store import Store

            arg = self._store_arg
            self._store = arg if isinstance(arg, Store) else Store(None if arg is None else Path(arg))
        return self._store

    @property
    def session_id(self) -> str | None:
        return None if self.recorder is None else self.recorder.session_id

    def _recorder(self):
        if not self.save or self.session is None:
            return None
        if self.recorder is None:
            from fmchat.store import Recorder

            self.recorder = Recorder(self.store, spec=self.config.model)
        return self.recorder

    def _autosave(self, snapshot: bool = False) -> None:
        """Commit what changed in the conversation; after a reply, the KV snapshot too. A failure is reported
        once through ``warn`` and the chat goes on."""
        try:
            recorder = self._recorder()
            if recorder is None:
                return
            recorder.sync(self.session)
            if snapshot and recorder.session_id is not None:
                from fmchat.store import kvsnap

                kvsnap.save(self.store, recorder.session_id, self.session, cap_bytes=self.config.kv_snapshot_cap * 2**20)
        except Exception as exc:  # noqa: BLE001  saving must never take the chat down
            if not self._save_warned:
                self._save_warned = True
                self.warn(f"could not save the session: {describe(exc)}")

    def _update_saved_settings(self) -> None:
        if self.recorder is None or self.recorder.session_id is None:
            return
        try:
            self.recorder.update_settings(self.session)  # the saved chat records what it now runs with
        except Exception as exc:  # noqa: BLE001
            self.warn(f"could not save the session settings: {describe(exc)}")

    # ------------------------------------------------------------------ saved sessions
    def resolve(self, session_id: str) -> str:
        return self.store.resolve(session_id)

    def saved_model(self, session_id: str) -> str | None:
        """The --model a saved session was started with (None when it did not say)."""
        rec = self.store.get(self.resolve(session_id))
        return rec.settings.get("model_spec") or None

    def open_saved(self, session_id: str, system: str | None = None) -> Resumed:
        """Put a saved conversation into this chat (messages, window, memory note, system prompt) and keep
        saving to it (unless ``save`` is off). ``system``: a system prompt given now (a flag), which wins over the
        saved one. The KV cache is empty until ``rebuild_cache``."""
        from fmchat.store import open_session

        if self.session is None:
            raise FmchatError("no model is loaded")
        recorder, rec = open_session(self.store, self.resolve(session_id), self.session, spec=self.config.model)
        self.recorder = recorder if self.save else None
        if system is not None:
            self.session.configure(system=system)
        self.config = replace(self.config, system=self.session.config.system)
        return Resumed(rec.id, rec.title, len(rec.messages), rec.model or "")

    def rebuild_cache(self, opened: Resumed, progress: Callable[[int, int], None] | None = None) -> Resumed:
        """Bring the KV cache up to the transcript: from the snapshot where it matches, then prefill the rest
        (``progress(done, total)``; ``cancel()`` stops between chunks)."""
        from fmchat.store import rebuild_cache

        r = rebuild_cache(self.session, self.store, opened.session_id, progress)
        return replace(opened, restored=r["restored"], prefilled=r["prefilled"], snapshot=r["snapshot"])

    def resume(self, session_id: str, progress: Callable[[int, int], None] | None = None, system: str | None = None) -> Resumed:
        """``open_saved`` then ``rebuild_cache``."""
        return self.rebuild_cache(self.open_saved(session_id, system), progress)

    def close(self) -> None:
        if self.session is not None:
            self.session.backend.close()
        if self._store is not None and self._store is not self._store_arg:
            self._store.close()
