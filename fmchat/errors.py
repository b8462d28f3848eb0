"""The errors fmchat shows to people. Each is one line of text; the CLI prints it and exits with ``exit_code``,
the TUI shows it as a note. Anything else that escapes is a bug, reported as ``TypeName: message``.

This module imports nothing from fmchat, so every room can raise these without importing another room.
"""

from __future__ import annotations


class FmchatError(Exception):
    """A failure worded for the user (one line). ``exit_code``: what the CLI exits with."""

    exit_code = 2


class UserError(FmchatError):
    """Bad input: a flag, a file, a choice that cannot be used here."""


class ModelNotFound(UserError):
    """The model cannot be found locally, or is not one fmchat can chat with."""


class UnknownChoice(UserError):
    """A backend, kernel, quantization, policy... that does not exist or is not available here."""


class BackendError(FmchatError):
    """A backend failed at run time (a server refused or dropped the stream...). The session is left as it was."""

    exit_code = 1


class StoreError(FmchatError):
    """The session store cannot be used (newer schema, unreadable file...)."""


class UnknownSession(StoreError):
    """No saved session has that id (or the prefix is ambiguous)."""


class SettingsError(UserError):
    """The settings file cannot be read."""


def describe(exc: BaseException) -> str:
    """One line for any exception: the message of ours, ``TypeName: message`` for anything else."""
    if isinstance(exc, FmchatError):
        return str(exc)
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
