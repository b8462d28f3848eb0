"""The typed messages the app's workers post to the UI thread (a turn's are ``widgets.chat``'s).

Workers never touch widgets: they post one of these, and the app's handler runs on the UI thread.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

from fmchat.backends.base import Backend
from fmchat.config import RunConfig
from fmchat.conversation import Resumed


@dataclass
class LoadStep(Message):
    """A load/convert step; ``fraction`` None when it has no measurable progress."""

    step: str
    fraction: float | None


@dataclass
class Loaded(Message):
    """``load_backend(config)`` returned ``backend``: the UI thread attaches it to the conversation."""

    backend: Backend
    config: RunConfig


@dataclass
class LoadFailed(Message):
    """The load failed (one line); ``previous``: the settings the running chat keeps (None on a first load)."""

    error: str
    config: RunConfig
    previous: RunConfig | None


@dataclass
class SessionOpened(Message):
    """``open_saved`` put a saved conversation into the chat; its KV cache is being rebuilt."""

    opened: Resumed


@dataclass
class RestoreStep(Message):
    """Prefill progress of a restore (tokens)."""

    done: int
    total: int


@dataclass
class RestoreDone(Message):
    """The restore ended: ``result`` (None with ``error`` when it could not open or rebuild)."""

    result: Resumed | None
    error: str | None
    seconds: float


@dataclass
class SaveWarning(Message):
    """The conversation could not save (reported once by the service); the chat goes on."""

    error: str
