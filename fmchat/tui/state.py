"""The app's state: one value of ``AppState``, moved only along ``TRANSITIONS`` (``FmchatApp._enter``)."""

from __future__ import annotations

from enum import Enum


class AppState(Enum):
    """What the app is doing: one value, changed only by ``FmchatApp._enter``.

    STARTING    constructed, not mounted yet                     -> LOADING
    LOADING     the first load runs; no chat yet                 -> READY | RESTORING (--session) | NO_MODEL
    NO_MODEL    the first load failed; F2 picks another model    -> LOADING
    READY       a chat is loaded and idle                        -> GENERATING | RESTORING | SWITCHING
    GENERATING  ChatView's worker runs a turn                    -> READY
    RESTORING   a worker opens a saved session and rebuilds its KV cache -> READY
    SWITCHING   a worker loads the backend new settings need; the chat stays on the old one -> READY

    Data that waits for the app to be idle (READY, or NO_MODEL) is not state: one message typed while
    loading or restoring (``_queued``, sent on READY) and deferred actions (``_deferred``, run first).
    """

    STARTING = "starting"
    LOADING = "loading"
    NO_MODEL = "no model"
    READY = "ready"
    GENERATING = "generating"
    RESTORING = "restoring"
    SWITCHING = "switching"


TRANSITIONS: dict[AppState, frozenset[AppState]] = {
    AppState.STARTING: frozenset({AppState.LOADING}),
    AppState.LOADING: frozenset({AppState.READY, AppState.RESTORING, AppState.NO_MODEL}),
    AppState.NO_MODEL: frozenset({AppState.LOADING}),
    AppState.READY: frozenset({AppState.GENERATING, AppState.RESTORING, AppState.SWITCHING}),
    AppState.GENERATING: frozenset({AppState.READY}),
    AppState.RESTORING: frozenset({AppState.READY}),
    AppState.SWITCHING: frozenset({AppState.READY}),
}
IDLE = (AppState.READY, AppState.NO_MODEL)


def check_transition(old: AppState, new: AppState) -> AppState:
    """``new``, when the app may go there from ``old``; a bug in the app otherwise."""
    if new not in TRANSITIONS[old]:
        raise RuntimeError(f"fmchat app: {old.name} -> {new.name} is not a transition")
    return new
