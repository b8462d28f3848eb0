"""Command palette entries that set one choice of a ``RunConfig`` field: one entry per choice the settings pane
offers (old names left out), the one in use marked, and those that cannot be used now (``choice_reason``: this
machine, the backend, the rest of the settings) marked unavailable with the reason, as the pane disables them.

Choosing one is the app's ``choose_setting``: refused with the reason, or applied exactly as the settings pane's
Apply is (``FmchatApp.apply_settings``: the one-line ``settings: a → b`` note, a reload where the field needs one).
"""

from __future__ import annotations

from dataclasses import dataclass

from fmchat.config import RunConfig, field_info

from .screens.settings import choice_reason, offered

# How each decode path reads in the palette (short: the palette is one line per entry); the registry's label is
# the entry's help.
DECODE_TITLES = {
    "auto": "auto (compiled step when ready, eager meanwhile)",
    "eager": "eager (one PyTorch call per op)",
    "compiled": "compiled (at load)",
}
PALETTE_FIELDS = {"compile": DECODE_TITLES}  # the fields with palette entries, and how their choices read


@dataclass(frozen=True)
class ChoiceCommand:
    """One palette entry: the choice ``value`` of field ``name``."""

    name: str
    value: str
    title: str
    help: str
    current: bool
    reason: str  # why it cannot be used now ('' when it can)


def current_choice(config: RunConfig, name: str) -> str:
    """The choice ``config`` holds for ``name``, an old name read as the choice it names ("off" -> "eager")."""
    _, alias_of = offered(name)
    value = getattr(config, name)
    return alias_of.get(value, value)


def choice_commands(config: RunConfig, name: str) -> list[ChoiceCommand]:
    """The palette's entries for field ``name`` with the app's settings ``config``."""
    label = field_info(name).metadata["label"]  # "Decode path"
    titles = PALETTE_FIELDS.get(name, {})
    current = current_choice(config, name)
    out = []
    for c in offered(name)[0]:
        reason = choice_reason(config, name, c)
        title = f"{label}: {titles.get(c.value, c.value)}"
        if reason:
            title, help_text = f"{title} — unavailable", f"unavailable: {reason}"
        elif c.value == current:
            title, help_text = f"{title} — current", f"in use now · {c.label}"
        else:
            help_text = c.label
        out.append(ChoiceCommand(name, c.value, title, help_text, c.value == current, reason))
    return out


def choice_problem(config: RunConfig, name: str, value: str) -> str:
    """Why ``value`` cannot be chosen for ``name`` now, as one line ('' when it can)."""
    label = field_info(name).metadata["label"].lower()
    for c in offered(name)[0]:
        if c.value == value:
            reason = choice_reason(config, name, c)
            return f"{label} {value} is not available: {reason}" if reason else ""
    return f"unknown {label} '{value}'"
